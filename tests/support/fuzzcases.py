"""Fuzz cases that are the same in every process: one explicit seed per case.

Why not hypothesis with ``derandomize=True``: its derandomized runs are only repeatable for the
same code and the same loaded modules.  Its provider replaces a few percent of its integer,
bytes and text draws by constants it collects from the source of every imported local module
(here the ``proxy`` package), and the constants it picks consume the shared random stream, so
which of proxy's modules a process has imported (one test file vs. the whole suite), or a new
literal anywhere in proxy/, changes most later inputs.  Here case ``i`` of a test is made from
``Draw(case_seed(i, salt, TENANTGATE_FUZZ_SEED))``, a pure function of the test's name, ``i``
and that variable (default "0"; set another value to explore other inputs, keep it to
reproduce a failure).

Usage::

    @fuzz_cases(300, lambda d: {"data": d.binary(max_size=300)})
    def test_random_bytes(data):
        ...

makes ``test_random_bytes()`` run the check on 300 inputs; a failure names the test, the case
number, the seed, TENANTGATE_FUZZ_SEED, the input, and how to rerun it
(``support.fuzzcases.rerun(test, seed)``).  :func:`plan` lists every case of a test module and
:func:`assert_same_plan_in_fresh_processes` checks that two interpreters with different hash
seeds and different modules of the project loaded plan the same inputs.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import random
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def case_seed(index: int, salt: int = 0, run: str = "0") -> int:
    """The seed of case ``index`` of the sequence ``salt`` (``run`` picks another family of
    sequences): a pure function of its arguments, the same in every process, whatever
    PYTHONHASHSEED, the modules loaded or the code under test."""
    digest = hashlib.blake2b(f"{run}/{salt}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def run_seed() -> str:
    """TENANTGATE_FUZZ_SEED: which family of inputs (default "0")."""
    return os.environ.get("TENANTGATE_FUZZ_SEED", "0")


# Characters that have tripped text handling before: case mappings that change length,
# combining marks, zero-width and direction controls, BOM, line/paragraph separators, NEL,
# replacement character, an emoji, quoting characters.
_TRICKY = "\u0130\u0131\u00df\ufb00\u0301\u200b\u200d\u202e\ufeff\ufffd\u2028\u2029\u0085\u00a0\U0001f600'\"\\;$\n\r\t"
_SPECIAL_BYTES = bytes([0, 1, 0x0A, 0x7F, 0x80, 0xFE, 0xFF])


def _edges(lo: int, hi: int) -> list[int]:
    near = {lo, lo + 1, hi - 1, hi, 0, 1, -1}
    for k in (7, 8, 15, 16, 31, 32, 63):
        near |= {2**k, 2**k - 1, -(2**k), -(2**k) + 1}
    return sorted(v for v in near if lo <= v <= hi)


class Draw(random.Random):
    """random.Random plus the draws the fuzz tests use, biased like hypothesis' strategies
    towards small sizes, the bounds and boundary values."""

    def size(self, min_size: int, max_size: int) -> int:
        r = self.random()
        if r < 0.04:
            return min_size
        if r < 0.08:
            return max_size
        if r < 0.6:  # short
            mean = max(1.0, min(5.0, (max_size - min_size) / 4))
            return min(max_size, min_size + 1 + int(self.expovariate(1 / mean)))
        return self.randint(min_size, max_size)

    def integer(self, lo: int, hi: int) -> int:
        r = self.random()
        if r < 0.15:
            return self.choice(_edges(lo, hi))
        if r < 0.45:
            v = self.randint(-256, 256)
            if lo <= v <= hi:
                return v
        return self.randint(lo, hi)

    def boolean(self) -> bool:
        return self.random() < 0.5

    def binary(self, max_size: int, min_size: int = 0) -> bytes:
        n = self.size(min_size, max_size)
        if self.random() < 0.5:
            return self.randbytes(n)
        return bytes(self.choice(_SPECIAL_BYTES) if self.random() < 0.3 else self.randrange(256) for _ in range(n))

    def character(self) -> str:
        """Any code point but a surrogate (like hypothesis' st.characters())."""
        r = self.random()
        if r < 0.45:
            return chr(self.randint(0x20, 0x7E))
        if r < 0.5:
            return chr(self.choice([*range(0x00, 0x20), 0x7F]))
        if r < 0.65:
            return chr(self.randint(0x80, 0x24F))
        if r < 0.8:
            c = self.randint(0x250, 0xFFFF - 0x800)
            return chr(c + 0x800 if c >= 0xD800 else c)  # skip the surrogates
        if r < 0.9:
            return chr(self.randint(0x10000, 0x10FFFF))
        return self.choice(_TRICKY)

    def text(self, max_size: int, min_size: int = 0, alphabet: str | None = None, exclude: str = "") -> str:
        out = []
        for _ in range(self.size(min_size, max_size)):
            c = self.choice(alphabet) if alphabet else self.character()
            while c in exclude:
                c = self.character()
            out.append(c)
        return "".join(out)

    def lists(self, element: Callable[[], Any], min_size: int = 0, max_size: int = 8) -> list:
        return [element() for _ in range(self.size(min_size, max_size))]

    def optional(self, value: Callable[[], Any]) -> Any:
        return None if self.random() < 0.5 else value()

    def dictionary(self, key: Callable[[], Any], value: Callable[[], Any], max_size: int) -> dict:
        out: dict = {}
        for _ in range(self.size(0, max_size)):
            out.setdefault(key(), value())
        return out


@dataclass(frozen=True)
class Case:
    module: str
    test: str
    index: int
    seed: int
    args: dict

    def label(self) -> str:
        """Everything needed to reproduce the case."""
        shown = repr(self.args)
        shown = shown if len(shown) <= 4000 else shown[:4000] + "..."
        return (f"{self.test} case={self.index} seed={self.seed} (TENANTGATE_FUZZ_SEED={run_seed()}; "
                f"rerun: support.fuzzcases.rerun({self.module}.{self.test}, {self.seed}))\n    input: {shown}")

    def record(self) -> list:
        return [self.test, self.index, self.seed, repr(self.args)]


def _salt(module: str, test: str) -> int:
    return zlib.crc32(f"{module}/{test}".encode())


def fuzz_cases(examples: int, inputs: Callable[[Draw], dict]):
    """Decorator: ``check(**inputs(Draw(seed)))`` for ``examples`` case seeds, as a test without
    arguments.  The test keeps ``check``, ``inputs`` and ``cases()`` (its plan) as attributes."""

    def decorate(check):
        module = check.__module__.rpartition(".")[2]

        def cases() -> Iterator[Case]:
            salt, run = _salt(module, check.__name__), run_seed()
            for index in range(examples):
                seed = case_seed(index, salt, run)
                yield Case(module, check.__name__, index, seed, inputs(Draw(seed)))

        def test() -> None:
            for case in cases():
                try:
                    check(**case.args)
                except Exception as e:
                    raise AssertionError(f"fuzz case failed: {case.label()}") from e

        test.__name__ = test.__qualname__ = check.__name__
        test.__module__, test.__doc__ = check.__module__, check.__doc__
        test.check, test.inputs, test.cases = check, inputs, cases
        return test

    return decorate


def rerun(test, seed: int) -> None:
    """Run the check of a @fuzz_cases ``test`` on the input of ``seed`` (from a failure's label)."""
    test.check(**test.inputs(Draw(seed)))


def plan(module) -> Iterator[Case]:
    """Every case of the @fuzz_cases tests of ``module`` (a module or its name), in order."""
    if isinstance(module, str):
        module = importlib.import_module(module)
    for value in list(vars(module).values()):
        if callable(getattr(value, "cases", None)) and hasattr(value, "inputs"):
            yield from value.cases()


# More of the project loaded, as later in a session or in a whole-suite run.
OTHER_IMPORTS = ("proxy.policy.engine", "proxy.catalog_sync", "proxy.server")

_PLAN_SCRIPT = """
import importlib, json, sys
for name in sys.argv[2:]:
    importlib.import_module(name)
from support import fuzzcases
json.dump([c.record() for c in fuzzcases.plan(sys.argv[1])], sys.stdout)
"""


def plan_in_fresh_process(module: str, hash_seed: str, *imports: str, env: dict | None = None) -> list[list]:
    """The records of ``plan(module)`` made in a new interpreter that has imported ``imports``
    first (``env``: more environment, e.g. the number of cases)."""
    tests = Path(__file__).resolve().parent.parent
    full_env = {**os.environ, **(env or {}), "PYTHONHASHSEED": hash_seed,
                "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT, module, *imports], env=full_env, cwd=tests,
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def assert_same_plan_in_fresh_processes(module: str, expected_cases: int, env: dict | None = None,
                                        imports: Sequence[str] = OTHER_IMPORTS) -> list[list]:
    """Two fresh processes (PYTHONHASHSEED 1 and 2, the second with ``imports`` loaded first)
    plan exactly the same ``expected_cases`` inputs for ``module``; returns the plan."""
    first = plan_in_fresh_process(module, "1", env=env)
    second = plan_in_fresh_process(module, "2", *imports, env=env)
    assert len(first) == len(second) == expected_cases, (len(first), len(second), expected_cases)
    for a, b in zip(first, second):
        assert a == b, f"the inputs differ between two processes, first at\n  {a}\n  {b}"
    return first

"""Shared machinery of the client conformance suite (issue 14).

Each client program is an ordinary application of one stack.  It runs twice, directly against
PostgreSQL as the RLS-bound role ``rls_acme`` (schema ``direct``) and through tenantgate as acme's
application user; :func:`compare` requires identical transcripts except for the differences that
``expected_differences.yaml`` lists, each documented in docs/limitations.md.  :class:`Recorder`
keeps the outcome per stack for the README's "Works with" table (``works_with.py``).
"""

from __future__ import annotations

import difflib
import json
import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROGRAMS = HERE / "programs"
RESULTS = ROOT / "build" / "clients-run.json"
DIRECT_ROLE, DIRECT_PW = "rls_acme", "rls-acme-pw"
TENANT_TABLES = ("customers", "orders", "order_items")


def expected_differences() -> list[dict]:
    return yaml.safe_load((HERE / "expected_differences.yaml").read_text()) or []


def documented(program: str, line: str) -> bool:
    """True when ``line`` differs because of a refusal documented in docs/limitations.md."""
    limitations = (ROOT / "docs" / "limitations.md").read_text()
    for e in expected_differences():
        if e["program"] == program and e["line"] in line:
            assert e["documented_by"] in limitations, e
            return True
    return False


def run(cmd: list[str], env_extra: dict | None = None, cwd: Path = ROOT, timeout: int = 180) -> str:
    """Run a client program; it must exit 0.  Returns its standard output."""
    env = dict(os.environ, PGCONNECT_TIMEOUT="10")
    env.update(env_extra or {})
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert out.returncode == 0, f"{cmd[:3]} failed:\n{out.stderr[-3000:]}\n{out.stdout[-2000:]}"
    return out.stdout


def compare(program: str, direct: str, proxied: str) -> None:
    """The two transcripts are identical, but for documented differences."""
    diff = [ln for ln in difflib.unified_diff(direct.splitlines(), proxied.splitlines(), "direct", "tenantgate",
                                              lineterm="", n=0)
            if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
    unexplained = [ln for ln in diff if not documented(program, ln[1:])]
    assert not unexplained, "\n".join(difflib.unified_diff(direct.splitlines(), proxied.splitlines(),
                                                          "direct", "tenantgate", lineterm=""))


def assert_ran_on_acme_only(transcript: str) -> None:
    """The program ran to its end on acme's rows and never saw globex's."""
    assert transcript.rstrip().endswith("done"), transcript[-2000:]
    assert "Wile E. Coyote" in transcript
    assert "Hank Scorpio" not in transcript and "Homer Simpson" not in transcript


@dataclass
class Outcome:
    stack: str       # "psycopg 3 (sync, async, pipeline, COPY, psycopg_pool)"
    language: str    # "Python", "Node.js", "Java", "command line"
    version: str     # the driver's version as the run saw it
    result: str      # "same output", "same output but for documented differences", "failed", …
    differences: int = 0


class Recorder:
    """Outcomes of this run, merged into build/clients-run.json by stack name."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Outcome] = {}

    def record(self, stack: str, language: str, version: str, direct: str | None = None,
               proxied: str | None = None, program: str | None = None) -> None:
        differences = 0
        if direct is not None and proxied is not None:
            differences = sum(1 for ln in difflib.unified_diff(direct.splitlines(), proxied.splitlines(), n=0)
                              if ln[:1] in "+-" and not ln.startswith(("+++", "---")))
        if direct is None:
            result = "runs without errors (through tenantgate only)"
        else:
            result = "same output" if not differences else "same output but for documented differences"
        self.outcomes[stack] = Outcome(stack, language, version, result, differences)

    def failed(self, stack: str, language: str, version: str) -> None:
        self.outcomes[stack] = Outcome(stack, language, version, "failed")

    def save(self) -> None:
        if not self.outcomes:
            return
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        previous.update({k: asdict(v) for k, v in self.outcomes.items()})
        RESULTS.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")


def checked_run(works_with: Recorder, stack: str, language: str, version: str, program: str,
                direct_cmd: list[str], proxied_cmd: list[str], **kw) -> tuple[str, str]:
    """Run a program both ways, compare, and record the outcome (a failure is recorded too)."""
    try:
        direct = run(direct_cmd, **kw)
        proxied = run(proxied_cmd, **kw)
        assert_ran_on_acme_only(proxied)
        compare(program, direct, proxied)
    except BaseException:
        works_with.failed(stack, language, version)
        raise
    works_with.record(stack, language, version, direct, proxied, program)
    return direct, proxied

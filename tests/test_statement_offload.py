"""The forked analysis of long statements (proxy/statement_offload.py), without a network."""

from __future__ import annotations

import asyncio
import os
import time

from proxy.seam import Refuse
from proxy.session.relay import too_long
from proxy.statement_offload import Computed, analyse, run_forked


def test_the_result_comes_back_from_the_child():
    parent = os.getpid()
    r = asyncio.run(run_forked(lambda: ("pid", os.getpid() != parent), 10))
    assert isinstance(r, Computed) and r.value == ("pid", True)


def test_a_child_over_budget_is_killed_and_the_statement_refused_57014():
    t0 = time.monotonic()
    r = asyncio.run(run_forked(lambda: time.sleep(30), 0.5))
    assert isinstance(r, Refuse) and r.sqlstate == "57014" and "statement_cpu_budget_s" in r.hint
    assert time.monotonic() - t0 < 5


def test_a_crash_in_the_child_fails_closed():
    def boom():
        raise ValueError("no")
    r = asyncio.run(run_forked(boom, 10))
    assert isinstance(r, Refuse) and r.sqlstate == "XX000"


def test_thread_fallback_and_size_refusal():
    assert asyncio.run(analyse(lambda: 42, 5)) == 42
    r = asyncio.run(analyse(lambda: time.sleep(2), 0.2))
    assert isinstance(r, Refuse) and r.sqlstate == "57014"
    r = too_long(2048, 1024)
    assert r.sqlstate == "54000" and "limits.max_statement_bytes" in r.hint

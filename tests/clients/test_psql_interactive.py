"""Interactive psql on a terminal, directly and through tenantgate (issue 14): ``\\watch``
stopped with Ctrl-C, and Ctrl-C cancelling a running ``SELECT pg_sleep(30)`` (psql sends a
CancelRequest on a new connection; tenantgate routes it to the statement's backend) in
autocommit and inside a transaction, after which the session keeps working; and Tab
completion (psql's catalog queries) with the line editor on.

psql runs on a pseudo-terminal (``psql_terminal.py``): only an interactive psql survives Ctrl-C.
The two transcripts must be identical once ``\\watch``'s timestamp lines are removed and its
repeated, identical result blocks are counted once (how many rounds run before Ctrl-C, and
whether Ctrl-C lands in a round's query or in its pause, is timing, not behaviour).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import psycopg
import pytest

from .conformance import compare
from .psql_terminal import PROMPT, PsqlTerminal

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")

STACK = "psql interactive (\\watch, Ctrl-C cancel)"
COMPLETION_STACK = "psql interactive (Tab completion)"
WATCH_TITLE = re.compile(r"^.* \(every 0\.2s\)$")
CANCELLED = "ERROR:  canceling statement due to user request"


def _psql_version() -> str:
    return subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.split()[2]


def _watch_rounds(text: str) -> tuple[int, str]:
    """(rounds printed, the distinct result blocks in order) of a ``\\watch`` run."""
    rounds = sum(1 for ln in text.splitlines() if WATCH_TITLE.match(ln))
    blocks: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.splitlines()
                 if ln.strip() and not WATCH_TITLE.match(ln) and ln not in ("Cancel request sent", CANCELLED)]
        if lines and "\n".join(lines) not in blocks:
            blocks.append("\n".join(lines))
    return rounds, "\n\n".join(blocks)


def _wait_until_running(admin_dsn: str, marker: str) -> None:
    """Until PostgreSQL runs the statement carrying ``marker`` (then Ctrl-C hits a running statement)."""
    with psycopg.connect(admin_dsn, autocommit=True) as a:
        for _ in range(600):
            if a.execute("SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s "
                         "AND pid <> pg_backend_pid()", [f"%{marker}%"]).fetchone():
                return
            time.sleep(0.1)
    raise AssertionError(f"the statement {marker} never started")


def session_transcript(dsn: str, admin_dsn: str) -> str:
    t = PsqlTerminal(dsn)
    out: list[str] = []
    try:
        out.append("-- plain query\n" + t.command("SELECT count(*) AS orders FROM orders WHERE order_id < 1000;"))

        t.command("SELECT count(*) AS orders, min(status) AS first_status FROM orders WHERE order_id < 1000 "
                  "\\watch 0.2", wait=False)
        t.wait_for(r"\(1 row\)\n\n", count=3)  # three rounds printed: Ctrl-C now most likely hits the pause
        rounds, blocks = _watch_rounds(t.ctrl_c())
        assert rounds >= 3, rounds
        out.append("-- \\watch, stopped with Ctrl-C\n" + blocks)
        out.append("-- after \\watch\n" + t.command("SELECT 'still here' AS session;"))

        t.command("SELECT pg_sleep(30) AS cancel_me_autocommit;", wait=False)
        _wait_until_running(admin_dsn, "cancel_me_autocommit")
        out.append("-- Ctrl-C of a running statement\n" + t.ctrl_c())
        out.append("-- after the cancel\n"
                   + t.command("SELECT name FROM customers WHERE customer_id < 1000 ORDER BY 1;"))

        out.append("-- in a transaction\n" + t.command("BEGIN;")
                   + t.command("UPDATE customers SET name = name WHERE customer_id = 1;"))
        t.command("SELECT pg_sleep(30) AS cancel_me_in_tx;", wait=False)
        _wait_until_running(admin_dsn, "cancel_me_in_tx")
        out.append("-- Ctrl-C in the transaction\n" + t.ctrl_c())
        out.append("-- the transaction is aborted\n" + t.command("SELECT 1 AS one;"))
        out.append("-- rolled back\n" + t.command("ROLLBACK;")
                   + t.command("SELECT count(*) AS customers FROM customers WHERE customer_id < 1000;"))
    finally:
        assert t.close() == 0, t.out[-2000:]
    return "\n".join(out)


def test_psql_watch_and_ctrl_c_behave_the_same_direct_and_through_tenantgate(demo, direct_dsn, works_with):
    try:
        direct = session_transcript(direct_dsn, demo.admin)
        proxied = session_transcript(demo.app("acme"), demo.admin)
        # what the user sees: acme's rows only, the statement cancelled, the session alive
        assert proxied.count("Cancel request sent") == 2, proxied
        assert proxied.count(CANCELLED) == 2, proxied
        assert "current transaction is aborted" in proxied, proxied
        assert "Wile E. Coyote" in proxied and "Hank Scorpio" not in proxied, proxied
        assert "      3 | open" in proxied, proxied  # acme's 3 orders, not globex's
        compare("test_psql_interactive.py", direct, proxied)
    except BaseException:
        works_with.failed(STACK, "command line", _psql_version())
        raise
    works_with.record(STACK, "command line", _psql_version(), direct, proxied)


def _clean(text: str) -> str:
    """Without the terminal's bells, backspaces and carriage returns."""
    return re.sub(r"[\x07\x08\r]", "", text)


def completion_transcript(dsn: str) -> str:
    """Tab completion runs psql's catalog queries: a unique table name, then a list of candidates."""
    t = PsqlTerminal(dsn, readline=True)
    out: list[str] = []
    try:
        start = len(t.out)
        t.keys("SELECT count(*) AS n FROM cust\t")
        t.wait_for("customers", since=start)
        t.keys(" WHERE customer_id < 1000;\n")
        t.wait_for(r"\(1 row\)", since=start)
        t.wait_for(re.escape(PROMPT), since=t.out.index("(1 row)", start))
        out.append("-- Tab completes a table name\n" + _clean(t.out[start:]).split(PROMPT)[0])

        start = len(t.out)
        t.keys("SELECT 1 FROM order\t\t")
        listing = t.wait_for(r"order_items\s+orders", since=start)
        candidates = re.search(r"^.*order_items.*$", _clean(listing), re.M).group(0).split()
        out.append("-- Tab Tab lists the candidates\n" + " ".join(candidates))
        t.keys("\x15\n")  # Ctrl-U and Enter: an empty line
    finally:
        assert t.close() == 0, t.out[-2000:]
    return "\n".join(out)


def test_psql_tab_completion_behaves_the_same_direct_and_through_tenantgate(demo, direct_dsn, works_with):
    try:
        direct = completion_transcript(direct_dsn)
        proxied = completion_transcript(demo.app("acme"))
        assert "FROM customers  WHERE customer_id < 1000;" in proxied, proxied
        assert "\n 2\n(1 row)" in proxied, proxied  # acme's two customers (globex has two more)
        assert proxied.endswith("order_items orders"), proxied
        compare("test_psql_interactive.py", direct, proxied)
    except BaseException:
        works_with.failed(COMPLETION_STACK, "command line", _psql_version())
        raise
    works_with.record(COMPLETION_STACK, "command line", _psql_version(), direct, proxied)

"""SIGHUP reloads the tenancy rules atomically (issue 15 item 2): validated, classified against
the catalog, swapped in with an empty rewrite cache, and logged in one line saying what changed.
A broken or missing rules file keeps the old rules, logs the error and counts a failed reload."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import psycopg

from support.pool import serve_pooled

ROOT = Path(__file__).resolve().parent.parent


def _wait_log(px, needle: str, start: int) -> str:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = px.log_path.read_text()[start:]
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never logged; log:\n{px.log_path.read_text()[-3000:]}")


def _products(conn) -> str:
    try:
        return str(conn.execute("SELECT count(*) FROM products").fetchone()[0])
    except psycopg.Error as e:
        return f"refused {e.sqlstate}"


def test_sighup_reloads_rules_atomically_and_a_bad_file_keeps_the_old_rules(demo, tmp_path):  # noqa: F811
    rules = tmp_path / "rules.yaml"
    shutil.copy(ROOT / "rules" / "tenancy.yaml", rules)
    original = rules.read_text()
    with serve_pooled(demo, tmp_path / "px", {"mode": "session"}, rules_file=str(rules), verbose=True) as px:
        with psycopg.connect(px.dsn("acme"), autocommit=True) as conn:
            assert _products(conn).isdigit()  # a shared table
            # products is no longer shared: it has no tenant column, so it is not readable
            rules.write_text(original.replace("shared_tables:\n  - products", "shared_tables: []"))
            mark = len(px.log_path.read_text())
            px.proc.send_signal(signal.SIGHUP)
            line = _wait_log(px, "rules reloaded from", mark)
            assert "shared_tables -products" in line
            assert not _products(conn).isdigit()  # the same session, the next statement: new rules
            # a broken file: refused, logged, the rules in force stay
            rules.write_text("tenant_column: [not, a, name\n")
            mark = len(px.log_path.read_text())
            px.proc.send_signal(signal.SIGHUP)
            _wait_log(px, "reload failed, keeping the old configuration", mark)
            assert not _products(conn).isdigit()
            # a missing file: the same
            rules.unlink()
            mark = len(px.log_path.read_text())
            px.proc.send_signal(signal.SIGHUP)
            _wait_log(px, "reload failed, keeping the old configuration", mark)
            # and back: products is shared again, from the next statement
            rules.write_text(original)
            mark = len(px.log_path.read_text())
            px.proc.send_signal(signal.SIGHUP)
            assert "shared_tables +products" in _wait_log(px, "rules reloaded from", mark)
            assert _products(conn).isdigit()
        # new sessions get the rules in force too
        with psycopg.connect(px.dsn("globex"), autocommit=True) as conn:
            assert _products(conn).isdigit()

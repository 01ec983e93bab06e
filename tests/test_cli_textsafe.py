"""Terminal injection: what a person chose (a grant's reason, a comment, a tenant name) reaches the CLI's
output with every control character escaped, and `audit export` keeps one record per line.

Through the real CLI: a requester writes a reason with ANSI escapes that, printed raw, repaint the
approver's screen so a globex/write/8h request reads acme/read/30m.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.control import add_people, control_env

ROOT = Path(__file__).resolve().parent.parent

# Erase the line, go to its start, print a harmless-looking grant; a one-byte CSI (U+009B); a newline
# that forges a row; a carriage return; bidi override; and the line separators JSON readers trip on.
EVIL = ("TICKET-1\x1b[2K\r\x1b[1A  tenant:     acme\n  access:     read\n  duration:   30m"
        "\x9b2J\u202egnp.exe\u2028next\u2029para\u0085nel\x07")
BAD_CHARS = ["\x1b", "\r", "\x9b", "\u202e", "\u2028", "\u2029", "\u0085", "\x07"]


@pytest.fixture
async def cli(pg, make_db, tmp_path):
    env = await control_env(pg, make_db, "textsafe")
    plane = env.plane()
    await plane.start()
    await add_people(plane, ("alice", ("approver",)), ("bob", ("operator",)))
    await plane.register_tenant("globex")  # no data DSN in this config: only registered tenants take grants
    await plane.close()
    cfg = tmp_path / "tenantgate.yaml"
    cfg.write_text(yaml.safe_dump({"control": {"dsn": env.dsn}, "grants": {"max_duration": "8h"}}))
    return str(cfg)


def tg(cfg: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args, "--config", cfg], input=stdin,
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def _clean(text: str) -> None:
    for ch in BAD_CHARS:
        assert ch not in text, (repr(ch), text)


async def test_grant_show_and_list_escape_the_reason(cli):
    r = tg(cli, "grant", "request", "--tenant", "globex", "--access", "write", "--for", "8h", "--reason", EVIL,
           "--as", "bob", "--password-stdin", stdin="bob-pw\n")
    assert r.returncode == 0, r.stderr
    _clean(r.stdout + r.stderr)
    gid = r.stdout.split()[1].rstrip(":")
    for args in (("grant", "show", gid), ("grant", "list")):
        r = tg(cli, *args)
        assert r.returncode == 0, r.stderr
        _clean(r.stdout)
        assert "TICKET-1\\u001b[2K\\u000d" in r.stdout  # `list` shortens the reason, then escapes it
    show = tg(cli, "grant", "show", gid).stdout
    lines = show.splitlines()
    # the reason stays on its own line: no forged "tenant:" / "access:" lines
    assert [ln for ln in lines if ln.startswith("  tenant:")] == ["  tenant:     globex"]
    assert [ln for ln in lines if ln.startswith("  access:")] == ["  access:     write"]
    assert "\\u000a  access:     read" in show and "\\u009b2J" in show and "\\u202e" in show
    # the approver's comment is escaped too
    r = tg(cli, "grant", "approve", gid, "--comment", "ok\x1b]0;title\x07", "--as", "alice", "--password-stdin",
           stdin="alice-pw\n")
    assert r.returncode == 0, r.stderr
    _clean(r.stdout)
    assert "\\u001b]0;title" in tg(cli, "grant", "show", gid).stdout
    # --json stays exact JSON: the value round-trips
    assert json.loads(tg(cli, "grant", "show", gid, "--json").stdout)["reason"] == EVIL


async def test_errors_quoting_user_input_are_escaped(cli):
    r = tg(cli, "grant", "show", "999", "--as", "x\x1b[31m")  # argparse error echoes the argument
    _clean(r.stdout + r.stderr)
    r = tg(cli, "grant", "request", "--tenant", "acme\x1b[2J", "--access", "read", "--for", "99h",
           "--reason", "x", "--as", "bob", "--password-stdin", stdin="bob-pw\n")
    assert r.returncode != 0
    _clean(r.stdout + r.stderr)


async def test_audit_export_is_one_record_per_line(cli):
    r = tg(cli, "grant", "request", "--tenant", "globex", "--access", "read", "--for", "1h", "--reason", EVIL,
           "--as", "bob", "--password-stdin", stdin="bob-pw\n")
    assert r.returncode == 0, r.stderr
    r = tg(cli, "audit", "export")
    assert r.returncode == 0, r.stderr
    _clean(r.stdout)
    # str.splitlines() breaks on U+2028, U+2029, U+0085 (as do many line-based readers): one record a line
    lines = r.stdout.splitlines()
    records = [json.loads(x) for x in lines]
    assert [x["seq"] for x in records] == list(range(1, len(records) + 1))
    reasons = [x["detail"].get("reason") for x in records if x["type"] == "grant.requested"]
    assert reasons == [EVIL]  # escaped in the line, exact in the value

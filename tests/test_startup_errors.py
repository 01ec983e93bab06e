"""`tenantgate serve` fails to start with one line that names the problem and the fix, and a
non-zero exit, never a Python traceback (issue 15 items 1 and 3)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from proxy.pgcluster import free_port
from proxy.scram import make_verifier

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules" / "tenancy.yaml"


def _config(tmp_path: Path, pg, db: str, **over) -> Path:
    raw = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "backend": {"host": pg.host, "port": pg.port, "database": db, "user": "postgres",
                    "password": pg.superuser_password, "sslmode": "disable"},
        "users": [{"name": "app_acme", "scram_verifier": make_verifier("pw"), "tenant": "acme"}],
        "rules_file": str(RULES),
    }
    raw.update(over)
    path = tmp_path / "tenantgate.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _serve(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", "serve", "--config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def _one_line(out: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in out.stderr, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


@pytest.fixture(scope="module")
def db(make_db):
    name, _ = make_db("starterr")
    return name


def test_application_users_without_rules_file_do_not_start(tmp_path, pg, db):
    path = _config(tmp_path, pg, db)
    raw = yaml.safe_load(path.read_text())
    del raw["rules_file"]
    path.write_text(yaml.safe_dump(raw))
    out = _serve(path)
    assert out.returncode == 2
    line = _one_line(out)
    assert "rules_file is not set" in line and "app_acme" in line and "rules/tenancy.yaml" in line


def test_a_missing_rules_file_is_named(tmp_path, pg, db):
    out = _serve(_config(tmp_path, pg, db, rules_file="no/such/rules.yaml"))
    assert out.returncode == 1
    line = _one_line(out)
    assert line.startswith("tenantgate: ") and "no/such/rules.yaml" in line


def test_control_schema_not_installed(tmp_path, pg, db):
    out = _serve(_config(tmp_path, pg, db, control={"dsn": pg.dsn(database=db)}))
    assert out.returncode == 1
    line = _one_line(out)
    assert "is not installed" in line and "operator add" in line  # how to install it


def test_port_in_use(tmp_path, pg, db):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _serve(_config(tmp_path, pg, db, listen={"host": "127.0.0.1", "port": port}))
    assert out.returncode == 1
    line = _one_line(out)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "address already in use" in line


def test_postgresql_unreachable(tmp_path, pg, db):
    path = _config(tmp_path, pg, db)
    raw = yaml.safe_load(path.read_text())
    raw["backend"]["port"] = free_port()
    path.write_text(yaml.safe_dump(raw))
    out = _serve(path)
    assert out.returncode == 1
    line = _one_line(out)
    assert "cannot reach PostgreSQL" in line and "backend.port" in line

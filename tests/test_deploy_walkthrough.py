"""deploy/README.md's walk-through, run literally (issue 15): every ```sh walkthrough block, in
order, against a new PostgreSQL 15 cluster with TLS.  If a documented step is wrong, this fails.

The test provides what the walk-through says must exist first: a new cluster with TLS, the
database ``app`` with the application's tables (the demo schema, as migrations would make it),
and the variables the walk-through names.  Blocks marked ``background`` are started and left
running (``serve``); the test waits for its banner.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from proxy.pgcluster import free_port, make_cluster

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "deploy" / "README.md"
BLOCK = re.compile(r"^ *```sh walkthrough( background)?\n(.*?)^ *```", re.M | re.S)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("psql") is None,
                                reason="the walk-through uses openssl and psql, which are missing here")


def blocks() -> list[tuple[bool, str]]:
    out = []
    for m in BLOCK.finditer(README.read_text()):
        out.append((bool(m.group(1)), textwrap.dedent(m.group(2))))
    return out


def test_the_walkthrough_has_the_steps_the_issue_names():
    text = "\n".join(b for _, b in blocks())
    for step in ("bootstrap.sql", "tenantgate.example.yaml", "serve", "operator add", "grant request",
                 "grant approve", "tenantgate.grant", "doctor"):
        assert step in text, step


def test_deploy_readme_walkthrough_from_a_new_cluster(tmp_path):
    cluster = make_cluster(tmp_path / "pg", "walk")
    server = None
    try:
        cluster.enable_tls()
        cluster.psql("CREATE DATABASE app")
        cluster.psql((ROOT / "proxy" / "sql" / "demo_schema.sql").read_text(), database="app")
        tg_dir = tmp_path / "etc-tenantgate"
        env = dict(os.environ)
        env.update({
            "REPO": str(ROOT), "TG_DIR": str(tg_dir), "PGADMIN": cluster.dsn(database="app"),
            "DB_HOST": cluster.host, "DB_PORT": str(cluster.port), "DB_CA": str(cluster.cert_file),
            "TG_PORT": str(free_port()), "METRICS_PORT": str(free_port()),
            "TENANTGATE": f"{sys.executable} -m proxy",
            "ALICE_PW": "alice-walk-pw-1", "BOB_PW": "bob-walk-pw-2", "CAROL_PW": "carol-walk-pw-3",
            "PGCONNECT_TIMEOUT": "10",
        })
        env.pop("PGOPTIONS", None)
        envfile = tmp_path / "walk.env"
        outputs = []
        for background, body in blocks():
            # one shell per block, as a reader would paste it; exported variables carry on
            script = f"set -euo pipefail\n[ -f {envfile} ] && source {envfile}\n{body}\nexport -p > {envfile}\n"
            if background:
                log = open(tmp_path / "serve.log", "w")
                # its own process group: the shell's child (tenantgate) is stopped with it below
                server = subprocess.Popen(["bash", "-c", script], env=env, cwd=ROOT, start_new_session=True,
                                          stdout=subprocess.PIPE, stderr=log, text=True)
                line = server.stdout.readline()
                assert "listening on" in line, (line, (tmp_path / "serve.log").read_text())
                continue
            out = subprocess.run(["bash", "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                                 timeout=180)
            assert out.returncode == 0, (f"walk-through step failed:\n{body}\n--- stderr:\n{out.stderr}"
                                         f"\n--- stdout:\n{out.stdout[:2000]}")
            outputs.append(out.stdout)
        acme = cluster.psql("SELECT count(*) FROM customers WHERE tenant_id = 'acme'", database="app").strip()
        lines = [ln.strip() for o in outputs for ln in o.splitlines()]
        assert lines.count(acme) >= 2, outputs  # the tenant's query and the operator's, acme's rows only
    finally:
        if server is not None:
            # SIGTERM to bash alone left tenantgate running after the suite (reparented to init)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
        cluster.destroy()


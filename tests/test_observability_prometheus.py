"""deploy/prometheus/ and grafana/ against real Prometheus and a real tenantgate.

* promtool (Debian's prometheus package) checks the alert rules and the scrape config;
* every metric name the dashboards and alert rules use appears in a real /metrics scrape;
* a real Prometheus server scrapes a running tenantgate, evaluates the alert rules without
  errors, and its HTTP API returns tenantgate series.

The package is installed by ``make test`` (target ``prometheus``).  When it is missing here, the
tests try ``apt-get install prometheus`` once and skip, with apt's error as the reason, only when
that fails.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from support.observability import obs_served  # noqa: F401 - session fixture
from proxy.pgcluster import free_port
from support.promql import promql_metric_names

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))

_install_error: list[str] = []


def prometheus_binaries() -> tuple[str, str]:
    """(promtool, prometheus) paths; installs Debian's package when missing, else skips with the reason."""
    if not (shutil.which("promtool") and shutil.which("prometheus")) and not _install_error:
        if shutil.which("apt-get") is None:
            _install_error.append("apt-get is not available on this system")
        else:
            r = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                               "--no-install-recommends prometheus", shell=True, capture_output=True, text=True,
                               timeout=900)
            subprocess.run("systemctl stop prometheus; systemctl disable prometheus", shell=True,
                           capture_output=True)
            if r.returncode != 0:
                _install_error.append(f"apt-get install prometheus failed ({r.returncode}): {r.stderr[-500:]}")
    promtool, prometheus = shutil.which("promtool"), shutil.which("prometheus")
    if not (promtool and prometheus):
        reason = _install_error[0] if _install_error else "promtool/prometheus not on PATH after installing"
        pytest.skip(f"Debian's prometheus package cannot be installed: {reason}")
    return promtool, prometheus


# ------------------------------------------------------------------------------------------ promtool


def test_promtool_check_rules():
    promtool, _ = prometheus_binaries()
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    n = sum(len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    assert f"SUCCESS: {n} rules found" in r.stdout


def test_promtool_check_config(tmp_path):
    promtool, _ = prometheus_binaries()
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    assert cfg["rule_files"] == ["/etc/prometheus/alerts.yml"]  # where deploy/compose mounts it
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    cfg["rule_files"] = [str(tmp_path / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([promtool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


# ------------------------------------------------------------------------------------------ names




def used_metric_names() -> dict[str, set[str]]:
    """{metric name: {where it is used}} over every dashboard and alert rule."""
    used: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for p in dash["panels"]:
            for t in p.get("targets", []):
                for n in promql_metric_names(t["expr"]):
                    used.setdefault(n, set()).add(f"{path.name}: {p['title']}")
        for var in dash.get("templating", {}).get("list", []):
            q = var.get("query")
            q = q.get("query") if isinstance(q, dict) else q
            m = re.match(r"label_values\((\w+),", q or "")
            if m:
                used.setdefault(m.group(1), set()).add(f"{path.name}: ${var['name']}")
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            for n in promql_metric_names(rule["expr"]):
                used.setdefault(n, set()).add(f"alerts.yml: {rule['alert']}")
    return used


def test_promql_names_extraction():
    assert promql_metric_names('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y"}[5m]))) > 4 * 3600 '
                        'and on (instance) time() - b') == {"a_bucket", "b"}


def test_every_dashboard_and_alert_metric_is_in_a_real_scrape(obs_served):  # noqa: F811
    from prometheus_client.parser import text_string_to_metric_families

    scrape = obs_served.scrape()
    exported = scrape.sample_names()
    for family in text_string_to_metric_families(scrape.text):  # names as Prometheus stores the series
        name = family.name
        exported |= {
            "counter": {f"{name}_total"},
            "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
            "summary": {name, f"{name}_sum", f"{name}_count"},
        }.get(family.type, {name})
    used = used_metric_names()
    assert len(used) > 30
    missing = {n: sorted(w) for n, w in used.items() if n not in exported and n != "up"}
    assert not missing, f"used but not exported by tenantgate: {missing}"
    assert "up" in used  # Prometheus' own per-target series: "tenantgate down"


# ------------------------------------------------------------------------------------------ a real server


def _api(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    doc = json.loads(urllib.request.urlopen(url, timeout=5).read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def test_real_prometheus_scrapes_tenantgate_and_evaluates_the_rules(obs_served, tmp_path):  # noqa: F811
    _, prometheus = prometheus_binaries()
    port = free_port()
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "alerts.yml")],
        "scrape_configs": [{"job_name": "tenantgate",
                            "static_configs": [{"targets": [f"127.0.0.1:{obs_served.metrics_port}"]}]}],
    }))
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        build = up = []
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                build = _api(port, 'tenantgate_build_info{job="tenantgate"}')
                up = _api(port, 'up{job="tenantgate"}')
            except OSError:
                build = up = []
            if build and up:
                break
            time.sleep(0.5)
        assert build, "Prometheus did not scrape tenantgate_build_info"
        assert build[0]["metric"]["version"] and build[0]["value"][1] == "1"
        assert up[0]["value"][1] == "1"
        assert _api(port, 'tenantgate_backend_up{job="tenantgate"}')[0]["value"][1] == "1"
        # the alert rules evaluate against the real series without errors
        deadline = time.monotonic() + 20
        while True:
            doc = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).read())
            rules = [r for g in doc["data"]["groups"] for r in g["rules"]]
            if rules and all(r.get("lastEvaluation", "").startswith("2") and not r["lastEvaluation"].startswith(
                    "0001") for r in rules):
                break
            assert time.monotonic() < deadline, rules
            time.sleep(0.5)
        bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
        assert not bad, bad
        assert not [r["name"] for r in rules if r["state"] == "firing" and r["name"] == "TenantgateDown"]
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert proc.returncode is not None

"""deploy/ and grafana/: the files parse, agree with each other and with the code.

* compose, Kubernetes, Prometheus and Grafana files parse (PyYAML, multi-doc; JSON);
* they refer only to images we know (postgres:15, prom/prometheus, grafana/grafana,
  python for the Dockerfile, and tenantgate built from deploy/Dockerfile);
* ports agree with tenantgate's config (listen, metrics, backend);
* every embedded tenantgate config validates against proxy/config.py;
* every command line they run parses with tenantgate's own CLI parser;
* every metric name in alerts.yml and the dashboard is one proxy/metrics.py
  exports (histogram _bucket/_sum/_count included) or one prometheus-client
  itself exports (process_*, python_*), or Prometheus' ``up``;
* the systemd units are hardened and pass ``systemd-analyze verify``.

promtool is not used: Debian's prometheus package is ~96 MB installed, so the
rule files' structure and PromQL metric names are checked here instead.
"""

from __future__ import annotations

import configparser
import ipaddress
import json
import os
import tempfile
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from proxy.bootstrap import render_hba
from proxy.cli import build_parser
from proxy.config import Config, load_config
from support.promql import exported_metric_names, promql_metric_names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S_DIR = DEPLOY / "kubernetes"
TENANTGATE_IMAGE = re.compile(r"^tenantgate:[\w.-]+$")
KNOWN_IMAGES = [re.compile(p) for p in (r"^postgres:15(\.\d+)?$", r"^prom/prometheus:v\d+\.\d+\.\d+$",
                                         r"^grafana/grafana:\d+\.\d+\.\d+$")]


def image_ok(image: str) -> bool:
    return bool(TENANTGATE_IMAGE.match(image)) or any(p.match(image) for p in KNOWN_IMAGES)


def parses_as_tenantgate_command(argv: list[str]) -> None:
    """The argv (after the program name) is a valid tenantgate command line."""
    args = build_parser().parse_args(argv)
    assert callable(args.func)


# --- metric names ---------------------------------------------------------------------------

def test_promql_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(tenantgate_query_duration_seconds_bucket'
            '{job="x", a=~"y|z"}[5m] offset 1h))) > 5 * up and on (instance) process_open_fds')
    assert promql_metric_names(expr) == {"tenantgate_query_duration_seconds_bucket", "up", "process_open_fds"}


def test_exported_names_include_histogram_series():
    names = exported_metric_names()
    assert {"tenantgate_query_duration_seconds_bucket", "tenantgate_statements_refused_total",
            "process_resident_memory_bytes"} <= names
    assert "tenantgate_no_such_metric" not in names


# --- Prometheus ----------------------------------------------------------------------------


def load_alerts():
    return yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())


def test_prometheus_config_scrapes_tenantgate_metrics_port():
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "tenantgate")
    cfg = load_config(COMPOSE_DIR / "tenantgate.yaml")
    assert job["static_configs"][0]["targets"] == [f"tenantgate:{cfg.metrics.port}"]


def test_alert_rules_structure_and_metric_names():
    alerts = load_alerts()
    known = exported_metric_names()
    names_seen = set()
    seen_alerts = set()
    for group in alerts["groups"]:
        assert set(group) <= {"name", "rules", "interval", "limit"} and group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            assert rule["alert"] not in seen_alerts and re.match(r"^[A-Z][A-Za-z]+$", rule["alert"])
            seen_alerts.add(rule["alert"])
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            if "for" in rule:
                assert re.match(r"^\d+[smh]$", rule["for"])
            expr = rule["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
            used = promql_metric_names(expr)
            assert used, rule["alert"]
            unknown = used - known
            assert not unknown, f"{rule['alert']} uses unknown metrics {unknown}"
            names_seen |= used
    # the alerts the issue asks for are there
    for wanted in ("tenantgate_audit_failures_total", "tenantgate_protocol_errors_total",
                   "tenantgate_statements_refused_total", "tenantgate_backend_connect_errors_total",
                   "tenantgate_rewrite_cache_hits_total", "tenantgate_grant_events_total"):
        assert wanted in names_seen


# --- Grafana --------------------------------------------------------------------------------


def test_grafana_dashboard_uses_only_exported_metrics():
    dash = json.loads((ROOT / "grafana" / "dashboards" / "tenantgate.json").read_text())
    known = exported_metric_names()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    used = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = promql_metric_names(t["expr"])
            assert names and not (names - known), f"panel {p['title']!r}: unknown {names - known}"
            used |= names
            assert t["datasource"]["uid"] == "prometheus"
    for var in dash["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        metric = re.match(r"label_values\((\w+),", query).group(1)
        assert metric in known
    titles = " | ".join(p["title"].lower() for p in panels)
    for word in ("connections", "refused by sqlstate", "latency", "cache hit ratio", "rewrite time", "audit",
                 "active grants", "grant events", "terminated operator sessions", "exports", "purges", "bytes",
                 "protocol errors", "cancel requests"):
        assert word in titles, word
    assert {"tenantgate_query_duration_seconds_bucket", "tenantgate_rewrite_seconds_bucket"} <= used


def test_grafana_provisioning_matches_compose_mounts():
    ds = yaml.safe_load((ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((ROOT / "grafana" / "provisioning" / "dashboards" / "tenantgate.yml").read_text())
    path = prov["providers"][0]["options"]["path"]
    grafana = load_compose()["services"]["grafana"]
    targets = {v.split(":")[1] for v in grafana["volumes"]}
    assert path in targets and "/etc/grafana/provisioning" in targets


# --- compose ---------------------------------------------------------------------------------


def load_compose():
    return yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())


def test_compose_services_images_and_mounts():
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {"postgres", "tenantgate", "prometheus", "grafana"}
    for name, svc in services.items():
        assert image_ok(svc["image"]), f"{name}: unknown image {svc['image']}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (COMPOSE_DIR / src).exists(), f"{name}: mount source {src} missing"
            else:
                assert src in compose["volumes"], f"{name}: named volume {src} not declared"
        for secret in svc.get("secrets", []):
            assert (secret if isinstance(secret, str) else secret["source"]) in compose["secrets"]
    assert services["postgres"]["image"] == "postgres:15"
    build = services["tenantgate"]["build"]
    assert (COMPOSE_DIR / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert (COMPOSE_DIR / compose["configs"]["tenantgate_config"]["file"]).exists()


def test_compose_postgres_is_not_published_and_only_on_internal_network():
    compose = load_compose()
    pg = compose["services"]["postgres"]
    assert "ports" not in pg and "network_mode" not in pg
    assert set(pg["networks"]) == {"backend"}
    assert compose["networks"]["backend"]["internal"] is True
    # only tenantgate shares that network
    on_backend = {n for n, s in compose["services"].items() if "backend" in (s.get("networks") or {})}
    assert on_backend == {"postgres", "tenantgate"}
    # pg_hba admits tenantgate's fixed address, which lies in the backend subnet
    tg_addr = compose["services"]["tenantgate"]["networks"]["backend"]["ipv4_address"]
    subnet = ipaddress.ip_network(compose["networks"]["backend"]["ipam"]["config"][0]["subnet"])
    assert pg["environment"]["TENANTGATE_ADDR"] == f"{tg_addr}/32"
    assert ipaddress.ip_address(tg_addr) in subnet


def test_compose_ports_and_config_agree():
    compose = load_compose()
    cfg = load_config(COMPOSE_DIR / "tenantgate.yaml")
    tg = compose["services"]["tenantgate"]
    assert cfg.backend.host == "postgres" and cfg.backend.port == 5432 and cfg.backend.database == "app"
    assert compose["services"]["postgres"]["environment"]["POSTGRES_DB"] == cfg.backend.database
    assert cfg.backend.user == "tenantgate_app" and cfg.backend.password_file == "/run/secrets/tenantgate_app_password"
    published = [p.rsplit(":", 1)[-1] for p in tg["ports"]]
    assert published == [str(cfg.listen.port)]
    assert all(p.startswith("127.0.0.1:") for s in compose["services"].values() for p in s.get("ports", []))
    assert tg["configs"][0]["target"] == "/etc/tenantgate/tenantgate.yaml"
    parses_as_tenantgate_command(tg["command"])
    assert tg["command"][-1] == tg["configs"][0]["target"]
    assert cfg.control.dsn_env in tg["environment"]
    assert f"@postgres:{cfg.backend.port}/{cfg.backend.database}" in tg["environment"][cfg.control.dsn_env]


@pytest.fixture(scope="module")
def plain_cluster():
    from proxy.pgcluster import make_cluster

    # not under pytest's basetemp: concurrent pytest runs reset /tmp/pytest-of-<user> to 0700,
    # and the postgres OS user must reach the cluster directory
    base = Path(tempfile.mkdtemp(prefix="tenantgate-compose-init-"))
    os.chmod(base, 0o755)
    cluster = make_cluster(base, "init")
    try:
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


def test_compose_init_script_bootstraps_and_renders_hba(plain_cluster, tmp_path):
    """Run initdb/20-tenantgate-bootstrap.sh for real: psql (passwords via \\getenv) and the sed rendering."""
    cluster = plain_cluster
    cluster.psql("CREATE DATABASE app")
    cluster.psql((COMPOSE_DIR / "initdb" / "10-example-schema.sql").read_text(), database="app")
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (tmp_path / "app_pw").write_text("app-pw\n")
    (tmp_path / "ctl_pw").write_text("ctl-pw\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTGATE_")}
    env.update(PGHOST=str(cluster.sockdir), PGPORT=str(cluster.port), POSTGRES_USER="postgres", POSTGRES_DB="app",
               PGDATA=str(pgdata), TENANTGATE_ADDR="172.28.0.10/32", TENANTGATE_POSTGRES_DIR=str(DEPLOY / "postgres"),
               TENANTGATE_APP_PASSWORD_FILE=str(tmp_path / "app_pw"),
               TENANTGATE_CONTROL_PASSWORD_FILE=str(tmp_path / "ctl_pw"))
    run = subprocess.run(["sh", str(COMPOSE_DIR / "initdb" / "20-tenantgate-bootstrap.sh")], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    forced = cluster.psql("SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class "
                          "WHERE relforcerowsecurity AND relrowsecurity", database="app")
    assert forced.strip() == "customers,order_items,orders"
    check = subprocess.run(["psql", "-X", "-qAt", f"postgresql://tenantgate_app:app-pw@127.0.0.1:{cluster.port}/app",
                            "-c", "SELECT current_user"], capture_output=True, text=True, env=env, timeout=30)
    assert check.stdout.strip() == "tenantgate_app", check.stderr

    def rules(text):
        return [ln.split() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]

    assert rules((pgdata / "pg_hba.conf").read_text()) == rules(render_hba("172.28.0.10/32", "app"))


# --- Dockerfile ------------------------------------------------------------------------------


def test_dockerfile_copies_existing_paths_and_exposes_config_ports():
    text = (DEPLOY / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms == ["python:3.11-slim-bookworm"]
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        *sources, _dest = line.split()
        for src in sources:
            assert (ROOT / src).exists(), f"COPY source {src} missing"
    exposed = {int(p) for p in re.search(r"^EXPOSE\s+(.+)$", text, re.M).group(1).split()}
    defaults = Config()
    assert exposed == {defaults.listen.port, defaults.metrics.port}
    entry = json.loads(re.search(r"^ENTRYPOINT\s+(\[.+\])$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD\s+(\[.+\])$", text, re.M).group(1))
    assert entry == ["tenantgate"]
    parses_as_tenantgate_command(cmd)
    assert "TENANTGATE_DEPLOY_DIR=/opt/tenantgate/deploy" in text and "COPY deploy/postgres ./deploy/postgres" in text


def test_example_config_validates():
    cfg = load_config(DEPLOY / "tenantgate.example.yaml")
    assert cfg.backend.user == "tenantgate_app" and cfg.backend.sslmode == "verify-full"
    assert cfg.tls.required and cfg.control.schema_ == "tenantgate_control"
    assert cfg.rules_file == "/opt/tenantgate/rules/tenancy.yaml"  # the image's rules (deploy/Dockerfile)


# --- Kubernetes -----------------------------------------------------------------------------


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), path
                docs.append(doc)
    return docs


def by_kind(kind: str) -> list[dict]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"]


def k8s_config() -> Config:
    cm = by_kind("ConfigMap")[0]
    return Config.model_validate(yaml.safe_load(cm["data"]["tenantgate.yaml"]))


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    files = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    kinds = {d["kind"] for d in k8s_docs()}
    assert {"Deployment", "Service", "ConfigMap", "Secret", "NetworkPolicy", "CronJob"} <= kinds


def test_k8s_workloads_images_commands_and_references():
    cfg = k8s_config()
    secret_keys = set(by_kind("Secret")[0]["stringData"])
    configmaps = {d["metadata"]["name"] for d in by_kind("ConfigMap")}
    for doc in by_kind("Deployment") + by_kind("CronJob"):
        spec = pod_spec(doc)["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            assert image_ok(c["image"]) and TENANTGATE_IMAGE.match(c["image"])
            parses_as_tenantgate_command(c["args"])
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            env = {e["name"]: e for e in c.get("env", [])}
            for e in env.values():
                assert e["valueFrom"]["secretKeyRef"]["key"] in secret_keys
            for needed in (cfg.backend.password_env, cfg.control.dsn_env, cfg.tokens.hmac_key_env):
                assert needed in env, f"{doc['metadata']['name']}: {needed} not set"
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            assert c["args"][-1] in mounts  # the --config file is mounted
            for m in c["volumeMounts"]:
                assert m["name"] in volumes
            for path in (cfg.audit.signing_key_file, cfg.backend.sslrootcert):
                assert any(path.startswith(mp.rstrip("/") + "/") for mp in mounts), path
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
            if "secret" in v:
                assert {i["key"] for i in v["secret"]["items"]} <= secret_keys


def test_k8s_ports_agree_with_config():
    cfg = k8s_config()
    dep = by_kind("Deployment")[0]
    container = pod_spec(dep)["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"postgres": cfg.listen.port, "metrics": cfg.metrics.port}
    svc = by_kind("Service")[0]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in ports
    assert pod_spec(dep)["metadata"]["annotations"]["prometheus.io/port"] == str(cfg.metrics.port)
    assert container["args"] == ["serve", "--config", "/etc/tenantgate/tenantgate.yaml"]
    assert pod_spec(dep)["spec"]["terminationGracePeriodSeconds"] > cfg.timeouts.drain_s


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policy_admits_only_tenantgate_pods_to_postgres():
    cfg = k8s_config()
    policies = [p for p in by_kind("NetworkPolicy")
                if _selects(p["spec"]["podSelector"], {"app.kubernetes.io/name": "postgresql"})]
    assert len(policies) == 1
    pol = policies[0]["spec"]
    assert pol["policyTypes"] == ["Ingress"]
    tenantgate_pods = [pod_spec(d)["metadata"]["labels"] for d in by_kind("Deployment") + by_kind("CronJob")]
    for rule in pol["ingress"]:
        assert [p["port"] for p in rule["ports"]] == [cfg.backend.port]
        assert rule["from"], "an ingress rule without 'from' admits everyone"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}  # no namespaceSelector / ipBlock
            assert peer["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "tenantgate"}
    for labels in tenantgate_pods:
        assert any(_selects(peer["podSelector"], labels) for rule in pol["ingress"] for peer in rule["from"])
    assert cfg.backend.host == "postgresql"


def test_cronjob_runs_purge_expired():
    cron = by_kind("CronJob")[0]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert len(cron["spec"]["schedule"].split()) == 5
    args = pod_spec(cron)["spec"]["containers"][0]["args"]
    assert args[:2] == ["tenant", "purge-expired"]


# --- systemd --------------------------------------------------------------------------------

SYSTEMD = DEPLOY / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string((SYSTEMD / name).read_text())
    return parser


def test_systemd_units_are_hardened_and_run_valid_commands():
    main = unit("tenantgate.service")["Service"]
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "ProtectHome": "yes", "User": "tenantgate", "CapabilityBoundingSet": "",
                       "ExecReload": "/bin/kill -HUP $MAINPID", "KillSignal": "SIGTERM"}.items():
        assert main[key] == value, key
    exec_start = shlex.split(main["ExecStart"])
    assert exec_start[0].endswith("/tenantgate")
    parses_as_tenantgate_command(exec_start[1:])
    assert int(main["TimeoutStopSec"]) > Config().timeouts.drain_s

    purge = unit("tenantgate-purge-expired.service")["Service"]
    assert purge["Type"] == "oneshot" and purge["ProtectSystem"] == "strict" and purge["NoNewPrivileges"] == "yes"
    argv = shlex.split(purge["ExecStart"])[1:]
    assert argv[:2] == ["tenant", "purge-expired"]
    parses_as_tenantgate_command(argv)
    timer = unit("tenantgate-purge-expired.timer")
    assert timer["Timer"]["Unit"] == "tenantgate-purge-expired.service" and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (the structural checks above still ran)")
    names = ["tenantgate.service", "tenantgate-purge-expired.service", "tenantgate-purge-expired.timer"]
    for name in names:  # verify needs an existing ExecStart binary
        text = (SYSTEMD / name).read_text().replace("/opt/tenantgate/venv/bin/tenantgate", "/bin/true")
        (tmp_path / name).write_text(text)
    out = subprocess.run([tool, "verify", "--man=no", *[str(tmp_path / n) for n in names]],
                         capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    assert out.returncode == 0 and not problems, problems

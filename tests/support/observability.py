"""Helpers for the observability tests: a `tenantgate serve` subprocess and its admin endpoint.

:func:`start_serve` writes a config, runs ``python -m proxy serve`` (:func:`support.serve.serve`) and
waits until ``/healthz`` answers and the data port accepts connections.
:class:`ServeProcess` scrapes ``/metrics`` and parses it with prometheus-client's
own text parser.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import time
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from support.serve import Served, serve
from proxy.pgcluster import free_port

ROOT = Path(__file__).resolve().parents[2]


def http_request(port: int, path: str, method: str = "GET", timeout: float = 10) -> tuple[int, dict, bytes]:
    """(status, headers (lower-case names), body) of one request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def parse_metrics(text: str) -> dict[str, list]:
    """{family name: [Sample, ...]} (histogram/counter samples keep their full names)."""
    return {f.name: list(f.samples) for f in text_string_to_metric_families(text)}


class Scrape:
    def __init__(self, text: str):
        self.text = text
        self.families = parse_metrics(text)

    def value(self, sample_name: str, **labels: str) -> float:
        """Sum of the samples named ``sample_name`` whose labels include ``labels``."""
        total = 0.0
        for samples in self.families.values():
            for s in samples:
                if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
        return total

    def sample_names(self) -> set[str]:
        return {s.name for samples in self.families.values() for s in samples}


class ServeProcess:
    """A started `tenantgate serve` (:class:`support.serve.Served`) with its data and admin ports."""

    def __init__(self, served: Served, port: int, metrics_port: int, cfg_path: Path):
        self.served, self.port, self.metrics_port, self.cfg_path = served, port, metrics_port, cfg_path
        self.proc, self.log_path = served.proc, served.log_path

    def scrape(self) -> Scrape:
        status, headers, body = http_request(self.metrics_port, "/metrics")
        assert status == 200, body
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        return Scrape(body.decode())

    def get(self, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
        return http_request(self.metrics_port, path, method)

    def log(self) -> str:
        return self.served.log()

    def stop(self) -> None:
        self.served.stop()


def start_serve(raw_config: dict, workdir: Path, *, verbose: bool = False, timeout: float = 60) -> ServeProcess:
    """Run `tenantgate serve` with ``raw_config`` (listen and metrics ports are filled in); returns once
    it is listening, ``/healthz`` answers and the data port accepts connections."""
    port, metrics_port = free_port(), free_port()
    raw = dict(raw_config)
    raw["listen"] = {"host": "127.0.0.1", "port": port}
    raw["metrics"] = {**raw.get("metrics", {}), "host": "127.0.0.1", "port": metrics_port}
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_path = workdir / "tenantgate.yaml"
    cfg_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    cfg_path.chmod(0o600)
    # a traceback in serve's log fails the running test
    served = ServeProcess(serve(cfg_path, *(["-v"] if verbose else []), log_path=workdir / "serve.log",
                                watch_crashes=True), port, metrics_port, cfg_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.proc.poll() is not None:
            raise RuntimeError(f"tenantgate serve exited early:\n{served.log()}")
        try:
            status, _, _ = http_request(metrics_port, "/healthz", timeout=2)
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
            if status == 200:
                return served
        except OSError:
            pass
        time.sleep(0.1)
    served.stop()
    raise TimeoutError(f"tenantgate serve did not start:\n{served.log()}")


def self_signed_cert(directory: Path) -> tuple[str, str]:
    """(cert file, key file) for CN=localhost, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return str(cert_path), str(key_path)


def json_log_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


@pytest.fixture(scope="session")
def obs_served(demo, tmp_path_factory):
    """A second tenantgate (`serve`) on the demo's config plus TLS, per-tenant labels (all) and
    JSON logs (refusal statements cut at 40 characters).  Needs the ``demo`` fixture imported."""
    work = tmp_path_factory.mktemp("obs-serve")
    raw = yaml.safe_load(demo.config_path.read_text())
    cert, key = self_signed_cert(work)
    raw["tls"] = {"cert_file": cert, "key_file": key}
    raw["metrics"] = {"tenant_labels": "all"}
    raw["logging"] = {"format": "json", "statement_max_chars": 40}
    s = start_serve(raw, work / "serve")
    yield s
    s.stop()

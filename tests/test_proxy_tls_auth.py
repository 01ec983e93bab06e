"""TLS toward clients and PostgreSQL, and every backend authentication method."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import pwd
import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.pgcluster import make_cluster
from proxy.wire import messages as m
from support.proxy_harness import RawClient, ensure_backend_role, errors_in, make_config, start_proxy

PW = "app-pw"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca_and_cert(d: Path, prefix: str = "") -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for localhost / 127.0.0.1 signed by it."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("tenantgate test CA")).issuer_name(_name("tenantgate test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, cert_path, key_path = d / f"{prefix}ca.pem", d / f"{prefix}server.crt", d / f"{prefix}server.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return ca_path, cert_path, key_path


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_ca_and_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def db(pg, make_db):
    name, _ = make_db("tls")
    ensure_backend_role(pg, name)
    return name


# ------------------------------------------------------------------ TLS toward clients

def test_client_tls_require_and_verify_full(pg, db, certs, tmp_path):
    ca, cert, key = certs
    p = start_proxy(make_config(pg, db, {"app": PW}, tls={"cert_file": str(cert), "key_file": str(key)}))
    try:
        with psycopg.connect(p.dsn("app", PW, db, sslmode="require")) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(p.dsn("app", PW, db, sslmode="verify-full", sslrootcert=str(ca))) as conn:
            assert conn.pgconn.ssl_in_use
        other_ca, _, _ = make_ca_and_cert(tmp_path, "other-")
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(p.dsn("app", PW, db, sslmode="verify-full", sslrootcert=str(other_ca)))
        with psycopg.connect(p.dsn("app", PW, db, sslmode="disable")) as conn:  # TLS optional here
            assert not conn.pgconn.ssl_in_use
        # bytes smuggled after SSLRequest, before the handshake: refused
        c = RawClient(p.host, p.port)
        c.send(m.encode_ssl_request() + m.encode_startup({"user": "app"}))
        e = errors_in(c.read_all())
        assert e and e[0]["C"] == "08P01" and "unencrypted data" in e[0]["M"]
    finally:
        p.stop()


def test_client_tls_required(pg, db, certs):
    ca, cert, key = certs
    p = start_proxy(make_config(pg, db, {"app": PW},
                                tls={"cert_file": str(cert), "key_file": str(key), "required": True}))
    try:
        with pytest.raises(psycopg.OperationalError, match="requires TLS"):
            psycopg.connect(p.dsn("app", PW, db, sslmode="disable"))
        with psycopg.connect(p.dsn("app", PW, db, sslmode="verify-full", sslrootcert=str(ca))) as conn:
            assert conn.execute("SELECT 2").fetchone() == (2,)
    finally:
        p.stop()


# ------------------------------------------------------------------ backend: md5, trust, TLS

@pytest.fixture(scope="module")
def auth_cluster(certs):
    """A second cluster with TLS and pg_hba lines for md5, trust and TLS-only roles."""
    base = Path(tempfile.mkdtemp(prefix="tenantgate-auth-"))
    os.chmod(base, 0o755)
    ca, cert, key = certs
    sslc, sslk = base / "server.crt", base / "server.key"
    shutil.copy(cert, sslc)
    shutil.copy(key, sslk)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for f in (sslc, sslk):
            os.chown(f, pw.pw_uid, pw.pw_gid)
    os.chmod(sslk, 0o600)
    cluster = make_cluster(base, "auth", extra_conf=f"ssl = on\nssl_cert_file = '{sslc}'\nssl_key_file = '{sslk}'\n")
    try:
        cluster.psql("CREATE DATABASE a")
        cluster.psql("SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5-pw'")
        cluster.psql("CREATE ROLE trustuser LOGIN")
        cluster.psql("CREATE ROLE tlsonly LOGIN PASSWORD 'tls-pw'")
        hba = cluster.datadir / "pg_hba.conf"
        hba.write_text(
            "host all md5user 127.0.0.1/32 md5\n"
            "host all trustuser 127.0.0.1/32 trust\n"
            "hostssl all tlsonly 127.0.0.1/32 scram-sha-256\n"
            "hostnossl all tlsonly 127.0.0.1/32 reject\n" + hba.read_text()
        )
        cluster.reload()
        yield cluster
    finally:
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("user,password,backend", [
    ("md5user", "md5-pw", {}),
    ("trustuser", None, {}),
    ("tlsonly", "tls-pw", {"sslmode": "require"}),
    ("tlsonly", "tls-pw", {"sslmode": "verify-full", "host": "127.0.0.1"}),
])
def test_backend_auth_methods(auth_cluster, certs, user, password, backend):
    ca = certs[0]
    if backend.get("sslmode") == "verify-full":
        backend = {**backend, "sslrootcert": str(ca)}
    p = start_proxy(make_config(auth_cluster, "a", {"app": PW}, backend_user=user, backend_password=password,
                                backend=backend))
    try:
        with psycopg.connect(p.dsn("app", PW, "a")) as conn:
            row = conn.execute("SELECT current_user, coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)").fetchone()
            assert row == (user, bool(backend.get("sslmode")))
    finally:
        p.stop()


def test_backend_failures_reach_the_client_as_08006(auth_cluster, certs, tmp_path):
    cases = [
        ("md5user", "wrong", {}, "password authentication failed"),
        ("tlsonly", "tls-pw", {"sslmode": "disable"}, "refused the connection"),
        ("trustuser", None, {"port": 1}, "could not connect"),
    ]
    other_ca, _, _ = make_ca_and_cert(tmp_path, "other-")
    cases.append(("tlsonly", "tls-pw", {"sslmode": "verify-full", "sslrootcert": str(other_ca)}, "TLS"))
    for user, password, backend, text in cases:
        p = start_proxy(make_config(auth_cluster, "a", {"app": PW}, backend_user=user, backend_password=password,
                                    backend=backend))
        try:
            c = RawClient(p.host, p.port)
            with pytest.raises(RuntimeError) as e:
                c.startup("app", PW, database="a")
            assert "'C': '08006'" in str(e.value) and text in str(e.value), str(e.value)
        finally:
            p.stop()


def test_backend_sslmode_prefer_falls_back_to_plain(pg, db):
    p = start_proxy(make_config(pg, db, {"app": PW}, backend={"sslmode": "prefer"}))  # this cluster has no TLS
    try:
        with psycopg.connect(p.dsn("app", PW, db)) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (False,)
    finally:
        p.stop()

"""Helpers for the deploy/doctor tests: a hardened test cluster and a source-address relay.

* :func:`make_hardened_cluster` starts a cluster with ``ssl = on`` (a
  self-signed certificate made here with ``cryptography``).
* :class:`Relay` stands in for tenantgate's network position: it listens on
  127.0.0.1 and connects onward to PostgreSQL *from* a chosen loopback source
  address (127.0.0.2), so pg_hba.conf sees that address.  On Linux all of
  127/8 is local, and a plain connection to 127.0.0.1 comes from 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import pwd
import shutil
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.pgcluster import PgCluster, make_cluster

DEMO_SCHEMA = """
CREATE TABLE products (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE customers (
    tenant_id text NOT NULL, id int NOT NULL, name text NOT NULL,
    PRIMARY KEY (tenant_id, id));
CREATE TABLE orders (
    tenant_id text NOT NULL, id int NOT NULL, customer_id int NOT NULL,
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, id));
CREATE TABLE order_items (
    tenant_id text NOT NULL, order_id int NOT NULL, product_id int NOT NULL REFERENCES products, qty int NOT NULL,
    PRIMARY KEY (tenant_id, order_id, product_id),
    FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id));
INSERT INTO products VALUES (1, 'widget'), (2, 'gadget');
INSERT INTO customers VALUES ('acme', 1, 'Wile E.'), ('globex', 1, 'Hank');
INSERT INTO orders VALUES ('acme', 10, 1), ('globex', 20, 1);
INSERT INTO order_items VALUES ('acme', 10, 1, 3), ('globex', 20, 2, 5);
"""

APP_PASSWORD = "app-secret"
CONTROL_PASSWORD = "control-secret"
BACKSTOP_KEY = "5a" * 32  # the backstop key (proxy/backstop.py) the test bootstraps install


def _write_as_postgres(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


def self_signed_cert(hostname: str = "localhost") -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def enable_ssl(cluster: PgCluster) -> None:
    cert, key = self_signed_cert()
    _write_as_postgres(cluster.datadir / "server.crt", cert)
    _write_as_postgres(cluster.datadir / "server.key", key)
    with (cluster.datadir / "postgresql.conf").open("a") as f:
        f.write("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    cluster.reload()


def make_hardened_cluster(base: Path, name: str) -> PgCluster:
    cluster = make_cluster(base, name)
    enable_ssl(cluster)
    return cluster


def socket_admin_dsn(cluster: PgCluster, database: str = "postgres") -> str:
    """Superuser DSN over the cluster's private unix socket (local trust in the tests)."""
    return f"postgresql://postgres@/{database}?host={cluster.sockdir}&port={cluster.port}"


class Relay:
    """A TCP relay on 127.0.0.1 whose outgoing connections come from ``source``."""

    def __init__(self, target_host: str, target_port: int, source: str = "127.0.0.2"):
        self.target = (target_host, target_port)
        self.source = source
        self.port: int | None = None
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server = None

    def start(self) -> "Relay":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("relay did not start")
        return self

    def stop(self) -> None:
        async def _close():
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target, local_addr=(self.source, 0))
        except OSError:
            writer.close()
            return

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                try:
                    dst.close()
                except Exception:  # noqa: BLE001
                    pass

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def dsn(self, user: str, password: str, database: str, sslmode: str = "require") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}?sslmode={sslmode}"


@contextlib.contextmanager
def hardened_cluster_with_relay(prefix: str, name: str):
    """A hardened cluster (not under pytest's basetemp: concurrent pytest runs reset
    /tmp/pytest-of-<user> to 0700, and the postgres OS user must reach the cluster directory)
    whose pg_hba lets 127.0.0.2 in, plus a TCP relay from that address; yields (cluster, relay)."""
    from proxy.bootstrap import install_hba

    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o755)
    cluster = make_hardened_cluster(base, name)
    relay = None
    try:
        install_hba(cluster, "127.0.0.2", database="all", local_auth="trust")
        relay = Relay(cluster.host, cluster.port, source="127.0.0.2").start()
        yield cluster, relay
    finally:
        if relay:
            relay.stop()
        cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)

"""An embedded, throwaway PostgreSQL cluster (for `tenantgate demo` and the tests).

PostgreSQL refuses to run as root, so when we are root every server command
runs as the ``postgres`` OS user via ``runuser``.  The cluster lives in its own
directory and listens on loopback on its own port (and on a private unix
socket directory), so several clusters can run side by side.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

PG_BIN = Path(os.environ.get("TENANTGATE_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _chown_to_postgres(path: Path) -> None:
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(path, pw.pw_uid, pw.pw_gid)


@dataclass
class PgCluster:
    """A PostgreSQL cluster in ``datadir`` listening on 127.0.0.1:``port``.

    The bootstrap superuser is ``postgres`` with password ``superuser_password``;
    host connections need scram-sha-256 (trust only on the private unix socket).
    After :meth:`enable_tls` the DSNs of :meth:`dsn` ask for ``sslmode``
    (``verify-full`` against ``sslrootcert``, the cluster's own certificate).
    """

    datadir: Path
    port: int
    superuser_password: str = "postgres-admin"
    host: str = "127.0.0.1"
    sslmode: str = "disable"
    sslrootcert: str | None = None

    @property
    def sockdir(self) -> Path:
        return self.datadir.parent / (self.datadir.name + ".sock")

    def dsn(self, user: str = "postgres", password: str | None = None, database: str = "postgres") -> str:
        if password is None and user == "postgres":
            password = self.superuser_password
        auth = user if password is None else f"{user}:{password}"
        dsn = f"postgresql://{auth}@{self.host}:{self.port}/{database}?sslmode={self.sslmode}"
        if self.sslrootcert:
            dsn += f"&sslrootcert={quote(self.sslrootcert, safe='/')}"
        return dsn

    @property
    def cert_file(self) -> Path:
        """The server certificate as clients read it (beside the data directory: sslrootcert)."""
        return self.datadir.parent / (self.datadir.name + "-server.crt")

    def enable_tls(self) -> None:
        """A self-signed certificate for ``self.host`` (and localhost), ``ssl = on``; DSNs then use
        ``sslmode=verify-full`` with the certificate as ``sslrootcert``.  Idempotent: an existing
        certificate is kept (a restarted demo keeps the one its clients trust)."""
        crt, key = self.datadir / "server.crt", self.datadir / "server.key"
        if not (crt.exists() and key.exists() and self.cert_file.exists()):
            cert_pem, key_pem = self_signed_certificate(self.host)
            for path, data in ((crt, cert_pem), (key, key_pem)):
                path.write_bytes(data)
                os.chmod(path, 0o600)
                _chown_to_postgres(path)
            self.cert_file.write_bytes(cert_pem)
            os.chmod(self.cert_file, 0o644)
        conf = self.datadir / "postgresql.conf"
        if "# tenantgate embedded cluster: TLS" not in conf.read_text():
            with conf.open("a") as f:
                f.write("\n# tenantgate embedded cluster: TLS\n"
                        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                        "password_encryption = 'scram-sha-256'\n")
            if (self.datadir / "postmaster.pid").exists():
                self.reload()
        self.sslmode = "verify-full"
        self.sslrootcert = str(self.cert_file)

    @property
    def admin_dsn(self) -> str:
        return self.dsn()

    def initdb(self, extra_conf: str = "") -> None:
        if not (PG_BIN / "initdb").exists():
            raise RuntimeError(f"PostgreSQL 15 not found at {PG_BIN}; install the postgresql-15 package")
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        if self.datadir.exists():
            shutil.rmtree(self.datadir)
        self.datadir.mkdir(mode=0o700)
        _chown_to_postgres(self.datadir)
        self.sockdir.mkdir(exist_ok=True)
        _chown_to_postgres(self.sockdir)
        pwfile = self.datadir.parent / (self.datadir.name + ".pw")
        pwfile.write_text(self.superuser_password + "\n")
        os.chmod(pwfile, 0o644)
        try:
            subprocess.run(
                _as_postgres([
                    str(PG_BIN / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                    "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                    "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
                ]),
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        conf = self.datadir / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                "\n# tenantgate embedded cluster\n"
                f"listen_addresses = '{self.host}'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.sockdir}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 300\nshared_buffers = 128MB\n"
                "log_min_messages = warning\nlogging_collector = off\n"
                + extra_conf
            )

    def start(self, timeout: float = 30.0) -> None:
        log = self.datadir.parent / (self.datadir.name + ".log")
        log.touch()
        _chown_to_postgres(log)
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-l", str(log), "-w", "-t", str(int(timeout)), "start"]),
            check=True, stdout=subprocess.DEVNULL,
        )

    def stop(self, mode: str = "fast") -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "stop"]),
            check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.datadir), "reload"]), check=True, stdout=subprocess.DEVNULL)

    def psql(self, sql: str, database: str = "postgres", user: str = "postgres") -> str:
        """Run SQL as a superuser over the private unix socket; returns stdout."""
        out = subprocess.run(
            _as_postgres(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-qAt", "-h", str(self.sockdir), "-p", str(self.port), "-U", user, "-d", database, "-c", sql]),
            capture_output=True, text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"psql failed ({out.returncode}): {out.stderr.strip()}")
        return out.stdout

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run([str(PG_BIN / "pg_isready"), "-h", self.host, "-p", str(self.port)], capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError("PostgreSQL did not become ready")

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.datadir, ignore_errors=True)
        shutil.rmtree(self.sockdir, ignore_errors=True)


def self_signed_certificate(host: str = "127.0.0.1", days: int = 3650) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): a self-signed P-256 certificate naming ``host`` and localhost
    (IP addresses as IP subject alternative names, so libpq's verify-full accepts them)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    alt: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for h in {host, "127.0.0.1"}:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_traversable(path: Path) -> None:
    """When root, let the postgres OS user reach ``path`` (o+x on it and its parents)."""
    if os.geteuid() != 0:
        return
    p = path.resolve()
    while p != p.parent:
        try:
            mode = p.stat().st_mode
            if not mode & 0o001:
                os.chmod(p, mode | 0o001)
        except OSError:
            pass
        p = p.parent


def make_cluster(base: Path, name: str = "pg", extra_conf: str = "") -> PgCluster:
    """initdb and start a fresh cluster under ``base`` on a free port."""
    base.mkdir(parents=True, exist_ok=True)
    ensure_traversable(base)
    cluster = PgCluster(datadir=base / name, port=free_port())
    cluster.initdb(extra_conf=extra_conf)
    cluster.start()
    return cluster

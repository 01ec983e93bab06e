"""One connection from tenantgate to PostgreSQL: connect, TLS, authenticate.

Credentials come from the config (``backend:``) or the environment, never
from the client.  TLS follows libpq's sslmode semantics up to verify-full
with ``sslrootcert``.  Authentication: SCRAM-SHA-256, md5, cleartext, trust.

After :func:`connect_backend` returns, the session takes the socket over by
calling :meth:`BackendProtocol.start_relay` with its data callback.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from dataclasses import dataclass, field
from typing import Callable

from proxy.config import BackendConfig
from proxy.metrics import BACKEND_CONNECT_ERRORS_TOTAL
from proxy.scram import ScramClientExchange, ScramError, md5_password
from proxy.wire import messages as m
from proxy.wire.buffer import ReceiveBuffer
from proxy.wire.errors import ProtocolError

CONNECTION_FAILURE = "08006"
CANNOT_CONNECT = "08001"


class BackendError(Exception):
    """Connecting to or talking with PostgreSQL failed; ``sqlstate`` is for the client."""

    def __init__(self, message: str, sqlstate: str = CONNECTION_FAILURE, *, detail: str | None = None):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.detail = detail


class BackendProtocol(asyncio.Protocol):
    """asyncio Protocol for the PostgreSQL socket.

    While connecting, bytes are buffered and read with :meth:`read_message`.
    After :meth:`start_relay`, every chunk goes straight to the session's sink.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = ReceiveBuffer(max_length=1 << 30)
        self._waiter: asyncio.Future | None = None
        self._sink: Callable[[bytes], None] | None = None
        self.closed = False
        self.on_lost: Callable[[Exception | None], None] | None = None
        self.on_pause_writing: Callable[[], None] | None = None
        self.on_resume_writing: Callable[[], None] | None = None

    # asyncio callbacks
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink(data)
            return
        self._buf.feed(data)
        self._wake()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.closed = True
        self._wake()
        if self.on_lost is not None:
            self.on_lost(exc)

    def pause_writing(self):
        if self.on_pause_writing:
            self.on_pause_writing()

    def resume_writing(self):
        if self.on_resume_writing:
            self.on_resume_writing()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        if self.closed:
            raise BackendError("the server closed the connection unexpectedly")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def read_byte(self) -> bytes:
        while len(self._buf) < 1:
            await self._wait()
        return self._buf.take_rest()

    async def read_message(self) -> tuple[bytes, bytes]:
        while True:
            try:
                msg = self._buf.next_message()
            except ProtocolError as e:
                raise BackendError(f"invalid data from the server: {e.message}")
            if msg is not None:
                return msg
            await self._wait()

    def start_relay(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        rest = self._buf.take_rest()
        if rest:
            sink(rest)

    def detach(self) -> None:
        """Back to buffering (a pooled connection between two clients): no sink, no callbacks.
        Reading resumes: the last client may have paused it (its socket was full) and that
        client's resume_writing would no longer reach this connection, whose next client would
        then never get its replies."""
        self._sink = None
        self.on_lost = None
        self.on_pause_writing = None
        self.on_resume_writing = None
        t = self.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def has_buffered_data(self) -> bool:
        return len(self._buf) > 0

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self, *, terminate: bool = True) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            if terminate and not self.closed:
                try:
                    t.write(m.TERMINATE)
                except Exception:
                    pass
            t.close()


@dataclass
class BackendConnection:
    protocol: BackendProtocol
    pid: int
    secret: int
    parameters: dict[str, str] = field(default_factory=dict)
    tx_status: bytes = b"I"
    tls: bool = False


def backend_ssl_context(cfg: BackendConfig) -> ssl.SSLContext | None:
    mode = cfg.sslmode
    if mode == "disable":
        return None
    if mode in ("verify-ca", "verify-full"):
        ctx = ssl.create_default_context(cafile=cfg.sslrootcert) if cfg.sslrootcert else ssl.create_default_context()
        ctx.check_hostname = mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:  # prefer / require: encrypt without verifying, like libpq
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _error_from(payload: bytes) -> BackendError:
    try:
        f = m.decode_error_fields(payload)
        return BackendError(f"the database server refused the connection: {f.message}", detail=f"SQLSTATE {f.sqlstate}")
    except ProtocolError:
        return BackendError("the database server refused the connection")


async def _authenticate(proto: BackendProtocol, user: str, password: str | None) -> None:
    scram: ScramClientExchange | None = None
    while True:
        t, payload = await proto.read_message()
        if t == b"E":
            raise _error_from(payload)
        if t != b"R":
            raise BackendError(f"unexpected message {t!r} from the server during authentication")
        try:
            code, data = m.decode_auth(payload)
        except ProtocolError:
            raise BackendError("malformed authentication request from the server")
        if code == m.AUTH_OK:
            return
        if code in (m.AUTH_CLEARTEXT, m.AUTH_MD5, m.AUTH_SASL) and password is None:
            raise BackendError("the database server asks for a password, but backend.password is not configured")
        if code == m.AUTH_CLEARTEXT:
            proto.write(m.encode_password(password))
        elif code == m.AUTH_MD5:
            if len(data) != 4:
                raise BackendError("malformed md5 authentication request from the server")
            proto.write(m.encode_password(md5_password(user, password, data)))
        elif code == m.AUTH_SASL:
            mechs = [x.decode(errors="replace") for x in data.split(b"\0") if x]
            if "SCRAM-SHA-256" not in mechs:
                raise BackendError(f"the database server offers no supported SASL mechanism ({', '.join(mechs)})")
            scram = ScramClientExchange(user, password)
            proto.write(m.encode_sasl_initial("SCRAM-SHA-256", scram.client_first()))
        elif code == m.AUTH_SASL_CONTINUE and scram is not None:
            try:
                proto.write(m.encode_sasl_response(scram.server_first(data)))
            except ScramError as e:
                raise BackendError(f"SCRAM exchange with the database server failed: {e}")
        elif code == m.AUTH_SASL_FINAL and scram is not None:
            try:
                scram.server_final(data)
            except ScramError as e:
                raise BackendError(str(e))
        else:
            raise BackendError(f"unsupported authentication method {code} requested by the database server")


def is_unix_socket_dir(host: str) -> bool:
    """``backend.host`` starting with "/" names a unix socket directory, as in libpq."""
    return host.startswith("/")


def _open_connection(loop, factory, cfg: BackendConfig):
    """TCP to host:port, or the unix socket ``<host>/.s.PGSQL.<port>`` when host is a directory
    (cheaper per message than TCP over loopback when tenantgate runs next to PostgreSQL)."""
    if is_unix_socket_dir(cfg.host):
        return loop.create_unix_connection(factory, os.path.join(cfg.host, f".s.PGSQL.{cfg.port}"))
    return loop.create_connection(factory, cfg.host, cfg.port)


async def connect_backend(
    cfg: BackendConfig, database: str, startup_params: dict[str, str], *, password: str | None = None
) -> BackendConnection:
    """Open, secure and authenticate a connection; returns after ReadyForQuery."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(cfg.connect_timeout_s):
            try:
                _, proto = await _open_connection(loop, BackendProtocol, cfg)
            except OSError as e:
                raise BackendError(f"could not connect to the database server at {cfg.host}:{cfg.port}: {e.strerror or e}")
            try:
                return await _handshake(loop, proto, cfg, database, startup_params, password)
            except BaseException:
                proto.close(terminate=False)
                raise
    except TimeoutError:
        BACKEND_CONNECT_ERRORS_TOTAL.inc()
        raise BackendError("timeout while connecting to the database server")
    except BackendError:
        BACKEND_CONNECT_ERRORS_TOTAL.inc()
        raise


#: how every backend session reads SQL text: the way the proxy's lexer (proxy/policy/lexer.py,
#: libpg_query's defaults) reads it.  Sent in the startup packet, so a role's or database's
#: setting (ALTER ROLE ... SET standard_conforming_strings = off) cannot make PostgreSQL read a
#: backslash in '...' as an escape the proxy did not see; RESET ALL returns to these values.
#: Clients cannot change either (proxy/policy/utility_statements.py SAFE_PARAMETERS).
LEXICAL_SETTINGS = {"standard_conforming_strings": "on", "backslash_quote": "safe_encoding"}
#: settings the policy engine resolves names with, sent at every backend connection's startup the
#: same way: ``search_path`` (the rules' schemas), set by proxy.gatekeeper.build_gatekeeper, so
#: a role's or database's search_path (or a schema named like the backend role, "$user") cannot
#: make PostgreSQL resolve a table, function or operator the proxy did not see
PINNED_SETTINGS: dict[str, str] = {}


async def _handshake(loop, proto: BackendProtocol, cfg: BackendConfig, database, startup_params, password):
    tls = False
    # like libpq, sslmode does not apply to unix sockets (local, never on the network)
    ctx = None if is_unix_socket_dir(cfg.host) else backend_ssl_context(cfg)
    if ctx is not None:
        proto.write(m.encode_ssl_request())
        answer = await proto.read_byte()
        if answer == b"S":
            try:
                new_transport = await loop.start_tls(
                    proto.transport, proto, ctx, server_hostname=cfg.host if cfg.sslmode == "verify-full" else None
                )
            except (ssl.SSLError, ConnectionError, OSError) as e:
                raise BackendError(f"TLS with the database server failed: {e}")
            proto.transport = new_transport
            tls = True
        elif answer == b"N":
            if cfg.sslmode != "prefer":
                raise BackendError(f"the database server does not support TLS, but backend.sslmode is {cfg.sslmode}")
        else:
            raise BackendError("invalid answer to SSLRequest from the database server")
    params = {"user": cfg.user, "database": database, **startup_params, **LEXICAL_SETTINGS, **PINNED_SETTINGS}
    proto.write(m.encode_startup(params))
    if password is None:
        password = cfg.resolved_password()
    await _authenticate(proto, cfg.user, password)
    conn = BackendConnection(proto, 0, 0, tls=tls)
    while True:
        t, payload = await proto.read_message()
        if t == b"S":
            try:
                k, v = m.decode_parameter_status(payload)
            except ProtocolError:
                raise BackendError("malformed ParameterStatus from the server")
            conn.parameters[k] = v
        elif t == b"K":
            try:
                conn.pid, conn.secret = m.decode_backend_key_data(payload)
            except ProtocolError:
                raise BackendError("malformed BackendKeyData from the server")
        elif t == b"Z":
            conn.tx_status = payload[:1] or b"I"
            return conn
        elif t == b"E":
            raise _error_from(payload)
        elif t == b"N":
            continue
        else:
            raise BackendError(f"unexpected message {t!r} from the server during startup")


class _CancelProtocol(asyncio.Protocol):
    def __init__(self, done: asyncio.Future):
        self.done = done

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(None)


async def send_cancel(cfg: BackendConfig, pid: int, secret: int, timeout: float = 5.0) -> bool:
    """Send a real CancelRequest for backend ``pid`` to PostgreSQL."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await _open_connection(loop, lambda: _CancelProtocol(done), cfg)
            transport.write(m.encode_cancel_request(pid, secret))
            await done
        return True
    except (OSError, TimeoutError):
        return False

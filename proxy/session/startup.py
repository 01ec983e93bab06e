"""A client session's startup: SSL/GSS/Cancel requests, SCRAM, opening the gate, the backend.

:func:`run_startup` is the one coroutine of a session (bounded by ``timeouts.startup_s``).  It
answers SSLRequest with real TLS when a certificate is configured, GSSENCRequest with ``N``,
routes a CancelRequest, authenticates with SCRAM-SHA-256 against the user registry, applies
connection-time settings (proxy/policy/startup_settings.py), asks the gatekeeper for the
session's gate, connects (or, in transaction mode, borrows) the backend connection, binds it
at the PostgreSQL backstop and runs the gate's setup statements.  Then the session relays.
"""

from __future__ import annotations

import asyncio
import logging

from proxy import backstop
from proxy.backend_link import BackendConnection, BackendError, connect_backend
from proxy.metrics import BACKEND_CONNECTIONS, PROTOCOL_ERRORS_TOTAL, TLS_HANDSHAKE_FAILED, TLS_HANDSHAKE_OK
from proxy.pool import PoolTimeout
from proxy.policy.startup_settings import StartupRefusal, split_startup
from proxy.scram import ScramError, ScramServerExchange, mock_verifier, parse_verifier
from proxy.seam import BackstopBound, PooledGate, SessionKind, SessionRefused, StartupInfo
from proxy.session.pooled import server_query, sync_server
from proxy.session.settings import PooledSettings, shared
from proxy.session_events import note_connection
from proxy.wire import messages as m
from proxy.wire.errors import ProtocolError
from proxy.wire.startup import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    parse_options,
    parse_startup_packet,
)

log = logging.getLogger("tenantgate.session")


class Fatal(Exception):
    """Startup ends with this FATAL error (``outcome`` labels the connection metric)."""

    def __init__(self, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None,
                 *, outcome: str = "refused"):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint
        self.outcome = outcome


async def run_startup(s) -> None:
    """The session's startup, with its timeout and its errors turned into FATAL replies."""
    try:
        async with asyncio.timeout(s.config.timeouts.startup_s):
            await _startup(s)
    except TimeoutError:
        note_connection(s, "startup_timeout", "08P01")
        PROTOCOL_ERRORS_TOTAL.labels(reason="startup_timeout").inc()
        s.fatal("08P01", f"startup timeout: the connection did not complete startup within "
                f"{s.config.timeouts.startup_s:g} s")
    except ProtocolError as e:
        note_connection(s, "protocol_error", e.sqlstate, e.message)
        s.protocol_fatal(e)
    except Fatal as e:
        note_connection(s, e.outcome, e.sqlstate, e.message)
        s.fatal(e.sqlstate, e.message, e.detail, e.hint)
    except (ConnectionError, asyncio.CancelledError):
        s.close()
    except Exception:  # never let one client crash the proxy
        log.exception("session %s: unexpected error during startup", s.session_id)
        note_connection(s, "internal_error", "XX000")
        s.fatal("XX000", "internal error in tenantgate during connection startup")


async def _read_auth_message(s) -> bytes:
    t, payload = await s.read(s.buf.next_message)
    if t == b"X":
        raise ConnectionResetError("client terminated during authentication")
    if t != b"p":
        raise ProtocolError(f"expected SASL response, got message type {t[0]}", reason="auth")
    return payload


async def _startup(s) -> None:
    server = s.server
    while True:
        payload = await s.read(s.buf.next_startup)
        pkt = parse_startup_packet(payload)
        if isinstance(pkt, SSLRequest):
            ctx = server.tls_context
            if ctx is None or s.tls:
                s.transport.write(b"N")
                continue
            if len(s.buf):
                raise ProtocolError("received unencrypted data after SSL request", reason="tls")
            s.transport.write(b"S")
            try:
                s.transport = await s.loop.start_tls(s.transport, s, ctx, server_side=True)
            except (OSError, ConnectionError, Exception) as e:  # handshake failures close the socket
                log.info("session %s: TLS handshake failed: %s", s.session_id, e)
                TLS_HANDSHAKE_FAILED.inc()
                raise ConnectionResetError("TLS handshake failed")
            TLS_HANDSHAKE_OK.inc()
            s.tls = True
            continue
        if isinstance(pkt, GSSENCRequest):
            s.transport.write(b"N")
            continue
        if isinstance(pkt, CancelRequest):
            server.cancels.cancel(pkt.pid, pkt.secret)
            note_connection(s, "cancel_request")
            s.close()
            return
        assert isinstance(pkt, StartupMessage)
        break
    await _authenticate_and_connect(s, pkt)


async def _authenticate(s, pkt: StartupMessage):
    """SCRAM-SHA-256; returns the user's record (None: unknown user, after a failed exchange)."""
    server = s.server
    user = pkt.user
    record = await server.gatekeeper.users.lookup(user)
    peer = s.transport.get_extra_info("peername")
    s.client_addr = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "unix"
    guard = getattr(server.gatekeeper, "auth_guard", None)  # operator throttling (proxy.control.auth_guard)
    if guard is not None:
        try:
            await guard.before(user, record, s.client_addr)
        except SessionRefused as e:
            raise Fatal(e.sqlstate, e.message, e.detail, e.hint, outcome="auth_locked")
    verifier = None
    if record is not None:
        try:
            verifier = parse_verifier(record.scram_verifier)
        except ScramError:
            log.error("user %s has an invalid SCRAM verifier", user)
    exchange = ScramServerExchange(verifier or mock_verifier(user), always_fail=verifier is None)
    s.transport.write(m.encode_auth_sasl(["SCRAM-SHA-256"]))
    mech, first = m.decode_sasl_initial(await _read_auth_message(s))
    if mech != "SCRAM-SHA-256":
        raise ProtocolError("client selected an invalid SASL authentication mechanism", reason="auth")
    auth_failed = Fatal("28P01", f'password authentication failed for user "{user}"', outcome="auth_failed")
    try:
        server_first = exchange.client_first(first)
        s.transport.write(m.encode_auth(m.AUTH_SASL_CONTINUE, server_first))
        final = await _read_auth_message(s)
        server_final = exchange.client_final(final)
    except ScramError:
        if guard is not None:
            await guard.failed(user, record, s.client_addr)
        raise auth_failed
    s.kind_label = getattr(record.kind, "value", "unknown")  # authenticated: label refusals by kind
    s.buf.max_length = s.config.limits.max_message_bytes
    s.transport.write(m.encode_auth(m.AUTH_SASL_FINAL, server_final) + m.encode_auth(m.AUTH_OK))
    return record


async def _authenticate_and_connect(s, pkt: StartupMessage) -> None:
    cfg = s.config
    server = s.server
    params = pkt.params
    if cfg.tls.required and not s.tls:
        raise Fatal("28000", "tenantgate requires TLS: connect with sslmode=require or stronger", outcome="no_tls")
    if server.active_sessions > cfg.limits.max_clients:
        raise Fatal("53300", "sorry, too many clients already", outcome="too_many_clients")
    if server.draining:
        raise Fatal("57P03", "tenantgate is shutting down", outcome="shutting_down")
    if params.get("replication", "false").lower() not in ("false", "0", "off", "no"):
        raise Fatal("0A000", "replication connections are not supported by tenantgate", outcome="replication")
    s.user = pkt.user
    s.database = pkt.database
    record = await _authenticate(s, pkt)
    if pkt.database == cfg.admin.database:
        s.start_admin_console(record)
        return

    # connection-time settings (startup packet and options=-c): the SET-able ones are applied
    # as PostgreSQL would, tenantgate.* go to the gate, anything else refuses the connection
    passthrough = record is not None and record.kind is SessionKind.PASSTHROUGH
    try:
        engine = getattr(server.gatekeeper, "engine", None)  # the tenant policy's rules: its fixed search_path
        startup = split_startup(params, parse_options(params.get("options", "")), strict=not passthrough,
                                fixed_search_path=engine.rules.schemas if engine is not None else None)
    except StartupRefusal as e:
        raise Fatal(e.sqlstate, e.message, None, e.hint, outcome="refused")
    if cfg.backend.database and pkt.database != cfg.backend.database:
        # tenantgate fronts one database: any other name does not exist here (as in PostgreSQL)
        raise Fatal("3D000", f'database "{pkt.database}" does not exist', None,
                    f'connect to database "{cfg.backend.database}"', outcome="refused")
    s.application_name = startup.settings.get("application_name")
    info = StartupInfo(
        user=s.user, database=pkt.database, client_addr=s.client_addr, options=startup.gate_options,
        application_name=s.application_name, session_id=s.session_id, tls=s.tls,
    )
    try:
        gate = await server.gatekeeper.open_session(record, info)
    except SessionRefused as e:
        raise Fatal(e.sqlstate, e.message, e.detail, e.hint, outcome="refused")
    s.gate = gate
    bkey = backstop.key_for(cfg) if isinstance(gate, BackstopBound) else None
    s.bkey = bkey
    if bkey is not None:
        gate.backstop_bind = s.backstop_call
    s.audited = bool(gate.audited)
    s.kind_label = getattr(gate.kind, "value", str(gate.kind))
    gate.set_terminator(s.terminator)

    forwarded = startup.settings
    # the backend of the tenant's region (proxy/control/placement.py; one region without `regions:`)
    route = getattr(server.gatekeeper, "route", None)
    region = route(gate) if route is not None else cfg.default_region()  # also kept as gate.region
    backend_cfg = cfg.backend_of(region)
    database = backend_cfg.database or pkt.database
    if gate.kind is SessionKind.TENANT and cfg.pool_mode_for(s.user, pkt.database) == "transaction":
        if len(cfg.regions) > 1:  # a placement change (gatekeeper): retarget(s, region) below
            gate.retarget = s.retarget
        backend = await _start_pooled(s, gate, database, forwarded, bkey)
        if backend is None:
            return
        status = b"I"
    else:
        try:
            backend = await connect_backend(backend_cfg, database, forwarded)
        except BackendError as e:
            raise Fatal(e.sqlstate, e.message, e.detail, outcome="backend_unavailable")
        s.backend = backend
        BACKEND_CONNECTIONS.inc()
        if s.closed:  # client vanished while we were connecting
            s.close()
            return
        setup = list(gate.backend_setup_sql)
        if bkey is not None:  # the PostgreSQL backstop: bind before anything else runs
            setup.insert(0, await _backstop_setup(s, backend, gate, bkey))
        status = await _run_setup_sql(backend, setup)
    s.start_relay(backend, status)


def session_region(s) -> str:
    """The region whose backend the session uses (its gate's, set by the gatekeeper's ``route``)."""
    return getattr(s.gate, "region", None) or s.config.default_region()


def session_backend(s):
    """The backend entry the session's connection came from (cancel requests go there)."""
    return s.config.backend_of(session_region(s))


def retarget(s, region: str) -> bool:
    """The tenant was placed in ``region`` (``tenant move`` flipped it): a transaction-mode session
    between transactions borrows from that region's pool from now on (statements held by PAUSE
    TENANT then run there; prepared statements are prepared again on first use, as on any new
    connection).  False when the session cannot follow (inside a transaction, holding a
    connection, or pinned to one): the gatekeeper then ends it."""
    settings = s.pooled_settings
    if s.pooled and not s.closed:
        s.let_go_of_parked()  # between transactions: the connection of the last one stays in the old pool
    if (s.closed or not s.pooled or s.pool is None or settings is None or s.sconn is not None
            or s.lent is not None or s.attach_task is not None or settings.pinned or s.tx_status != b"I"):
        return False
    pool = s.server.pools.get(s.pool.database, region)
    s.pool = settings.pool = pool
    s._last_sconn = None
    return True


async def _start_pooled(s, gate: PooledGate, database: str, forwarded: dict[str, str], bkey) -> BackendConnection | None:
    """Transaction mode: borrow a pooled connection for the startup (settings applied, their
    ParameterStatus reported to the client); it goes back at the first idle ReadyForQuery."""
    s.pooled = True
    pool = s.pool = s.server.pools.get(database, session_region(s))
    settings = s.pooled_settings = PooledSettings(pool, bkey)
    names = tuple(gate.tracked_parameters) + tuple(sorted(settings.gate_settings(gate)))
    settings.probe_names = pool.probe_names.setdefault(names, names)  # one shared tuple per pool
    settings.connect = shared({k.lower(): v for k, v in forwarded.items()})
    settings.want(settings.connect, gate)
    gate.pooled = True  # RESET ALL / DISCARD ALL are followed by a settings read-back
    try:
        sc = await pool.acquire(s.config.pool.queue_timeout_s)
    except PoolTimeout as e:
        raise Fatal("53300", str(e), hint="try again later, or raise pool.size", outcome="pool_timeout")
    except BackendError as e:
        raise Fatal(e.sqlstate, e.message, e.detail, outcome="backend_unavailable")
    try:
        await sync_server(sc, settings)
    except BackendError as e:
        pool.discard(sc)
        raise Fatal(e.sqlstate, "session setup on the database server failed", detail=e.message,
                    outcome="setup_failed")
    except BaseException:
        pool.discard(sc)
        raise
    if s.closed:
        pool.release(sc)
        return None
    s.lent = sc  # bound to the relay when it starts
    return sc.conn


async def _backstop_setup(s, backend: BackendConnection, gate, bkey: bytes) -> str:
    """Session mode: the statement binding the new backend connection (its identity read first)."""
    try:
        row = await server_query(backend, backstop.IDENTITY_SQL)
        s.binder = backstop.BackendBinder.from_identity_row(bkey, row)
    except (BackendError, backstop.BackstopError) as e:
        raise Fatal("28000", "tenantgate could not bind the database connection to the tenant",
                    detail=getattr(e, "message", str(e)), hint="apply deploy/postgres/bootstrap.sql with the "
                    "proxy's backstop key (config backstop.key)", outcome="setup_failed")
    return s.binder.sql(*gate.backstop_binding())


async def _run_setup_sql(backend: BackendConnection, statements: list[str]) -> bytes:
    """Run the gate's setup statements (one round trip) before the client's first statement."""
    if statements:
        try:
            await server_query(backend, "; ".join(statements))
        except BackendError as e:
            raise Fatal(e.sqlstate, "session setup on the database server failed", detail=e.message,
                        outcome="setup_failed")
    return backend.tx_status

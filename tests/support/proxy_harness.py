"""Run tenantgate in front of a test database, for end-to-end tests.

The proxy runs in its own thread with its own (uvloop) event loop, so tests
may use blocking clients (psycopg, psql, pgbench) as well as asyncio ones.
One caveat: a blocking C call that holds the GIL while it waits for the proxy
deadlocks with it; psycopg's ``conn.cancel()`` is one (use ``conn.cancel_safe()``).

Quick use (the ``proxy_factory`` fixture; import it into your test module)::

    from support.proxy_harness import proxy_factory  # noqa: F401  (pytest fixture)

    def test_something(proxy_factory, make_db):
        db, admin_dsn = make_db("mytest")
        proxy = proxy_factory(db, users={"app": "app-pw"})        # passthrough users
        with psycopg.connect(proxy.dsn("app", "app-pw")) as conn: ...

With your own policy::

    proxy = proxy_factory(db, gatekeeper_factory=lambda config: MyGatekeeper(config),
                          users=[{"name": "acme_app", "password": "pw", "tenant": "acme"}])

``gatekeeper_factory(config)`` runs *inside the proxy's event loop* and may
return a Gatekeeper or an awaitable of one (so it can open asyncpg pools).
Extra keyword arguments become config sections, e.g. ``tls={...}``,
``limits={"max_message_bytes": 4096}``, ``timeouts={"startup_s": 1}``.

The backend role (``tg_backend``, password ``tg-backend-pw`` by default) is
created on the cluster when missing and made owner of the test database, so it
can create tables in ``public``.  Outside fixtures use :func:`start_proxy`
with a config from :func:`make_config`; call ``.stop()`` at the end.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, Callable
from urllib.parse import quote

import pytest

from support import crash_watch
from proxy.config import Config
from proxy.passthrough import PassthroughGatekeeper
from proxy.pgcluster import PgCluster
from proxy.scram import make_verifier
from proxy.server import ProxyServer

BACKEND_ROLE = "tg_backend"
BACKEND_PASSWORD = "tg-backend-pw"

_verifier_cache: dict[str, str] = {}


def verifier_for(password: str) -> str:
    """A SCRAM verifier for ``password`` (cached: computing one takes a few ms)."""
    v = _verifier_cache.get(password)
    if v is None:
        v = _verifier_cache[password] = make_verifier(password)
    return v


def ensure_backend_role(pg: PgCluster, database: str, role: str = BACKEND_ROLE,
                        password: str = BACKEND_PASSWORD, *, owner: bool = True) -> None:
    """Create the LOGIN role tenantgate uses toward PostgreSQL; make it own ``database``."""
    pg.psql(
        f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
        f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'; END IF; END$$"
    )
    if owner:
        pg.psql(f'ALTER DATABASE "{database}" OWNER TO "{role}"')


def make_config(pg: PgCluster, database: str, users: dict[str, str] | list[dict] | None = None, *,
                backend_user: str = BACKEND_ROLE, backend_password: str | None = BACKEND_PASSWORD,
                **sections: Any) -> Config:
    """A validated Config: listen on 127.0.0.1, port 0; backend = ``pg``/``database``.

    ``users``: {name: password} (passthrough users) or a list of dicts with
    ``name``, ``password`` (or ``scram_verifier``) and any other UserConfig keys.
    """
    user_list: list[dict] = []
    if isinstance(users, dict):
        for name, pw in users.items():
            user_list.append({"name": name, "scram_verifier": verifier_for(pw), "passthrough": True})
    else:
        for u in users or []:
            u = dict(u)
            if "password" in u:
                u["scram_verifier"] = verifier_for(u.pop("password"))
            user_list.append(u)
    backend = {"host": pg.host, "port": pg.port, "database": database, "user": backend_user,
               "password": backend_password, "sslmode": "disable", **sections.pop("backend", {})}
    raw = {"listen": {"host": "127.0.0.1", "port": 0, **sections.pop("listen", {})},
           "backend": backend, "users": user_list, "metrics": {"port": None}, **sections}
    return Config.model_validate(raw)


class RunningProxy:
    """A tenantgate running in a background thread.  Use :func:`start_proxy`."""

    def __init__(self, config: Config, gatekeeper_factory: Callable[[Config], Any] | None):
        self.config = config
        self._factory = gatekeeper_factory or (lambda cfg: PassthroughGatekeeper(cfg))
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: ProxyServer | None = None
        self.gatekeeper: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tenantgate-test-proxy", daemon=True)

    # -- thread
    def _run(self) -> None:
        try:
            import uvloop
            loop = uvloop.new_event_loop()
        except ImportError:  # pragma: no cover
            loop = asyncio.new_event_loop()
        self.loop = loop
        loop.set_exception_handler(crash_watch.loop_exception_handler)  # an unhandled exception fails the test
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._start())
        except BaseException as e:  # noqa: BLE001
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        # as asyncio.run does: cancel what is still pending (e.g. a cancel request on its way to
        # PostgreSQL when the test stopped the proxy) and let it finish before closing the loop
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    async def _start(self) -> None:
        gk = self._factory(self.config)
        if inspect.isawaitable(gk):
            gk = await gk
        self.gatekeeper = gk
        self.server = ProxyServer(self.config, gk)
        await self.server.start()

    def _start_thread(self) -> "RunningProxy":
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    # -- API
    @property
    def host(self) -> str:
        return self.config.listen.host

    @property
    def port(self) -> int:
        return self.server.port

    def dsn(self, user: str, password: str, database: str | None = None, **params: str) -> str:
        """A libpq URL to the proxy (sslmode=disable unless given)."""
        params.setdefault("sslmode", "disable")
        db = database or self.config.backend.database or user
        query = "&".join(f"{k}={quote(str(v))}" for k, v in params.items())
        return f"postgresql://{quote(user)}:{quote(password)}@{self.host}:{self.port}/{quote(db)}?{query}"

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run ``fn()`` in the proxy's loop (awaiting it if it returns an awaitable)."""
        async def runner():
            r = fn()
            if inspect.isawaitable(r):
                r = await r
            return r
        return asyncio.run_coroutine_threadsafe(runner(), self.loop).result(timeout)

    def reload(self, config: Config) -> None:
        self.call(lambda: self.server.reload(config))
        self.config = self.server.config

    def session_count(self) -> int:
        return self.call(lambda: len(self.server.sessions))

    def stop(self, *, drain: bool = False, timeout: float | None = None) -> None:
        if self.loop is None or not self._thread.is_alive():
            return
        try:
            if drain:
                self.call(lambda: self.server.drain(timeout), timeout=(timeout or 30) + 10)
            else:
                self.call(lambda: self.server.close())
            closer = getattr(self.gatekeeper, "close", None)
            if closer is not None:
                self.call(closer)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def start_proxy(config: Config, gatekeeper_factory: Callable[[Config], Any] | None = None) -> RunningProxy:
    """Start tenantgate with ``config`` (see :func:`make_config`) in a background thread."""
    return RunningProxy(config, gatekeeper_factory)._start_thread()


@pytest.fixture
def proxy_factory(pg):
    """Factory fixture: ``proxy_factory(database, users=..., gatekeeper_factory=..., **sections)``
    -> :class:`RunningProxy` (stopped at the end of the test)."""
    started: list[RunningProxy] = []

    def factory(database: str, users: dict[str, str] | list[dict] | None = None, *,
                gatekeeper_factory: Callable[[Config], Any] | None = None,
                backend_user: str = BACKEND_ROLE, backend_password: str | None = BACKEND_PASSWORD,
                **sections: Any) -> RunningProxy:
        if backend_user == BACKEND_ROLE:
            ensure_backend_role(pg, database)
        cfg = make_config(pg, database, users, backend_user=backend_user, backend_password=backend_password,
                          **sections)
        p = start_proxy(cfg, gatekeeper_factory)
        started.append(p)
        return p

    yield factory
    for p in started:
        p.stop()


class RawClient:
    """A minimal blocking PostgreSQL client speaking raw protocol messages.

    For tests of bad input and exact message sequences::

        c = RawClient(proxy.host, proxy.port)
        c.startup("app", "app-pw", database=db)        # SCRAM; returns after ReadyForQuery
        c.send(m.encode_query("select 1"))
        msgs = c.read_until(b"Z")                        # [(type, payload), ...]
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0):
        import socket

        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buf = b""
        self.parameters: dict[str, str] = {}
        self.key: tuple[int, int] | None = None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            self._buf += chunk
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def read_message(self) -> tuple[bytes, bytes]:
        import struct

        head = self.recv_exact(5)
        (length,) = struct.unpack("!I", head[1:])
        return head[:1], self.recv_exact(length - 4)

    def read_until(self, mtype: bytes = b"Z") -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            msg = self.read_message()
            out.append(msg)
            if msg[0] == mtype:
                return out

    def read_all(self) -> list[tuple[bytes, bytes]]:
        """Messages until the server closes the connection."""
        out = []
        while True:
            try:
                out.append(self.read_message())
            except (ConnectionError, OSError):
                return out

    def startup(self, user: str, password: str, database: str | None = None, **params: str) -> None:
        from proxy.scram import ScramClientExchange
        from proxy.wire import messages as m

        p = {"user": user, "database": database or user, **params}
        self.send(m.encode_startup(p))
        scram = None
        while True:
            t, payload = self.read_message()
            if t == b"E":
                raise RuntimeError(f"startup failed: {m.decode_error_fields(payload).fields}")
            if t == b"R":
                code, data = m.decode_auth(payload)
                if code == m.AUTH_SASL:
                    scram = ScramClientExchange(user or "x", password)
                    self.send(m.encode_sasl_initial("SCRAM-SHA-256", scram.client_first()))
                elif code == m.AUTH_SASL_CONTINUE:
                    self.send(m.encode_sasl_response(scram.server_first(data)))
                elif code == m.AUTH_SASL_FINAL:
                    scram.server_final(data)
            elif t == b"S":
                k, v = m.decode_parameter_status(payload)
                self.parameters[k] = v
            elif t == b"K":
                self.key = m.decode_backend_key_data(payload)
            elif t == b"Z":
                return

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def errors_in(msgs: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    """The fields of every ErrorResponse in ``msgs`` (e.g. ``[{"S": "FATAL", "C": "08P01", ...}]``)."""
    from proxy.wire import messages as m

    return [m.decode_error_fields(p).fields for t, p in msgs if t == b"E"]


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a true value (returned); fail after ``timeout`` s.

    For tests on a loaded machine: wait for the state a check needs instead of sleeping."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def wait_until_query_active(admin_dsn: str, needle: str, timeout: float = 20.0) -> int:
    """Wait until a backend runs a query containing ``needle`` (pg_stat_activity state 'active');
    returns its pid.  A cancel sent before that could hit nothing and prove nothing."""
    import psycopg

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        def active():
            row = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid()"
                " AND strpos(query, %s) > 0", [needle]).fetchone()
            return row[0] if row else None

        return wait_until(active, timeout, what=f"a running query with {needle!r}")

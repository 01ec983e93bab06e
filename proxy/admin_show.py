"""The admin console's SHOW results: PgBouncer's columns filled from tenantgate's state.

:class:`ShowCommands` is mixed into :class:`proxy.admin_console.AdminConsole`;
each ``show_<what>()`` returns a :class:`Result` read from
``server.pool_snapshot()`` (:mod:`proxy.pool_view`) and ``server.config``.
Columns PgBouncer has and tenantgate cannot fill are left out, never filled
with made-up values.  ``SHOW STATS`` averages cover the last 60 seconds
(:mod:`proxy.stats_window`), as PgBouncer's do; ``SHOW TENANTS`` has no
PgBouncer counterpart.  Nothing here changes state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from proxy import __version__
from proxy.seam import SqlStateError
from proxy.wire import messages as m
from proxy.wire.rows import INT8_OID, TEXT_OID, encode_command_complete, encode_data_row, encode_row_description

# When the server says neither when it started nor has a 60 s window yet, averages count
# from when this module was first imported (about when the proxy started).
_IMPORTED_AT = time.time()

_TOTALS = ("xact_count", "query_count", "received", "sent", "xact_time_us", "query_time_us", "wait_time_us",
           "server_assignment_count")

_MASK = "********"
_SECRET_WORDS = ("password", "secret", "hmac_key", "dsn", "verifier", "token_key", "private")
_REFERENCE_SUFFIXES = ("_env", "_file", "_files")  # names of env variables / paths, not secrets

# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Result:
    """One SHOW result: columns as (name, type oid) and rows of Python values."""

    columns: tuple[tuple[str, int], ...]
    rows: tuple[tuple[Any, ...], ...]

    tag: str = "SHOW"

    def encode(self) -> bytes:
        out = [encode_row_description(self.columns)]
        out += [encode_data_row([_text(v) for v in row]) for row in self.rows]
        out.append(encode_command_complete(self.tag))
        return b"".join(out)


class ConsoleError(SqlStateError):
    """A statement failed: becomes an ErrorResponse; the connection stays usable."""

    def encode(self) -> bytes:
        return m.encode_error("ERROR", self.sqlstate, self.message, self.detail, self.hint)


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _int(v: Any) -> int:
    try:
        return int(v or 0)
    except (TypeError, ValueError):
        return 0


def _timestamp(epoch: Any) -> str:
    """PgBouncer's timestamp format, in UTC; empty when unknown."""
    if not epoch:
        return ""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(epoch)))
    except (TypeError, ValueError, OverflowError, OSError):
        return ""


def _tls(v: Any) -> str:
    """PgBouncer's ``tls`` column is empty for plain connections."""
    if isinstance(v, str):
        return v
    return "TLS" if v else ""


def _split_us(us: Any) -> tuple[int, int]:
    """Microseconds as PgBouncer shows waits: whole seconds and the microsecond rest."""
    us = max(_int(us), 0)
    return us // 1_000_000, us % 1_000_000


def _cols(spec: str) -> tuple[tuple[str, int], ...]:
    """Column list from "name name:i ...": ``:i`` marks int8 columns, the rest are text."""
    out = []
    for item in spec.split():
        name, _, kind = item.partition(":")
        out.append((name, INT8_OID if kind == "i" else TEXT_OID))
    return tuple(out)



# --------------------------------------------------------------------------- SHOW commands


class ShowCommands:
    """The SHOW commands; the console provides ``server`` and ``clock``."""

    server: Any
    clock: Any

    def snapshot(self) -> dict[str, list[dict]]:
        """``server.pool_snapshot()``, or an empty one when the server has none."""
        empty: dict[str, list[dict]] = {"pools": [], "clients": [], "servers": [], "stats": []}
        fn = getattr(self.server, "pool_snapshot", None)
        if fn is None:
            return empty
        try:
            snap = fn()
        except Exception as e:  # noqa: BLE001 - the console must answer, not die
            raise ConsoleError("XX000", f"could not read the pool state: {e}") from None
        if not isinstance(snap, dict):
            raise ConsoleError("XX000", "could not read the pool state: pool_snapshot() did not return a dict")
        for k in empty:
            v = snap.get(k)
            empty[k] = list(v) if isinstance(v, (list, tuple)) else []
        if "started_at" in snap:
            empty["started_at"] = snap["started_at"]  # type: ignore[assignment]
        return empty

    def show_pools(self) -> Result:
        cols = _cols("database user cl_active:i cl_waiting:i sv_active:i sv_idle:i sv_used:i sv_login:i "
                     "maxwait:i maxwait_us:i pool_mode region")
        rows = []
        for p in self.snapshot()["pools"]:
            wait_s, wait_us = _split_us(p.get("maxwait_us"))
            rows.append((p.get("database", ""), p.get("user", ""), _int(p.get("cl_active")),
                         _int(p.get("cl_waiting")), _int(p.get("sv_active")), _int(p.get("sv_idle")),
                         _int(p.get("sv_used")), _int(p.get("sv_login")), wait_s, wait_us,
                         p.get("pool_mode", ""), p.get("region", "")))
        return Result(cols, tuple(rows))

    def show_clients(self) -> Result:
        cols = _cols("type user database state addr port:i connect_time request_time wait:i wait_us:i "
                     "id tls application_name prepared_statements:i kind pool_mode region")
        rows = []
        for c in self.snapshot()["clients"]:
            wait_s, wait_us = _split_us(c.get("wait_us"))
            rows.append(("C", c.get("user", ""), c.get("database", ""), c.get("state", ""), c.get("addr", ""),
                         _int(c.get("port")), _timestamp(c.get("connect_time")), _timestamp(c.get("request_time")),
                         wait_s, wait_us, c.get("id", ""), _tls(c.get("tls")), c.get("application_name") or "",
                         _int(c.get("prepared_statements")), c.get("kind", ""), c.get("pool_mode", ""),
                         c.get("region", "")))
        return Result(cols, tuple(rows))

    def show_servers(self) -> Result:
        cols = _cols("type user database state addr port:i connect_time request_time remote_pid:i tls "
                     "prepared_statements:i link region")
        rows = []
        for s in self.snapshot()["servers"]:
            rows.append(("S", s.get("user", ""), s.get("database", ""), s.get("state", ""), s.get("addr", ""),
                         _int(s.get("port")), _timestamp(s.get("connect_time")), _timestamp(s.get("request_time")),
                         _int(s.get("remote_pid")), _tls(s.get("tls")), _int(s.get("prepared_statements")),
                         s.get("client") or "", s.get("region", "")))
        return Result(cols, tuple(rows))

    def _stats(self) -> list[tuple[str, dict[str, int], dict[str, int]]]:
        """Per database: (name, totals, averages), PgBouncer's units (bytes, µs).

        Averages cover the last 60 s when the snapshot carries the window (``window_s`` and the
        totals at its start, ``window_start``: :mod:`proxy.stats_window`); before the first
        window sample they cover the time since start."""
        snap = self.snapshot()
        started = snap.get("started_at") or getattr(self.server, "started_at", None) or _IMPORTED_AT
        since_start = max(self.clock() - float(started), 1.0)
        out = []
        for s in snap["stats"]:
            t = {k: _int(s.get("total_" + k)) for k in _TOTALS}
            start = s.get("window_start")
            if isinstance(start, dict) and s.get("window_s"):
                elapsed = max(float(s["window_s"]), 1.0)
                d = {k: max(t[k] - _int(start.get("total_" + k)), 0) for k in _TOTALS}
            else:
                elapsed, d = since_start, t
            assignments = d["server_assignment_count"] or d["xact_count"]
            avg = {
                "xact_count": round(d["xact_count"] / elapsed),
                "query_count": round(d["query_count"] / elapsed),
                "recv": round(d["received"] / elapsed),
                "sent": round(d["sent"] / elapsed),
                "xact_time": d["xact_time_us"] // d["xact_count"] if d["xact_count"] else 0,
                "query_time": d["query_time_us"] // d["query_count"] if d["query_count"] else 0,
                "wait_time": d["wait_time_us"] // assignments if assignments else 0,
            }
            out.append((s.get("database", ""), t, avg))
        return out

    def show_stats(self) -> Result:
        cols = _cols("database total_xact_count:i total_query_count:i total_received:i total_sent:i "
                     "total_xact_time:i total_query_time:i total_wait_time:i avg_xact_count:i avg_query_count:i "
                     "avg_recv:i avg_sent:i avg_xact_time:i avg_query_time:i avg_wait_time:i")
        rows = []
        for db, t, a in self._stats():
            rows.append((db, t["xact_count"], t["query_count"], t["received"], t["sent"], t["xact_time_us"],
                         t["query_time_us"], t["wait_time_us"], a["xact_count"], a["query_count"], a["recv"],
                         a["sent"], a["xact_time"], a["query_time"], a["wait_time"]))
        return Result(cols, tuple(rows))

    def show_stats_totals(self) -> Result:
        cols = _cols("database xact_count:i query_count:i bytes_received:i bytes_sent:i xact_time:i "
                     "query_time:i wait_time:i")
        rows = [(db, t["xact_count"], t["query_count"], t["received"], t["sent"], t["xact_time_us"],
                 t["query_time_us"], t["wait_time_us"]) for db, t, _ in self._stats()]
        return Result(cols, tuple(rows))

    def show_stats_averages(self) -> Result:
        cols = _cols("database xact_count:i query_count:i bytes_received:i bytes_sent:i xact_time:i "
                     "query_time:i wait_time:i")
        rows = [(db, a["xact_count"], a["query_count"], a["recv"], a["sent"], a["xact_time"], a["query_time"],
                 a["wait_time"]) for db, _, a in self._stats()]
        return Result(cols, tuple(rows))

    def show_databases(self) -> Result:
        cols = _cols("name host port:i database force_user pool_size:i server_lifetime:i pool_mode "
                     "current_connections:i current_client_connections:i")
        cfg = getattr(self.server, "config", None)
        backend = getattr(cfg, "backend", None)
        pool_cfg = getattr(cfg, "pool", None)
        rows = []
        for p in self.snapshot()["pools"]:
            name = p.get("database", "")
            servers = sum(_int(p.get(k)) for k in ("sv_active", "sv_idle", "sv_used", "sv_login"))
            clients = sum(_int(p.get(k)) for k in ("cl_active", "cl_waiting"))
            rows.append((name, getattr(backend, "host", ""), _int(getattr(backend, "port", 0)),
                         getattr(backend, "database", None) or name, p.get("user", ""),
                         _int(p.get("size", getattr(pool_cfg, "size", 0))),
                         _int(getattr(pool_cfg, "server_lifetime_s", 0)), p.get("pool_mode", ""), servers, clients))
        return Result(cols, tuple(rows))

    def show_users(self) -> Result:
        cols = _cols("name pool_mode admin")
        cfg = getattr(self.server, "config", None)
        rows = [(u.name, u.pool_mode or "", "yes" if u.admin else "") for u in getattr(cfg, "users", [])]
        return Result(cols, tuple(rows))

    def show_lists(self) -> Result:
        snap = self.snapshot()
        cfg = getattr(self.server, "config", None)
        items = [
            ("databases", len({p.get("database") for p in snap["pools"]})),
            ("users", len(getattr(cfg, "users", []))),
            ("pools", len(snap["pools"])),
            ("used_clients", len(snap["clients"])),
            ("used_servers", len(snap["servers"])),
        ]
        return Result(_cols("list items:i"), tuple(items))

    def show_config(self) -> Result:
        cfg = getattr(self.server, "config", None)
        if cfg is None:
            return Result(_cols("key value default"), ())
        current = config_items(cfg)
        defaults = config_items(type(cfg)())
        rows = [(k, v, defaults.get(k, "")) for k, v in current.items()]
        return Result(_cols("key value default"), tuple(rows))

    def show_tenants(self) -> Result:
        """Per tenant: its sessions now, transactions and refused statements since start, and
        whether it is paused (PAUSE TENANT).  Not in PgBouncer, which knows no tenants."""
        cols = _cols("tenant sessions:i transactions:i refusals:i paused")
        fn = getattr(self.server, "tenant_snapshot", None)
        rows = []
        if fn is not None:
            for t in fn():
                rows.append((t.get("tenant", ""), _int(t.get("sessions")), _int(t.get("transactions")),
                             _int(t.get("refusals")), "yes" if t.get("paused") else ""))
        return Result(cols, tuple(rows))

    def show_version(self) -> Result:
        return Result(_cols("version"), ((f"tenantgate {__version__}",),))


# --------------------------------------------------------------------------- config rendering


def is_secret_key(key: str) -> bool:
    """Whether a dotted config key holds a secret (shown masked).  Fails closed:
    any key whose name mentions a password, DSN, key or secret is masked, except
    names of environment variables and file paths."""
    leaf = key.rsplit(".", 1)[-1].lower()
    if leaf.endswith(_REFERENCE_SUFFIXES):
        return False
    return any(w in leaf for w in _SECRET_WORDS)


def _render(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ", ".join(_render(x) for x in v)
    return str(v)


def config_items(config: Any) -> dict[str, str]:
    """The config as ordered dotted keys -> text; secrets masked, users by name only."""
    data = config.model_dump(by_alias=True, exclude={"users"})
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        if isinstance(value, dict):
            value = ""
        text = _render(value)
        out[prefix] = (_MASK if text else "") if is_secret_key(prefix) else text

    walk("", data)
    out["users"] = ", ".join(u.name for u in getattr(config, "users", []))
    return out



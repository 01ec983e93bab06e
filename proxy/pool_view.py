"""A plain-data view of pools, clients and server connections (for SHOW POOLS and friends).

``snapshot(server)`` reads the live :class:`proxy.server.ProxyServer`: its client
sessions and its transaction pools.  Session-mode clients own their backend
connection; they appear as a pool of mode ``session`` per database.  Nothing
here changes state.
"""

from __future__ import annotations

import time


def _addr(session) -> tuple[str, int]:
    t = session.transport
    peer = t.get_extra_info("peername") if t is not None else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return str(peer[0]), int(peer[1])
    return "unix", 0


def _client_state(s) -> str:
    if getattr(s, "held_task", None) is not None:  # held by PAUSE (proxy/holds.py)
        return "waiting"
    if s.pooled:
        if s.sconn is not None and not s.parked:  # a parked connection is idle in the pool
            return "active"
        return "waiting" if s.attach_task is not None else "idle"
    return "idle" if s.idle else "active"


def snapshot(server) -> dict:
    backend_user = server.config.backend.user
    now = time.time()
    clients = []
    servers = []
    pools: dict[tuple[str, str, str], dict] = {}
    default_region = server.config.default_region()

    def pool_row(database: str, mode: str, region: str) -> dict:
        row = pools.get((database, mode, region))
        if row is None:
            row = pools[(database, mode, region)] = {
                "database": database, "user": backend_user, "pool_mode": mode, "cl_active": 0, "cl_waiting": 0,
                "sv_active": 0, "sv_idle": 0, "sv_used": 0, "sv_login": 0, "maxwait_us": 0,
                "size": server.config.pool.size if mode == "transaction" else 0, "region": region,
            }
        return row

    for s in list(server.sessions):
        if not s.relaying:
            continue
        database = s.database or ""
        mode = "transaction" if s.pooled else "session"
        state = _client_state(s)
        addr, port = _addr(s)
        region = getattr(s.gate, "region", None) or default_region  # the backend it uses (placement)
        row = pool_row(database, mode, region)
        row["cl_waiting" if state == "waiting" else "cl_active"] += 1
        clients.append({
            "user": s.user or "", "database": database, "state": state, "addr": addr, "port": port,
            "connect_time": s.connected_at, "request_time": s.request_time,
            "wait_us": int((now - s.request_time) * 1e6) if state == "waiting" else 0,
            "tls": s.tls, "application_name": s.application_name or "", "kind": s.kind_label,
            "pool_mode": mode, "prepared_statements": s.prepared_statements, "id": s.session_id,
            "region": region,
        })
        if not s.pooled and s.backend is not None:
            row["sv_active"] += 1
            servers.append(_server_row(s.backend, backend_user, database, "active", s.connected_at,
                                       s.request_time, s.session_id, 0, server.config.backend_of(region), region))

    stats = []
    for key, pool in server.pools.pools.items():
        database = pool.database
        region = getattr(pool, "region", None) or default_region
        row = pool_row(database, "transaction", region)
        row["maxwait_us"] = int(pool.maxwait_s() * 1e6)
        idle = set(pool.idle)
        for sc in list(pool.servers):
            state = "idle" if sc in idle else "active"
            row["sv_idle" if state == "idle" else "sv_active"] += 1
            client = sc.client
            servers.append(_server_row(sc.conn, backend_user, database, state, sc.created, sc.last_used,
                                       client.session_id if client is not None else None, len(sc.prepared),
                                       server.config.backend_of(region), region))
        row["sv_login"] += pool.connecting
        stat = {"database": key, **pool.totals()}  # key: database, or database@region
        window = server.pools.stats_window.since(time.monotonic(), key)
        if window is not None:  # SHOW STATS averages cover the last 60 s (proxy/stats_window.py)
            stat["window_s"], stat["window_start"] = window
        stats.append(stat)
    return {"pools": list(pools.values()), "clients": clients, "servers": servers, "stats": stats,
            "started_at": server.started_at}


def _server_row(conn, user, database, state, connect_time, request_time, client, prepared, backend_cfg,
                region: str) -> dict:
    return {"region": region,
        "user": user, "database": database, "state": state, "addr": backend_cfg.host, "port": backend_cfg.port,
        "connect_time": connect_time, "request_time": request_time, "remote_pid": conn.pid, "tls": conn.tls,
        "prepared_statements": prepared, "client": client,
    }

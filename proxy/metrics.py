"""Every Prometheus metric tenantgate exports, in one place.

Names follow Prometheus conventions (``_total`` counters, ``_seconds``
durations).  Dashboards (grafana/) and alert rules (deploy/prometheus/) refer
to these names; tests check that they exist.

With several worker processes (``workers`` > 1) the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before the workers start, so every worker records
into shared files and the supervisor's /metrics sums them
(prometheus_client multiprocess mode).  Gauges therefore say how to combine
the workers' values (``multiprocess_mode``; ignored in a single process).
"""

from __future__ import annotations

import platform

from prometheus_client import Counter, Gauge, Histogram

from proxy import __version__

CLIENT_CONNECTIONS = Gauge("tenantgate_client_connections", "Open client connections", ["kind"],
                           multiprocess_mode="livesum")
CLIENT_CONNECTIONS_TOTAL = Counter(
    "tenantgate_client_connection_attempts_total",
    "Client connection attempts by session kind (unauthenticated until SCRAM succeeded) and outcome",
    ["kind", "outcome"],
)
BACKEND_CONNECTIONS = Gauge("tenantgate_backend_connections", "Open connections to PostgreSQL",
                            multiprocess_mode="livesum")
BACKEND_CONNECT_ERRORS_TOTAL = Counter("tenantgate_backend_connect_errors_total", "Failed connects to PostgreSQL")
STATEMENTS_TOTAL = Counter(
    "tenantgate_statements_total", "Statements seen, by session kind and result", ["kind", "result"]
)
STATEMENTS_REFUSED_TOTAL = Counter(
    "tenantgate_statements_refused_total",
    "Statements refused by policy, by session kind, reason (proxy.policy.refusal_reason.REASONS) and SQLSTATE",
    ["kind", "reason", "sqlstate"],
)
QUERY_DURATION_SECONDS = Histogram(
    "tenantgate_query_duration_seconds",
    "Time from a client's query to the backend's ReadyForQuery",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REWRITE_CACHE_HITS_TOTAL = Counter("tenantgate_rewrite_cache_hits_total", "Rewrite cache hits")
REWRITE_CACHE_MISSES_TOTAL = Counter("tenantgate_rewrite_cache_misses_total", "Rewrite cache misses")
REWRITE_SECONDS = Histogram(
    "tenantgate_rewrite_seconds",
    "Time to parse, check and rewrite one statement (cache misses)",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
)
PROTOCOL_ERRORS_TOTAL = Counter("tenantgate_protocol_errors_total", "Protocol violations by clients", ["reason"])
CANCEL_REQUESTS_TOTAL = Counter("tenantgate_cancel_requests_total", "CancelRequests by result", ["result"])
BYTES_TOTAL = Counter("tenantgate_bytes_total", "Bytes relayed", ["direction"])
CONFIG_RELOADS_TOTAL = Counter("tenantgate_config_reloads_total", "Config reloads (SIGHUP) by result", ["result"])
AUDIT_RECORDS_TOTAL = Counter("tenantgate_audit_records_total", "Audit records written", ["type"])
AUDIT_WRITE_SECONDS = Histogram(
    "tenantgate_audit_write_seconds",
    "Time to durably write one audit record",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
AUDIT_FAILURES_TOTAL = Counter("tenantgate_audit_failures_total", "Audit writes that failed (statement refused)")
GRANT_EVENTS_TOTAL = Counter("tenantgate_grant_events_total", "Grant lifecycle events", ["event"])
# every worker counts the same grants in the control schema: report one count, not the sum
ACTIVE_GRANTS = Gauge("tenantgate_active_grants", "Approved, unexpired grants", multiprocess_mode="livemax")
OPERATOR_SESSIONS_TERMINATED_TOTAL = Counter(
    "tenantgate_operator_sessions_terminated_total", "Operator sessions ended by the proxy", ["reason"]
)
TENANT_EXPORTS_TOTAL = Counter("tenantgate_tenant_exports_total", "Tenant exports by result", ["result"])
TENANT_PURGES_TOTAL = Counter("tenantgate_tenant_purges_total", "Tenant purges by result", ["result"])
TENANT_PURGED_ROWS_TOTAL = Counter("tenantgate_tenant_purged_rows_total", "Rows deleted by tenant purges")
CATALOG_REFRESHES_TOTAL = Counter("tenantgate_catalog_refreshes_total", "Catalog discovery refreshes", ["reason"])

# ---- transaction pooling (proxy/pool.py) ------------------------------------------------
POOL_SERVER_CONNECTIONS = Gauge(
    "tenantgate_pool_server_connections", "Pooled backend connections by state (active: lent to a client) "
    "and region (the backend entry, docs/scale-out.md)",
    ["state", "region"], multiprocess_mode="livesum",
)
POOL_WAITING_CLIENTS = Gauge(
    "tenantgate_pool_waiting_clients", "Clients waiting for a pooled backend connection", multiprocess_mode="livesum"
)
POOL_WAIT_SECONDS = Histogram(
    "tenantgate_pool_wait_seconds", "Time a client waited for a pooled backend connection (waits only)",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
POOL_TRANSACTIONS_TOTAL = Counter(
    "tenantgate_pool_transactions_total", "Transactions served by pooled backend connections"
)

# ---- observability additions (issue 7) --------------------------------------------------
BUILD_INFO = Gauge("tenantgate_build_info", "Always 1; the labels say which tenantgate runs",
                   ["version", "python"], multiprocess_mode="livemax")
BUILD_INFO.labels(version=__version__, python=platform.python_version()).set(1)

TLS_HANDSHAKES_TOTAL = Counter("tenantgate_tls_handshakes_total", "TLS handshakes with clients by result", ["result"])
TLS_HANDSHAKE_OK = TLS_HANDSHAKES_TOTAL.labels(result="ok")
TLS_HANDSHAKE_FAILED = TLS_HANDSHAKES_TOTAL.labels(result="error")

REWRITE_CACHE_ENTRIES = Gauge("tenantgate_rewrite_cache_entries", "Entries in the rewrite cache",
                              multiprocess_mode="livesum")

# Readiness (proxy/readiness.py): refreshed by /readyz and by every /metrics scrape (cached ~1 s).
BACKEND_UP = Gauge("tenantgate_backend_up", "1 when the last connect to PostgreSQL succeeded, else 0",
                   multiprocess_mode="livemax")
REGION_BACKEND_UP = Gauge("tenantgate_region_backend_up",
                          "1 when the last connect to the region's PostgreSQL succeeded, else 0 (every region; "
                          "tenantgate_backend_up is the default region's)", ["region"], multiprocess_mode="livemax")
CONTROL_UP = Gauge("tenantgate_control_up",
                   "0 when the control schema is configured and did not answer the last readiness probe, else 1",
                   multiprocess_mode="livemax")

# Read from the control schema by proxy/control/watcher.py (every worker reads the same rows: max, not sum).
TENANTS = Gauge("tenantgate_tenants", "Registered tenants by lifecycle status", ["status"], multiprocess_mode="livemax")
OLDEST_ACTIVE_GRANT_AGE_SECONDS = Gauge(
    "tenantgate_oldest_active_grant_age_seconds",
    "Seconds since the oldest approved, unexpired grant was approved (0: none active)", multiprocess_mode="livemax")
TENANTS_PURGE_OVERDUE = Gauge(
    "tenantgate_tenants_purge_overdue",
    "Offboarded tenants whose retention period has ended and which are not purged yet", multiprocess_mode="livemax")
CONTROL_STATS_TIMESTAMP = Gauge(
    "tenantgate_control_stats_timestamp_seconds",
    "Unix time the control-schema gauges (tenants, grants, purges) were last read", multiprocess_mode="livemax")

# Tenant export and purge: counted by the proxy from the audit chain (proxy/control/stats.py AuditTail)
# and by the `tenantgate tenant ...` process itself.
TENANT_EXPORTED_ROWS_TOTAL = Counter("tenantgate_tenant_exported_rows_total", "Rows written by tenant exports")
_LIFECYCLE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
TENANT_EXPORT_SECONDS = Histogram("tenantgate_tenant_export_seconds", "Duration of successful tenant exports",
                                  buckets=_LIFECYCLE_BUCKETS)
TENANT_PURGE_SECONDS = Histogram("tenantgate_tenant_purge_seconds", "Duration of successful tenant purges",
                                 buckets=_LIFECYCLE_BUCKETS)

# Per-tenant statement counts: only with metrics.tenant_labels "top" or "all" (off by default).
TENANT_STATEMENTS_TOTAL = Counter(
    "tenantgate_tenant_statements_total",
    "Statements forwarded per tenant (metrics.tenant_labels; tenants beyond the top N are counted as \"other\")",
    ["tenant"],
)
TENANTS_PURGE_OVERDUE_SECONDS = Gauge(
    "tenantgate_tenants_purge_overdue_seconds",
    "Seconds since the retention period of the longest-overdue unpurged tenant ended (0: none overdue)",
    multiprocess_mode="livemax")

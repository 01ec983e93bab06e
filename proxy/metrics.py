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

from prometheus_client import Counter, Gauge, Histogram

CLIENT_CONNECTIONS = Gauge("tenantgate_client_connections", "Open client connections", ["kind"],
                           multiprocess_mode="livesum")
CLIENT_CONNECTIONS_TOTAL = Counter(
    "tenantgate_client_connection_attempts_total", "Client connection attempts by outcome", ["outcome"]
)
BACKEND_CONNECTIONS = Gauge("tenantgate_backend_connections", "Open connections to PostgreSQL",
                            multiprocess_mode="livesum")
BACKEND_CONNECT_ERRORS_TOTAL = Counter("tenantgate_backend_connect_errors_total", "Failed connects to PostgreSQL")
STATEMENTS_TOTAL = Counter(
    "tenantgate_statements_total", "Statements seen, by session kind and result", ["kind", "result"]
)
STATEMENTS_REFUSED_TOTAL = Counter(
    "tenantgate_statements_refused_total", "Statements refused by policy, by SQLSTATE", ["kind", "sqlstate"]
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

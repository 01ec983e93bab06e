"""A client session's metrics, through prometheus_client's public API.

Counters are added up per session and handed to prometheus_client in bulk (a counter
increment takes a lock): statements forwarded and bytes in both directions at least every
:data:`FLUSH_EVERY` transactions or :data:`FLUSH_S` seconds of a busy session, after 64 kB,
and when the session ends.  Query durations are observed once per statement
(``Histogram.observe``, about 0.6 µs).  SHOW TENANTS' per-tenant transaction counts (added to
the tenant's at a flush; SHOW TENANTS adds what sessions have not flushed yet) and the pool's
SHOW STATS byte counts are kept here too.

No I/O: the relay core (:mod:`proxy.session.relay`) calls it synchronously.
"""

from __future__ import annotations

import time

from proxy.metrics import BYTES_TOTAL, QUERY_DURATION_SECONDS, STATEMENTS_TOTAL
from proxy.session_events import count_tenant_statements, note_refusal

FLUSH_EVERY = 32
FLUSH_S = 1.0
FLUSH_BYTES = 65536

_BYTES_IN = BYTES_TOTAL.labels(direction="client_to_server")
_BYTES_OUT = BYTES_TOTAL.labels(direction="server_to_client")
_observe = QUERY_DURATION_SECONDS.observe
_UNSET = object()


class SessionCounters:
    """Metrics of one session.  ``owner`` is the session (for labels: kind, user, tenant)."""

    __slots__ = ("owner", "tenants", "pool", "n_forwarded", "n_ready", "n_transactions", "bytes_in", "bytes_out",
                 "_pool_marks", "_t_flush", "_forwarded", "_refused", "_epoch", "_tx_tenant")

    def __init__(self, owner, tenants) -> None:
        self.owner = owner
        self.tenants = tenants  # proxy.tenant_counters.TenantCounters (SHOW TENANTS)
        self.pool = None  # the transaction pool, for its SHOW STATS byte counts
        self.n_forwarded = 0  # statements forwarded since the last flush
        self.n_ready = 0
        # transactions finished since the last flush, all of them for the tenant _tx_tenant, which
        # is looked up again when the gate's tenant_epoch changes (a tenant token switch; gates
        # without an epoch: every time), so each transaction counts for the tenant it ran for
        self.n_transactions = 0
        self._epoch: object = _UNSET
        self._tx_tenant: str | None = None
        self.bytes_in = 0  # not yet handed to prometheus_client
        self.bytes_out = 0
        self._pool_marks = (0, 0)
        self._t_flush = time.perf_counter()
        self._forwarded = None
        self._refused = None

    def started(self, kind_label: str) -> None:
        """The session is open: its statement counters get their labels."""
        forwarded = STATEMENTS_TOTAL.labels(kind=kind_label, result="forwarded")
        self._forwarded = count_tenant_statements(forwarded, self.owner)  # metrics.tenant_labels
        self._refused = STATEMENTS_TOTAL.labels(kind=kind_label, result="refused")

    def refusal(self, sql: str, refusal) -> None:
        if self._refused is not None:
            self._refused.inc()
        self.tenants.refusal(self.owner)  # SHOW TENANTS
        note_refusal(self.owner, sql, refusal)  # tenantgate_statements_refused_total{kind,reason,sqlstate} + log

    def ready(self, idle: bool, took: float | None) -> None:
        """A ReadyForQuery; ``took``: the duration of the statement (or Sync segment) it ends."""
        if idle:
            epoch = getattr(self.owner.gate, "tenant_epoch", None)
            if epoch is None or epoch != self._epoch:
                self._add_transactions()
                self._epoch = epoch
                self._tx_tenant = self.tenants.tenant_of(self.owner)
            self.n_transactions += 1
        pool = self.pool
        if pool is not None:
            pool.query_count += 1
        if took is not None:
            _observe(took)
        self.n_ready += 1
        if self.n_ready >= FLUSH_EVERY or self.bytes_in > FLUSH_BYTES or self.bytes_out > FLUSH_BYTES:
            self.flush()
        elif took is not None and time.perf_counter() - self._t_flush > FLUSH_S:
            self.flush()

    def _add_transactions(self) -> None:
        n = self.n_transactions
        if n:
            self.n_transactions = 0
            if self._tx_tenant is not None:
                self.tenants.add_transactions(self._tx_tenant, n)

    def count_pool_bytes(self) -> None:
        """Bytes since the last call, for the pool's SHOW STATS."""
        pool = self.pool
        mark_in, mark_out = self._pool_marks
        pool.bytes_received += self.bytes_in - mark_in
        pool.bytes_sent += self.bytes_out - mark_out
        self._pool_marks = (self.bytes_in, self.bytes_out)

    def flush(self) -> None:
        """Hand the locally counted values to prometheus_client."""
        self._t_flush = time.perf_counter()
        self.n_ready = 0
        self._add_transactions()
        if self.n_forwarded:
            if self._forwarded is not None:
                self._forwarded.inc(self.n_forwarded)
            self.n_forwarded = 0
        if self.pool is not None:
            self.count_pool_bytes()
            self._pool_marks = (0, 0)
        if self.bytes_in:
            _BYTES_IN.inc(self.bytes_in)
            self.bytes_in = 0
        if self.bytes_out:
            _BYTES_OUT.inc(self.bytes_out)
            self.bytes_out = 0

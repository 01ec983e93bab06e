"""Tenant data lifecycle: export, verify, import, purge with a deletion receipt.

One module per job (the CLI is ``proxy/commands/tenant.py``; see docs/lifecycle.md):

* :mod:`proxy.lifecycle.tables`   — find the tenant tables, their columns and the FK order;
* :mod:`proxy.lifecycle.export`   — consistent streaming export (dir or .tar.zst) and ``verify_export``;
* :mod:`proxy.lifecycle.importer` — load an export into an empty tenant in one transaction;
* :mod:`proxy.lifecycle.purge`    — batched, resumable, verified purge and its receipt;
* :mod:`proxy.lifecycle.status`   — what offboarded / purged mean for sessions (for the gate);
* :mod:`proxy.lifecycle.progress` — the tiny terminal-only progress line;
* :mod:`proxy.lifecycle.self_export` — the tenant's own export through tenantgate (client side);
* :mod:`proxy.lifecycle.webhook`  — signed webhook delivery with retries (retention notices).

All of it takes plain inputs (an asyncpg connection, the tenant column, the
tables), so it does not depend on the control plane.
"""

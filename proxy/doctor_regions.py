"""`tenantgate doctor` over every region's backend (``regions:`` in the config, docs/scale-out.md).

Each region's server is checked like a single backend (:func:`proxy.doctor.diagnose`), and one more
check compares them: the tenant tables (and their columns and types) must be the same on every
region, because the proxy rewrites against one catalog (the default region's) and ``tenant move``
copies rows between them.  :func:`diagnose_regions` returns a :class:`RegionsReport`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import asyncpg

from proxy.config import Config
from proxy.doctor import FAIL, PASS, SKIP, Report, diagnose

_REGION_DSN = re.compile(r"^([a-z0-9][a-z0-9_-]{0,62})=(postgres(?:ql)?://.*)$")


def split_admin_dsns(values: list[str] | None, regions: list[str]) -> dict[str, str]:
    """``--admin-dsn`` values: ``REGION=URL`` for one region, or a bare DSN for the default (first) region."""
    out: dict[str, str] = {}
    for v in values or ():
        m = _REGION_DSN.match(v)
        if m and m.group(1) in regions:
            out[m.group(1)] = m.group(2)
        else:
            out[regions[0]] = v
    return out


@dataclass
class RegionsReport:
    reports: dict[str, Report]
    schema: Report = field(default_factory=lambda: Report(target="every region"))

    @property
    def ok(self) -> bool:
        return self.schema.ok and all(r.ok for r in self.reports.values())

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "regions": {n: r.to_dict() for n, r in self.reports.items()},
                           "across_regions": self.schema.to_dict()}, indent=2)

    def to_text(self) -> str:
        parts = []
        for name, r in self.reports.items():
            parts.append(f"== region {name}\n{r.to_text()}")
        parts.append(f"== across regions\n{self.schema.to_text()}")
        parts.append(f"result over {len(self.reports)} regions: {'OK' if self.ok else 'FAIL'}")
        return "\n\n".join(parts)


async def _tenant_columns(dsn: str, tenant_column: str, schemas: list[str]) -> dict[str, list[tuple[str, str]]]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT c.table_schema || '.' || c.table_name AS t, c.column_name, c.data_type, c.ordinal_position "
            "FROM information_schema.columns c JOIN information_schema.tables t USING (table_schema, table_name) "
            "WHERE c.table_schema = ANY($1::text[]) AND t.table_type = 'BASE TABLE' AND EXISTS ("
            "  SELECT 1 FROM information_schema.columns k WHERE k.table_schema = c.table_schema "
            "  AND k.table_name = c.table_name AND k.column_name = $2) "
            "ORDER BY 1, c.ordinal_position", schemas, tenant_column)
    finally:
        await conn.close()
    out: dict[str, list[tuple[str, str]]] = {}
    for r in rows:
        out.setdefault(r["t"], []).append((r["column_name"], r["data_type"]))
    return out


async def diagnose_regions(cfg: Config, *, admin_dsns: dict[str, str] | None = None,
                           tenant_column: str = "tenant_id", schemas: list[str] | None = None,
                           control_schema: str | None = None) -> RegionsReport:
    schemas = schemas or ["public"]
    key = cfg.backstop.resolved_key()
    out = RegionsReport({})
    shapes: dict[str, dict] = {}
    for region in cfg.region_names():
        b = cfg.backend_of(region)
        dsn = b.url()
        out.reports[region] = await diagnose(
            dsn, admin_dsn=(admin_dsns or {}).get(region), tenant_column=tenant_column, schemas=schemas,
            control_schema=control_schema or cfg.control.schema_, backstop_key=key)
        try:
            shapes[region] = await _tenant_columns(dsn, tenant_column, schemas)
        except Exception as e:  # noqa: BLE001 - reported by the region's own connect check
            out.schema.add("regions.schema", SKIP, f"region {region}: tenant tables not compared ({e})")
    if len(shapes) >= 2:
        first, *rest = shapes
        differ = False
        for region in rest:
            a, b = shapes[first], shapes[region]
            for t in sorted(set(a) | set(b)):
                if a.get(t) != b.get(t):
                    differ = True
                    what = ("missing" if t not in b else "extra" if t not in a else
                            f"columns differ: {a[t]} vs {b[t]}")
                    out.schema.add("regions.schema", FAIL, f"tenant table {t}: region {region} vs {first}: {what}",
                                   "apply the same migrations to every region's server (and rerun the bootstrap)",
                                   subject=t)
        if not differ:
            out.schema.add("regions.schema", PASS,
                           f"the tenant tables are the same on every region ({', '.join(shapes)}): "
                           f"{len(shapes[first])} tables")
    return out

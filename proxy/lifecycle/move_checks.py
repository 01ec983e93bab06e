"""What a tenant move checks and compares: the tenant tables of source and target (a readable diff), the
replica identities a row-filtered publication needs, and per-table row counts and checksums of one
tenant.  Used by :mod:`proxy.lifecycle.move`."""

from __future__ import annotations

from proxy.lifecycle.tables import TenantSchema

_KEY_SQL = """
SELECT c.relreplident::text AS replident,
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.i) FROM pg_index x
                   CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY k(attnum, i)
                   JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                  WHERE x.indrelid = c.oid AND x.indisprimary), '{}') AS pkey,
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.i) FROM pg_index x
                   CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY k(attnum, i)
                   JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                  WHERE x.indrelid = c.oid AND x.indisreplident), '{}') AS identkey
FROM pg_class c WHERE c.oid = $1::regclass
"""


async def key_columns(conn, schema: TenantSchema) -> dict[str, dict]:
    out = {}
    for key, t in schema.tables.items():
        r = await conn.fetchrow(_KEY_SQL, t.qualified)
        out[key] = {"replident": r["replident"], "pkey": list(r["pkey"]), "identkey": list(r["identkey"])}
    return out


def schema_diff(src: TenantSchema, src_keys: dict, tgt: TenantSchema, tgt_keys: dict) -> list[str]:
    """Readable differences between the tenant tables on the source and on the target."""
    out: list[str] = []
    for key in sorted(set(src.tables) | set(tgt.tables)):
        s, t = src.tables.get(key), tgt.tables.get(key)
        if t is None:
            out.append(f"{key}: missing on the target")
            continue
        if s is None:
            out.append(f"{key}: a tenant table on the target only")
            continue
        scols = [(c.name, c.type, c.not_null, c.generated) for c in s.columns]
        tcols = [(c.name, c.type, c.not_null, c.generated) for c in t.columns]
        if scols != tcols:
            tn = {c[0]: c for c in tcols}
            sn = {c[0]: c for c in scols}
            for c in scols:
                if c[0] not in tn:
                    out.append(f"{key}.{c[0]}: missing on the target (source: {c[1]})")
                elif tn[c[0]] != c:
                    o = tn[c[0]]
                    out.append(f"{key}.{c[0]}: source {c[1]}{' NOT NULL' if c[2] else ''}"
                               f"{' GENERATED' if c[3] else ''}, target {o[1]}{' NOT NULL' if o[2] else ''}"
                               f"{' GENERATED' if o[3] else ''}")
            for c in tcols:
                if c[0] not in sn:
                    out.append(f"{key}.{c[0]}: on the target only ({c[1]})")
            if not any(line.startswith(f"{key}.") for line in out):
                out.append(f"{key}: columns in a different order (source: {', '.join(c[0] for c in scols)}; "
                           f"target: {', '.join(c[0] for c in tcols)})")
        if src_keys[key]["pkey"] != tgt_keys[key]["pkey"]:
            out.append(f"{key}: primary key source ({', '.join(src_keys[key]['pkey']) or 'none'}), "
                       f"target ({', '.join(tgt_keys[key]['pkey']) or 'none'})")
    return out


def identity_problems(schema: TenantSchema, keys: dict) -> list[str]:
    """Tables whose UPDATE/DELETE would fail once published with a row filter on the tenant column
    (PostgreSQL 15: the filter may use replica identity columns only)."""
    out = []
    for key, t in sorted(schema.tables.items()):
        k = keys[key]
        cols = {"d": k["pkey"], "i": k["identkey"]}.get(k["replident"])
        if k["replident"] == "f":
            continue
        if not cols:
            out.append(f"{key}: no primary key or replica identity (UPDATE and DELETE on it would fail while "
                       "it is published)")
        elif t.tenant_column not in cols:
            out.append(f"{key}: the tenant column {t.tenant_column} is not part of its replica identity "
                       f"({', '.join(cols)})")
    return out


async def checksums(conn, schema: TenantSchema, tenant: str, *, own_tx: bool = True) -> dict[str, tuple[int, str]]:
    """Per table (count, checksum) of the tenant's rows, from one snapshot (``own_tx=False``: the snapshot of
    the REPEATABLE READ transaction ``conn`` is in)."""
    async def run():
        out = {}
        for key, t in sorted(schema.tables.items()):
            r = await conn.fetchrow(
                f"SELECT count(*) AS n, coalesce(sum(('x' || substr(md5(r::text), 1, 15))::bit(60)::bigint), 0)::text"
                f" AS s FROM {t.qualified} r WHERE {t.tenant_predicate(tenant, 'r')}")
            out[key] = (r["n"], r["s"])
        return out

    if not own_tx:
        return await run()
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await run()


async def row_counts(conn, schema: TenantSchema, tenant: str) -> dict[str, int]:
    """Per table the tenant's rows, in the snapshot of the transaction ``conn`` is in."""
    return {key: await conn.fetchval(f"SELECT count(*) FROM {t.qualified} WHERE {t.tenant_predicate(tenant)}")
            for key, t in sorted(schema.tables.items())}

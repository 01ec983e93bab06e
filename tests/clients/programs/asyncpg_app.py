"""An asyncpg application: the default pool (its reset runs on every release), prepare,
executemany, copy_records_to_table without the tenant column, a cursor in a transaction."""

import asyncio
import sys

import asyncpg

LO = 971000


def say(*a):
    print(*a, flush=True)


def rows(rs):
    return [tuple(r) for r in rs]


async def main(dsn: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=2)
    try:
        for i in range(4):  # each release resets the connection (pg_advisory_unlock_all; CLOSE ALL; ...)
            async with pool.acquire() as conn:
                say("pool", i, await conn.fetchval("SELECT count(*) FROM customers WHERE customer_id < 1000"))
        async with pool.acquire() as conn:
            stmt = await conn.prepare("SELECT name FROM customers WHERE customer_id = $1")
            say("prepared", [await stmt.fetchval(k) for k in (1, 2, 3)])
            await conn.executemany("INSERT INTO customers (customer_id, name) VALUES ($1, $2)",
                                   [(LO + 1, "a"), (LO + 2, "b")])
            async with conn.transaction():
                cur = await conn.cursor("SELECT customer_id, name FROM customers WHERE customer_id > $1 ORDER BY 1", LO)
                say("cursor", rows(await cur.fetch(2)), rows(await cur.fetch(5)))
            try:  # PostgreSQL refuses COPY FROM under row-level security; tenantgate takes it
                say("copy in ok", await conn.copy_records_to_table("customers", records=[(LO + 3, "c")],
                                                                   columns=["customer_id", "name"]))
            except asyncpg.PostgresError as e:
                say("copy in ERROR", e.sqlstate)
            try:
                await conn.execute("SELECT pg_advisory_lock(1)")
            except asyncpg.PostgresError as e:
                say("advisory", e.sqlstate)
            say("types", rows(await conn.fetch("SELECT 1::int2, 2.5::numeric, 'x'::text, ARRAY[1,2], '{\"a\":1}'::jsonb")))
            await conn.execute("DELETE FROM customers WHERE customer_id > $1", LO)
    finally:
        await pool.close()
    say("done")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))

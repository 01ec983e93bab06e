"""The embedded cluster the whole suite stands on."""

import asyncpg


async def test_cluster_accepts_scram_superuser(pg):
    conn = await asyncpg.connect(pg.admin_dsn)
    try:
        assert await conn.fetchval("SELECT current_setting('server_version_num')::int / 10000") == 15
        assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    finally:
        await conn.close()


def test_make_db_gives_empty_database(pg, make_db):
    name, dsn = make_db("empty")
    assert pg.psql("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace", database=name).strip() == "0"

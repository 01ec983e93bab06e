"""`tenantgate doctor` fails when a cross-tenant channel the bootstrap closed is opened again.

One test per channel (proxy/doctor_backstop.py CHANNELS), plus the guard and the backstop
policies: a fresh bootstrapped database passes; re-opening the channel the way a careless
migration or DBA would (GRANT ... TO PUBLIC, ALTER SYSTEM, a permissive policy) makes exactly
that check fail.
"""

from __future__ import annotations

import uuid

import pytest

from support.deploy import (
    APP_PASSWORD, BACKSTOP_KEY, CONTROL_PASSWORD, DEMO_SCHEMA, hardened_cluster_with_relay, socket_admin_dsn,
)
from proxy.bootstrap import apply_bootstrap
from proxy.doctor import diagnose
from proxy.doctor_backstop import CHANNELS


@pytest.fixture(scope="module")
def env():
    with hardened_cluster_with_relay("tenantgate-doctor-bs-", "doctorbs") as cluster_relay:
        yield cluster_relay


@pytest.fixture
def app_db(env):
    cluster, _ = env
    name = f"app_{uuid.uuid4().hex[:8]}"
    cluster.psql(f"CREATE DATABASE {name}")
    cluster.psql(DEMO_SCHEMA + "\nCREATE SEQUENCE public.ticket_seq;", database=name)
    apply_bootstrap(socket_admin_dsn(cluster, name), APP_PASSWORD, CONTROL_PASSWORD, backstop_key=BACKSTOP_KEY)
    return name


async def doctor(env, db, key: bytes | None = bytes.fromhex(BACKSTOP_KEY)):
    cluster, relay = env
    return await diagnose(relay.dsn("tenantgate_app", APP_PASSWORD, db, sslmode="require"), backstop_key=key)


def failing(report) -> set[str]:
    return {f.check for f in report.failures}


async def test_bootstrapped_database_passes_every_backstop_check(env, app_db):
    report = await doctor(env, app_db)
    assert report.ok, report.to_text()
    passed = {f.check for f in report.findings if f.status == "pass"}
    assert set(CHANNELS) | {"backstop.guard", "backstop.key", "rls.policy"} <= passed


# channel -> SQL (as superuser, in the app database) that opens it again
REOPEN = {
    "channel.activity": ["GRANT SELECT ON pg_stat_activity TO PUBLIC",
                         "GRANT EXECUTE ON FUNCTION pg_stat_get_activity(integer) TO PUBLIC"],
    "channel.stats_counters": ["GRANT EXECUTE ON FUNCTION pg_stat_get_tuples_inserted(oid) TO PUBLIC"],
    "channel.locks": ["GRANT SELECT ON pg_locks TO PUBLIC", "GRANT EXECUTE ON FUNCTION pg_lock_status() TO PUBLIC"],
    "channel.column_stats": ["GRANT SELECT ON pg_stats TO PUBLIC"],
    "channel.large_objects": ["GRANT EXECUTE ON FUNCTION lo_creat(integer) TO PUBLIC"],
    "channel.temp": ["DO $$ BEGIN EXECUTE format('GRANT TEMP ON DATABASE %I TO PUBLIC', current_database()); END $$"],
    "channel.advisory_locks": ["GRANT EXECUTE ON FUNCTION pg_advisory_lock(bigint) TO PUBLIC"],
    "channel.notify": ["GRANT EXECUTE ON FUNCTION pg_notify(text, text) TO PUBLIC"],
    "channel.prepared_xacts": ["GRANT SELECT ON pg_prepared_xacts TO PUBLIC",
                               "GRANT EXECUTE ON FUNCTION pg_prepared_xact() TO PUBLIC"],
    "channel.setseed": ["GRANT EXECUTE ON FUNCTION setseed(double precision) TO PUBLIC"],
    "channel.signal": ["GRANT EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) TO PUBLIC"],
    "channel.sequences": ["GRANT SELECT ON SEQUENCE public.ticket_seq TO tenantgate_app"],
    "channel.truncate": ["GRANT TRUNCATE ON public.orders TO tenantgate_app"],
    "channel.pg_stat_statements": ["CREATE EXTENSION pg_stat_statements",
                                   "GRANT EXECUTE ON FUNCTION pg_stat_statements_reset(oid, oid, bigint) TO PUBLIC"],
    "channel.foreign_data": ["CREATE EXTENSION postgres_fdw", "GRANT USAGE ON FOREIGN DATA WRAPPER postgres_fdw TO PUBLIC"],
}


def test_every_channel_has_a_reopening_test():
    assert set(REOPEN) == set(CHANNELS)


@pytest.mark.parametrize("check", sorted(REOPEN))
async def test_reopened_channel_fails_doctor(env, app_db, check):
    cluster, _ = env
    for sql in REOPEN[check]:
        cluster.psql(sql, database=app_db)
    report = await doctor(env, app_db)
    assert check in failing(report), report.to_text()
    # (installing an extension is also doctor's older extension.<name> finding)
    assert failing(report) - {check} <= {"extension.postgres_fdw", "extension.pg_stat_statements"}, report.to_text()
    # rerunning the bootstrap (after migrations) closes it again
    apply_bootstrap(socket_admin_dsn(cluster, app_db), APP_PASSWORD, CONTROL_PASSWORD)
    assert (await doctor(env, app_db)).ok


async def test_max_prepared_transactions_opens_prepared_xacts(env, app_db):
    """PREPARE TRANSACTION leaves a transaction (and its locks) behind, visible to all."""
    cluster, _ = env
    cluster.psql("ALTER SYSTEM SET max_prepared_transactions = 5")
    cluster.restart()
    try:
        report = await doctor(env, app_db)
    finally:
        cluster.psql("ALTER SYSTEM RESET max_prepared_transactions")
        cluster.restart()
    assert "channel.prepared_xacts" in failing(report)


async def test_guard_membership_fails_doctor(env, app_db):
    cluster, _ = env
    cluster.psql("GRANT tenantgate_guard TO tenantgate_app")
    try:
        report = await doctor(env, app_db)
    finally:
        cluster.psql("REVOKE tenantgate_guard FROM tenantgate_app")
    assert "backstop.guard" in failing(report)
    assert "act as tenantgate_guard" in report.by_check("backstop.guard")[0].message


async def test_guard_table_grant_fails_doctor(env, app_db):
    cluster, _ = env
    cluster.psql("GRANT UPDATE ON tenantgate_guard.binding TO tenantgate_app", database=app_db)
    report = await doctor(env, app_db)
    assert failing(report) == {"backstop.guard"}


async def test_wrong_key_fails_doctor_missing_key_warns(env, app_db):
    report = await doctor(env, app_db, key=b"\x01" * 32)
    assert failing(report) == {"backstop.key"}
    cluster, _ = env
    cluster.psql("DELETE FROM tenantgate_guard.key", database=app_db)
    report = await doctor(env, app_db)
    assert "backstop.key" in {f.check for f in report.warnings}


@pytest.mark.parametrize("sql", [
    "CREATE POLICY everyone ON customers USING (true)",
    "DROP POLICY tenantgate_tenant_delete ON customers",
    "ALTER POLICY tenantgate_tenant_isolation ON customers USING (tenant_id = current_setting('tenantgate.tenant_id'))",
])
async def test_policy_that_is_not_the_backstop_fails_doctor(env, app_db, sql):
    cluster, _ = env
    cluster.psql(sql, database=app_db)
    report = await doctor(env, app_db)
    assert "rls.policy" in failing(report)
    assert [f.subject for f in report.failures if f.check == "rls.policy"] == ["public.customers"]

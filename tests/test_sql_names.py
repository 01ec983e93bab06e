"""proxy.policy.names: the one quote_ident (rewriter, lifecycle, doctor) and the tenant setting's name."""

from __future__ import annotations

import psycopg
import pytest

from proxy.policy.names import TENANT_GUC, quote_ident
from proxy.policy.tenantvalue import tenant_guc_reference
from proxy.seam import SqlStateError


@pytest.mark.parametrize("name", ["orders", "Orders", 'we"ird', "with space", "ünï", 'x""y', "select"])
def test_quote_ident_is_read_back_by_postgresql_as_the_same_name(pg, name):
    with psycopg.connect(pg.admin_dsn, autocommit=True) as conn:
        got = conn.execute(f"SELECT 1 AS {quote_ident(name)}").description[0].name
    assert got == name


def test_a_nul_in_an_identifier_is_refused_not_truncated():
    with pytest.raises(SqlStateError) as e:
        quote_ident("orders\x00; DROP TABLE x")
    assert e.value.sqlstate == "22023"


@pytest.mark.parametrize("type_,value,expected", [("text", "o'neil", "o'neil"), ("integer", "42", 42)])
def test_the_tenant_setting_reference_reads_what_the_proxy_sets(pg, type_, value, expected):
    """Statements that outlive one execution name the tenant by TENANT_GUC (tenantvalue)."""
    with psycopg.connect(pg.admin_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_catalog.set_config(%s, %s, false)", (TENANT_GUC, value))
        assert conn.execute(f"SELECT {tenant_guc_reference(type_)}").fetchone()[0] == expected

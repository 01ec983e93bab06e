"""COPY FROM STDIN without the tenant column (issue 14 item 6; proxy/policy/copy_fill.py).

The proxy appends the tenant column to the statement's column list and adds the session's
tenant to every row: text, CSV (fields with newlines, quotes, delimiters) and binary, through
psycopg 3, asyncpg and psql's \\copy.  A malformed stream ends the COPY with nothing inserted.
"""

from __future__ import annotations

import os
import struct
import subprocess
from urllib.parse import urlsplit

import asyncpg
import psycopg
import pytest

from support.e2e import admin_execute, admin_rows
from proxy.policy.copy_fill import CopyFill
from proxy.policy.statement_result import CopyInSpec

LO, HI = 993000, 993999


@pytest.fixture
def clean(demo):
    admin_execute(demo, "DELETE FROM customers WHERE customer_id BETWEEN %s AND %s", [LO, HI])
    yield
    admin_execute(demo, "DELETE FROM customers WHERE customer_id BETWEEN %s AND %s", [LO, HI])


def _landed(demo):
    with psycopg.connect(demo.admin) as a:
        return a.execute("SELECT tenant_id, customer_id, name, email FROM customers "
                         "WHERE customer_id BETWEEN %s AND %s ORDER BY 2", [LO, HI]).fetchall()


def test_text_csv_and_binary_through_psycopg(demo, clean):
    globex_before = admin_rows(demo, "customers", "globex")
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy("COPY customers (customer_id, name, email) FROM STDIN") as cp:
            cp.write_row((LO + 1, "tab\there", "a@x"))
            cp.write_row((LO + 2, "new\nline \\ slash", None))
        with cur.copy("COPY customers (customer_id, name, email) FROM STDIN (FORMAT csv, HEADER true)") as cp:
            cp.write(b'id,name,email\n')
            cp.write(f'{LO + 3},"multi\nline, ""quoted""",c@x\n{LO + 4},plain,\n'.encode())
        with cur.copy("COPY customers (name, customer_id) FROM STDIN (FORMAT binary)") as cp:
            cp.set_types(["text", "int4"])
            cp.write_row(("binary", LO + 5))
    assert _landed(demo) == [
        ("acme", LO + 1, "tab\there", "a@x"), ("acme", LO + 2, "new\nline \\ slash", None),
        ("acme", LO + 3, 'multi\nline, "quoted"', "c@x"), ("acme", LO + 4, "plain", None),
        ("acme", LO + 5, "binary", None)]
    assert admin_rows(demo, "customers", "globex") == globex_before


async def test_asyncpg_copy_records_to_table_without_the_tenant_column(demo, clean):
    conn = await asyncpg.connect(demo.app("globex"))
    try:
        res = await conn.copy_records_to_table("customers", records=[(LO + 10, "ap", "ap@x"), (LO + 11, "aq", None)],
                                               columns=["customer_id", "name", "email"])
        assert res == "COPY 2"
    finally:
        await conn.close()
    assert _landed(demo) == [("globex", LO + 10, "ap", "ap@x"), ("globex", LO + 11, "aq", None)]


def test_psql_backslash_copy_without_the_tenant_column(demo, clean, tmp_path):
    f = tmp_path / "rows.csv"
    f.write_text(f"{LO + 20},from psql\n{LO + 21},second\n")
    url = urlsplit(demo.app("acme"))
    env = dict(os.environ, PGPASSWORD=url.password, PGSSLMODE="disable")
    out = subprocess.run(["psql", "-h", url.hostname, "-p", str(url.port), "-U", url.username, "-d", "app", "-X",
                          "-c", rf"\copy customers (customer_id, name) FROM '{f}' WITH (FORMAT csv)"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert [r[:3] for r in _landed(demo)] == [("acme", LO + 20, "from psql"), ("acme", LO + 21, "second")]


@pytest.mark.parametrize("payload", [
    b"1\n",                                   # too few fields
    b"993030\tx\ty\tz\n",                     # too many fields
])
def test_a_row_with_the_wrong_field_count_inserts_nothing(demo, clean, payload):
    with psycopg.connect(demo.app("acme"), autocommit=True) as conn:
        with pytest.raises(psycopg.Error):
            with conn.cursor().copy("COPY customers (customer_id, name) FROM STDIN") as cp:
                cp.write(f"{LO + 29}\tgood row\n".encode())
                cp.write(payload)
    assert _landed(demo) == []


def test_rows_split_across_copydata_messages_at_every_byte():
    spec = CopyInSpec(format="csv", ncols=2, tenant_index=-1, delimiter=",", null="", quote='"', escape='"',
                      header=False, table="t", fill=True)
    data = b'1,"a\nb"\r\n2,"x,""y"""\n3,plain'
    expected = b'1,"a\nb","acme"\r\n2,"x,""y""","acme"\n3,plain,"acme"\n'
    for cut in range(len(data) + 1):
        f = CopyFill(spec, "acme", "text")
        assert f.feed(data[:cut]) is None
        first = f.take()
        assert f.feed(data[cut:]) is None
        assert f.finish() is None
        assert first + f.take() == expected, cut


def test_binary_rows_split_across_messages():
    spec = CopyInSpec(format="binary", ncols=1, tenant_index=-1, delimiter="\t", null="\\N", quote='"', escape='"',
                      header=False, table="t", fill=True)
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
    row = struct.pack("!hi", 1, 4) + struct.pack("!i", 7)
    data = header + row + row + struct.pack("!h", -1)
    tenant = struct.pack("!i", 4) + b"acme"
    expected = header + (struct.pack("!hi", 2, 4) + struct.pack("!i", 7) + tenant) * 2 + struct.pack("!h", -1)
    for cut in range(len(data) + 1):
        f = CopyFill(spec, "acme", "text")
        assert f.feed(data[:cut]) is None
        first = f.take()
        assert f.feed(data[cut:]) is None and f.finish() is None
        assert first + f.take() == expected, cut

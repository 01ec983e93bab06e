"""Units of the backstop binding (proxy/backstop.py) and its varcache form (no database)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from proxy import backstop, varcache


KEY = bytes(range(32))


def test_mac_is_hmac_sha256_over_the_documented_message():
    m = backstop.mac(KEY, "acme", "write", 123, 456, 7)
    assert m == hmac.new(KEY, b"4:acme|write|123|456|7", hashlib.sha256).hexdigest()
    assert backstop.mac(KEY, "acme", "write", 123, 456, 7, local=True) == \
        hmac.new(KEY, b"4:acme|write|123|456|7|local", hashlib.sha256).hexdigest()
    # the length prefix keeps tenant names with separators unambiguous
    assert backstop.mac(KEY, "a|write", "read", 1, 2, 3) != backstop.mac(KEY, "a", "write|read", 1, 2, 3)


def test_binder_nonces_increase_and_literals_are_escaped():
    b = backstop.BackendBinder(KEY, 10, 20)
    first, second = b.call("o'brien\\", "write"), b.call("o'brien\\", "write")
    assert "E'o\\'brien\\\\'" in first and ", 1, " in first and ", 2, " in second
    assert b.sql(None, "none").startswith("SELECT tenantgate_guard.bind(NULL, E'none', 3, ")
    with pytest.raises(ValueError):
        b.call(None, "write")


def test_key_parsing():
    assert backstop.parse_key("ab" * 32) == b"\xab" * 32
    for bad in ("zz" * 32, "ab" * 8, "ab" * 65):
        with pytest.raises(backstop.BackstopError):
            backstop.parse_key(bad)


def test_varcache_binds_first_and_reads_the_binding_back():
    to_set = {"application_name": "x", backstop.BINDING_SETTING: "read:acme"}
    calls = []
    sql = varcache.apply_sql(to_set, [], lambda v: calls.append(v) or "tenantgate_guard.bind(...)")
    assert calls == ["read:acme"]
    assert sql.startswith("SELECT tenantgate_guard.bind(...), pg_catalog.set_config(E'application_name'")
    assert "tenantgate.backstop" not in sql
    with pytest.raises(ValueError):  # a binding change with no binder fails closed
        varcache.apply_sql(to_set, [])
    assert varcache.apply_sql({}, [backstop.BINDING_SETTING], lambda v: f"B({v})") == "SELECT B(none:)"
    assert varcache.probe_sql(["timezone", backstop.BINDING_SETTING]) == \
        "SELECT pg_catalog.current_setting(E'timezone', true), tenantgate_guard.current_binding()"
    assert backstop.split_value(backstop.binding_value("acme", "write")) == ("acme", "write")
    assert backstop.binding_value("acme", "none") == "none:"

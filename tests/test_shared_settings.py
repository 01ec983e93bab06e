"""Sessions with the same settings share one read-only mapping (proxy/session/settings.py):
a change in one session makes a new mapping and never reaches another session."""

from __future__ import annotations

import pytest

from proxy.session.settings import PooledSettings, shared


class _Gate:
    tenant_epoch = 0

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant

    def backend_settings(self) -> dict[str, str]:
        return {"tenantgate.tenant_id": self.tenant}


def _session(tenant: str, connect: dict[str, str]) -> PooledSettings:
    s = PooledSettings(pool=None, bkey=None)
    s.connect = shared(connect)
    s.want(s.connect, _Gate(tenant))
    return s


def test_equal_settings_share_one_mapping_and_different_tenants_do_not():
    a = _session("acme", {"application_name": "app"})
    b = _session("acme", {"application_name": "app"})
    c = _session("globex", {"application_name": "app"})
    assert a.wanted is b.wanted and a.connect is b.connect
    assert c.wanted is not a.wanted
    assert c.wanted["tenantgate.tenant_id"] == "globex" and a.wanted["tenantgate.tenant_id"] == "acme"


def test_a_shared_mapping_cannot_be_changed_in_place():
    a = _session("acme", {"datestyle": "ISO"})
    with pytest.raises(TypeError):
        a.wanted["datestyle"] = "German"  # type: ignore[index]
    with pytest.raises(AttributeError):
        a.wanted.update({"datestyle": "German"})  # type: ignore[attr-defined]


def test_a_set_read_back_in_one_session_leaves_the_other_sessions_settings():
    a = _session("acme", {"datestyle": "ISO"})
    b = _session("acme", {"datestyle": "ISO"})
    a.want({"datestyle": "German"}, _Gate("acme"))  # the probe after a SET in session a
    assert a.wanted["datestyle"] == "German"
    assert b.wanted["datestyle"] == "ISO" and b.wanted["tenantgate.tenant_id"] == "acme"


def test_refresh_after_a_tenant_switch_makes_the_new_tenants_settings():
    a = _session("acme", {})
    b = _session("acme", {})
    g = _Gate("globex")
    g.tenant_epoch = 1
    assert a.refresh_wanted(g)["tenantgate.tenant_id"] == "globex"
    assert b.wanted["tenantgate.tenant_id"] == "acme"

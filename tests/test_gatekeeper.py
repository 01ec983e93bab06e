"""The production gatekeeper's own decisions (the parts it composes are tested elsewhere)."""

import pytest

from proxy.config import Config
from proxy.gatekeeper import PolicyGatekeeper
from proxy.seam import SessionKind, SessionRefused, StartupInfo, UserRecord


async def test_passthrough_users_are_refused_when_a_policy_is_configured():
    gk = PolicyGatekeeper(Config(), engine=None, catalog=None, plane=None)
    user = UserRecord(name="raw", scram_verifier="SCRAM-SHA-256$4096:x$y:z", kind=SessionKind.PASSTHROUGH)
    startup = StartupInfo(user="raw", database="app", client_addr="127.0.0.1:1", options={},
                          application_name=None, session_id="s1", tls=False)
    with pytest.raises(SessionRefused) as e:
        await gk.open_session(user, startup)
    assert e.value.sqlstate == "28000" and "passthrough" in e.value.message

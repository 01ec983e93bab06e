"""Transaction pooling: the settings a client's statements must find on a borrowed connection.

``wanted`` is what this session's connection must have (connection-time settings, the
client's SETs as read back, and the gate's own settings: tenant GUC, backstop binding);
:mod:`proxy.varcache` compares it with a connection's state.  After a statement that changes
settings the relay reads them back (the *probe*) before the connection goes back to the pool.
Pure state; the relay core and :mod:`proxy.session.pooled` use it.

``connect`` and ``wanted`` are read-only mappings shared by every session with the same
settings (:func:`shared`): most clients of one application connect with the same parameters,
and an idle session then holds no settings of its own.  A change makes a new mapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from proxy import backstop

_SHARED: dict[frozenset, Mapping[str, str]] = {}
_SHARED_MAX = 4096  # distinct setting combinations kept for sharing (then the table starts over)
EMPTY: Mapping[str, str] = MappingProxyType({})


def shared(settings: Mapping[str, str]) -> Mapping[str, str]:
    """A read-only mapping equal to ``settings``, the same object for equal settings."""
    if not settings:
        return EMPTY
    key = frozenset(settings.items())
    found = _SHARED.get(key)
    if found is None:
        if len(_SHARED) >= _SHARED_MAX:
            _SHARED.clear()
        found = _SHARED[key] = MappingProxyType(dict(settings))
    return found


class PooledSettings:
    __slots__ = ("pool", "bkey", "probe_names", "probe_values", "connect", "wanted", "wanted_epoch", "reset",
                 "dirty", "pinned")

    def __init__(self, pool, bkey: bytes | None) -> None:
        self.pool = pool
        self.bkey = bkey  # the backstop key, when the gate binds connections (proxy/backstop.py)
        self.probe_names: tuple[str, ...] = ()
        self.probe_values: list | None = None
        self.connect: Mapping[str, str] = EMPTY  # connection-time settings: RESET ALL's values
        self.wanted: Mapping[str, str] = EMPTY
        self.wanted_epoch = None  # the gate's tenant_epoch ``wanted`` was last updated for
        self.reset = False  # a RESET ALL / DISCARD ALL ran since the last read-back
        self.dirty = False  # a SET ran since the connection was lent
        self.pinned = False  # session state on the connection (SQL PREPARE, WITH HOLD): keep it

    def gate_settings(self, gate) -> dict[str, str]:
        """The gate's backend settings plus, with the backstop configured, its binding."""
        settings = gate.backend_settings()
        if self.bkey is not None:
            settings[backstop.BINDING_SETTING] = backstop.binding_value(*gate.backstop_binding())
        return settings

    def want(self, settings: Mapping[str, str], gate) -> None:
        """``wanted`` becomes ``settings`` plus the gate's own."""
        self.wanted = shared({**settings, **self.gate_settings(gate)})

    def refresh_wanted(self, gate) -> Mapping[str, str]:
        """``wanted``, updated when the gate's tenant may have changed."""
        epoch = gate.tenant_epoch
        if epoch != self.wanted_epoch:
            self.want(self.wanted, gate)
            self.wanted_epoch = epoch
        return self.wanted

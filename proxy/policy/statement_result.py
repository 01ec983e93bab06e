"""The tenant-independent result of checking one statement (shared by the passes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.policy.edits import Edit


@dataclass
class CopyInSpec:
    """How to find the tenant column in a COPY ... FROM STDIN data stream."""

    format: str  # "text" | "csv" | "binary"
    ncols: int
    tenant_index: int
    delimiter: str
    null: str
    quote: str
    escape: str
    header: bool
    table: str
    # the client's rows lack the tenant column: the proxy adds it (proxy/policy/copy_fill.py)
    fill: bool = False


@dataclass
class Piece:
    edits: list[Edit] = field(default_factory=list)
    statement_class: str = "other"  # read | write | tcl | set | other
    touches_tenant: bool = False
    writes: bool = False
    read_write_request: bool = False  # BEGIN READ WRITE and friends (refused in read-only sessions)
    param_checks: set[int] = field(default_factory=set)
    # parameters naming the setting of current_setting($n), checked at Bind (catalog_views.SettingNameCheck)
    setting_params: set[int] = field(default_factory=set)
    required_literals: list[str] = field(default_factory=list)
    copy_in: CopyInSpec | None = None
    prepared: tuple[str, ...] = ()
    deallocated: tuple[str, ...] = ()
    deallocate_all: bool = False
    requires_prepared: tuple[str, ...] = ()
    tenant_token: tuple[str, bool] | None = None  # (token, is_local)
    # leaves state on the backend connection that later transactions use (SQL PREPARE,
    # DECLARE ... WITH HOLD): a transaction-pooled session keeps its connection from then on
    pins_session: bool = False
    # RESET ALL / DISCARD ALL: the client's settings go back to their reset values (resets.py)
    resets_settings: bool = False

    def absorb(self, other: "Piece") -> None:
        """Merge the effects of an inner statement (EXPLAIN x, PREPARE p AS x, ...)."""
        self.edits.extend(other.edits)
        self.touches_tenant |= other.touches_tenant
        self.writes |= other.writes
        self.param_checks |= other.param_checks
        self.setting_params |= other.setting_params
        self.required_literals.extend(other.required_literals)
        self.requires_prepared += other.requires_prepared
        self.pins_session |= other.pins_session

"""The one seam between the protocol side and the policy side.

The server (``proxy.server`` and friends) knows bytes and sockets but not SQL.
The policy side (``proxy.policy``) knows SQL but not sockets.  They meet here:

* At connection time the server authenticates the client against a
  :class:`UserDirectory` (SCRAM verifiers) and then asks a :class:`Gatekeeper`
  to open a :class:`SessionGate` for the session.  Opening may be refused with
  :class:`SessionRefused` (sent to the client as FATAL).
* Every statement the client sends, on every path (simple Query, Parse, COPY,
  several statements in one Query) is handed to :meth:`SessionGate.check`,
  which returns either :class:`Forward` (the SQL to send to PostgreSQL) or
  :class:`Refuse` (an ErrorResponse for the client; the session stays usable).

Everything in this module is plain data and protocols: no I/O.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence, runtime_checkable


class Origin(enum.Enum):
    """Which protocol path a statement arrived on."""

    SIMPLE = "simple"  # Query ('Q') message; may hold several statements
    PARSE = "parse"  # Parse ('P') message of the extended protocol


class SessionKind(enum.Enum):
    TENANT = "tenant"  # application user bound to one tenant, or using tenant tokens
    OPERATOR = "operator"  # human operator under a just-in-time grant
    PASSTHROUGH = "passthrough"  # no policy at all (only for tests of the bare proxy)


@dataclass(frozen=True)
class UserRecord:
    """One entry of tenantgate's own user registry.

    ``scram_verifier`` is in PostgreSQL's pg_authid format:
    ``SCRAM-SHA-256$<iterations>:<salt b64>$<StoredKey b64>:<ServerKey b64>``.
    """

    name: str
    scram_verifier: str
    kind: SessionKind
    tenant: str | None = None  # credential-bound tenant (application users)
    token_tenants: bool = False  # may pick its tenant with a signed token
    totp_secret: str | None = None  # operators with TOTP enrolled
    roles: frozenset[str] = frozenset()  # e.g. {"operator"}, {"approver"}
    admin: bool = False  # may use the admin console (config admin.database) and no other database


class UserDirectory(Protocol):
    async def lookup(self, name: str) -> UserRecord | None: ...


@dataclass(frozen=True)
class StartupInfo:
    user: str
    database: str
    client_addr: str  # "ip:port" or "unix"
    options: dict[str, str]  # from the startup "options" (-c name=value) and extra startup parameters
    application_name: str | None
    session_id: str  # tenantgate's own id for the session (hex)
    tls: bool


_SAFE_ENCODING_PREFIXES = ("latin", "iso8859", "win12", "win866", "win874", "cp12", "cp866", "cp874",
                           "koi8", "euc", "alt", "tcvn", "abc", "mule")


def client_encoding_is_safe(name: str) -> bool:
    """Whether statement text in client encoding ``name`` reads the same to tenantgate and PostgreSQL.

    The proxy reads statement text as UTF-8.  UTF8, SQL_ASCII, single-byte and EUC encodings keep
    every ASCII byte an ASCII character; SJIS, BIG5, GBK, UHC, GB18030 and JOHAB can hide a
    backslash or quote inside a multi-byte character, so PostgreSQL would see another statement.
    Names are normalised as PostgreSQL does (case and punctuation ignored).
    """
    norm = "".join(ch for ch in name.lower() if ch.isalnum())
    return norm in ("utf8", "unicode", "sqlascii") or norm.startswith(_SAFE_ENCODING_PREFIXES)


class SqlStateError(Exception):
    """An error that reaches a client or an operator as a PostgreSQL-style error: SQLSTATE, message,
    optional detail and hint.  The refusals of every part of tenantgate derive from it."""

    def __init__(self, sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint


class SessionRefused(SqlStateError):
    """Opening a session was refused: sent as FATAL, connection closed."""


class ParamCheck(Protocol):
    """A check on one bound parameter value (Bind), e.g. "$1 must be this tenant"."""

    # Declared parameter type OIDs (Parse) the check stays valid for; 0 (unspecified) always is.
    type_oids: frozenset[int]

    def accepts(self, format_code: int, value: bytes | None) -> bool: ...

    def describe(self) -> str: ...


class CopyInCheck(Protocol):
    """Stateful check of the rows of a COPY ... FROM STDIN stream.

    ``feed`` gets each CopyData payload in order; ``finish`` is called on
    CopyDone.  Either returns an error message to abort the COPY (the proxy
    then sends CopyFail to PostgreSQL, so nothing is committed), or None.
    """

    #: True when the check rewrites the stream: the proxy then forwards ``take()`` (after each
    #: ``feed`` and before CopyDone) instead of the client's bytes
    fills: bool

    def feed(self, data: bytes) -> str | None: ...

    def finish(self) -> str | None: ...

    def take(self) -> bytes: ...


@dataclass(frozen=True)
class Forward:
    """Send ``sql`` to PostgreSQL instead of what the client sent."""

    sql: str
    # For Parse: checks on bound parameter values, by 0-based parameter index.
    param_checks: tuple[tuple[int, ParamCheck], ...] = ()
    # For COPY ... FROM STDIN: a checker for the data stream (one per COPY).
    copy_in_check: Callable[[], CopyInCheck] | None = None
    # The statement class for audit and metrics: "read", "write", "ddl", "tcl", "set", "other".
    statement_class: str = "other"
    # Free-form data the gate wants back in audit hooks (e.g. original SQL).
    audit: Any = None
    # The statement leaves state on the backend connection that later transactions need
    # (SQL PREPARE, WITH HOLD cursors): a transaction-pooled session keeps its connection.
    pins_session: bool = False
    # The statement may change session settings without being a SET (set_config): a pooled
    # session reads its settings back afterwards so they follow it.
    changes_settings: bool = False
    # RESET ALL / DISCARD ALL: the client's settings go back to their reset values, i.e. the
    # connection-time ones (proxy.policy.resets); a pooled session puts those back afterwards.
    resets_settings: bool = False
    # The gate applied the statement's effect when it checked it (a tenant token switch): it may
    # run once, so it cannot be a named prepared statement and its unnamed statement binds once.
    single_use: bool = False


@dataclass(frozen=True)
class Refuse:
    """Do not forward; answer with ErrorResponse (severity ERROR)."""

    sqlstate: str
    message: str
    detail: str | None = None
    hint: str | None = None
    # Why, for metrics and logs (one of proxy.policy.refusal_reason.REASONS); "" = derive it
    # from sqlstate and message (proxy.policy.refusal_reason.refusal_reason).
    # (Not part of equality: two refusals with the same error are the same answer to the client.)
    reason: str = field(default="", compare=False)


Decision = Forward | Refuse


@dataclass(frozen=True)
class Outcome:
    """What became of a forwarded statement (for audit)."""

    sqlstate: str | None  # None = success
    command_tag: str | None  # e.g. "SELECT 3", "UPDATE 1"
    rows: int | None
    duration_s: float
    # Extra facts for the outcome record, e.g. {"copy_in": {"bytes": n, "sha256": hex}} for the
    # data an operator loaded with COPY ... FROM STDIN
    detail: dict | None = None


class SessionGate(Protocol):
    """Per-session policy object.  Created by :meth:`Gatekeeper.open_session`."""

    kind: SessionKind
    # True when every statement must be durably audited before it is forwarded
    # (operator sessions).  When False, audit_before/audit_after are not called.
    audited: bool
    # SQL the proxy runs on the backend connection right after connecting,
    # before the client's first statement (e.g. SET tenantgate.tenant_id ...).
    backend_setup_sql: Sequence[str]

    def check(self, sql: str, origin: Origin) -> Decision: ...

    def on_ready_for_query(self, tx_status: bytes) -> None:
        """Called with b"I", b"T" or b"E" on each ReadyForQuery (per-transaction state)."""

    async def audit_before(self, decision: Forward, params: Sequence[bytes | None] | None) -> Any:
        """Durably log a statement before it runs; raise to refuse it (then nothing runs)."""

    async def audit_after(self, handle: Any, outcome: Outcome) -> None: ...

    def on_refused(self, sql: str, refusal: Refuse) -> None:
        """A statement was refused (fire-and-forget logging of possible attacks)."""

    def set_terminator(self, terminate: Callable[[str, str], None]) -> None:
        """Give the gate a callback to end the session: terminate(sqlstate, message).

        Used to end operator sessions on grant expiry or revocation.
        """

    def warm_up(self, sql: str, origin: Origin) -> tuple[Callable[[], Any], Callable[[Any], None]] | None:
        """For a long statement whose analysis is cold: ``(compute, adopt)`` to run the analysis
        in a forked child and adopt its result, or None to analyse it in a worker thread."""

    async def close(self) -> None: ...


@runtime_checkable
class BackstopBound(Protocol):
    """A gate whose backend connections are bound to a tenant at the PostgreSQL backstop
    (proxy/backstop.py).  The session binds each connection before anything else runs."""

    # the session's hook for a tenant switch: (tenant, mode, local) -> the bind call to send, or
    # None when the proxy rebinds by itself (transaction pooling: at the settings read-back)
    backstop_bind: Callable[[str | None, str, bool], str | None] | None

    def backstop_binding(self) -> tuple[str | None, str]:
        """(tenant or None, mode) the session's connection must be bound to now."""


class PooledGate(SessionGate, Protocol):
    """What transaction pooling (proxy/session/pooled.py, settings.py) needs of a tenant gate:
    the settings that must follow the client from one borrowed connection to the next."""

    pooled: bool  # set by the session: RESET ALL / DISCARD ALL are followed by a settings read-back
    tenant_epoch: int  # changes whenever the session's tenant changes (a token switch)
    tracked_parameters: tuple[str, ...]  # the client-settable parameters read back after a SET

    def backend_settings(self) -> dict[str, str]:
        """Settings the proxy itself keeps on the connection (the tenant GUC)."""


class Gatekeeper(Protocol):
    """Decides who a session is, and gives it its SessionGate."""

    users: UserDirectory

    async def open_session(self, user: UserRecord, startup: StartupInfo) -> SessionGate: ...

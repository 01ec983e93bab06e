"""PostgreSQL's prepared statements and portals, as PostgreSQL's own replies say they are.

Sans-IO: no sockets, no SQL.  The session (``proxy.session.protocol``) tells the ledger what
it sends (Parse, Bind, Close, a simple Query) and what PostgreSQL answers (ParseComplete,
BindComplete, CloseComplete, ErrorResponse, ReadyForQuery); the ledger answers "which
statement (and which checks, audit text, class) will PostgreSQL really run for this name?".

Why: the proxy checks a Bind's tenant parameters and audits an Execute with the statement
it *believes* sits behind a name.  If that belief is updated when a Parse is *sent*, a Parse
that PostgreSQL refuses (42P05 duplicate name, a syntax error, or one skipped because an
earlier message of the pipeline failed) replaces the proxy's record while PostgreSQL keeps
the old statement, and the next Bind runs the old statement with the new one's checks.

The rules, mirroring PostgreSQL (postgres.c):

* Every Parse/Bind/Close the session forwards is a *pending operation* tagged with its Sync
  segment (the number of the Sync, or simple Query, that ends it).  PostgreSQL answers the
  ones it runs, in order, with ParseComplete/BindComplete/CloseComplete: each such reply
  confirms the oldest pending operation, whose effect is applied only then.
* An ErrorResponse in segment *s* discards every pending operation of *s*: PostgreSQL either
  failed on it or skipped it up to the Sync.  (A failing *unnamed* Parse has already dropped
  the previous unnamed statement; the ledger keeps the previous one, a harmless superset:
  a Bind of it fails in PostgreSQL.)
* A simple Query drops the unnamed statement and the unnamed portal once it has run (applied
  at its ReadyForQuery unless an error may have skipped it).  ReadyForQuery with status ``I``
  ends the transaction: every portal is gone.
* A lookup of a name whose latest pending operation belongs to the segment being sent is an
  exact prediction: if that operation fails, PostgreSQL skips the message asking, too.  A
  lookup whose latest pending operation belongs to an *earlier* segment cannot be predicted
  (that segment may still fail): the ledger answers :class:`Wait`, and the session holds the
  message until those replies have arrived.
* ``DEALLOCATE ALL`` / ``DISCARD ALL`` (seen as their command tags) drop every named statement.

A reply the ledger did not expect (ParseComplete with no pending Parse, ...) raises
:class:`LedgerError`: the session's view can no longer be trusted, it must end (fail closed).
"""

from __future__ import annotations

from typing import Any

PARSE = 1
BIND = 2
CLOSE_STATEMENT = 3
CLOSE_PORTAL = 4
QUERY = 5
PLACEHOLDER_PARSE = 6  # a Parse the proxy inserts (pooled re-prepare): answered, changes nothing here

_COMPLETION_OF = {PARSE: ord("1"), PLACEHOLDER_PARSE: ord("1"), BIND: ord("2"),
                  CLOSE_STATEMENT: ord("3"), CLOSE_PORTAL: ord("3")}

#: the backend message types the ledger must see (ParseComplete, BindComplete, CloseComplete)
COMPLETIONS = frozenset({ord("1"), ord("2"), ord("3")})


class LedgerError(Exception):
    """PostgreSQL's replies do not match what was sent: the session must end."""


class Wait:
    """The answer depends on replies of segment ``seg`` that have not arrived yet."""

    __slots__ = ("seg",)

    def __init__(self, seg: int):
        self.seg = seg

    def __repr__(self) -> str:
        return f"Wait(seg={self.seg})"


def is_checked(decision: Any) -> bool:
    """Whether a Bind of this statement must be inspected (parameter or COPY checks)."""
    return decision is not None and bool(getattr(decision, "param_checks", None)
                                         or getattr(decision, "copy_in_check", None) is not None)


class StatementLedger:
    """Statements (name -> the gate's Forward decision) and portals (name -> (decision, params)).

    ``None`` as a decision means "exists, nothing to check or audit known".
    """

    __slots__ = ("stmts", "portals", "_ops", "checked", "_stale")

    def __init__(self) -> None:
        self.stmts: dict[str, Any] = {}
        self.portals: dict[str, tuple[Any, tuple]] = {}
        self._ops: list[list] = []  # [seg, kind, name, value], oldest first
        # Some statement or portal (confirmed or pending) has checks: Binds and Executes must be
        # inspected.  Set as soon as one is sent; recomputed when nothing is pending (an upper bound).
        self.checked = False
        self._stale = False  # something was dropped since ``checked`` was last computed

    def empty(self) -> bool:
        """No statement, portal or pending operation known (a new ledger's state)."""
        return not self.stmts and not self.portals and not self._ops and not self.checked

    def _recompute_checked(self) -> None:
        if not self._ops:
            self._stale = False
            self.checked = any(is_checked(v) for v in self.stmts.values()) or any(
                is_checked(p[0]) for p in self.portals.values())

    # ---------------------------------------------------------------- state summaries

    @property
    def has_portals(self) -> bool:
        if self.portals:
            return True
        for op in self._ops:
            if op[1] == BIND:
                return True
        return False

    @property
    def pending(self) -> int:
        return len(self._ops)

    # ---------------------------------------------------------------- what the session sends

    def parse_sent(self, seg: int, name: str, decision: Any) -> None:
        if is_checked(decision):
            self.checked = True
        self._ops.append([seg, PARSE, name, decision])

    def placeholder_parse_sent(self, seg: int) -> None:
        self._ops.append([seg, PLACEHOLDER_PARSE, None, None])

    def bind_sent(self, seg: int, portal: str, decision: Any, params: tuple = ()) -> None:
        if is_checked(decision):
            self.checked = True
        self._ops.append([seg, BIND, portal, (decision, params)])

    def close_sent(self, seg: int, kind: bytes, name: str) -> None:
        self._ops.append([seg, CLOSE_STATEMENT if kind == b"S" else CLOSE_PORTAL, name, None])

    def query_sent(self, seg: int) -> None:
        self._ops.append([seg, QUERY, "", None])

    # ---------------------------------------------------------------- lookups

    def _latest(self, kinds: tuple[int, ...], name: str) -> list | None:
        for op in reversed(self._ops):
            if op[1] in kinds and op[2] == name:
                return op
        return None

    def statement(self, name: str, seg: int) -> Any:
        """What a message of segment ``seg`` naming statement ``name`` will reach in PostgreSQL:
        the decision, None (no such statement, or nothing known about it), or :class:`Wait`."""
        op = self._latest((PARSE, CLOSE_STATEMENT, QUERY) if name == "" else (PARSE, CLOSE_STATEMENT), name)
        if op is None:
            return self.stmts.get(name)
        if op[0] < seg:
            return Wait(op[0])
        return op[3] if op[1] == PARSE else None

    def statement_exists(self, name: str, seg: int) -> bool | Wait:
        """Whether PostgreSQL will hold statement ``name`` when a Parse of segment ``seg`` reaches it."""
        op = self._latest((PARSE, CLOSE_STATEMENT), name)
        if op is None:
            return name in self.stmts
        if op[0] < seg:
            return Wait(op[0])
        return op[1] == PARSE

    def portal(self, name: str, seg: int) -> tuple | None | Wait:
        op = self._latest((BIND, CLOSE_PORTAL, QUERY) if name == "" else (BIND, CLOSE_PORTAL), name)
        if op is None:
            return self.portals.get(name)
        if op[0] < seg:
            return Wait(op[0])
        return op[3] if op[1] == BIND else None

    # ---------------------------------------------------------------- what PostgreSQL answers

    def completed(self, t: int) -> None:
        """ParseComplete ('1'), BindComplete ('2') or CloseComplete ('3') arrived."""
        ops = self._ops
        i = 0
        # a simple Query's own effect does not produce these replies: look past it
        while i < len(ops) and ops[i][1] == QUERY:
            i += 1
        if i >= len(ops) or _COMPLETION_OF[ops[i][1]] != t:
            raise LedgerError(f"unexpected {chr(t)!r} reply from the database server "
                              f"(pending: {[op[1] for op in ops]})")
        _seg, kind, name, value = ops.pop(i)
        if kind == PARSE:
            if name in self.stmts:
                self._stale = True  # the unnamed statement replaced
            self.stmts[name] = value
        elif kind == BIND:
            self.portals[name] = value
        elif kind == CLOSE_STATEMENT:
            self.stmts.pop(name, None)
            self._stale = True
        elif kind == CLOSE_PORTAL:
            self.portals.pop(name, None)
            self._stale = True

    def failed(self, seg: int) -> None:
        """An ErrorResponse arrived while PostgreSQL works on segment ``seg``."""
        if self._ops:
            self._ops = [op for op in self._ops if op[0] > seg]
            self._stale = True

    def ready(self, seg: int, status: bytes) -> None:
        """ReadyForQuery ended segment ``seg`` with transaction status ``status``."""
        ops = self._ops
        while ops and ops[0][0] <= seg:
            op = ops.pop(0)
            if op[1] != QUERY:
                raise LedgerError(f"the database server did not answer a message of segment {seg}")
            self.stmts.pop("", None)
            self.portals.pop("", None)
            self._stale = True
        if status == b"I" and self.portals:
            self.portals.clear()
            self._stale = True
        if self.checked and self._stale:
            self._recompute_checked()

    def all_statements_dropped(self) -> None:
        """DEALLOCATE ALL / DISCARD ALL ran: no named statement is left (the unnamed one is)."""
        unnamed = self.stmts.get("", _MISSING)
        self.stmts.clear()
        if unnamed is not _MISSING:
            self.stmts[""] = unnamed
        self._stale = True
        self._recompute_checked()


_MISSING = object()

"""The statement ledger without sockets: PostgreSQL's replies, not the messages sent, decide
which statement and portal sit behind a name (proxy/session/ledger.py).

Segments are numbered as the session numbers them: the n-th Sync (or simple Query) ends segment n.
"""

from __future__ import annotations

import pytest

from proxy.session.ledger import LedgerError, StatementLedger, Wait

PC, BC, CC = ord("1"), ord("2"), ord("3")


class Dec:  # a stand-in for a gate decision (Forward): only what the ledger looks at
    def __init__(self, sql: str, checked: bool = False):
        self.sql = sql
        self.param_checks = (("check",),) if checked else ()
        self.copy_in_check = None

    def __repr__(self) -> str:
        return self.sql


INSERT = Dec("insert into t (tenant_id, x) values ($1, $2)", checked=True)
SELECT = Dec("select $1::text")
B = Dec("select customer_id, email from customers")
A = Dec("select 1")


def test_a_parse_counts_once_postgresql_confirms_it():
    L = StatementLedger()
    L.parse_sent(1, "s1", INSERT)
    assert L.statement("s1", 1) is INSERT  # same segment: exact prediction
    assert isinstance(L.statement("s1", 2), Wait)  # later segment: unknown until segment 1 answers
    L.completed(PC)
    L.ready(1, b"I")
    assert L.statement("s1", 2) is INSERT and L.checked


def test_duplicate_named_parse_refused_by_postgresql_keeps_the_first_statement():
    L = StatementLedger()
    L.parse_sent(1, "s1", INSERT)
    L.completed(PC)
    L.ready(1, b"I")
    assert L.statement_exists("s1", 2) is True  # the session refuses the duplicate itself
    # had it been sent anyway: PostgreSQL answers 42P05, the record stays the INSERT
    L.parse_sent(2, "s1", SELECT)
    L.failed(2)
    L.ready(2, b"I")
    assert L.statement("s1", 3) is INSERT


def test_unnamed_parse_skipped_after_an_error_leaves_the_previous_unnamed_statement():
    L = StatementLedger()
    L.parse_sent(1, "", B)
    L.completed(PC)
    L.ready(1, b"I")
    # Bind of a missing statement fails, Parse unnamed A is skipped, Sync
    L.bind_sent(2, "", None)
    L.parse_sent(2, "", A)
    assert L.statement("", 2) is A  # within the segment: exact (if A is skipped, so is its Bind)
    L.failed(2)
    L.ready(2, b"I")
    assert L.statement("", 3) is B


@pytest.mark.parametrize("error_at", range(5))
def test_every_error_position_in_a_pipeline(error_at):
    """Parse s1, Bind p1, Parse s2, Close s0, Bind p2: PostgreSQL answers those before the error,
    the rest is failed or skipped."""
    L = StatementLedger()
    OLD = Dec("old", checked=True)
    L.parse_sent(1, "s0", OLD)
    L.completed(PC)
    L.ready(1, b"T")
    s1, s2 = Dec("s1", True), Dec("s2")
    L.parse_sent(2, "s1", s1)
    L.bind_sent(2, "p1", s1, (b"x",))
    L.parse_sent(2, "s2", s2)
    L.close_sent(2, b"S", "s0")
    L.bind_sent(2, "p2", s2)
    replies = [PC, BC, PC, CC, BC]
    for r in replies[:error_at]:
        L.completed(r)
    L.failed(2)
    L.ready(2, b"E")
    assert (L.statement("s1", 3) is s1) == (error_at > 0)
    assert (L.portal("p1", 3) is not None) == (error_at > 1)
    assert (L.statement("s2", 3) is s2) == (error_at > 2)
    assert (L.statement("s0", 3) is OLD) == (error_at <= 3)
    assert (L.portal("p2", 3) is not None) == (error_at > 4)


def test_close_takes_effect_at_close_complete_only():
    L = StatementLedger()
    L.parse_sent(1, "s1", INSERT)
    L.completed(PC)
    L.ready(1, b"I")
    L.bind_sent(2, "", None)  # fails
    L.close_sent(2, b"S", "s1")  # skipped: PostgreSQL keeps s1
    assert L.statement("s1", 2) is None  # same segment: if the Close is skipped, so is what follows
    assert isinstance(L.statement("s1", 3), Wait)
    L.failed(2)
    L.ready(2, b"I")
    assert L.statement("s1", 3) is INSERT


def test_simple_query_drops_the_unnamed_statement_when_it_ran():
    L = StatementLedger()
    L.parse_sent(1, "", INSERT)
    L.completed(PC)
    L.ready(1, b"I")
    L.query_sent(2)
    assert isinstance(L.statement("", 3), Wait)
    L.ready(2, b"I")
    assert L.statement("", 3) is None
    # a Query that fails may not have run at all (skipped): the old statement is kept
    L.parse_sent(3, "", INSERT)
    L.completed(PC)
    L.ready(3, b"I")
    L.query_sent(4)
    L.failed(4)
    L.ready(4, b"I")
    assert L.statement("", 5) is INSERT


def test_portals_end_with_the_transaction():
    L = StatementLedger()
    L.parse_sent(1, "s", INSERT)
    L.bind_sent(1, "p", INSERT, (b"acme",))
    L.completed(PC)
    L.completed(BC)
    L.ready(1, b"T")
    assert L.portal("p", 2) == (INSERT, (b"acme",))
    L.query_sent(2)
    L.ready(2, b"I")
    assert L.portal("p", 3) is None


def test_deallocate_all_drops_named_statements_only():
    L = StatementLedger()
    L.parse_sent(1, "s", INSERT)
    L.parse_sent(1, "", A)
    L.completed(PC)
    L.completed(PC)
    L.ready(1, b"I")
    L.all_statements_dropped()
    assert L.statement_exists("s", 2) is False and L.statement("", 2) is A
    assert not L.checked


def test_checked_flag_follows_what_postgresql_holds():
    L = StatementLedger()
    L.parse_sent(1, "s", INSERT)
    assert L.checked
    L.failed(1)
    L.ready(1, b"I")
    assert not L.checked


def test_unexpected_replies_fail_closed():
    L = StatementLedger()
    with pytest.raises(LedgerError):
        L.completed(PC)
    L.parse_sent(1, "s", A)
    with pytest.raises(LedgerError):
        L.completed(BC)
    L2 = StatementLedger()
    L2.parse_sent(1, "s", A)
    with pytest.raises(LedgerError):  # ReadyForQuery without the ParseComplete
        L2.ready(1, b"I")

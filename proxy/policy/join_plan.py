"""Where a tenant predicate goes in a join, for the rewriter (sqlglot tree) and the verifier (pglast tree).

An item on the nullable side of an outer join must be filtered before that join (in its ON), or
another tenant's rows would decide which rows are null-extended; that is what PostgreSQL's row-level
security does.  :func:`nullable_side` and :func:`on_filters` state the rule once for a join type;
:mod:`proxy.policy.pg_verify` checks PostgreSQL's tree with them, :func:`join_plan` plans the
rewrite of a sqlglot SELECT (:mod:`proxy.policy.inject`) by the same rule.
"""

from __future__ import annotations

from typing import Callable

from sqlglot import exp

def nullable_side(join_type: str, side: str) -> bool:
    """Is the operand on ``side`` ("l" or "r") of a ``join_type`` join null-extended by it?"""
    return join_type == "FULL" or (join_type == "LEFT" and side == "r") or (join_type == "RIGHT" and side == "l")


def on_filters(join_type: str, side: str) -> bool:
    """Does a predicate in the ON of a ``join_type`` join filter the operand on ``side`` before the join
    (an inner join's both operands, an outer join's nullable one; FULL JOIN needs more, see join_plan)?"""
    return join_type == "INNER" or (join_type != "FULL" and nullable_side(join_type, side))


FULL = "full"


def join_plan(sel: exp.Select, not_null: Callable[[int], bool] = lambda k: False) -> dict[int, object]:
    """Where each FROM item of ``sel`` (0 = the first, k = the k-th join) gets its tenant
    predicate: "where", the :class:`exp.Join` whose ON takes it, or "wrap" (subquery wrapper).

    An item on the nullable side of an outer join must be filtered before that join: the
    right operand of a LEFT JOIN in its own ON, everything left of a RIGHT JOIN in the RIGHT
    JOIN's ON.  Joins without an ON (USING, NATURAL) need the wrapper for their nullable side.
    Items never on a nullable side are filtered in WHERE.

    FULL JOIN (with ON, no later RIGHT/FULL JOIN in its chain, and a NOT NULL tenant column on
    every operand, ``not_null(k)``): ``(FULL, join)`` — the predicates go into the FULL JOIN's ON
    (no cross-tenant match) and ``(<ref>."tc" = T OR <ref>."tc" IS NULL)`` into WHERE (drops the
    other tenants' unmatched rows, keeps null-extended ones).  Otherwise the wrapper.
    """
    joins = sel.args.get("joins") or []
    plan: dict[int, object] = {}
    pending = [0]
    for k, j in enumerate(joins, start=1):
        if not any(j.args.get(a) for a in ("on", "using", "side", "kind", "method")):
            # a comma: binds looser than JOIN, so it starts a new join chain
            for i in pending:
                plan[i] = "where"
            pending = [k]
            continue
        side = (j.args.get("side") or "").upper()
        has_on = j.args.get("on") is not None and not j.args.get("using") and not j.args.get("method")
        if side in ("RIGHT", "FULL"):
            # a FULL placement earlier in this chain would now sit on a nullable side
            for i, place in list(plan.items()):
                if isinstance(place, tuple) and i < k and _same_chain(joins, i, k):
                    plan[i] = "wrap"
        if side == "FULL":
            ok = has_on and all(not_null(i) for i in pending + [k])
            for i in pending + [k]:
                plan[i] = (FULL, j) if ok else "wrap"
            pending = []
        elif side == "RIGHT":
            for i in pending:
                plan[i] = j if has_on else "wrap"
            pending = [k]
        elif side == "LEFT":
            plan[k] = j if has_on else "wrap"
        else:
            pending.append(k)
    for i in pending:
        plan[i] = "where"
    return plan


def _same_chain(joins: list, i: int, k: int) -> bool:
    """True when FROM items i < k are joined by JOIN operators (no comma in between)."""
    for m in range(i + 1, k + 1):
        j = joins[m - 1]
        if not any(j.args.get(a) for a in ("on", "using", "side", "kind", "method")):
            return False
    return True


def from_item_index(table: exp.Table) -> tuple[exp.Select, int] | None:
    parent = table.parent
    sel = parent.parent if parent is not None else None
    if not isinstance(sel, exp.Select):
        return None
    if isinstance(parent, exp.From) and parent.arg_key in ("from", "from_") and table.arg_key == "this":
        return sel, 0
    if isinstance(parent, exp.Join) and table.arg_key == "this":
        for k, j in enumerate(sel.args.get("joins") or [], start=1):
            if j is parent:
                return sel, k
    return None

"""Pass 5: fidelity check of a rewritten statement.

The rewrite is spliced into the original text, so nothing else is regenerated.
This pass re-parses the spliced text (with a marker literal in place of the
tenant) and checks, on the new tree, that *every* reference to a tenant
relation is guarded:

* a FROM item must be exactly ``(SELECT * FROM <rel> WHERE "tc" = <marker>)``, or
  ``(<rel> [AS a] INNER JOIN (SELECT) AS tenantgate_guard_N ON <ref>."tc" = <marker>)``, or
  filtered in the WHERE / ON that the join plan assigns to it;
* an UPDATE/DELETE target must have ``WHERE ... AND <ref>."tc" = <marker>`` (or just the
  predicate) at the top of its WHERE;
* an INSERT target must list the tenant column, with the marker, a checked literal or a
  checked parameter as its value in every row; ON CONFLICT DO UPDATE must carry the predicate.

Anything else (a splice that landed in the wrong place, a construct sqlglot sees differently
after the edit) is refused.  Entry point: :func:`verify_rewrite`.
"""

from __future__ import annotations

from sqlglot import exp

from proxy.policy.catalog import CatalogSnapshot
from proxy.policy.errors import FEATURE_NOT_SUPPORTED, PolicyRefusal
from proxy.policy.parse import parse_tokens, tokenize_span
from proxy.policy.inject import GUARD_PREFIX, from_item_index, join_plan
from proxy.policy.resolve import fold_identifier, resolve_table
from proxy.policy.rules import Rules

MARKER = "tenantgate:verify"
MARKER_SQL = "'tenantgate:verify'"


def _fail(what: str) -> PolicyRefusal:
    return PolicyRefusal(FEATURE_NOT_SUPPORTED, f"rewrite verification failed: {what}")


def _is_marker(e: exp.Expression | None) -> bool:
    return isinstance(e, exp.Literal) and e.is_string and e.this == MARKER


def _is_pred(e: exp.Expression | None, col: str, qualified: bool) -> bool:
    if not isinstance(e, exp.EQ) or not _is_marker(e.expression):
        return False
    c = e.this
    if not isinstance(c, exp.Column) or fold_identifier(c.this) != col:
        return False
    return (c.args.get("table") is not None) == qualified and not c.args.get("db")


def _where_guarded(node: exp.Expression, col: str) -> bool:
    w = node.args.get("where")
    if not isinstance(w, exp.Where):
        return False
    cond = w.this
    if _is_pred(cond, col, True) or _is_conflict_guard(cond, col):
        return True
    return isinstance(cond, exp.And) and isinstance(cond.this, exp.Paren) and (
        _is_pred(cond.expression, col, True) or _is_conflict_guard(cond.expression, col)
    )


def _is_conflict_guard(e: exp.Expression, col: str) -> bool:
    """``(CASE WHEN <ref>."tc" = <marker> THEN true ELSE CAST(<no tenant value> AS boolean) END)``"""
    if isinstance(e, exp.Paren):
        e = e.this
    if not isinstance(e, exp.Case) or len(e.args.get("ifs") or []) != 1 or e.this is not None:
        return False
    branch = e.args["ifs"][0]
    if not (_is_pred(branch.this, col, True) and isinstance(branch.args.get("true"), exp.Boolean)
            and branch.args["true"].this is True):
        return False
    default = e.args.get("default")
    if not isinstance(default, exp.Cast):
        return False
    inner = default.this
    return isinstance(inner, exp.Case) and all(
        isinstance(x, (exp.Null, exp.Literal, exp.Column, exp.Is, exp.If, exp.Identifier))
        for x in inner.walk() if x is not inner
    )


def _guarded_from_item(table: exp.Table, col: str) -> bool:
    frm = table.parent
    sel = frm.parent if frm is not None else None
    sub = sel.parent if sel is not None else None
    if not (isinstance(frm, exp.From) and isinstance(sel, exp.Select) and isinstance(sub, exp.Subquery)):
        return False
    if table.args.get("alias") or table.args.get("joins"):
        return False
    if len(sel.expressions) != 1 or not isinstance(sel.expressions[0], exp.Star):
        return False
    allowed = {"expressions", "from_", "from", "where"}
    if any(v for k, v in sel.args.items() if k not in allowed):
        return False
    w = sel.args.get("where")
    return isinstance(w, exp.Where) and _is_pred(w.this, col, False)


def _guard_joined(table: exp.Table, col: str) -> bool:
    """``(<rel> [AS a] INNER JOIN (SELECT) AS tenantgate_guard_N ON <ref>."tc" = <marker>)``:
    the relation is the left operand of a parenthesised join whose only join is the zero-column
    guard, and the guard's ON is exactly the predicate on this relation."""
    sub = table.parent
    if not (isinstance(sub, exp.Subquery) and table.arg_key == "this") or sub.args.get("alias"):
        return False
    if any(v for k, v in sub.args.items() if k != "this"):
        return False
    alias = table.args.get("alias")
    if isinstance(alias, exp.TableAlias) and alias.args.get("columns"):
        return False
    joins = table.args.get("joins") or []
    if len(joins) != 1:
        return False
    j = joins[0]
    if (j.args.get("side") or "") or (j.args.get("kind") or "").upper() not in ("", "INNER"):
        return False
    if any(j.args.get(k) for k in ("using", "method", "global_", "global")):
        return False
    guard = j.this
    if not isinstance(guard, exp.Subquery) or not isinstance(guard.this, exp.Select):
        return False
    if any(v for v in guard.this.args.values()):
        return False  # (SELECT) with nothing: zero columns, one row
    galias = guard.args.get("alias")
    if not (isinstance(galias, exp.TableAlias) and isinstance(galias.this, exp.Identifier)
            and galias.this.name.startswith(GUARD_PREFIX) and not galias.args.get("columns")):
        return False
    on = j.args.get("on")
    return _pred_ref(on, col) == _ref_name(table) if on is not None else False


def _pred_ref(e: exp.Expression, col: str) -> str | None:
    """The qualifier of ``<ref>."tc" = <marker>``, or None."""
    if not isinstance(e, exp.EQ) or not _is_marker(e.expression):
        return None
    c = e.this
    if not isinstance(c, exp.Column) or fold_identifier(c.this) != col or c.args.get("db"):
        return None
    t = c.args.get("table")
    return fold_identifier(t) if isinstance(t, exp.Identifier) else None


def _conjuncts(cond: exp.Expression | None) -> list[exp.Expression]:
    if cond is None:
        return []
    if isinstance(cond, exp.And):
        return _conjuncts(cond.this) + _conjuncts(cond.expression)
    return [cond]


def _ref_name(table: exp.Table) -> str:
    alias = table.args.get("alias")
    if isinstance(alias, exp.TableAlias) and isinstance(alias.this, exp.Identifier):
        return fold_identifier(alias.this)
    return fold_identifier(table.this)


def _is_or_null(e: exp.Expression, col: str, ref: str) -> bool:
    """``(<ref>."tc" = <marker> OR <ref>."tc" IS NULL)``"""
    if isinstance(e, exp.Paren):
        e = e.this
    if not isinstance(e, exp.Or) or _pred_ref(e.this, col) != ref:
        return False
    isn = e.expression
    return (
        isinstance(isn, exp.Is) and isinstance(isn.expression, exp.Null) and isinstance(isn.this, exp.Column)
        and fold_identifier(isn.this.this) == col and isinstance(isn.this.args.get("table"), exp.Identifier)
        and fold_identifier(isn.this.args["table"]) == ref and not isn.this.args.get("db")
    )


def _not_null_fn(sel: exp.Select, snapshot: CatalogSnapshot, col: str):
    items = [(sel.args.get("from_") or sel.args.get("from")).this] + [j.this for j in sel.args.get("joins") or []]

    def not_null(k: int) -> bool:
        t = items[k] if k < len(items) else None
        if not (isinstance(t, exp.Table) and isinstance(t.this, exp.Identifier)):
            return True  # not a relation: needs no predicate
        try:
            rel = resolve_table(t, snapshot)
        except PolicyRefusal:
            return False
        return rel is None or rel.classification != "tenant" or rel.column_not_null(col)

    return not_null


def _predicate_guarded(table: exp.Table, col: str, snapshot: CatalogSnapshot) -> bool:
    """A FROM item filtered by a top-level conjunct of the WHERE or of the ON that
    :func:`~proxy.policy.inject.join_plan` assigns to it."""
    found = from_item_index(table)
    if found is None:
        return False
    sel, k = found
    alias = table.args.get("alias")
    if isinstance(alias, exp.TableAlias) and alias.args.get("columns"):
        return False
    place = join_plan(sel, _not_null_fn(sel, snapshot, col)).get(k, "wrap")
    ref = _ref_name(table)
    if isinstance(place, tuple):
        w = sel.args.get("where")
        return (
            any(_pred_ref(c, col) == ref for c in _conjuncts(place[1].args.get("on")))
            and isinstance(w, exp.Where)
            and any(_is_or_null(c, col, ref) for c in _conjuncts(w.this))
        )
    if isinstance(place, exp.Join):
        return any(_pred_ref(c, col) == ref for c in _conjuncts(place.args.get("on")))
    if place != "where":
        return False
    w = sel.args.get("where")
    return isinstance(w, exp.Where) and any(_pred_ref(c, col) == ref for c in _conjuncts(w.this))


def _insert_guarded(ins: exp.Insert, col: str, param_checks: set[int], literals: int) -> bool:
    schema = ins.this
    if not isinstance(schema, exp.Schema):
        return False
    cols = [fold_identifier(c) for c in schema.expressions]
    if cols.count(col) != 1:
        return False
    k = cols.index(col)

    def ok(e: exp.Expression) -> bool:
        if isinstance(e, exp.Alias):
            e = e.this
        if isinstance(e, exp.Cast) and isinstance(e.this, (exp.Parameter, exp.Literal)):
            e = e.this  # the cast target was checked by inject.check_tenant_value
        if _is_marker(e):
            return True
        if isinstance(e, exp.Parameter) and isinstance(e.this, exp.Literal):
            return int(e.this.this) - 1 in param_checks
        return isinstance(e, exp.Literal) and literals > 0

    src = ins.expression
    if isinstance(src, exp.Values):
        rows_ok = all(isinstance(r, exp.Tuple) and len(r.expressions) > k and ok(r.expressions[k]) for r in src.expressions)
    elif isinstance(src, exp.Select) and any(isinstance(e, exp.Star) for e in src.expressions):
        # SELECT *, T FROM (<set operation>) AS q: * stands for every column but the last
        frm = src.args.get("from_") or src.args.get("from")
        rows_ok = (
            len(src.expressions) == 2 and isinstance(src.expressions[0], exp.Star) and ok(src.expressions[1])
            and k == len(cols) - 1 and frm is not None and isinstance(frm.this, exp.Subquery)
            and isinstance(frm.this.this, exp.SetOperation) and not src.args.get("joins")
            and not src.args.get("where")
        )
    elif isinstance(src, exp.Select):
        rows_ok = len(src.expressions) > k and ok(src.expressions[k])
    else:
        rows_ok = False
    if not rows_ok:
        return False
    conflict = ins.args.get("conflict")
    if conflict is not None and str(conflict.args.get("action") or "").upper() == "DO UPDATE":
        return _where_guarded(conflict, col)
    return True


def _merge_guarded(merge: exp.Merge, table: exp.Table, col: str, param_checks: set[int], literals: int) -> bool:
    ref = _ref_name(table)
    if not any(_pred_ref(c, col) == ref for c in _conjuncts(merge.args.get("on"))):
        return False
    for when in merge.args["whens"].expressions:
        ins = when.args.get("then")
        if not isinstance(ins, exp.Insert):
            continue
        cols = ins.this.expressions if isinstance(ins.this, exp.Tuple) else []
        names = [fold_identifier(c.this if isinstance(c, exp.Column) else c) for c in cols]
        vals = ins.expression.expressions if isinstance(ins.expression, exp.Tuple) else []
        if names.count(col) != 1 or len(vals) != len(names):
            return False
        v = vals[names.index(col)]
        if not (_is_marker(v) or (isinstance(v, exp.Literal) and literals > 0)
                or (isinstance(v, exp.Parameter) and isinstance(v.this, exp.Literal)
                    and int(v.this.this) - 1 in param_checks)):
            return False
    return True


def verify_rewrite(
    sql: str,
    start: int,
    end: int,
    snapshot: CatalogSnapshot,
    rules: Rules,
    *,
    param_checks: set[int],
    required_literals: int,
) -> None:
    """Re-parse ``sql[start:end]`` (already spliced, marker literal in place) and check every guard."""
    tree = parse_tokens(sql, tokenize_span(sql, start, end), "rewritten statement")
    col = rules.tenant_column
    for node in tree.walk():
        if not (isinstance(node, exp.Table) and isinstance(node.this, exp.Identifier)):
            continue
        if isinstance(node.parent, exp.Lock):
            continue
        rel = resolve_table(node, snapshot)
        if rel is None or rel.classification != "tenant":
            continue
        parent = node.parent
        if isinstance(parent, exp.Merge) and node.arg_key == "this":
            if not _merge_guarded(parent, node, col, param_checks, required_literals):
                raise _fail(f"MERGE into {rel.qualified} is not bound to the tenant")
        elif isinstance(parent, (exp.Update, exp.Delete)) and node.arg_key == "this":
            if not _where_guarded(parent, col):
                raise _fail(f"{type(parent).__name__.upper()} of {rel.qualified} is not filtered")
        elif isinstance(parent, exp.Schema) and isinstance(parent.parent, exp.Insert):
            if not _insert_guarded(parent.parent, col, param_checks, required_literals):
                raise _fail(f"INSERT into {rel.qualified} is not bound to the tenant")
        elif isinstance(parent, exp.Insert):
            raise _fail(f"INSERT into {rel.qualified} has no column list")
        elif not (_guarded_from_item(node, col) or _guard_joined(node, col)
                  or _predicate_guarded(node, col, snapshot)):
            raise _fail(f"reference to {rel.qualified} is not filtered")

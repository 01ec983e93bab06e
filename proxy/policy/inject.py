"""Pass 4: add the tenant predicates, as text edits spliced into the original statement.

``T`` is the quoted tenant literal, ``tc`` the tenant column, ``<ref>`` a FROM item's alias or name.

* **FROM items** (FROM, every JOIN kind, subqueries anywhere, CTE bodies, LATERAL, set
  operations): ``<ref>."tc" = T`` is added as a top-level conjunct of the WHERE of the SELECT that
  owns the item; an item on the nullable side of an outer join is filtered before that join,
  in its ON (see :func:`join_plan`), which is what PostgreSQL's row-level security does.
  Where that is not possible (FULL JOIN without a NOT NULL tenant column, USING/NATURAL outer
  joins, ``TABLE t``, column aliases, parenthesised joins, UPDATE ... FROM, DELETE ... USING,
  MERGE ... USING) the relation is replaced in place by
  ``(SELECT * FROM <name as written> WHERE "tc" = T) AS <ref>``.
* **UPDATE / DELETE target**: ``WHERE (<original>) AND <ref>."tc" = T``; assigning the tenant
  column is refused.
* **INSERT**: the tenant column is appended to the column list and ``T`` to every VALUES row
  (or to the SELECT list of INSERT ... SELECT; a set operation is wrapped); a given value must be
  a literal equal to the tenant (checked per session) or a parameter (checked on Bind).
  ``ON CONFLICT ... DO UPDATE`` raises an error, like RLS, when the conflicting row belongs to
  another tenant.
* **MERGE**: ``ON (<original>) AND <ref>."tc" = T`` (so another tenant's row never matches),
  the source is filtered like any FROM item, WHEN ... INSERT gets the tenant column like INSERT,
  and UPDATE SET of the tenant column is refused.

Everything else in the statement stays byte-identical.  Entry point: :func:`inject_tenant`.
The edits are tenant-independent (``TENANT`` marks where the literal goes), so a rewrite is
cached once and reused for every tenant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sqlglot import exp
from sqlglot.tokens import Token, TokenType

from proxy.policy.catalog_views import CATALOG_ROW_FILTERS
from proxy.policy.catalog import CatalogSnapshot, Relation
from proxy.policy.errors import FEATURE_NOT_SUPPORTED, INSUFFICIENT_PRIVILEGE, PolicyRefusal
from proxy.policy.resolve import display_name, fold_identifier, quote_ident, resolve_table
from proxy.policy.rules import Rules


class _TenantMarker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


TENANT = _TenantMarker("TENANT")
GUARD_PREFIX = "tenantgate_guard_"  # alias of the zero-column guard of :meth:`_Injector.guard_join`
# The tenant inside a statement that outlives this execution (the body of SQL PREPARE): in
# sessions whose tenant can change it becomes a reference to the backend GUC, not a literal.
TENANT_LASTING = _TenantMarker("TENANT_LASTING")


@dataclass(frozen=True)
class Edit:
    """Replace ``sql[start:end]`` with ``parts`` (strings and TENANT markers)."""

    start: int
    end: int
    parts: tuple


@dataclass
class Injection:
    edits: list[Edit] = field(default_factory=list)
    touches_tenant: bool = False
    writes: bool = False
    param_checks: set[int] = field(default_factory=set)  # 0-based parameter indexes in the tenant column
    required_literals: list[str] = field(default_factory=list)  # literals that must equal the tenant
    tenant_relations: list[str] = field(default_factory=list)
    shared_relations: list[str] = field(default_factory=list)


_FROM_PARENTS = (exp.From, exp.Join)
CONFLICT_MESSAGE = "'tenantgate: ON CONFLICT DO UPDATE hit a row that belongs to another tenant'"
SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})


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


class _Injector:
    def __init__(self, sql: str, tokens: list[Token], snapshot: CatalogSnapshot, rules: Rules):
        self.sql = sql
        self.tokens = tokens
        self.snapshot = snapshot
        self.rules = rules
        self.col = rules.tenant_column
        self.qcol = quote_ident(rules.tenant_column)
        self.out = Injection()
        self._where_preds: dict[int, tuple[exp.Select, list]] = {}
        self._on_preds: dict[int, tuple[exp.Join, list]] = {}
        self._guards = 0
        self.by_start = {t.start: i for i, t in enumerate(tokens)}
        self.wrapped_catalogs: set[str] = set()  # catalog views read through a row filter

    # ---- token helpers -------------------------------------------------------------
    def tok_index(self, pos: int) -> int:
        try:
            return self.by_start[pos]
        except KeyError:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate a name in the statement text") from None

    def scan(self, i0: int, stop: set, *, until_negative: bool = True) -> int:
        """Index of the first token at depth 0 (from i0) whose type is in ``stop``; or the index where
        depth would go negative / the end (len(tokens))."""
        depth = 0
        for i in range(i0, len(self.tokens)):
            t = self.tokens[i].token_type
            if t in (TokenType.L_PAREN, TokenType.L_BRACKET):
                depth += 1
            elif t in (TokenType.R_PAREN, TokenType.R_BRACKET):
                depth -= 1
                if depth < 0 and until_negative:
                    return i
            elif depth == 0 and t in stop:
                return i
        return len(self.tokens)

    def after(self, i: int) -> int:
        """Text position just after token i (for i == len: after the last token of the range)."""
        return self.tokens[i - 1].end + 1 if i > 0 else 0

    def name_span(self, table: exp.Table) -> tuple[int, int]:
        idents = [table.args.get(k) for k in ("catalog", "db", "this")]
        metas = [i.meta for i in idents if isinstance(i, exp.Identifier)]
        if not metas or any("start" not in m for m in metas):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"could not locate relation {display_name(table)} in the text")
        return min(m["start"] for m in metas), max(m["end"] for m in metas) + 1

    def add(self, start: int, end: int, *parts) -> None:
        self.out.edits.append(Edit(start, end, tuple(parts)))

    # ---- relations ------------------------------------------------------------------
    def relation_ref(self, table: exp.Table, rel: Relation) -> str:
        alias = table.args.get("alias")
        if isinstance(alias, exp.TableAlias) and alias.this is not None:
            return quote_ident(fold_identifier(alias.this))
        return quote_ident(rel.name)

    def handle_table(self, table: exp.Table) -> None:
        parent = table.parent
        key = table.arg_key
        if isinstance(parent, exp.Lock):
            return  # FOR UPDATE OF <alias>: names a FROM item, not a relation
        if isinstance(parent, (exp.Update, exp.Delete, exp.Insert, exp.Merge)) and key == "this":
            return  # DML targets: handled by their statements
        if isinstance(parent, exp.Schema) and isinstance(parent.parent, exp.Insert):
            return
        from_item = (
            isinstance(parent, _FROM_PARENTS)
            or (isinstance(parent, exp.Delete) and key == "using")
            or (isinstance(parent, exp.Merge) and key == "using")
            or (isinstance(parent, exp.Subquery) and table.args.get("joins"))
        )
        if not from_item:
            raise PolicyRefusal(
                FEATURE_NOT_SUPPORTED,
                f"relation {display_name(table)} is used in an unsupported position ({type(parent).__name__})",
            )
        rel = resolve_table(table, self.snapshot)
        if rel is not None and rel.classification == "system":
            where = CATALOG_ROW_FILTERS.get((rel.schema, rel.name))
            if where is not None:  # a catalog a tenant sees only in part (catalog_views.py)
                self.wrap_catalog(table, where)
            return
        if rel is None:
            return
        if rel.classification == "shared":
            self.out.shared_relations.append(rel.qualified)
            return
        # tenant-scoped
        for unsupported in ("sample", "version", "hints", "pivots"):
            if table.args.get(unsupported):
                raise PolicyRefusal(
                    FEATURE_NOT_SUPPORTED,
                    f"{unsupported.upper()} on tenant table {rel.qualified} is not supported",
                )
        self.out.touches_tenant = True
        self.out.tenant_relations.append(rel.qualified)
        if self.plan_predicate(table, rel) or self.guard_join(table, rel):
            return
        start, end = self.name_span(table)
        i = self.tok_index(start)
        inner_start = start
        if table.args.get("only"):
            if i == 0 or self.tokens[i - 1].token_type != TokenType.ONLY:
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate ONLY in the text")
            i -= 1
            inner_start = start = self.tokens[i].start
        table_kw = i > 0 and self.tokens[i - 1].token_type == TokenType.TABLE
        inner = self.sql[inner_start:end]
        wrapped = ("(SELECT * FROM ", inner, " WHERE ", self.qcol, " = ", TENANT, ")")
        has_alias = isinstance(table.args.get("alias"), exp.TableAlias) and table.args["alias"].this is not None
        if table_kw:
            if has_alias:
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "TABLE with an alias")
            self.add(self.tokens[i - 1].start, end, "SELECT * FROM ", *wrapped, " AS ", quote_ident(rel.name))
        elif has_alias:
            self.add(start, end, *wrapped)
        else:
            self.add(start, end, *wrapped, " AS ", quote_ident(rel.name))

    def wrap_catalog(self, table: exp.Table, where: str) -> None:
        """A catalog view a tenant may read only in part: ``(SELECT * FROM <it> WHERE <where>)``
        under the name (or alias) it had."""
        if table.args.get("only") or any(table.args.get(k) for k in ("sample", "version", "hints", "pivots")):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"unsupported use of {display_name(table)}")
        start, end = self.name_span(table)
        i = self.tok_index(start)
        if i > 0 and self.tokens[i - 1].token_type == TokenType.TABLE:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"TABLE {display_name(table)}")
        wrapped = ("(SELECT * FROM pg_catalog.", quote_ident(table.name.lower()), " WHERE ", where, ")")
        has_alias = isinstance(table.args.get("alias"), exp.TableAlias) and table.args["alias"].this is not None
        if has_alias:
            self.add(start, end, *wrapped)
        else:
            self.add(start, end, *wrapped, " AS ", quote_ident(table.name.lower()))
            # pg_catalog.pg_namespace.nspname (SQLAlchemy writes this) names the FROM item as
            # pg_namespace now: drop the schema from such column references
            self.wrapped_catalogs.add(table.name.lower())

    def unqualify_wrapped_columns(self, tree: exp.Expression) -> None:
        for col in tree.find_all(exp.Column):
            db, tbl = col.args.get("db"), col.args.get("table")
            if not (isinstance(db, exp.Identifier) and isinstance(tbl, exp.Identifier)):
                continue
            if fold_identifier(db) != "pg_catalog" or fold_identifier(tbl) not in self.wrapped_catalogs:
                continue
            if col.args.get("catalog") is not None or "start" not in db.meta or "start" not in tbl.meta:
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"could not locate column reference {col.sql()}")
            self.add(db.meta["start"], tbl.meta["start"], "")

    def guard_join(self, table: exp.Table, rel: Relation) -> bool:
        """A FROM item of a SELECT that must be filtered before its outer join but has no ON to
        take the predicate (USING / NATURAL outer joins, FULL JOIN without NOT NULL tenant
        columns) becomes ``(<rel> [AS a] INNER JOIN (SELECT) AS tenantgate_guard_N ON <ref>."tc" = T)``.

        Unlike a subquery wrapper the relation stays a base relation of the query, so
        PostgreSQL's functional dependency on its primary key (GROUP BY pk) still holds; the
        zero-column guard adds no columns to ``*``, USING or NATURAL.  False: not applicable."""
        alias = table.args.get("alias")
        if isinstance(alias, exp.TableAlias) and alias.args.get("columns"):
            return False
        if from_item_index(table) is None or table.args.get("joins"):
            return False
        start, end = self.name_span(table)
        i = self.tok_index(start)
        if table.args.get("only"):
            if i == 0 or self.tokens[i - 1].token_type != TokenType.ONLY:
                return False
            i -= 1
            start = self.tokens[i].start
        if i > 0 and self.tokens[i - 1].token_type == TokenType.TABLE:
            return False
        if isinstance(alias, exp.TableAlias) and alias.this is not None:
            meta = alias.this.meta if isinstance(alias.this, exp.Identifier) else {}
            if "end" not in meta:
                return False
            end = meta["end"] + 1
        self._guards += 1
        self.add(
            start, end, "(", self.sql[start:end], " INNER JOIN (SELECT) AS ", f"{GUARD_PREFIX}{self._guards}",
            " ON ", self.relation_ref(table, rel), ".", self.qcol, " = ", TENANT, ")",
        )
        return True

    # ---- predicates in WHERE / ON (preferred: keeps PostgreSQL's own name resolution) ----------
    def plan_predicate(self, table: exp.Table, rel: Relation) -> bool:
        """Plan ``<ref>."tc" = T`` in the WHERE of the owning SELECT (inner FROM items) or in the
        ON of a LEFT JOIN (its nullable side).  False: use the subquery wrapper instead."""
        alias = table.args.get("alias")
        if isinstance(alias, exp.TableAlias) and alias.args.get("columns"):
            return False  # the tenant column may be renamed by the column aliases
        start, _ = self.name_span(table)
        i = self.tok_index(start)
        if table.args.get("only"):
            i -= 1
        if i > 0 and self.tokens[i - 1].token_type == TokenType.TABLE:
            return False
        found = from_item_index(table)
        if found is None:
            return False
        sel, k = found
        place = join_plan(sel, self.not_null_fn(sel)).get(k, "wrap")
        if place == "wrap":
            return False
        ref = self.relation_ref(table, rel)
        if isinstance(place, tuple):  # FULL JOIN: ON, plus "or null-extended" in WHERE
            self._on_preds.setdefault(id(place[1]), (place[1], []))[1].append((i, ref))
            self._where_preds.setdefault(id(sel), (sel, []))[1].append((i, ref, "or_null"))
        elif isinstance(place, exp.Join):
            self._on_preds.setdefault(id(place), (place, []))[1].append((i, ref))
        else:
            self._where_preds.setdefault(id(sel), (sel, []))[1].append((i, ref))
        return True

    _WHERE_STOP = {
        TokenType.WHERE, TokenType.GROUP_BY, TokenType.HAVING, TokenType.WINDOW, TokenType.ORDER_BY,
        TokenType.LIMIT, TokenType.OFFSET, TokenType.FETCH, TokenType.FOR, TokenType.UNION,
        TokenType.INTERSECT, TokenType.EXCEPT, TokenType.RETURNING,
    }
    _JOIN_STOP = {
        TokenType.JOIN, TokenType.LEFT, TokenType.RIGHT, TokenType.FULL, TokenType.INNER, TokenType.CROSS,
        TokenType.OUTER, TokenType.NATURAL, TokenType.COMMA, TokenType.ON,
    }

    def scan_clause(self, i0: int, stop: set) -> int:
        """Like scan(), also stopping at ``ON CONFLICT`` (INSERT ... SELECT ... ON CONFLICT)."""
        i = i0
        while True:
            i = self.scan(i, stop | {TokenType.ON})
            if i < len(self.tokens) and self.tokens[i].token_type == TokenType.ON and TokenType.ON not in stop:
                nxt = self.tokens[i + 1] if i + 1 < len(self.tokens) else None
                if nxt is not None and nxt.text.upper() == "CONFLICT":
                    return i
                i += 1
                continue
            if (
                i + 1 < len(self.tokens) and self.tokens[i].token_type in (TokenType.LEFT, TokenType.RIGHT)
                and self.tokens[i + 1].token_type == TokenType.L_PAREN
            ):
                i += 1  # left(...) / right(...): the string functions, not a join keyword
                continue
            return i

    def join_anchor(self, join: exp.Join, items: list) -> int:
        """A token index inside the join's right operand, at the select's depth (after which its ON follows)."""
        right = join.this
        if isinstance(right, exp.Table) and isinstance(right.this, exp.Identifier):
            start, _ = self.name_span(right)
            return self.tok_index(start)
        # e.g. RIGHT JOIN (subquery) s ON ...: its alias follows the operand
        alias = right.args.get("alias")
        if isinstance(alias, exp.TableAlias) and isinstance(alias.this, exp.Identifier) and "start" in alias.this.meta:
            return self.tok_index(alias.this.meta["start"])
        raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "an outer join operand without an alias")

    def not_null_fn(self, sel: exp.Select) -> Callable[[int], bool]:
        """For join_plan: is FROM item k a tenant table whose tenant column is NOT NULL?"""
        items = [(sel.args.get("from_") or sel.args.get("from")).this] + [
            j.this for j in sel.args.get("joins") or []
        ]

        def not_null(k: int) -> bool:
            t = items[k] if k < len(items) else None
            if not (isinstance(t, exp.Table) and isinstance(t.this, exp.Identifier)):
                return True  # not a relation: needs no predicate
            try:
                rel = resolve_table(t, self.snapshot)
            except PolicyRefusal:
                return False
            return rel is None or rel.classification != "tenant" or rel.column_not_null(self.col)

        return not_null

    def pred(self, ref: str) -> tuple:
        return (ref, ".", self.qcol, " = ", TENANT)

    def apply_predicates(self) -> None:
        for join, items in self._on_preds.values():
            # the join's own table (or the RIGHT JOIN's right operand) precedes its ON
            anchor = self.join_anchor(join, items)
            on_i = self.scan(anchor + 1, {TokenType.ON})
            if on_i >= len(self.tokens) or self.tokens[on_i].token_type != TokenType.ON:
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate a join condition")
            end_i = self.scan_clause(on_i + 1, self._WHERE_STOP | self._JOIN_STOP)
            preds: list = []
            for _, ref in sorted(items):
                preds.extend((" AND ",) if preds else ())
                preds.extend(self.pred(ref))
            p = self.tokens[on_i].end + 1
            self.add(p, p, " (")
            q = self.after(end_i)
            self.add(q, q, ") AND ", *preds, " ")
        for sel, items in self._where_preds.values():
            last = max(it[0] for it in items)
            preds: list = []
            for it in sorted(items, key=lambda it: it[0]):
                preds.extend((" AND ",) if preds else ())
                if len(it) == 3:
                    preds.extend(("(", *self.pred(it[1]), " OR ", it[1], ".", self.qcol, " IS NULL)"))
                else:
                    preds.extend(self.pred(it[1]))
            w = self.scan_clause(last + 1, self._WHERE_STOP)
            has_where = w < len(self.tokens) and self.tokens[w].token_type == TokenType.WHERE
            if has_where != bool(sel.args.get("where")):
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the WHERE clause")
            if has_where:
                end_i = self.scan_clause(w + 1, self._WHERE_STOP - {TokenType.WHERE})
                p = self.tokens[w].end + 1
                self.add(p, p, " (")
                q = self.after(end_i)
                self.add(q, q, ") AND ", *preds, " ")
            else:
                q = self.after(w)
                self.add(q, q, " WHERE ", *preds, " ")

    def write_target(self, table: exp.Table, what: str) -> Relation:
        rel = resolve_table(table, self.snapshot)
        if rel is None:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"{what} into a CTE name is not supported")
        if rel.classification != "tenant":
            raise PolicyRefusal(
                INSUFFICIENT_PRIVILEGE, f"permission denied: tenant sessions cannot {what} {rel.qualified}"
            )
        if rel.kind not in ("r", "p"):
            raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, f"permission denied: cannot {what} view {rel.qualified}")
        for unsupported in ("sample", "version", "hints", "joins"):
            if table.args.get(unsupported):
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"{unsupported.upper()} on a {what} target")
        self.out.touches_tenant = True
        self.out.writes = True
        self.out.tenant_relations.append(rel.qualified)
        return rel

    def refuse_tenant_assignment(self, assignments: list[exp.Expression], what: str) -> None:
        for a in assignments:
            target = a.this
            if isinstance(target, exp.Paren):  # SET (a) = ROW(...) / (SELECT ...): one column
                target = target.this
            targets = target.expressions if isinstance(target, exp.Tuple) else [target]
            for t in targets:
                name = t.this if isinstance(t, exp.Column) else t
                if not isinstance(name, exp.Identifier):
                    raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"unsupported assignment target in {what}")
                if fold_identifier(name) == self.col:
                    raise PolicyRefusal(
                        INSUFFICIENT_PRIVILEGE, f"changing the tenant column {self.col} is not allowed"
                    )

    def target_end_index(self, table: exp.Table) -> int:
        """Token index just after the target name (and its alias)."""
        _, end = self.name_span(table)
        last = end - 1
        alias = table.args.get("alias")
        if isinstance(alias, exp.TableAlias) and isinstance(alias.this, exp.Identifier):
            last = max(last, alias.this.meta.get("end", last))
        return self.tok_index_end(last) + 1

    def tok_index_end(self, endpos: int) -> int:
        for i, t in enumerate(self.tokens):
            if t.end == endpos:
                return i
        raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate a name in the statement text")

    def filter_where(
        self, table: exp.Table, rel: Relation, node: exp.Expression, from_index: int, *, conflict: bool = False
    ) -> None:
        """Add the tenant predicate to the WHERE of an UPDATE/DELETE (or ON CONFLICT DO UPDATE).

        For ON CONFLICT DO UPDATE the predicate raises an error instead of skipping the row when
        the conflicting row belongs to another tenant, like PostgreSQL's RLS does ("new row
        violates row-level security policy"); the message never shows the other tenant's value.
        """
        ref = self.relation_ref(table, rel)
        pred: tuple = (ref, ".", self.qcol, " = ", TENANT)
        if conflict:
            pred = (
                "(CASE WHEN ", *pred, " THEN true ELSE CAST(CASE WHEN ", ref, ".", self.qcol,
                " IS NULL THEN NULL ELSE ", CONFLICT_MESSAGE, " END AS boolean) END)",
            )
        where_i = self.scan(from_index, {TokenType.WHERE})
        where_found = where_i < len(self.tokens) and self.tokens[where_i].token_type == TokenType.WHERE
        if where_found != bool(node.args.get("where")):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the WHERE clause")
        stop_i = self.scan(from_index if not where_found else where_i + 1, {TokenType.RETURNING})
        pos = self.after(stop_i)
        if where_found:
            self.add(self.tokens[where_i].end + 1, self.tokens[where_i].end + 1, " (")
            self.add(pos, pos, ") AND ", *pred, " ")
        else:
            self.add(pos, pos, " WHERE ", *pred, " ")

    # ---- statements -------------------------------------------------------------------
    def handle_update(self, node: exp.Update) -> None:
        table = node.this
        if not isinstance(table, exp.Table):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "UPDATE of something that is not a table")
        rel = self.write_target(table, "UPDATE")
        self.refuse_tenant_assignment(node.expressions, "UPDATE")
        self.filter_where(table, rel, node, self.target_end_index(table))

    def handle_delete(self, node: exp.Delete) -> None:
        table = node.this
        if not isinstance(table, exp.Table):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "DELETE from something that is not a table")
        rel = self.write_target(table, "DELETE FROM")
        self.filter_where(table, rel, node, self.target_end_index(table))

    _TEXT_TYPES = {"text", "varchar"}  # not char/bpchar/name: they can truncate the value
    _CAST_TARGETS = {
        "text": _TEXT_TYPES, "varchar": _TEXT_TYPES, "uuid": {"uuid"},
        "integer": {"int", "integer", "int4"}, "bigint": {"bigint", "int8"},
    }

    def check_tenant_value(self, e: exp.Expression) -> None:
        if isinstance(e, exp.Cast) and isinstance(e.this, (exp.Parameter, exp.Literal)):
            # $1::VARCHAR (SQLAlchemy) or 'acme'::text: a cast to the tenant column's own kind of
            # type keeps the value; checked like the bare parameter or literal
            to = e.args.get("to")
            name = to.this.value.lower() if isinstance(to, exp.DataType) and hasattr(to.this, "value") else ""
            if not to.expressions and name in self._CAST_TARGETS.get(self.rules.tenant_column_type, ()):
                e = e.this
        if isinstance(e, exp.Parameter) and isinstance(e.this, exp.Literal) and not e.this.is_string:
            self.out.param_checks.add(int(e.this.this) - 1)
            return
        if isinstance(e, exp.Literal):
            self.out.required_literals.append(str(e.this))
            return
        raise PolicyRefusal(
            INSUFFICIENT_PRIVILEGE,
            f"the value of the tenant column {self.col} must be a plain literal or a parameter "
            f"(found {type(e).__name__})",
        )

    def handle_insert(self, node: exp.Insert) -> None:
        target = node.this
        schema = target if isinstance(target, exp.Schema) else None
        table = schema.this if schema is not None else target
        if not isinstance(table, exp.Table):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "INSERT into something that is not a table")
        rel = self.write_target(table, "INSERT INTO")
        for unsupported in ("overwrite", "ignore", "by_name", "partition", "stored", "settings"):
            if node.args.get(unsupported):
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"INSERT {unsupported.upper()}")
        cols = [fold_identifier(c) for c in schema.expressions] if schema is not None else None
        target_end = self.target_end_index(table)
        src = node.expression
        if node.args.get("default"):
            # INSERT INTO t DEFAULT VALUES  ->  INSERT INTO t ("tc") VALUES (T)
            i = target_end
            if not (
                i + 1 < len(self.tokens)
                and self.tokens[i].text.upper() == "DEFAULT"
                and self.tokens[i + 1].text.upper() == "VALUES"
            ):
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate DEFAULT VALUES")
            self.add(self.tokens[i].start, self.tokens[i + 1].end + 1, "(", self.qcol, ") VALUES (", TENANT, ")")
        elif isinstance(src, exp.Values):
            rows = src.expressions
            width = {len(r.expressions) if isinstance(r, exp.Tuple) else -1 for r in rows}
            if len(width) != 1 or -1 in width:
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "VALUES rows of different widths")
            n = width.pop()
            cols = self.effective_columns(cols, n, rel, table, target_end)
            ends = self.values_row_ends(target_end, len(rows))
            if self.col in cols:
                k = cols.index(self.col)
                for r in rows:
                    self.check_tenant_value(r.expressions[k])
            else:
                self.append_column(schema, target_end)
                for end_i in ends:
                    p = self.tokens[end_i].start
                    self.add(p, p, ", ", TENANT)
        elif isinstance(src, exp.Select) and not src.args.get("with_") and not src.args.get("with") \
                and _has_star(src) and cols is not None and self.col not in cols:
            # INSERT INTO t (a, b) SELECT * FROM UNNEST($1, $2) (Django's bulk_create): the column
            # list is explicit, so the source's columns map onto it; add the tenant column after
            # them, as for a set operation:  SELECT *, T FROM (<source>) AS q
            self.wrap_source_with_tenant(schema, target_end)
        elif isinstance(src, exp.Select) and not src.args.get("with_") and not src.args.get("with"):
            projections = src.expressions
            if _has_star(src):
                raise PolicyRefusal(
                    FEATURE_NOT_SUPPORTED,
                    "INSERT ... SELECT * into a tenant table: list the columns explicitly, without the tenant "
                    "column (tenantgate fills it in)" if cols is not None else
                    "INSERT ... SELECT * into a tenant table: list the columns explicitly"
                )
            cols = self.effective_columns(cols, len(projections), rel, table, target_end)
            if self.col in cols:
                k = cols.index(self.col)
                p = projections[k]
                self.check_tenant_value(p.this if isinstance(p, exp.Alias) else p)
            else:
                self.append_column(schema, target_end)
                sel_i = self.scan(target_end, {TokenType.SELECT})
                if sel_i >= len(self.tokens) or self.tokens[sel_i].token_type != TokenType.SELECT:
                    raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the SELECT of INSERT ... SELECT")
                end_i = self.select_list_end(sel_i + 1)
                p = self.after(end_i)
                self.add(p, p, ", ", TENANT)
        elif isinstance(src, exp.SetOperation) and (cols is None or self.col not in cols):
            # INSERT ... SELECT ... UNION ...: the set operation resolves its column types itself,
            # so wrapping it as a FROM item keeps its meaning:  SELECT *, T FROM (<set op>) AS q
            if cols is None:
                raise PolicyRefusal(
                    FEATURE_NOT_SUPPORTED, "INSERT ... set operation into a tenant table needs a column list"
                )
            self.wrap_source_with_tenant(schema, target_end)
        else:
            raise PolicyRefusal(
                FEATURE_NOT_SUPPORTED,
                f"INSERT from {type(src).__name__ if src is not None else 'nothing'} into a tenant table "
                "is not supported (use VALUES or a plain SELECT)",
            )
        conflict = node.args.get("conflict")
        if conflict is not None:
            action = str(conflict.args.get("action") or "").upper()
            if conflict.args.get("duplicate"):
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "ON DUPLICATE KEY")
            if action == "DO UPDATE":
                self.refuse_tenant_assignment(conflict.expressions, "ON CONFLICT DO UPDATE")
                do_i = None
                for i in range(target_end, len(self.tokens)):
                    t = self.tokens[i]
                    if t.text.upper() == "DO" and i + 1 < len(self.tokens) and self.tokens[i + 1].token_type == TokenType.UPDATE:
                        do_i = i
                if do_i is None:
                    raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate DO UPDATE")
                self.filter_where(table, rel, conflict, do_i + 2, conflict=True)
            elif action != "DO NOTHING":
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"ON CONFLICT {action}")

    def handle_merge(self, node: exp.Merge) -> None:
        table = node.this
        if not isinstance(table, exp.Table):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "MERGE into something that is not a table")
        rel = self.write_target(table, "MERGE INTO")
        target_end = self.target_end_index(table)
        on_i = self.scan(target_end, {TokenType.ON})
        if on_i >= len(self.tokens) or self.tokens[on_i].token_type != TokenType.ON:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the MERGE join condition")
        whens = node.args["whens"].expressions if node.args.get("whens") else []
        when_is: list[int] = []
        i = on_i + 1
        while True:
            i = self.scan(i, {TokenType.WHEN})
            if i >= len(self.tokens) or self.tokens[i].token_type != TokenType.WHEN:
                break
            when_is.append(i)
            i += 1
        if not when_is or len(when_is) != len(whens):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the MERGE WHEN clauses")
        p = self.tokens[on_i].end + 1
        self.add(p, p, " (")
        q = self.after(when_is[0])
        self.add(q, q, ") AND ", *self.pred(self.relation_ref(table, rel)), " ")
        bounds = when_is + [len(self.tokens)]
        for k, when in enumerate(whens):
            if when.args.get("source"):
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "WHEN NOT MATCHED BY SOURCE")
            then = when.args.get("then")
            if isinstance(then, exp.Update):
                self.refuse_tenant_assignment(then.expressions, "MERGE ... UPDATE")
            elif isinstance(then, exp.Insert):
                self.merge_insert(then, rel, bounds[k], bounds[k + 1])
            elif isinstance(then, exp.Var) and then.name.upper() in ("DELETE", "DO NOTHING"):
                pass
            else:
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "unsupported MERGE action")

    def merge_insert(self, ins: exp.Insert, rel: Relation, lo: int, hi: int) -> None:
        ins_i = next((j for j in range(lo, hi) if self.tokens[j].token_type == TokenType.INSERT), None)
        if ins_i is None:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the MERGE INSERT")
        j = ins_i + 1
        cols = None
        cols_close = None
        if j < hi and self.tokens[j].token_type == TokenType.L_PAREN:
            cols_close = self.scan(j + 1, set())
            col_nodes = ins.this.expressions if isinstance(ins.this, exp.Tuple) else None
            if col_nodes is None:
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "unsupported MERGE INSERT column list")
            cols = [fold_identifier(c.this if isinstance(c, exp.Column) else c) for c in col_nodes]
            j = cols_close + 1
        if j + 1 < hi and self.tokens[j].text.upper() == "DEFAULT" and self.tokens[j + 1].text.upper() == "VALUES":
            if cols is not None:
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "unsupported MERGE INSERT form")
            self.add(self.tokens[j].start, self.tokens[j + 1].end + 1, "(", self.qcol, ") VALUES (", TENANT, ")")
            return
        if j >= hi or self.tokens[j].token_type != TokenType.VALUES or j + 1 >= hi \
                or self.tokens[j + 1].token_type != TokenType.L_PAREN:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the MERGE INSERT values")
        row_close = self.scan(j + 2, set())
        values = ins.args.get("expression")
        vals = values.expressions if isinstance(values, exp.Tuple) else None
        if vals is None:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "unsupported MERGE INSERT values")
        if cols is None:
            names = [c.name for c in rel.columns]
            if len(vals) > len(names):
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "MERGE INSERT has more expressions than target columns")
            cols = names[: len(vals)]
            # write the column list out, so the tenant column is explicit
            extra = [] if self.col in cols else [self.col]
            p = self.tokens[ins_i].end + 1
            self.add(p, p, " (", ", ".join(quote_ident(c) for c in cols + extra), ")")
            if extra:
                p = self.tokens[row_close].start
                self.add(p, p, ", ", TENANT)
                return
        elif len(cols) != len(vals):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "MERGE INSERT has a different number of columns and values")
        if self.col in cols:
            self.check_tenant_value(vals[cols.index(self.col)])
            return
        p = self.tokens[cols_close].start
        self.add(p, p, ", ", self.qcol)
        p = self.tokens[row_close].start
        self.add(p, p, ", ", TENANT)

    def effective_columns(self, cols, n, rel: Relation, table, target_end) -> list[str]:
        if cols is not None:
            if len(cols) != n:
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "INSERT has a different number of columns and values")
            return cols
        names = [c.name for c in rel.columns]
        if n > len(names):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "INSERT has more expressions than target columns")
        cols = names[:n]
        # no column list: write it out, so the tenant column is explicit
        extra = [] if self.col in cols else [self.col]
        p = self.after(target_end)
        self.add(p, p, " (", ", ".join(quote_ident(c) for c in cols + extra), ")")
        return cols

    def wrap_source_with_tenant(self, schema, target_end: int) -> None:
        """INSERT INTO t (cols) <source>  ->  INSERT INTO t (cols, tc) SELECT *, T FROM (<source>) AS q:
        the source keeps its own meaning and column types; the tenant value is added after them."""
        self.append_column(schema, target_end)
        first = self.scan(target_end, {TokenType.SELECT, TokenType.L_PAREN, TokenType.VALUES, TokenType.WITH})
        if first >= len(self.tokens):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the INSERT source")
        end_i = self.scan_clause(first, {TokenType.RETURNING})
        p = self.tokens[first].start
        self.add(p, p, "SELECT *, ", TENANT, " FROM (")
        q = self.after(end_i)
        self.add(q, q, ") AS tenantgate_insert_source ")

    def append_column(self, schema, target_end: int) -> None:
        if schema is None:
            return  # effective_columns wrote the whole list
        last = schema.expressions[-1]
        i = self.tok_index_end(last.meta["end"]) + 1
        if i >= len(self.tokens) or self.tokens[i].token_type != TokenType.R_PAREN:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the INSERT column list")
        p = self.tokens[i].start
        self.add(p, p, ", ", self.qcol)

    def values_row_ends(self, from_i: int, nrows: int) -> list[int]:
        i = self.scan(from_i, {TokenType.VALUES})
        if i >= len(self.tokens) or self.tokens[i].token_type != TokenType.VALUES:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate VALUES")
        ends = []
        i += 1
        while i < len(self.tokens) and self.tokens[i].token_type == TokenType.L_PAREN:
            close = self.scan(i + 1, set())
            if close >= len(self.tokens):
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "unbalanced VALUES row")
            ends.append(close)
            i = close + 1
            if i < len(self.tokens) and self.tokens[i].token_type == TokenType.COMMA:
                i += 1
            else:
                break
        if len(ends) != nrows:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the VALUES rows")
        return ends

    _SELECT_LIST_END = {
        TokenType.FROM, TokenType.WHERE, TokenType.GROUP_BY, TokenType.HAVING, TokenType.WINDOW,
        TokenType.ORDER_BY, TokenType.LIMIT, TokenType.OFFSET, TokenType.FETCH, TokenType.FOR,
        TokenType.UNION, TokenType.INTERSECT, TokenType.EXCEPT, TokenType.RETURNING, TokenType.INTO,
    }

    def select_list_end(self, i0: int) -> int:
        i = i0
        while True:
            i = self.scan(i, self._SELECT_LIST_END | {TokenType.ON})
            if (
                i < len(self.tokens)
                and self.tokens[i].token_type in (TokenType.ON, TokenType.FROM)
                and i > 0
                and self.tokens[i - 1].token_type == TokenType.DISTINCT
            ):  # SELECT DISTINCT ON (...), x IS [NOT] DISTINCT FROM y
                i += 1
                continue
            return i

    # ---- driver --------------------------------------------------------------------------
    def run(self, tree: exp.Expression) -> Injection:
        for node in tree.walk():
            if isinstance(node, exp.Merge):
                self.handle_merge(node)
            elif isinstance(node, (exp.Insert, exp.Update)) and isinstance(node.parent, exp.When):
                continue  # MERGE actions: handled by handle_merge
            elif isinstance(node, exp.Insert):
                self.handle_insert(node)
            elif isinstance(node, exp.Update):
                self.handle_update(node)
            elif isinstance(node, exp.Delete):
                self.handle_delete(node)
            elif isinstance(node, exp.Table) and isinstance(node.this, exp.Identifier):
                self.handle_table(node)
            elif isinstance(node, exp.Table) and node.this is None and not node.args.get("rows_from"):
                # (ROWS FROM (f(...), ...): its items are function tables, walked like any other)
                raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "unsupported FROM item")
        self.apply_predicates()
        if self.wrapped_catalogs:
            self.unqualify_wrapped_columns(tree)
        if self.out.tenant_relations:
            for col in tree.find_all(exp.Column):
                name = col.name.lower() if isinstance(col.this, exp.Identifier) else ""
                if name in SYSTEM_COLUMNS:
                    raise PolicyRefusal(
                        FEATURE_NOT_SUPPORTED,
                        f"system column {name} is not available on tenant tables through tenantgate",
                    )
        return self.out


def inject_tenant(tree: exp.Expression, tokens: list[Token], sql: str, snapshot: CatalogSnapshot, rules: Rules) -> Injection:
    """Compute the tenant edits for one parsed statement (see module docstring)."""
    return _Injector(sql, tokens, snapshot, rules).run(tree)


def _has_star(select: exp.Select) -> bool:
    return any(isinstance(p, exp.Star) or (isinstance(p, exp.Column) and isinstance(p.this, exp.Star))
               for p in select.expressions)

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
  ``INSERT INTO t (cols) SELECT * FROM <src>`` (Django's bulk_create: UNNEST of arrays) wraps the
  source as a FROM item: without the tenant column in ``cols`` the tenant is appended; with it,
  the tenant literal is inserted and every source row whose tenant value differs (or is NULL)
  fails the statement in PostgreSQL (22P02 naming tenantgate), as RLS's WITH CHECK would.
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

from typing import Callable

from sqlglot import exp
from sqlglot.tokens import Token, TokenType

from proxy.policy.catalog_views import CATALOG_COLUMNS, CATALOG_ROW_FILTERS
from proxy.policy.catalog import CatalogSnapshot, Relation
from proxy.policy.join_plan import from_item_index, join_plan
from proxy.policy.errors import FEATURE_NOT_SUPPORTED, PolicyRefusal
from proxy.policy.names import quote_ident
from proxy.policy.resolve import display_name, fold_identifier, resolve_table
from proxy.policy.rules import Rules
from proxy.policy.edits import TENANT, Edit, Injection
from proxy.policy.inject_writes import WriteInjection


GUARD_PREFIX = "tenantgate_guard_"  # alias of the zero-column guard of :meth:`_Injector.guard_join`

_FROM_PARENTS = (exp.From, exp.Join)
SYSTEM_COLUMNS = frozenset({"ctid", "xmin", "xmax", "cmin", "cmax", "tableoid"})


class _Injector(WriteInjection):
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
                self.wrap_catalog(table, where, CATALOG_COLUMNS.get((rel.schema, rel.name), "*"))
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

    def wrap_catalog(self, table: exp.Table, where: str, columns: str = "*") -> None:
        """A catalog view a tenant may read only in part: ``(SELECT * FROM <it> WHERE <where>)``
        under the name (or alias) it had."""
        if table.args.get("only") or any(table.args.get(k) for k in ("sample", "version", "hints", "pivots")):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"unsupported use of {display_name(table)}")
        start, end = self.name_span(table)
        i = self.tok_index(start)
        if i > 0 and self.tokens[i - 1].token_type == TokenType.TABLE:
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"TABLE {display_name(table)}")
        wrapped = ("(SELECT ", columns, " FROM pg_catalog.", quote_ident(table.name.lower()), " WHERE ", where, ")")
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



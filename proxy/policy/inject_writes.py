"""Pass 4, the writes: tenant predicates and tenant values for UPDATE, DELETE, INSERT and MERGE.

Part of :class:`proxy.policy.inject._Injector` (a base class of it; the reads, the FROM-item
predicates and the driver are in :mod:`proxy.policy.inject`).  The module docstring of
:mod:`proxy.policy.inject` describes every rewrite; this module holds the write statements':

* UPDATE / DELETE target: ``WHERE (<original>) AND <ref>."tc" = T``; assigning the tenant
  column is refused;
* INSERT: the tenant column appended to the column list and ``T`` to every VALUES row (or to
  the SELECT list of INSERT ... SELECT), given values checked, ON CONFLICT DO UPDATE guarded;
* MERGE: the ON condition, the WHEN ... INSERT values and refused tenant assignments.
"""

from __future__ import annotations


from sqlglot import exp
from sqlglot.tokens import TokenType

from proxy.policy.catalog import Relation
from proxy.policy.edits import TENANT
from proxy.policy.errors import FEATURE_NOT_SUPPORTED, INSUFFICIENT_PRIVILEGE, PolicyRefusal
from proxy.policy.names import quote_ident
from proxy.policy.resolve import fold_identifier, resolve_table

CONFLICT_MESSAGE = "'tenantgate: ON CONFLICT DO UPDATE hit a row that belongs to another tenant'"
INSERT_ROW_MESSAGE = "'tenantgate: INSERT of a row whose tenant column is not the session''s tenant: '"


def _has_star(select: exp.Select) -> bool:
    return any(isinstance(p, exp.Star) or (isinstance(p, exp.Column) and isinstance(p.this, exp.Star))
               for p in select.expressions)


class WriteInjection:
    """The write statements' edits (state lives in :class:`proxy.policy.inject._Injector`)."""

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
        elif isinstance(src, exp.Select) and not src.args.get("with_") and not src.args.get("with") \
                and _has_star(src) and cols is not None:
            # the same with the tenant column listed (Django's bulk_create of a model that has it):
            # every row the source yields is checked, and a row for another tenant (or NULL) fails
            # the statement, as row-level security's WITH CHECK would
            self.check_source_tenant(cols.index(self.col), len(cols), target_end)
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

    def check_source_tenant(self, k: int, n: int, target_end: int) -> None:
        """INSERT INTO t (c1, .., tc, .., cn) SELECT * FROM <src>  ->  INSERT INTO t (...) SELECT c1, .., T, ..
        cn FROM (SELECT * FROM <src>) AS q (c1, .., cn) WHERE CASE WHEN q.ck = T THEN true ELSE <error> END:
        the source keeps its meaning, and a row whose tenant value is not the session's tenant (or is
        NULL) makes PostgreSQL fail the whole statement (22P02, naming tenantgate)."""
        first = self.scan(target_end, {TokenType.SELECT, TokenType.L_PAREN, TokenType.VALUES, TokenType.WITH})
        if first >= len(self.tokens):
            raise PolicyRefusal(FEATURE_NOT_SUPPORTED, "could not locate the INSERT source")
        end_i = self.scan_clause(first, {TokenType.RETURNING})
        names = [f"tenantgate_c{i + 1}" for i in range(n)]
        # the tenant column gets the tenant literal itself (the second opinion, pg_verify, checks
        # exactly that); the source's own value only decides whether the row may be inserted
        select_list: list = []
        for i, name in enumerate(names):
            select_list += ([", "] if i else []) + ([TENANT] if i == k else [name])
        p = self.tokens[first].start
        self.add(p, p, "SELECT ", *select_list, " FROM (")
        q = self.after(end_i)
        # the error depends on the row's value, so PostgreSQL cannot evaluate it before the rows exist
        ref = f"tenantgate_insert_source.{names[k]}"
        self.add(q, q, ") AS tenantgate_insert_source (", ", ".join(names), ") WHERE CASE WHEN ",
                 ref, " = ", TENANT, " THEN true ELSE CAST(", INSERT_ROW_MESSAGE, " || coalesce(", ref,
                 "::text, 'NULL') AS boolean) END ")

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

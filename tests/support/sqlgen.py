"""Random SQL over the schema of ``rewrite_schema``, one statement per seed.

:func:`generate` makes :class:`GeneratedStatement` values: SELECT (joins of
every kind, LATERAL, derived tables, CTEs incl. recursive ones and CTEs that
shadow table names, correlated/EXISTS/IN/scalar subqueries, aggregates with
GROUP BY/HAVING, window functions, DISTINCT, set operations, ORDER BY/LIMIT)
and INSERT (VALUES or SELECT, ON CONFLICT, RETURNING), UPDATE (SET, FROM,
RETURNING), DELETE (USING, RETURNING), MERGE, and data-modifying CTEs.

Also: comments and line breaks between clauses, quoted and upper-case names,
``public.``-qualified and ``ONLY`` references, aliases named like other tables,
string literals holding quotes, semicolons and comment markers (splice traps),
and GROUP BY a primary key with the table's other columns selected.

The statements are meant to be *deterministic*: LIMIT only follows an ORDER BY
over every output column; UPDATE ... FROM and DELETE ... USING never read the
FROM/USING items in SET or RETURNING; no key column is updated; ON CONFLICT only with VALUES; there is no
division, no cast that can fail, no volatile function.  So the oracle (RLS)
and the candidate (rewritten SQL) can be compared exactly.  Results are
compared as multisets unless ``ordered`` is set (the top-level ORDER BY then
fixes the order completely).

Each statement comes from one seed (:func:`generate` reproduces it); :func:`support.fuzzcases.case_seed`
numbers the seeds of a run, the same in every process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from support.fuzzcases import case_seed as case_seed  # shared with the wire fuzz tests (re-exported)
from support.rewrite_schema import ALL_TABLES, PRODUCTS, TABLES_BY_NAME, TENANT_TABLES, Table

INT_LITERALS = (0, 1, 2, 3, 4, 5, 6, 7, 10, 20, 30, -1)
TEXT_LITERALS = (
    "open", "shipped", "closed", "north", "south", "tools", "misc", "widget",
    "cust-A-1", "cust-A-2", "cust-B-1", "cust-C-2", "A", "B", "C", "T-A-1", "T-B-2",
    "note-A-2-1", "subj-A-1", "c1@a.example", "", "it's", "a;b", "--x", "/* y */", "$$", "O'Brien -- x",
)  # fmt: skip
# Values for key/foreign-key columns on INSERT: mostly fresh keys and existing parents.
KEY_POOLS = {
    "id": (7, 8, 9, 10, 11, 12, 1),
    "customer_id": (1, 2, 3, 4, 5),
    "order_id": (1, 2, 3, 4, 5, 6, 7),
    "line": (3, 4, 5, 6, 1),
    "product_id": (1, 2, 3, 4, 5, 6),
}
CMP_OPS = ("=", "<>", "<", "<=", ">", ">=")


@dataclass(frozen=True)
class GeneratedStatement:
    sql: str
    kind: str  # "select", "insert", "update", "delete", "cte_write", "merge"
    ordered: bool = False  # result order is fully determined by a top-level ORDER BY

    def __str__(self) -> str:
        return self.sql


@dataclass
class Source:
    """One FROM item visible in a scope: its alias and typed columns."""

    alias: str
    columns: tuple[tuple[str, str], ...]  # (name, "int"|"text")
    key: tuple[str, ...] = ()  # primary key, when this is a base table (functional dependency)

    def of_type(self, typ: str) -> list[str]:
        return [f"{self.alias}.{n}" for n, t in self.columns if t == typ]


@dataclass
class Ctx:
    """Generation context: CTEs in scope and fresh-name counter (shared)."""

    ctes: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    counter: list[int] = field(default_factory=lambda: [0])

    def fresh(self, prefix: str) -> str:
        self.counter[0] += 1
        return f"{prefix}{self.counter[0]}"

    def with_ctes(self, extra: dict) -> "Ctx":
        return Ctx({**self.ctes, **extra}, self.counter)


def _table_columns(t: Table) -> tuple[tuple[str, str], ...]:
    return tuple((c.name, c.type) for c in t.columns)


class _Gen:
    """Builds SQL text from a seeded random source.

    The seed comes from :func:`case_seed`: a fuzzer wants every case fresh (no
    mutations of earlier examples, no near-duplicates) and every run repeatable.
    """

    def __init__(self, rng: random.Random, pk_group_by: bool = True):
        self.rng = rng
        self.pk_group_by = pk_group_by

    # ---- small helpers -------------------------------------------------
    def pick(self, seq):
        return self.rng.choice(list(seq))

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def randint(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def ws(self) -> str:
        """A separator: mostly one space, sometimes a comment or a line break (splice traps)."""
        if not self.chance(0.08):
            return " "
        return self.pick([" /* c */ ", "\n", " -- note\n", " /* nested /* c */ */ ", "\t"])

    def lit(self, typ: str) -> str:
        if self.chance(0.06):
            return f"NULL::{typ}"
        if typ == "int":
            return str(self.pick(INT_LITERALS))
        return "'" + self.pick(TEXT_LITERALS).replace("'", "''") + "'"

    def column(self, scope: list[Source], typ: str) -> str | None:
        cols = [c for s in scope for c in s.of_type(typ)]
        if not cols:
            return None
        col = self.pick(cols)
        if self.chance(0.05):  # quoted column name: same meaning
            alias, _, name = col.rpartition(".")
            col = f'{alias}."{name}"'
        return col

    # ---- expressions ---------------------------------------------------
    def expr(self, scope: list[Source], typ: str, ctx: Ctx, depth: int) -> str:
        col = self.column(scope, typ)
        choice = self.randint(0, 9 if depth > 0 else 3)
        if choice in (0, 1) and col:
            return col
        if choice == 2 or (choice < 2 and not col):
            return self.lit(typ)
        if choice == 3:
            return col or self.lit(typ)
        sub = depth - 1
        if typ == "int":
            kind = self.pick(["add", "coalesce", "length", "abs", "case", "scalar", "scalar"])
            if kind == "add":
                return f"({self.expr(scope, 'int', ctx, sub)} + {self.pick([1, 2, 10])})"
            if kind == "coalesce":
                return f"coalesce({self.expr(scope, 'int', ctx, sub)}, {self.pick(INT_LITERALS)})"
            if kind == "length":
                return f"length({self.expr(scope, 'text', ctx, sub)})"
            if kind == "abs":
                return f"abs({self.expr(scope, 'int', ctx, sub)})"
            if kind == "case":
                return (
                    f"CASE WHEN {self.cond(scope, ctx, sub)} THEN {self.expr(scope, 'int', ctx, sub)}"
                    f" ELSE {self.expr(scope, 'int', ctx, sub)} END"
                )
            return self.scalar_subquery(scope, "int", ctx, sub)
        kind = self.pick(["upper", "concat", "coalesce", "case", "scalar", "scalar"])
        if kind == "upper":
            return f"{self.pick(['upper', 'lower'])}({self.expr(scope, 'text', ctx, sub)})"
        if kind == "concat":
            return f"({self.expr(scope, 'text', ctx, sub)} || '-x')"
        if kind == "coalesce":
            return f"coalesce({self.expr(scope, 'text', ctx, sub)}, 'none')"
        if kind == "case":
            return (
                f"CASE WHEN {self.cond(scope, ctx, sub)} THEN {self.expr(scope, 'text', ctx, sub)}"
                f" ELSE {self.expr(scope, 'text', ctx, sub)} END"
            )
        return self.scalar_subquery(scope, "text", ctx, sub)

    def scalar_subquery(self, outer: list[Source], typ: str, ctx: Ctx, depth: int) -> str:
        """(SELECT agg(...) FROM t WHERE <maybe correlated>): always at most one row."""
        t = self.pick(ALL_TABLES)
        alias = ctx.fresh("s")
        src = Source(alias, _table_columns(t))
        where = self.correlation(src, outer, ctx, depth)
        if typ == "int":
            cols = src.of_type("int")
            agg = self.pick(["count(*)", f"max({self.pick(cols)})", f"sum({self.pick(cols)})", f"min({self.pick(cols)})"])
        else:
            agg = f"{self.pick(['min', 'max'])}({self.pick(src.of_type('text'))})"
        return f"(SELECT {agg} FROM {self.table_name(t)} AS {alias}{where})"

    def correlation(self, inner: Source, outer: list[Source], ctx: Ctx, depth: int) -> str:
        scope = [inner, *outer]
        parts = []
        if outer and self.chance(0.7):
            ocol = self.column(outer, "int")
            if ocol:
                parts.append(f"{self.pick(inner.of_type('int'))} = {ocol}")
        if self.chance(0.5):
            parts.append(self.cond(scope if depth > 0 else [inner], ctx, max(depth - 1, 0)))
        return (" WHERE " + " AND ".join(parts)) if parts else ""

    def cond(self, scope: list[Source], ctx: Ctx, depth: int) -> str:
        choice = self.randint(0, 14 if depth > 0 else 6)
        typ = self.pick(["int", "int", "text"])
        if choice <= 1:
            return f"{self.expr(scope, typ, ctx, depth)} {self.pick(CMP_OPS)} {self.expr(scope, typ, ctx, 0)}"
        if choice == 2:
            return f"{self.expr(scope, typ, ctx, 0)} IS {self.pick(['', 'NOT '])}NULL"
        if choice == 3:
            items = ", ".join(self.lit(typ) for _ in range(self.randint(1, 3)))
            return f"{self.expr(scope, typ, ctx, 0)} {self.pick(['IN', 'NOT IN'])} ({items})"
        if choice == 4:
            return f"{self.expr(scope, 'int', ctx, 0)} BETWEEN {self.lit('int')} AND {self.lit('int')}"
        if choice == 5:
            tcols = [c for s in scope for c in s.of_type("text") if c.endswith(".tenant_id")]
            if tcols:  # tenant tricks: other tenant, or "not me"
                return f"{self.pick(tcols)} {self.pick(['=', '<>', '>='])} '{self.pick(['A', 'B', 'C'])}'"
            return f"{self.expr(scope, 'text', ctx, 0)} LIKE '{self.pick(['cust-%', '%-A-%', 'n%', '%'])}'"
        if choice == 6:
            return f"{self.expr(scope, typ, ctx, 0)} IS {self.pick(['', 'NOT '])}DISTINCT FROM {self.lit(typ)}"
        sub = depth - 1
        if choice == 7:
            return f"NOT ({self.cond(scope, ctx, sub)})"
        if choice in (8, 9):
            return f"({self.cond(scope, ctx, sub)} {self.pick(['AND', 'OR'])} {self.cond(scope, ctx, sub)})"
        if choice == 10:
            return f"({self.cond(scope, ctx, sub)} OR {self.pick(['true', '1 = 1', 'false'])})"
        if choice in (11, 12):
            q = self.select_query(scope, ctx, sub, shape=None, star_ok=True)
            return f"{self.pick(['', 'NOT '])}EXISTS ({q[0]})"
        if choice == 13:
            q = self.select_query(scope, ctx, sub, shape=(typ,))
            return f"{self.expr(scope, typ, ctx, 0)} {self.pick(['IN', 'NOT IN'])} ({q[0]})"
        q = self.select_query(scope, ctx, sub, shape=(typ,))
        return f"{self.expr(scope, typ, ctx, 0)} {self.pick(CMP_OPS)} {self.pick(['ANY', 'ALL'])} ({q[0]})"

    # ---- FROM ------------------------------------------------------------
    def table_name(self, t: Table) -> str:
        form = self.randint(0, 9)
        if form == 7:
            return f"public.{t.name}"
        if form == 8:
            return f'"{t.name}"'
        if form == 9:
            return t.name.upper()  # case folding
        return t.name

    def table_item(self, ctx: Ctx, taken: set[str], tenant_only: bool = False) -> tuple[str, Source]:
        choices = list(TENANT_TABLES if tenant_only else ALL_TABLES)
        cte_names = [n for n in ctx.ctes if n not in TABLES_BY_NAME and not tenant_only]
        if cte_names and self.chance(0.4):
            name = self.pick(cte_names)
            alias = ctx.fresh("c")
            return f"{name} AS {alias}", Source(alias, ctx.ctes[name])
        t = self.pick(choices)
        if t.name in ctx.ctes:  # a CTE shadows this table name
            if self.chance(0.5):
                alias = ctx.fresh("c")
                return f"{t.name} AS {alias}", Source(alias, ctx.ctes[t.name])
            ref = f"public.{t.name}"
        else:
            ref = self.table_name(t)
        if self.chance(0.1) and not ref.startswith('"') and ref.islower():
            ref = "ONLY " + ref
        # alias: fresh, or shadowing another table's name, or none at all
        form = self.randint(0, 9)
        if form == 8:
            other = self.pick([x.name for x in ALL_TABLES if x.name != t.name])
            if other not in taken:
                taken.add(other)
                return f"{ref} AS {other}", Source(other, _table_columns(t), t.key)
        if form == 9 and t.name not in taken and ref in (t.name, f"ONLY {t.name}"):
            taken.add(t.name)
            return ref, Source(t.name, _table_columns(t), t.key)
        alias = ctx.fresh("t")
        return f"{ref} {self.pick(['AS ', ''])}{alias}", Source(alias, _table_columns(t), t.key)

    def from_item(self, outer: list[Source], ctx: Ctx, depth: int, taken: set[str]) -> tuple[str, Source]:
        if self.chance(0.04):
            alias = ctx.fresh("v")
            rows = ", ".join(f"({self.pick(INT_LITERALS)}, '{self.pick(['A', 'B', 'open', 'x'])}')"
                             for _ in range(self.randint(1, 3)))
            names = (f"{alias}c0", f"{alias}c1")
            return f"(VALUES {rows}) AS {alias}({', '.join(names)})", Source(alias, ((names[0], "int"), (names[1], "text")))
        if depth > 0 and self.chance(0.2):
            shape = self.shape()
            q, _ = self.select_query(outer, ctx, depth - 1, shape=shape)
            alias = ctx.fresh("d")
            names = tuple(f"{alias}c{i}" for i in range(len(shape)))
            return f"({q}) AS {alias}({', '.join(names)})", Source(alias, tuple(zip(names, shape)))
        return self.table_item(ctx, taken)

    def join_condition(self, left: list[Source], right: Source, ctx: Ctx, depth: int, full: bool) -> str:
        parts = []
        typ = self.pick(["int", "int", "text"])
        if not right.of_type(typ) or not self.column(left, typ):
            typ = "text" if typ == "int" else "int"
        lcol, rcols = self.column(left, typ), right.of_type(typ)
        if lcol and rcols:
            parts.append(f"{lcol} = {self.pick(rcols)}")
        ltid = [c for s in left for c in s.of_type("text") if c.endswith(".tenant_id")]
        rtid = [c for c in right.of_type("text") if c.endswith(".tenant_id")]
        if ltid and rtid and self.chance(0.4):
            parts.append(f"{self.pick(ltid)} = {self.pick(rtid)}")
        if not full and self.chance(0.3):
            parts.append(self.cond([*left, right], ctx, max(depth - 1, 0)))
        if not parts:
            return "true"
        return " AND ".join(parts)

    def from_clause(self, outer: list[Source], ctx: Ctx, depth: int) -> tuple[str, list[Source], bool]:
        """Returns (sql, scope, has_outer_join)."""
        taken = {s.alias for s in outer}
        sql, first = self.from_item(outer, ctx, depth, taken)
        scope = [first]
        on_scope = [first]  # what an ON condition may see (a comma resets it)
        outer_join = False
        for _ in range(self.randint(0, 2)):
            kind = self.pick(["JOIN", "LEFT JOIN", "RIGHT JOIN", "FULL JOIN", "CROSS JOIN", ",", "USING", "LATERAL"])
            if kind == "LATERAL" and depth == 0:
                kind = "JOIN"
            if kind == "LATERAL":
                shape = (self.pick(["int", "text"]),)
                q, _ = self.select_query([*outer, *scope], ctx, depth - 1, shape=shape, lateral=True)
                alias = ctx.fresh("l")
                src = Source(alias, ((f"{alias}c0", shape[0]),))
                if self.chance(0.5):
                    sql += f" CROSS JOIN LATERAL ({q}) AS {alias}({alias}c0)"
                else:
                    sql += f" LEFT JOIN LATERAL ({q}) AS {alias}({alias}c0) ON true"
                    outer_join = True
                scope.append(src)
                on_scope.append(src)
                continue
            item, src = self.from_item(outer, ctx, depth, taken)
            if kind == "USING":
                common = [n for n, _ in scope[0].columns if n in dict(src.columns)] if len(scope) == 1 else []
                if not common:
                    kind = "JOIN"
                else:
                    cols = sorted(set(self.rng.sample(common, self.randint(1, min(2, len(common))))))
                    jt = self.pick(["JOIN", "LEFT JOIN", "FULL JOIN", "RIGHT JOIN"])
                    outer_join |= jt != "JOIN"
                    if self.chance(0.2):
                        sql += f" NATURAL {jt} {item}"
                    else:
                        sql += f" {jt} {item} USING ({', '.join(cols)})"
                    scope.append(src)
                    on_scope.append(src)
                    continue
            if kind == ",":
                sql += f", {item}"
                on_scope = []
            elif kind == "CROSS JOIN":
                sql += f" CROSS JOIN {item}"
            else:
                left = on_scope + outer if kind == "JOIN" else on_scope
                on = self.join_condition(left, src, ctx, depth, kind == "FULL JOIN")
                outer_join |= kind != "JOIN"
                sql += f" {kind} {item} ON {on}"
            scope.append(src)
            on_scope.append(src)
        return sql, scope, outer_join

    # ---- SELECT ------------------------------------------------------------
    def shape(self) -> tuple[str, ...]:
        return tuple(self.pick(["int", "int", "text"]) for _ in range(self.randint(1, 3)))

    def aggregate(self, scope: list[Source], typ: str, ctx: Ctx) -> str:
        if typ == "int":
            col = self.column(scope, "int")
            if not col:
                return "count(*)"
            return self.pick(["count(*)", f"count({col})", f"sum({col})", f"max({col})", f"min({col})", f"count(DISTINCT {col})"])
        col = self.column(scope, "text")
        return f"{self.pick(['min', 'max'])}({col})" if col else "'none'"

    def window(self, scope: list[Source], ctx: Ctx) -> str:
        part = self.column(scope, self.pick(["int", "text"]))
        over = f"PARTITION BY {part}" if part and self.chance(0.6) else ""
        col = self.column(scope, "int")
        fn = self.pick(["count(*)", f"sum({col})" if col else "count(*)", "rank()", "dense_rank()"])
        if fn in ("rank()", "dense_rank()"):
            order = self.column(scope, "int") or "1"
            over = f"{over} ORDER BY {order}".strip()
        return f"{fn} OVER ({over})"

    def select_core(self, outer, ctx, depth, shape, star_ok=False, lateral=False):
        from_sql, scope, outer_join = self.from_clause(outer, ctx, depth)
        visible = [*scope, *outer]
        where = f"{self.ws()}WHERE {self.cond(visible, ctx, depth)}" if self.chance(0.7) else ""
        if lateral and outer and self.chance(0.7):
            inner_col = self.column(scope, "int")
            outer_col = self.column(outer, "int")
            if inner_col and outer_col:
                where = f" WHERE {inner_col} = {outer_col}" + (f" AND ({where[7:]})" if where else "")
        if star_ok and shape is None and self.chance(0.3):
            return f"SELECT *{self.ws()}FROM {from_sql}{where}", None, False
        shape = shape or self.shape()
        if self.chance(0.3):  # aggregate query
            groups = []
            keyed = [s for s in scope if s.key]
            dependent: list[Source] = []
            if keyed and self.pk_group_by and self.chance(0.2):  # GROUP BY a primary key: its other columns may be selected
                src = self.pick(keyed)
                groups = [f"{src.alias}.{k}" for k in src.key]
                dependent = [src]
            for _ in range(self.randint(0, 2)):
                g = self.column(scope, self.pick(["int", "text"]))
                if g and g not in groups:
                    groups.append(g)
            items = []
            for typ in shape:
                gcols = [g for g in groups if any(g in s.of_type(typ) for s in scope)]
                gcols += [c for s in dependent for c in s.of_type(typ)]
                if gcols and self.chance(0.5):
                    items.append(self.pick(gcols))
                else:
                    items.append(self.aggregate(scope, typ, ctx))
            group_sql = f" GROUP BY {', '.join(groups)}" if groups else ""
            having = ""
            if self.chance(0.4):
                having = f" HAVING {self.aggregate(scope, 'int', ctx)} {self.pick(CMP_OPS)} {self.lit('int')}"
            sql = f"SELECT {', '.join(items)} FROM {from_sql}{where}{group_sql}{having}"
            return sql, shape, False
        items = []
        for typ in shape:
            if typ == "int" and self.chance(0.1):
                items.append(self.window(visible, ctx))
            else:
                items.append(self.expr(visible, typ, ctx, depth))
        distinct = "DISTINCT " if self.chance(0.15) else ""
        lockable = not distinct and not outer_join and self.chance(0.05)
        return f"SELECT {distinct}{', '.join(items)}{self.ws()}FROM{self.ws()}{from_sql}{where}", shape, lockable

    def cte_block(self, outer, ctx, depth) -> tuple[str, Ctx]:
        defs = []
        new: dict[str, tuple[tuple[str, str], ...]] = {}
        recursive = False
        for _ in range(self.randint(1, 2)):
            if self.chance(0.25):
                name = self.pick([t.name for t in ALL_TABLES])  # shadows a table
            else:
                name = ctx.fresh("cte")
            if name in new:
                continue
            if self.chance(0.2):
                recursive = True
                t = self.pick(TENANT_TABLES)
                a = ctx.fresh("r")
                src = Source(a, _table_columns(t))
                cond = self.cond([src], ctx, 0)
                col = self.pick(src.of_type("int"))
                step_t = self.pick(TENANT_TABLES)
                b = ctx.fresh("r")
                step_src = Source(b, _table_columns(step_t))
                step_col = self.pick(step_src.of_type("int"))
                if self.chance(0.5):
                    step = f"SELECT {name}.n + 1, {name}.v FROM {name} WHERE {name}.n < 3"
                else:
                    step = (
                        f"SELECT {name}.n + 1, {b}.{step_col.split('.')[1]} FROM {name}"
                        f" JOIN {step_t.name} AS {b} ON {step_col} = {name}.v WHERE {name}.n < 3"
                    )
                body = f"SELECT 1, {col} FROM {t.name} AS {a} WHERE {cond} UNION {self.pick(['', 'ALL '])}{step}"
                defs.append(f"{name}(n, v) AS ({body})")
                new[name] = (("n", "int"), ("v", "int"))
                continue
            shape = self.shape()
            q, _ = self.select_query([], ctx.with_ctes(new), depth - 1, shape=shape)
            cols = tuple((f"{name}_c{i}", typ) for i, typ in enumerate(shape))
            defs.append(f"{name}({', '.join(n for n, _ in cols)}) AS ({q})")
            new[name] = cols
        if not defs:
            return "", ctx
        head = "WITH RECURSIVE " if recursive else "WITH "
        return head + ", ".join(defs) + " ", ctx.with_ctes(new)

    def select_query(self, outer, ctx, depth, shape=None, star_ok=False, lateral=False, top=False):
        """Returns (sql, ordered)."""
        prefix = ""
        if depth > 0 and self.chance(0.15 if not top else 0.3):
            prefix, ctx = self.cte_block(outer, ctx, depth)
        setop = depth > 0 and not lateral and self.chance(0.15)
        if setop:
            shape = shape or self.shape()
            a, _, _ = self.select_core(outer, ctx, depth - 1, shape)
            b, _, _ = self.select_core(outer, ctx, depth - 1, shape)
            op = self.pick(["UNION", "UNION ALL", "INTERSECT", "INTERSECT ALL", "EXCEPT", "EXCEPT ALL"])
            sql, out_shape, lockable = f"({a}) {op} ({b})", shape, False
        else:
            sql, out_shape, lockable = self.select_core(outer, ctx, depth, shape, star_ok=star_ok, lateral=lateral)
        ordered = False
        if out_shape is not None and (top or shape is not None) and self.chance(0.25 if top else 0.1):
            positions = ", ".join(
                f"{i + 1}{self.pick(['', ' DESC'])}{self.pick(['', ' NULLS FIRST', ' NULLS LAST'])}"
                for i in range(len(out_shape))
            )
            sql += f" ORDER BY {positions}"
            ordered = top
            if self.chance(0.6):
                sql += f" LIMIT {self.randint(0, 5)}"
                if self.chance(0.4):
                    sql += f" OFFSET {self.randint(0, 3)}"
        elif top and lockable:
            sql += f" FOR {self.pick(['UPDATE', 'SHARE', 'NO KEY UPDATE', 'KEY SHARE'])}"
        return prefix + sql, ordered

    # ---- writes --------------------------------------------------------------
    def returning(self, target: Source, ctx: Ctx) -> str:
        if not self.chance(0.4):
            return ""
        if self.chance(0.3):
            # "*" would include the FROM/USING items of UPDATE/DELETE, and which of several
            # matching rows is returned depends on the plan: only the target's columns.
            return f" RETURNING {target.alias}.*"
        items = [self.expr([target], self.pick(["int", "text"]), ctx, 1) for _ in range(self.randint(1, 2))]
        return " RETURNING " + ", ".join(items)

    def target(self, ctx: Ctx) -> tuple[Table, str, Source]:
        t = PRODUCTS if self.chance(0.03) else self.pick(TENANT_TABLES)
        ref = self.table_name(t)
        if self.chance(0.5):
            alias = ctx.fresh("w")
            return t, f"{ref} AS {alias}", Source(alias, _table_columns(t))
        return t, ref, Source(t.name, _table_columns(t))

    def insert(self, ctx: Ctx, depth: int, returning_cols: tuple | None = None) -> str:
        t = PRODUCTS if self.chance(0.03) else self.pick(TENANT_TABLES)
        cols = [c for c in t.columns if not c.nullable and c.name != "tenant_id"]
        cols += [c for c in t.columns if c.nullable and self.chance(0.6)]
        tenant_value = None
        if t.tenant and self.chance(0.35):
            tenant_value = self.pick(["'A'", "'A'", "'A'", "'B'", "DEFAULT"])
            cols.insert(0, t.column("tenant_id"))
        names = [c.name for c in cols]
        if self.chance(0.8):
            rows = []
            for _ in range(self.randint(1, 3)):
                vals = []
                for c in cols:
                    if c.name == "tenant_id":
                        vals.append(tenant_value)
                    elif c.name == "id" and self.chance(0.1):  # a key computed from the tenant's own rows
                        vals.append(f"(SELECT coalesce(max(k.id), 0) + {len(rows) + 1} FROM {t.name} AS k)")
                    elif c.name in KEY_POOLS:
                        vals.append(str(self.pick(KEY_POOLS[c.name])) if not (c.nullable and self.chance(0.1)) else "NULL")
                    elif c.name == "code":
                        vals.append(self.pick(["'T-new-1'", "'T-new-2'", "NULL", "'T-A-1'", "'T-B-1'"]))
                    else:
                        v = self.lit(c.type)
                        vals.append(v if c.nullable or not v.startswith("NULL") else ("0" if c.type == "int" else "'x'"))
                rows.append("(" + ", ".join(vals) + ")")
            source = "VALUES " + ", ".join(rows)
        else:
            shape = tuple(c.type for c in cols)
            if tenant_value is not None:
                shape = shape[1:]
            q, _ = self.select_query([], ctx, depth - 1, shape=shape)
            if tenant_value is not None and tenant_value != "DEFAULT":
                qcols = [f"q{i}" for i in range(len(shape))]
                source = f"SELECT {tenant_value}, {', '.join('q.' + c for c in qcols)} FROM ({q}) AS q({', '.join(qcols)})"
            elif tenant_value == "DEFAULT":
                names = names[1:]
                source = q
            else:
                source = q
        conflict = ""
        # ON CONFLICT only with VALUES: with a SELECT source, two source rows with the same key
        # make the outcome depend on the plan's row order (which one is inserted, which skipped).
        if source.startswith("VALUES") and self.chance(0.35):
            if self.chance(0.3):
                conflict = " ON CONFLICT DO NOTHING"
            elif t.name == "tickets" and self.chance(0.4):
                conflict = " ON CONFLICT (code) DO UPDATE SET subject = EXCLUDED.subject"  # key lacks tenant
            else:
                key = ", ".join(t.key)
                settable = [c for c in t.columns if c.nullable]
                c = self.pick(settable)
                value = self.pick([f"EXCLUDED.{c.name}", self.lit(c.type), f"{t.name}.{c.name}"])
                where = f" WHERE {t.name}.{c.name} IS NOT NULL" if self.chance(0.3) else ""
                conflict = f" ON CONFLICT ({key}) {self.pick(['DO NOTHING', f'DO UPDATE SET {c.name} = {value}{where}'])}"
        ret = ""
        if returning_cols:
            ret = " RETURNING " + ", ".join(self.pick([c for c, typ in _table_columns(t) if typ == want]) for want in returning_cols)
        else:
            ret = self.returning(Source(t.name, _table_columns(t)), ctx)
        return f"INSERT INTO {self.table_name(t)} ({', '.join(names)}) {source}{conflict}{ret}"

    def update(self, ctx: Ctx, depth: int, returning_cols: tuple | None = None) -> str:
        t, ref, target = self.target(ctx)
        sets = []
        # Never a key column other than the tenant's: "SET id = id + 1" succeeds or fails
        # depending on the order rows are visited, which differs between plans.
        settable = [c for c in t.columns if (c.nullable or self.chance(0.1)) and (c.name == "tenant_id" or c.name not in t.key)]
        for c in self.rng.sample(settable, self.randint(1, min(2, len(settable)))):
            if c.name == "tenant_id":
                sets.append(f"tenant_id = '{self.pick(['A', 'B'])}'")
            else:
                sets.append(f"{c.name} = {self.expr([target], c.type, ctx, depth)}")
        from_sql, scope = "", [target]
        if self.chance(0.3):
            item, src = self.from_item([], ctx, depth - 1, {target.alias})
            from_sql = f" FROM {item}"
            scope = [target, src]
        where = f" WHERE {self.cond(scope, ctx, depth)}" if (from_sql or self.chance(0.85)) else ""
        ret = self._dml_returning(target, ctx, returning_cols)
        return f"UPDATE {ref}{self.ws()}SET {', '.join(sets)}{from_sql}{where}{ret}"

    def delete(self, ctx: Ctx, depth: int, returning_cols: tuple | None = None) -> str:
        t, ref, target = self.target(ctx)
        using, scope = "", [target]
        if self.chance(0.3):
            item, src = self.from_item([], ctx, depth - 1, {target.alias})
            using = f" USING {item}"
            scope = [target, src]
        where = f" WHERE {self.cond(scope, ctx, depth)}" if (using or self.chance(0.85)) else ""
        ret = self._dml_returning(target, ctx, returning_cols)
        return f"DELETE FROM{self.ws()}{ref}{using}{where}{ret}"

    def _dml_returning(self, target: Source, ctx: Ctx, returning_cols: tuple | None) -> str:
        if returning_cols:
            return " RETURNING " + ", ".join(self.pick(target.of_type(typ)) for typ in returning_cols)
        return self.returning(target, ctx)

    def merge(self, ctx: Ctx, depth: int) -> str:
        """MERGE INTO a tenant table USING a table, subquery or VALUES (PostgreSQL 15: no RETURNING)."""
        t = self.pick(TENANT_TABLES)
        alias = ctx.fresh("m")
        target = Source(alias, _table_columns(t))
        item, src = self.from_item([], ctx, depth - 1, {alias})
        on = self.join_condition([target], src, ctx, 0, full=False)
        whens = []
        if self.chance(0.8):
            cond = f" AND {self.cond([target, src], ctx, 0)}" if self.chance(0.3) else ""
            settable = [c for c in t.columns if c.nullable]
            action = self.pick(["update", "update", "delete", "nothing"])
            if action == "update":
                c = self.pick(settable)
                action_sql = f"UPDATE SET {c.name} = {self.expr([target, src], c.type, ctx, 0)}"
            else:
                action_sql = "DELETE" if action == "delete" else "DO NOTHING"
            whens.append(f"WHEN MATCHED{cond} THEN {action_sql}")
        if self.chance(0.6) or not whens:
            cond = f" AND {self.cond([src], ctx, 0)}" if self.chance(0.3) else ""
            cols = [c for c in t.columns if not c.nullable and c.name != "tenant_id"]
            cols += [c for c in t.columns if c.nullable and self.chance(0.4)]
            vals = []
            for c in cols:
                if c.name in KEY_POOLS:
                    vals.append(str(self.pick(KEY_POOLS[c.name])))
                elif c.nullable:
                    vals.append(self.expr([src], c.type, ctx, 0))
                else:
                    vals.append(f"coalesce({self.expr([src], c.type, ctx, 0)}, {'0' if c.type == 'int' else repr('x')})")
            whens.append(f"WHEN NOT MATCHED{cond} THEN INSERT ({', '.join(c.name for c in cols)}) VALUES ({', '.join(vals)})")
        return f"MERGE INTO {self.table_name(t)} AS {alias} USING {item} ON {on} {' '.join(whens)}"

    def cte_write(self, ctx: Ctx, depth: int) -> str:
        shape = self.shape()
        kind = self.pick(["insert", "update", "delete"])
        inner = getattr(self, kind)(ctx, depth - 1, returning_cols=shape)
        name = ctx.fresh("m")
        cols = tuple((f"{name}_c{i}", typ) for i, typ in enumerate(shape))
        sub_ctx = ctx.with_ctes({name: cols})
        main_src = Source(name, cols)
        if self.chance(0.5):
            main = f"SELECT count(*) FROM {name}"
        else:
            main = f"SELECT {', '.join(n for n, _ in cols)} FROM {name}"
            if self.chance(0.4):
                main += f" WHERE {self.cond([main_src], sub_ctx, 0)}"
        return f"WITH {name}({', '.join(n for n, _ in cols)}) AS ({inner}) {main}"


def generate(seed: int, max_depth: int = 2, pk_group_by: bool = True) -> GeneratedStatement:
    """The statement for ``seed`` (also handy to reproduce a reported case): one SQL statement
    over the rewrite schema (mostly valid, deterministic).

    ``pk_group_by=False`` leaves out GROUP BY a primary key with other columns of
    that table selected (valid only on base tables, so view-based rewriters fail it).
    """
    g = _Gen(random.Random(seed), pk_group_by)
    ctx = Ctx()
    kind = g.pick(["select"] * 6 + ["insert", "insert", "update", "update", "delete", "delete", "cte_write", "merge"])
    depth = g.randint(1, max_depth)
    if kind == "select":
        sql, ordered = g.select_query([], ctx, depth, star_ok=True, top=True)
        return GeneratedStatement(sql, kind, ordered)
    if kind == "cte_write":
        return GeneratedStatement(g.cte_write(ctx, depth), kind)
    return GeneratedStatement(getattr(g, kind)(ctx, depth), kind)

"""Pass 6: the second opinion — check the rewritten statement on PostgreSQL's own parse tree.

Every other pass reasons about sqlglot's tree.  This one parses the rewritten text (with the
marker literal ``'tenantgate:verify'`` where the tenant goes) with libpg_query, the parser of
PostgreSQL 15 compiled as a library (``pglast.parser.parse_sql_json``), and checks on *that*
tree, independently of sqlglot, that PostgreSQL will run a statement in which every tenant
relation is filtered:

* the text is exactly one statement, of a kind the sqlglot passes modelled (SELECT, INSERT,
  UPDATE, DELETE, MERGE; no SELECT INTO);
* every ``RangeVar`` is resolved as PostgreSQL resolves it (libpg_query has already folded and
  truncated the identifiers; CTE names shadow relations with WITH's scoping; the fixed
  search_path of :class:`~proxy.policy.catalog.CatalogSnapshot`);
* a tenant relation in a FROM tree (SELECT, UPDATE ... FROM, DELETE ... USING, MERGE ... USING,
  CTE bodies, subqueries and sublinks anywhere, LATERAL, set operations) is *covered* by a filter
  point: a top-level conjunct ``<ref>."tc" = <marker>`` of the ON of a join that drops its other
  rows (INNER: either side; LEFT: the right side; RIGHT: the left side), or of the WHERE of its
  own query level; between the relation and that point it must never be on the nullable side
  of an outer join (its other tenants' rows could otherwise decide which rows are
  null-extended) and never hidden behind a join alias.  The unqualified form ``"tc" = <marker>``
  counts only when the relation is the only FROM item of its query (the subquery wrapper).  A
  FULL JOIN counts with the predicate in its ON plus ``(<ref>."tc" = <marker> OR <ref>."tc" IS
  NULL)`` in WHERE, on a NOT NULL tenant column;
* UPDATE / DELETE targets: the conjunct in their WHERE; assigning the tenant column is refused;
* INSERT: an explicit column list with the tenant column once; in every VALUES row / the SELECT
  list the value at that position is the marker, a literal the proxy checks against the session's
  tenant (same decoded value), or a parameter checked on Bind.  Row expansions (``*``,
  ``(z).*``) shift positions: the tenant value must sit before the first or after the last
  expansion (PostgreSQL insists on as many expressions as listed columns), else refused;
  ON CONFLICT DO UPDATE needs the predicate or the rewriter's raising guard in its WHERE;
* MERGE: the predicate in the join condition, a source filtered inside itself, WHEN NOT MATCHED
  INSERT bound like INSERT, UPDATE SET of the tenant column refused;
* row locks (FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE) on a non-tenant relation are
  refused: a tenant could otherwise block other tenants' foreign-key checks on shared tables.

A marker counts only at a byte offset where the rewriter put it, so a client cannot forge a
predicate by writing the marker itself.  Runs on cache misses; a cache hit replays a verified
template.  Entry point: :func:`pg_verify`.
"""

from __future__ import annotations

import json

from pglast.parser import ParseError, parse_sql_json

from proxy.policy.catalog import CatalogSnapshot, Relation
from proxy.policy.join_plan import nullable_side, on_filters
from proxy.policy.pg_calls import check_calls
from proxy.policy.errors import FEATURE_NOT_SUPPORTED, INSUFFICIENT_PRIVILEGE, SYNTAX_ERROR, PolicyRefusal
from proxy.policy.rules import Rules

MARKER = "tenantgate:verify"
MARKER_SQL = "'tenantgate:verify'"
_STATEMENTS = ("SelectStmt", "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt")
_TEXT_TYPES = {"text", "varchar"}
_CAST_TARGETS = {
    "text": _TEXT_TYPES, "varchar": _TEXT_TYPES, "uuid": {"uuid"},
    "integer": {"int4", "int", "integer"}, "bigint": {"int8", "bigint"},
}
_LOCKS = {
    "LCS_FORUPDATE": "FOR UPDATE", "LCS_FORNOKEYUPDATE": "FOR NO KEY UPDATE",
    "LCS_FORSHARE": "FOR SHARE", "LCS_FORKEYSHARE": "FOR KEY SHARE",
}


def _fail(what: str) -> PolicyRefusal:
    return PolicyRefusal(
        FEATURE_NOT_SUPPORTED, f"rewrite verification failed (PostgreSQL's parser): {what}",
        hint="rewrite the statement in a simpler form (explicit columns, no row expansion in INSERT/MERGE)",
    )


def _unwrap(node) -> tuple[str, dict]:
    """``{"Type": body}`` -> (Type, body); a bare body -> ("", body)."""
    if type(node) is dict and len(node) == 1:
        for k, v in node.items():
            if type(v) is dict and k[0].isupper():
                return k, v
    return "", node or {}


def _sval(node) -> str | None:
    t, b = _unwrap(node)
    return b.get("sval", "") if t == "String" else None


def _conjuncts(node) -> list:
    t, b = _unwrap(node)
    if t == "BoolExpr" and b.get("boolop") == "AND_EXPR":
        out = []
        for a in b.get("args", ()):
            out.extend(_conjuncts(a))
        return out
    return [] if node is None else [node]


def _ref(rv: dict) -> str:
    alias = rv.get("alias")
    return alias["aliasname"] if alias and "aliasname" in alias else rv["relname"]


class _Entry:
    """A RangeVar in a FROM tree, with the joins above it (outermost first) and its side in each."""

    __slots__ = ("rv", "rel", "path")

    def __init__(self, rv: dict, rel: Relation | None, path: list):
        self.rv = rv
        self.rel = rel
        self.path = path


class _Verifier:
    def __init__(self, snapshot: CatalogSnapshot, rules: Rules, markers: frozenset[int],
                 param_checks: set[int], literals: frozenset[str]):
        self.snapshot = snapshot
        self.col = rules.tenant_column
        self.col_type = rules.tenant_column_type
        self.markers = markers
        self.param_checks = param_checks
        self.literals = literals
        self._refs: dict[int, set] = {}
        self.seen: set[int] = set()  # ids of the RangeVars checked (see pg_verify: all must be)
        self.deep = True  # False: no SubLink anywhere, expressions need no walk

    # ---- names -----------------------------------------------------------------------------
    def resolve(self, rv: dict, ctes: dict) -> Relation | None:
        """The relation ``rv`` names, or None for a CTE reference."""
        self.seen.add(id(rv))
        if rv.get("catalogname"):
            raise _fail(f"cross-database reference {rv['catalogname']}.{rv.get('schemaname')}.{rv['relname']}")
        schema = rv.get("schemaname")
        name = rv["relname"]
        if schema is None and name in ctes:
            return None
        if schema is not None and (schema == "pg_temp" or schema.startswith(("pg_temp_", "pg_toast"))):
            raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, f"relation {schema}.{name} is not accessible through tenantgate")
        rel = self.snapshot.resolve(schema, name)
        if rel is None:
            raise _fail(f'relation "{name if schema is None else schema + "." + name}" is not known to tenantgate')
        if rel.classification == "denied":
            raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, f"permission denied for relation {rel.qualified}: {rel.reason}")
        return rel

    # ---- predicates ------------------------------------------------------------------------
    def is_marker(self, node) -> bool:
        t, b = _unwrap(node)
        return t == "A_Const" and "sval" in b and b["sval"].get("sval") == MARKER and b.get("location") in self.markers

    def pred_ref(self, node) -> str | None:
        """``<ref>."tc" = <marker>`` -> ref; ``"tc" = <marker>`` -> ""; else None."""
        t, b = _unwrap(node)
        if t != "A_Expr" or b.get("kind") != "AEXPR_OP" or [_sval(n) for n in b.get("name", ())] != ["="]:
            return None
        if not self.is_marker(b.get("rexpr")):
            return None
        ct, cb = _unwrap(b.get("lexpr"))
        if ct != "ColumnRef":
            return None
        fields = [_sval(f) for f in cb.get("fields", ())]
        if not fields or fields[-1] != self.col or None in fields:
            return None
        if len(fields) == 2:
            return fields[0]
        return "" if len(fields) == 1 else None

    def or_null_ref(self, node) -> str | None:
        """``(<ref>."tc" = <marker> OR <ref>."tc" IS NULL)`` -> ref."""
        t, b = _unwrap(node)
        if t != "BoolExpr" or b.get("boolop") != "OR_EXPR" or len(b.get("args", ())) != 2:
            return None
        ref = self.pred_ref(b["args"][0])
        nt, nb = _unwrap(b["args"][1])
        if not ref or nt != "NullTest" or nb.get("nulltesttype") != "IS_NULL":
            return None
        ct, cb = _unwrap(nb.get("arg"))
        fields = [_sval(f) for f in cb.get("fields", ())] if ct == "ColumnRef" else []
        return ref if fields == [ref, self.col] else None

    def has_pred(self, cond, ref: str, *, unqualified: bool = False) -> bool:
        if cond is None:
            return False
        refs = self._refs.get(id(cond))
        if refs is None:
            refs = self._refs[id(cond)] = {self.pred_ref(c) for c in _conjuncts(cond)}
        return ref in refs or (unqualified and "" in refs)

    def is_conflict_guard(self, node, ref: str) -> bool:
        """``CASE WHEN <ref>."tc" = <marker> THEN true ELSE CAST(CASE ... END AS boolean) END``:
        true only for the tenant's rows; the ELSE yields NULL or a cast error, never true."""
        t, b = _unwrap(node)
        if t != "CaseExpr" or b.get("arg") or len(b.get("args", ())) != 1:
            return False
        _, w = _unwrap(b["args"][0])
        rt, rb = _unwrap(w.get("result"))
        if self.pred_ref(w.get("expr")) != ref or rt != "A_Const" or rb.get("boolval", {}).get("boolval") is not True:
            return False
        dt, db = _unwrap(b.get("defresult"))
        if dt != "TypeCast" or [_sval(n) for n in db["typeName"].get("names", ())][-1:] != ["bool"]:
            return False
        it, ib = _unwrap(db.get("arg"))
        if it != "CaseExpr":
            return False
        results = [_unwrap(x)[1].get("result") for x in ib.get("args", ())] + [ib.get("defresult")]
        for r in results:
            at, ab = _unwrap(r)
            if at != "A_Const" or not (ab.get("isnull") or
                                       ("sval" in ab and ab["sval"].get("sval", "").startswith("tenantgate: "))):
                return False
        return True

    # ---- FROM trees --------------------------------------------------------------------------
    def from_entries(self, items: list, ctes: dict, path: list, out: list[_Entry]) -> None:
        for item in items:
            self.from_item(item, ctes, path, out)

    def from_item(self, item, ctes: dict, path: list, out: list[_Entry]) -> None:
        t, b = _unwrap(item)
        if t == "RangeVar":
            out.append(_Entry(b, self.resolve(b, ctes), path))
        elif t == "JoinExpr":
            self.from_item(b.get("larg"), ctes, path + [(b, "l")], out)
            self.from_item(b.get("rarg"), ctes, path + [(b, "r")], out)
            self.visit(b.get("quals"), ctes)
        elif t == "RangeSubselect":
            self.visit(b.get("subquery"), ctes)
        elif t == "RangeTableSample":
            rt, rb = _unwrap(b.get("relation"))
            rel = self.resolve(rb, ctes) if rt == "RangeVar" else None
            if rel is not None and rel.classification == "tenant":
                raise _fail(f"TABLESAMPLE on tenant table {rel.qualified}")
            self.visit(b, ctes)
        else:  # RangeFunction, RangeTableFunc (XMLTABLE): expressions only
            self.visit(item, ctes)

    @staticmethod
    def nullable(join: dict, side: str) -> bool:
        jt = join.get("jointype")
        if jt not in ("JOIN_INNER", "JOIN_LEFT", "JOIN_RIGHT", "JOIN_FULL"):
            raise _fail(f"join type {jt}")
        return nullable_side(jt[5:], side)

    def clean_below(self, path: list, k: int) -> bool:
        """Between the relation and path[k] (exclusive): never nullable, never behind a join alias."""
        return all(not self.nullable(j, s) and not j.get("alias") for j, s in path[k + 1:])

    def covered(self, e: _Entry, where, single: bool) -> bool:
        rv, path = e.rv, e.path
        alias = rv.get("alias")
        if alias and alias.get("colnames"):
            return False  # column aliases may rename the tenant column
        ref = _ref(rv)
        for k in range(len(path) - 1, -1, -1):
            join, side = path[k]
            if not self.clean_below(path, k) or not self.has_pred(join.get("quals"), ref):
                continue
            jt = join.get("jointype")
            if jt in ("JOIN_INNER", "JOIN_LEFT", "JOIN_RIGHT") and on_filters(jt[5:], side):
                return True
            if jt == "JOIN_FULL" and e.rel.column_not_null(self.col) and where is not None:
                above = all(not self.nullable(j, s) and not j.get("alias") for j, s in path[:k])
                if above and self.clean_below(path, k) and any(self.or_null_ref(c) == ref for c in _conjuncts(where)):
                    return True
        if where is None or not self.clean_below(path, -1):
            return False
        return self.has_pred(where, ref, unqualified=single and not path)

    def check_scope(self, entries: list[_Entry], where, what: str = "reference to", single: bool = False) -> None:
        for e in entries:
            if e.rel is not None and e.rel.classification == "tenant" and not self.covered(e, where, single):
                raise _fail(f"{what} {e.rel.qualified} is not filtered by the tenant predicate")

    # ---- statements --------------------------------------------------------------------------
    def with_clause(self, body: dict, ctes: dict) -> dict:
        w = body.get("withClause")
        if not w:
            return ctes
        _, wb = _unwrap(w)
        items = [_unwrap(c)[1] for c in wb.get("ctes", ())]
        inner = dict(ctes)
        if wb.get("recursive"):
            inner.update((c["ctename"], c) for c in items)
            for c in items:
                self.visit(c.get("ctequery"), inner)
            return inner
        for c in items:
            self.visit(c.get("ctequery"), inner)
            inner[c["ctename"]] = c
        return inner

    def select(self, b: dict, ctes: dict) -> None:
        ctes = self.with_clause(b, ctes)
        if b.get("intoClause"):
            raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, "SELECT INTO creates a table and is not allowed in a tenant session")
        if b.get("op", "SETOP_NONE") != "SETOP_NONE":
            self.select(b["larg"], ctes)
            self.select(b["rarg"], ctes)
        entries: list[_Entry] = []
        self.from_entries(b.get("fromClause", ()), ctes, [], entries)
        frm = b.get("fromClause", ())
        single = len(frm) == 1 and _unwrap(frm[0])[0] == "RangeVar"
        self.check_scope(entries, b.get("whereClause"), single=single)
        if b.get("lockingClause"):
            self.row_locks(b, ctes)
        for k, v in b.items():
            if k not in ("fromClause", "withClause", "larg", "rarg", "lockingClause"):
                self.visit(v, ctes)

    def update(self, b: dict, ctes: dict) -> None:
        ctes = self.with_clause(b, ctes)
        self.assignments(b.get("targetList", ()), "UPDATE")
        self.dml_scope(b, "fromClause", ctes, "UPDATE of")

    def delete(self, b: dict, ctes: dict) -> None:
        ctes = self.with_clause(b, ctes)
        self.dml_scope(b, "usingClause", ctes, "DELETE from")

    def dml_scope(self, b: dict, extra: str, ctes: dict, what: str) -> None:
        target = _Entry(b["relation"], self.write_target(b["relation"], ctes), [])
        entries: list[_Entry] = []
        self.from_entries(b.get(extra, ()), ctes, [], entries)
        where = b.get("whereClause")
        if not self.covered(target, where, False):
            raise _fail(f"{what} {target.rel.qualified} is not filtered by the tenant predicate")
        self.check_scope(entries, where)
        for k, v in b.items():
            if k not in ("relation", extra, "withClause"):
                self.visit(v, ctes)

    def write_target(self, rv: dict, ctes: dict) -> Relation:
        rel = self.resolve(rv, ctes)
        if rel is None or rel.classification != "tenant":
            name = rv["relname"] if rel is None else rel.qualified
            raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, f"permission denied: tenant sessions cannot write to {name}")
        return rel

    def assignments(self, targets, what: str) -> None:
        for t in targets:
            if _unwrap(t)[1].get("name") == self.col:
                raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, f"changing the tenant column {self.col} is not allowed ({what})")

    def insert(self, b: dict, ctes: dict) -> None:
        ctes = self.with_clause(b, ctes)
        rel = self.write_target(b["relation"], ctes)
        cols = [_unwrap(c)[1].get("name") for c in b.get("cols", ())]
        if cols.count(self.col) != 1:
            raise _fail(f"INSERT into {rel.qualified} does not name the tenant column exactly once")
        k = cols.index(self.col)
        st, sb = _unwrap(b.get("selectStmt"))
        if st != "SelectStmt" or sb.get("op", "SETOP_NONE") != "SETOP_NONE":
            raise _fail(f"INSERT into {rel.qualified} from a source whose tenant value cannot be located")
        if sb.get("valuesLists"):
            for row in sb["valuesLists"]:
                self.bound_value([x for x in _unwrap(row)[1].get("items", ())], k, len(cols), rel)
        else:
            self.bound_value([_unwrap(t)[1].get("val") for t in sb.get("targetList", ())], k, len(cols), rel)
        self.select(sb, ctes)
        occ = b.get("onConflictClause")
        if occ and occ.get("action") == "ONCONFLICT_UPDATE":
            self.assignments(occ.get("targetList", ()), "ON CONFLICT DO UPDATE")
            ref = _ref(b["relation"])
            if not any(self.pred_ref(c) == ref or self.is_conflict_guard(c, ref) for c in _conjuncts(occ.get("whereClause"))):
                raise _fail(f"ON CONFLICT DO UPDATE of {rel.qualified} is not limited to the tenant's rows")
        for key, v in b.items():
            if key not in ("relation", "selectStmt", "withClause"):
                self.visit(v, ctes)

    def bound_value(self, exprs: list, k: int, ncols: int, rel: Relation) -> None:
        """The expression that lands in column k is the tenant (see module docstring)."""
        stars = [i for i, e in enumerate(exprs) if self.is_expansion(e)]
        if not stars:
            if len(exprs) != ncols:
                raise _fail(f"INSERT into {rel.qualified} has {len(exprs)} values for {ncols} columns")
            e = exprs[k]
        elif k < stars[0]:
            e = exprs[k]
        elif ncols - k <= len(exprs) - 1 - stars[-1]:
            e = exprs[len(exprs) - (ncols - k)]
        else:
            raise _fail(f"a row expansion (* or .*) decides which value lands in the tenant column of {rel.qualified}")
        if not self.tenant_value(e):
            raise PolicyRefusal(
                INSUFFICIENT_PRIVILEGE,
                f"the value of the tenant column {self.col} must be a plain literal or a parameter",
            )

    @staticmethod
    def is_expansion(e) -> bool:
        t, b = _unwrap(e)
        if t == "ColumnRef":
            return any(_unwrap(f)[0] == "A_Star" for f in b.get("fields", ()))
        if t == "A_Indirection":
            return any(_unwrap(f)[0] == "A_Star" for f in b.get("indirection", ()))
        return False

    def tenant_value(self, e) -> bool:
        t, b = _unwrap(e)
        if t == "TypeCast":
            tn = b.get("typeName", {})
            names = [_sval(n) for n in tn.get("names", ())]
            if tn.get("typmods") or tn.get("arrayBounds") or tn.get("setof") or not names \
                    or names[-1] not in _CAST_TARGETS.get(self.col_type, ()) or names[:-1] not in ([], ["pg_catalog"]):
                return False
            t, b = _unwrap(b.get("arg"))
            if t not in ("A_Const", "ParamRef"):
                return False
        if t == "ParamRef":
            return b.get("number", 0) - 1 in self.param_checks
        if t != "A_Const" or b.get("isnull"):
            return False
        if self.is_marker({t: b}):
            return True
        if "sval" in b:
            return b["sval"].get("sval", "") in self.literals
        if "ival" in b:
            return str(b["ival"].get("ival", 0)) in self.literals
        return False

    def merge(self, b: dict, ctes: dict) -> None:
        ctes = self.with_clause(b, ctes)
        rel = self.write_target(b["relation"], ctes)
        if not self.has_pred(b.get("joinCondition"), _ref(b["relation"])):
            raise _fail(f"MERGE into {rel.qualified} is not bound to the tenant")
        entries: list[_Entry] = []
        self.from_item(b.get("sourceRelation"), ctes, [], entries)
        self.check_scope(entries, None, "MERGE source")
        for w in b.get("mergeWhenClauses", ()):
            _, wb = _unwrap(w)
            cmd = wb.get("commandType")
            if cmd == "CMD_UPDATE":
                self.assignments(wb.get("targetList", ()), "MERGE ... UPDATE")
            elif cmd == "CMD_INSERT":
                cols = [_unwrap(c)[1].get("name") for c in wb.get("targetList", ())]
                if cols.count(self.col) != 1:
                    raise _fail(f"MERGE ... INSERT into {rel.qualified} does not name the tenant column exactly once")
                self.bound_value(wb.get("values", []), cols.index(self.col), len(cols), rel)
            elif cmd not in ("CMD_DELETE", "CMD_NOTHING"):
                raise _fail(f"MERGE action {cmd}")
        for key, v in b.items():
            if key not in ("relation", "sourceRelation", "withClause"):
                self.visit(v, ctes)

    # ---- row locks ----------------------------------------------------------------------------
    def row_locks(self, b: dict, ctes: dict) -> None:
        items: dict[str, object] = {}

        def collect(item) -> None:
            t, ib = _unwrap(item)
            if t == "RangeVar":
                items[_ref(ib)] = ("rel", ib)
            elif t == "JoinExpr":
                collect(ib.get("larg"))
                collect(ib.get("rarg"))
            elif t == "RangeSubselect" and ib.get("alias"):
                items[ib["alias"]["aliasname"]] = ("sub", ib.get("subquery"))

        for item in b.get("fromClause", ()):
            collect(item)
        for lc in b["lockingClause"]:
            _, lb = _unwrap(lc)
            what = _LOCKS.get(lb.get("strength"), "row locks")
            locked = [_unwrap(r)[1] for r in lb.get("lockedRels", ())]
            self.seen.update(id(r) for r in locked)
            names = [r.get("relname") for r in locked]
            targets = [items[n] for n in names if n in items] if names else list(items.values())
            for kind, node in targets:
                for rel in (self.relations_in(node, ctes) if kind == "sub" else [self.resolve(node, ctes)]):
                    if rel is None:
                        continue  # a CTE: its body is checked with the CTE's own relations below
                    if rel.classification != "tenant":
                        raise PolicyRefusal(
                            INSUFFICIENT_PRIVILEGE,
                            f"{what} on {rel.qualified} is not allowed in a tenant session: row locks on shared "
                            "tables would block other tenants",
                            hint="lock only tenant tables (FOR UPDATE OF <tenant table alias>)",
                        )
                if kind == "rel" and node.get("schemaname") is None and node["relname"] in ctes:
                    for rel in self.relations_in(ctes[node["relname"]].get("ctequery"), ctes):
                        if rel is not None and rel.classification != "tenant":
                            raise PolicyRefusal(
                                INSUFFICIENT_PRIVILEGE,
                                f"{what} on {rel.qualified} (through a WITH query) is not allowed in a tenant session",
                            )

    def relations_in(self, node, ctes: dict) -> list:
        found: list = []

        def walk(n) -> None:
            if isinstance(n, dict):
                t, b = _unwrap(n)
                if t == "RangeVar" or (not t and "relname" in b):
                    if b.get("schemaname") is None and b.get("relname") in ctes:
                        return
                    found.append(self.snapshot.resolve(b.get("schemaname"), b["relname"]))
                    return
                for v in b.values():
                    walk(v)
            elif isinstance(n, list):
                for v in n:
                    walk(v)

        walk(node)
        return found

    # ---- generic walk -----------------------------------------------------------------------------
    def visit(self, node, ctes: dict) -> None:
        if isinstance(node, list):
            for n in node:
                self.visit(n, ctes)
            return
        if not isinstance(node, dict):
            return
        t, b = _unwrap(node)
        if t == "SelectStmt":
            self.select(b, ctes)
        elif t == "InsertStmt":
            self.insert(b, ctes)
        elif t == "UpdateStmt":
            self.update(b, ctes)
        elif t == "DeleteStmt":
            self.delete(b, ctes)
        elif t == "MergeStmt":
            self.merge(b, ctes)
        elif t == "RangeVar" or (not t and "relname" in b):
            # a relation outside any FROM tree modelled here (LockingClause names are not walked)
            rel = self.resolve(b, ctes)
            if rel is not None and rel.classification == "tenant":
                raise _fail(f"relation {rel.qualified} is used in a position tenantgate does not model")
        elif self.deep:
            for v in b.values():
                if type(v) is dict or type(v) is list:
                    self.visit(v, ctes)


def marker_offsets(pieces, marker_sql: str, tenant) -> tuple[str, frozenset[int]]:
    """Join spliced pieces (strings and the TENANT object) with the marker literal; returns the text and
    the UTF-8 byte offsets of the markers (libpg_query's locations are byte offsets)."""
    out: list[str] = []
    offsets: list[int] = []
    pos = 0
    mlen = len(marker_sql.encode("utf-8"))
    for p in pieces:
        if p is tenant:
            offsets.append(pos)
            out.append(marker_sql)
            pos += mlen
        else:
            out.append(p)
            pos += len(p.encode("utf-8")) if not p.isascii() else len(p)
    return "".join(out), frozenset(offsets)


def pg_verify(
    sql: str,
    markers: frozenset[int],
    snapshot: CatalogSnapshot,
    rules: Rules,
    *,
    param_checks: set[int] = frozenset(),
    required_literals=(),
    function_checker=None,
    setting_params: frozenset[int] = frozenset(),
) -> None:
    """Parse ``sql`` (one rewritten statement, markers at the byte offsets ``markers``) with
    PostgreSQL's parser and check it (see module docstring); raises :class:`PolicyRefusal`.
    With ``function_checker``, every function call PostgreSQL will make is judged too
    (:mod:`proxy.policy.pg_calls`)."""
    try:
        text = parse_sql_json(sql)
        tree = json.loads(text)
    except ParseError as e:
        raise PolicyRefusal(SYNTAX_ERROR, f"syntax error (PostgreSQL's parser): {e}") from None
    stmts = tree.get("stmts", [])
    if len(stmts) != 1:
        raise PolicyRefusal(
            SYNTAX_ERROR,
            f"PostgreSQL reads {len(stmts)} statements where tenantgate read one: refused",
            hint="check string continuations, comments and quoting in the statement",
        )
    t, _ = _unwrap(stmts[0].get("stmt"))
    if t not in _STATEMENTS:
        raise PolicyRefusal(FEATURE_NOT_SUPPORTED, f"PostgreSQL reads this statement as {t or 'nothing'}: refused")
    if function_checker is not None:
        check_calls(stmts[0]["stmt"], function_checker, snapshot, frozenset(setting_params))
    v = _Verifier(snapshot, rules, markers, set(param_checks), frozenset(required_literals))
    # Statements nest inside expressions only through SubLink: without one, expressions are not walked.
    v.deep = '"SubLink"' in text
    v.visit(stmts[0]["stmt"], {})
    # Completeness: every RangeVar PostgreSQL parsed was checked by one of the rules above (JSON escapes
    # quotes inside names and literals, so the key occurs once per RangeVar).
    if len(v.seen) != text.count('"relname":'):
        raise _fail("a relation is named in a position tenantgate does not model")

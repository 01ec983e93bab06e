"""Lexer differential fuzz: token soups that tenantgate forwards must read the same to PostgreSQL.

:func:`soup` builds ``SELECT <items>`` texts from every lexical form that tenantgate and
PostgreSQL could read differently: strings of every kind ('', E'' with escapes, U&'' with and
without UESCAPE, $tag$ dollar quotes, B''/X''/N''), continuations with \\n, \\r\\n, \\r and
comments between the pieces, U&"" and quoted identifiers, nested /* */ comments, -- comments,
``$n`` next to other tokens, operators and numbers in every form (0x1F, 1e5, .5, 1.e3, 1_000),
plus random one-character mutations and extra statements.  :func:`judge` runs a text through
the policy engine; a refused text is fine, a forwarded one is compared:

* fast judge (every case): sqlglot's tree as tenantgate parsed it against PostgreSQL's own
  parse tree (pglast): statement count, select-list length, and per item its kind and value
  (string values, numbers, parameter numbers, alias names);
* PostgreSQL itself (a sample, batched by the caller): the forwarded text is executed and the
  returned column count and string values must be what tenantgate's tree said.

``python tests/support/lexer_fuzz.py --cases N [--pg DSN]`` is ``make fuzz-lexer``: prints cases per
second and disagreements.  ``tests/test_lexer_differential.py`` runs 5,000 cases through
hypothesis with a real PostgreSQL.
"""

from __future__ import annotations

import random
import sys
import time
from decimal import Decimal, InvalidOperation

from sqlglot import exp

_BODY = ["a", "b", "é", "x y", "''", ";", "--", "/*", "*/", "$", "$$", '"', "\\", "\n", "\r\n", "\t", "%", "?"]
_ESC = ["\\'", "\\\\", "\\n", "\\t", "\\x41", "\\x4", "\\101", "\\7", "\\u00e9", "\\U0001F600", "\\q", "''", "\\b"]
_GAPS = ["\n", "\r\n", "\r", " \n ", "\t\n\f", "\n-- c\n", " -- c;'\r\n", "\n--\n\n", "/* c */\n", "\n/* c */",
         " ", "  "]
_NUMBERS = ["1", "42", "1.5", ".5", "1.", "1.e3", "1e5", "1e-5", "1E+2", "0x1F", "0o17", "0b101", "1_000", "00012",
            "1e", "1.2.3", "9999999999999999999999", "0.000",
            # digits of other scripts: Python's \\d matches them, PostgreSQL reads an identifier
            "\u0663", "\uff15", "1\u0663", "\u0663.5", "\u0967e3"]
_TAGS = ["", "a", "a1", "_x", "é", "Tag"]
_OPS = ["+", "-", "||", "*", "/", "<", ">=", "<>", "!=", "::text", "::int", "::numeric", " IS NULL", "#", "@", "~"]
_SEPS = [", ", ",", ",\n", " , ", ",/* c */", ",-- c\n", ", /* a /* nested */ b */ ", ",\r\n"]
_NAMES = ["x", "y1", "_z", "é", "select", "from", "Ab", '"x""y"', '"a b"', '"é"', 'U&"\\0061"', 'U&"!0062" UESCAPE \'!\'']
_MUTANTS = "'\";$\\-/*\nE&U"


def _body(rnd: random.Random, parts: list[str]) -> str:
    return "".join(rnd.choice(parts) for _ in range(rnd.randint(0, 4)))


def _std(rnd):
    return "'" + _body(rnd, [p for p in _BODY if p not in ("\\",) or rnd.random() < 0.5]).replace("'", "''") \
        .replace("''''", "''") + "'"


def _piece(rnd, escaped: bool) -> str:
    if escaped:
        return "'" + _body(rnd, ["a", "é", ";", "--", "$$"] + _ESC) + "'"
    return "'" + _body(rnd, ["a", "é", ";", "--", "$$", "''", "\\", " "]) + "'"


def _string(rnd: random.Random) -> str:
    k = rnd.randrange(9)
    if k == 0:
        return _piece(rnd, False)
    if k == 1:
        return rnd.choice("Ee") + _piece(rnd, True)
    if k in (2, 3):  # continuation: one string to PostgreSQL when the gap has a newline
        escaped = rnd.random() < 0.5
        first = (rnd.choice("Ee") if escaped else "") + _piece(rnd, escaped)
        return first + "".join(rnd.choice(_GAPS) + _piece(rnd, escaped) for _ in range(rnd.randint(1, 2)))
    if k == 4:
        body = _body(rnd, ["a", "\\0061", "\\+000062", "!0063", "\\\\", "!!", "é", "''"])
        tail = rnd.choice(["", " UESCAPE '!'", "\nUESCAPE '!'", " UESCAPE '\\'", " UESCAPE 'a'"])
        return "U&'" + body + "'" + tail
    if k == 5:
        tag = "$" + rnd.choice(_TAGS) + "$"
        return tag + _body(rnd, ["a", "$", "$$", "'", "\\", ";", "$a$", "é", "\n"]) + tag
    if k == 6:
        return rnd.choice(["B'101'", "X'1F'", "b'0'", "x'ab'", "N'nat'", "B'12'"])
    if k == 7:
        return rnd.choice(["'a'", "E'b'"]) + rnd.choice(_GAPS) + rnd.choice(["'c'", "E'\\''", "'\\'"])
    return "'" + _body(rnd, _BODY).replace("'", "''") + "'"


def _atom(rnd: random.Random) -> str:
    k = rnd.randrange(6)
    if k <= 2:
        return _string(rnd)
    if k == 3:
        return rnd.choice(_NUMBERS)
    if k == 4:
        return "$" + str(rnd.randint(1, 12))
    return rnd.choice(["NULL", "true", "current_date", "(1)", "(SELECT 1)", "ARRAY[1,2]", "1 BETWEEN 0 AND 2"])


def _item(rnd: random.Random) -> str:
    text = _atom(rnd)
    if rnd.random() < 0.1:  # a typed constant: PostgreSQL reads "name 'x'" and "name $1" as a cast
        text = rnd.choice(["text ", "int ", "foo ", "date ", "x.y ", "U", "E", "B", "X", "N", "interval "]) + text
    while rnd.random() < 0.25:
        op = rnd.choice(_OPS)
        text = text + op + ("" if op.startswith(("::", " IS")) else rnd.choice(["", " "]) + _atom(rnd))
    r = rnd.random()
    if r < 0.15:
        text += " AS " + rnd.choice(_NAMES)
    elif r < 0.25:
        text += " " + rnd.choice(_NAMES)
    return text


def soup(rnd: random.Random) -> str:
    items = [_item(rnd) for _ in range(rnd.randint(1, 4))]
    text = "SELECT " + "".join(it + (rnd.choice(_SEPS) if k < len(items) - 1 else "") for k, it in enumerate(items))
    if rnd.random() < 0.1:
        text += rnd.choice(["; SELECT 1", ";", " ;; SELECT 'x'", "\n-- trailing", " /* c */"])
    if rnd.random() < 0.15:
        pos = rnd.randrange(len(text) + 1)
        if rnd.random() < 0.5 and pos < len(text):
            text = text[:pos] + text[pos + 1 :]
        else:
            text = text[:pos] + rnd.choice(_MUTANTS) + text[pos:]
    return text


# ---- judges ------------------------------------------------------------------------------------
def _number(text: str):
    try:
        return Decimal(text)
    except InvalidOperation:
        return ("num?", text)


def sqlglot_view(sql: str, checked: bool = True):
    """What tenantgate parsed: per statement, per select item (kind, value, alias).
    ``checked=False``: plain sqlglot without the cross-check (to show the judges can fail)."""
    if checked:
        from proxy.policy.parse import parse_statements

        trees = [st.tree for st in parse_statements(sql)]
    else:
        import sqlglot

        trees = [t for t in sqlglot.parse(sql, read="postgres") if t is not None]
    out = []
    for tree in trees:
        if not isinstance(tree, exp.Select):
            out.append(("stmt", type(tree).__name__))
            continue
        items = []
        for e in tree.expressions:
            alias = None
            if isinstance(e, exp.Alias):
                alias = e.alias
                e = e.this
            items.append((_sg_value(e), alias))
        out.append(tuple(items))
    return out


def _sg_value(e):
    if isinstance(e, exp.Literal):
        return ("str", e.this) if e.is_string else ("num", _number(e.this))
    if isinstance(e, (exp.ByteString, exp.RawString)):  # E'' and dollar-quoted strings
        return ("str", e.this)
    if isinstance(e, exp.Neg) and isinstance(e.this, exp.Literal) and not e.this.is_string:
        return ("num", -_number(e.this.this)) if isinstance(_number(e.this.this), Decimal) else ("?", "neg")
    if isinstance(e, (exp.Placeholder, exp.Parameter)):
        node = e.this if isinstance(e, exp.Parameter) else e
        txt = node.this if hasattr(node, "this") else None
        txt = txt.this if isinstance(txt, exp.Expression) else txt
        return ("param", int(txt)) if txt is not None and str(txt).isdigit() else ("?", "param")
    return ("?", type(e).__name__)


def pglast_view(sql: str):
    """What PostgreSQL's parser reads, in the same shape as :func:`sqlglot_view`."""
    from pglast import parser

    out = []
    for raw in parser.parse_sql(sql):
        stmt = raw.stmt
        if type(stmt).__name__ != "SelectStmt" or stmt.targetList is None:
            out.append(("stmt", type(stmt).__name__))
            continue
        items = []
        for rt in stmt.targetList:
            items.append((_pg_value(rt.val), rt.name))
        out.append(tuple(items))
    return out


def _pg_value(v):
    name = type(v).__name__
    if name == "A_Const":
        if v.isnull:
            return ("?", "null")
        val = v.val
        vname = type(val).__name__
        if vname == "String":
            return ("str", val.sval)
        if vname == "Integer":
            return ("num", Decimal(val.ival))
        if vname == "Float":
            return ("num", _number(val.fval))
        return ("?", vname)
    if name == "ParamRef":
        return ("param", v.number)
    return ("?", name)


def compare_views(sg, pg) -> str | None:
    """None when tenantgate's and PostgreSQL's readings agree where both are comparable."""
    if len(sg) != len(pg):
        return f"statement count {len(sg)} != {len(pg)}"
    for a, b in zip(sg, pg):
        if a and a[0] == "stmt" or b and b[0] == "stmt":
            continue
        if len(a) != len(b):
            return f"select list length {len(a)} != {len(b)}"
        for (va, aa), (vb, ab) in zip(a, b):
            if va[0] != "?" and vb[0] != "?" and va != vb:
                return f"value {va!r} != {vb!r}"
            if (va[0] == "?") != (vb[0] == "?") and "str" in (va[0], vb[0]):
                return f"kind {va!r} != {vb!r}"
            if aa is not None and ab is not None and aa != ab and aa.lower() != ab:
                return f"alias {aa!r} != {ab!r}"
            if (aa is None) != (ab is None):
                return f"alias {aa!r} != {ab!r}"
    return None


class Judge:
    def __init__(self):
        from proxy.policy.allowlist import FunctionChecker
        from support.demo_policy import demo_engine
        from proxy.policy.context import PolicyContext

        self.engine = demo_engine(FunctionChecker.default())
        self.ctx = PolicyContext(tenant="acme")
        self.cases = self.forwarded = 0
        self.disagreements: list[tuple[str, str]] = []

    def __call__(self, sql: str):
        """(forwarded text or None, sqlglot view or None); records disagreements of the fast judge."""
        from proxy.seam import Forward, Origin

        self.cases += 1
        d = self.engine.check(sql, self.ctx, Origin.SIMPLE)
        if not isinstance(d, Forward):
            return None, None
        self.forwarded += 1
        out = d.sql
        try:
            sg = sqlglot_view(out) if out.strip() else []
            pg = pglast_view(out) if out.strip() else []
        except Exception as e:  # the forwarded text must parse with both
            self.disagreements.append((sql, f"forwarded text does not parse: {type(e).__name__}: {e}"))
            return out, None
        why = compare_views(sg, pg)
        if why:
            self.disagreements.append((sql, why))
        return out, sg


def run_in_postgres(conn, out: str, sg) -> str | None:
    """Execute a forwarded single SELECT of literals; compare with tenantgate's view."""
    if len(sg) != 1 or not sg[0] or sg[0][0] == "stmt" or any(v[0] in ("param", "?") for v, _ in sg[0]):
        return None
    try:
        cur = conn.execute(out)
        row = cur.fetchone()
        ncols = len(cur.description)
    except Exception:
        conn.rollback()
        return None  # an error is not a different reading (e.g. an invalid escape)
    if ncols != len(sg[0]):
        return f"PostgreSQL returned {ncols} columns, tenantgate saw {len(sg[0])}"
    for (v, _), got in zip(sg[0], row):
        if v[0] == "str" and str(got) != v[1]:
            return f"PostgreSQL returned {got!r}, tenantgate saw the string {v[1]!r}"
        if v[0] == "num" and isinstance(v[1], Decimal) and Decimal(str(got)) != v[1]:
            return f"PostgreSQL returned {got!r}, tenantgate saw the number {v[1]!r}"
    return None


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--pg", help="DSN of a PostgreSQL 15 to execute every --pg-every'th forwarded case on")
    ap.add_argument("--pg-every", type=int, default=20)
    ap.add_argument("--start-pg", action="store_true", help="start a throwaway PostgreSQL 15 cluster as the judge")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.CRITICAL)
    rnd = random.Random(args.seed)
    judge = Judge()
    conn = None
    cluster = None
    if args.start_pg:
        import tempfile
        from pathlib import Path

        from proxy.pgcluster import make_cluster

        base = Path(tempfile.mkdtemp(prefix="tenantgate-lexfuzz-"))
        base.chmod(0o755)
        cluster = make_cluster(base, "lexfuzz")
        args.pg = cluster.dsn()
    if args.pg:
        import psycopg

        conn = psycopg.connect(args.pg, autocommit=True)
    try:
        return _loop(args, rnd, judge, conn)
    finally:
        if conn is not None:
            conn.close()
        if cluster is not None:
            cluster.destroy()


def _loop(args, rnd, judge, conn) -> int:
    executed = 0
    printed = 0
    t0 = time.perf_counter()
    last = t0
    for k in range(args.cases):
        sql = soup(rnd)
        out, sg = judge(sql)
        if conn is not None and out is not None and sg is not None and judge.forwarded % args.pg_every == 0:
            why = run_in_postgres(conn, out, sg)
            executed += 1
            if why:
                judge.disagreements.append((sql, why))
        while printed < len(judge.disagreements):
            sql_, why_ = judge.disagreements[printed]
            print(f"DISAGREEMENT {why_}: {sql_!r}", flush=True)
            printed += 1
        now = time.perf_counter()
        if now - last > 30:
            last = now
            print(f"{k + 1} cases, {(k + 1) / (now - t0):.0f}/s, {judge.forwarded} forwarded, "
                  f"{executed} executed in PostgreSQL, {len(judge.disagreements)} disagreements", flush=True)
    dt = time.perf_counter() - t0
    print(f"lexer fuzz: {judge.cases} cases in {dt:.0f} s ({judge.cases / dt:.0f} cases/s), "
          f"{judge.forwarded} forwarded, {executed} executed in PostgreSQL, "
          f"{len(judge.disagreements)} disagreements")
    return 1 if judge.disagreements else 0


if __name__ == "__main__":
    from pathlib import Path

    sys.path[:0] = [".", str(Path(__file__).resolve().parents[1])]  # the repo (proxy) and tests/ (support)
    sys.exit(main(sys.argv[1:]))

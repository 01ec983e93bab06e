"""COPY in tenant sessions.

* ``COPY (query) TO STDOUT``: the query is rewritten like any other.
* ``COPY table [(cols)] TO STDOUT``: rewritten to
  ``COPY (SELECT cols|* FROM (SELECT * FROM table WHERE "tc" = T) AS table) TO STDOUT``.
* ``COPY table [(cols)] FROM STDIN``: forwarded (to the bootstrap's view
  ``tenantgate_copy."<schema>.<table>"`` when the catalog has it, because PostgreSQL refuses
  COPY FROM into a table under row-level security; unchanged otherwise), with a :class:`TenantCopyInCheck`
  that parses the data stream (text, CSV or binary format, across CopyData chunk
  boundaries) and aborts the COPY (nothing committed) at the first row whose tenant column is
  not the session's tenant.  The tenant column must be in the column list.
* Files and programs (``TO 'file'``, ``FROM PROGRAM``) are refused (42501).
"""

from __future__ import annotations

import struct

from sqlglot.tokens import Token, TokenType

from proxy.policy.errors import FEATURE_NOT_SUPPORTED, INSUFFICIENT_PRIVILEGE, SYNTAX_ERROR, PolicyRefusal
from proxy.policy.edits import TENANT, Edit
from proxy.policy.statement_result import CopyInSpec, Piece
from proxy.policy.names import quote_ident
from proxy.policy.resolve import fold_identifier, truncate_identifier, UnknownRelation
from proxy.policy.copy_data import binary_header_end, binary_tuple, csv_records, split_text, text_lines, text_unescape
from proxy.policy.tenantvalue import binary_matches, text_matches


def _refuse(msg: str, state: str = FEATURE_NOT_SUPPORTED) -> PolicyRefusal:
    return PolicyRefusal(state, msg)


def _ident(t: Token) -> str:
    if t.token_type == TokenType.IDENTIFIER:
        return truncate_identifier(t.text)
    if t.token_type in (TokenType.STRING, TokenType.L_PAREN, TokenType.R_PAREN, TokenType.COMMA, TokenType.DOT):
        raise _refuse(f"unexpected {t.text!r} in COPY", SYNTAX_ERROR)
    return fold_identifier(t.text)


def _match_paren(toks: list[Token], i: int) -> int:
    depth = 0
    for j in range(i, len(toks)):
        if toks[j].token_type == TokenType.L_PAREN:
            depth += 1
        elif toks[j].token_type == TokenType.R_PAREN:
            depth -= 1
            if depth == 0:
                return j
    raise _refuse("unbalanced parentheses in COPY", SYNTAX_ERROR)


def _word(t: Token) -> str:
    return "" if t.token_type in (TokenType.STRING, TokenType.IDENTIFIER) else t.text.upper()


def copy_piece(sql: str, start: int, end: int, toks: list[Token], inner) -> Piece:
    snapshot, rules = inner.snapshot, inner.rules
    if not toks:
        raise _refuse("COPY without a source", SYNTAX_ERROR)
    i = 0
    if toks[0].token_type == TokenType.L_PAREN:
        close = _match_paren(toks, 0)
        if close == 1:
            raise _refuse("COPY with an empty query", SYNTAX_ERROR)
        body = inner(sql, toks[1].start, toks[close - 1].end + 1)
        if body.statement_class not in ("read", "write"):
            raise _refuse("COPY (statement) needs a SELECT, INSERT, UPDATE or DELETE")
        direction, options = _direction(toks, close + 1)
        if direction != "TO":
            raise _refuse("COPY (query) FROM is not valid", SYNTAX_ERROR)
        _parse_options(options, "text")
        piece = Piece(statement_class=body.statement_class)
        piece.absorb(body)
        return piece
    # table name
    parts = [_ident(toks[0])]
    i = 1
    while i + 1 < len(toks) and toks[i].token_type == TokenType.DOT:
        parts.append(_ident(toks[i + 1]))
        i += 2
    if len(parts) > 2:
        raise _refuse("cross-database references are not implemented")
    schema, name = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
    name_start, name_end = toks[0].start, toks[i - 1].end + 1
    cols: list[str] | None = None
    cols_text = "*"
    span_end = name_end
    if i < len(toks) and toks[i].token_type == TokenType.L_PAREN:
        close = _match_paren(toks, i)
        inner_toks = toks[i + 1 : close]
        cols = [_ident(t) for t in inner_toks[0::2]]
        if any(t.token_type != TokenType.COMMA for t in inner_toks[1::2]) or not cols:
            raise _refuse("unsupported COPY column list", SYNTAX_ERROR)
        cols_text = sql[toks[i + 1].start : toks[close - 1].end + 1]
        span_end = toks[close].end + 1
        i = close + 1
    direction, options = _direction(toks, i)
    rel = snapshot.resolve(schema, name)
    shown = f"{schema}.{name}" if schema else name
    if rel is None:
        raise UnknownRelation(shown)
    if rel.classification == "denied":
        raise _refuse(f"permission denied for relation {rel.qualified}: {rel.reason}", INSUFFICIENT_PRIVILEGE)
    fmt = _parse_options(options, "text", rules.tenant_column if direction == "FROM" else None)
    if direction == "TO":
        piece = Piece(statement_class="read")
        if rel.classification == "tenant":
            piece.touches_tenant = True
            piece.edits.append(
                Edit(
                    name_start,
                    span_end,
                    (
                        "(SELECT ", cols_text, " FROM (SELECT * FROM ", sql[name_start:name_end], " WHERE ",
                        quote_ident(rules.tenant_column), " = ", TENANT, ") AS ", quote_ident(rel.name), ")",
                    ),
                )
            )
        return piece
    # FROM STDIN
    if rel.classification != "tenant":
        raise _refuse(f"permission denied: tenant sessions cannot COPY into {rel.qualified}", INSUFFICIENT_PRIVILEGE)
    if rel.kind not in ("r", "p"):
        raise _refuse(f"permission denied: cannot COPY into view {rel.qualified}", INSUFFICIENT_PRIVILEGE)
    view = snapshot.copy_view(rel, rules.tenant_column)
    # without a column list PostgreSQL copies every column but generated ones: the view has exactly those
    names = cols if cols is not None else [c.name for c in (view or rel).columns]
    fill = rules.tenant_column not in names
    if fill and cols is None:  # (a table without the tenant column is not a tenant table)
        raise _refuse(f"COPY FROM into {rel.qualified}: list the columns")
    if fill and fmt.get("header_match"):
        raise _refuse("COPY ... HEADER MATCH without the tenant column is not supported: list it, or use HEADER true")
    sent = names + [rules.tenant_column] if fill else names  # what PostgreSQL receives
    if view is not None and any(not view.has_column(c) for c in sent):
        view = None  # e.g. a generated column named: plain COPY gives PostgreSQL's own error
    spec = CopyInSpec(
        format=fmt["format"], ncols=len(names), tenant_index=-1 if fill else names.index(rules.tenant_column),
        delimiter=fmt["delimiter"], null=fmt["null"], quote=fmt["quote"], escape=fmt["escape"],
        header=fmt["header"], table=rel.qualified, fill=fill,
    )
    piece = Piece(statement_class="write", touches_tenant=True, writes=True, copy_in=spec)
    if fill:
        # like INSERT: the tenant column is added after the client's columns (copy_fill.py adds the values)
        piece.edits.append(Edit(span_end - 1, span_end - 1, (", ", quote_ident(rules.tenant_column))))
    if view is not None:
        # PostgreSQL refuses COPY FROM into a table under row-level security; the bootstrap's view
        # (INSTEAD OF INSERT, RLS still applies row by row) takes the rows instead
        piece.edits.append(Edit(name_start, name_end, (quote_ident(view.schema), ".", quote_ident(view.name))))
    return piece


def _direction(toks: list[Token], i: int) -> tuple[str, list[Token]]:
    if i + 1 >= len(toks):
        raise _refuse("COPY needs TO STDOUT or FROM STDIN", SYNTAX_ERROR)
    d, target = _word(toks[i]), toks[i + 1]
    if d not in ("TO", "FROM"):
        raise _refuse(f"unsupported COPY form near {toks[i].text!r}", SYNTAX_ERROR)
    tw = _word(target)
    if d == "TO" and tw == "STDOUT" or d == "FROM" and tw == "STDIN":
        return d, toks[i + 2 :]
    if tw == "PROGRAM" or target.token_type == TokenType.STRING:
        raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, "COPY to or from a file or program is not allowed through tenantgate",
                            reason="storage")
    raise PolicyRefusal(INSUFFICIENT_PRIVILEGE, f"COPY {d} {target.text} is not supported (use STDIN/STDOUT)",
                        reason="storage")


def _string(t: Token, what: str) -> str:
    if t.token_type != TokenType.STRING:
        raise _refuse(f"COPY option {what} needs a quoted string")
    return t.text


def _column_list(val: list[Token], key: str) -> list[str]:
    if len(val) < 3 or val[0].token_type != TokenType.L_PAREN or val[-1].token_type != TokenType.R_PAREN:
        raise _refuse(f"COPY option {key} needs a column list")
    inner = val[1:-1]
    if any(t.token_type != TokenType.COMMA for t in inner[1::2]) or len(inner) % 2 == 0:
        raise _refuse(f"unsupported column list in COPY option {key}")
    return [_ident(t) for t in inner[0::2]]


def _parse_options(toks: list[Token], default_format: str, tenant_column: str | None = None) -> dict:
    opts: dict = {"format": default_format, "header": False}
    raw: dict[str, str] = {}
    if toks and _word(toks[0]) == "WITH":
        toks = toks[1:]
    if toks and toks[0].token_type == TokenType.L_PAREN:
        close = _match_paren(toks, 0)
        if close != len(toks) - 1:
            raise _refuse("unsupported text after COPY options")
        body = toks[1:close]
        groups: list[list[Token]] = [[]]
        depth = 0
        for t in body:
            if t.token_type == TokenType.L_PAREN:
                depth += 1
            elif t.token_type == TokenType.R_PAREN:
                depth -= 1
            if t.token_type == TokenType.COMMA and depth == 0:
                groups.append([])
            else:
                groups[-1].append(t)
        for g in groups:
            if not g:
                raise _refuse("empty COPY option", SYNTAX_ERROR)
            key = g[0].text.lower()
            val = g[1:]
            if key == "format":
                raw["format"] = val[0].text.lower() if len(val) == 1 else "?"
            elif key in ("delimiter", "null", "quote", "escape") and len(val) == 1:
                raw[key] = _string(val[0], key)
            elif key == "header":
                v = val[0].text.lower() if val else "true"
                if v == "match":
                    raw["header"] = "match"
                else:
                    raw["header"] = "true" if v in ("true", "on", "1") else "false" if v in ("false", "off", "0") else "?"
            elif key in ("force_not_null", "force_null"):
                # they change which fields become NULL: only columns other than the tenant
                # column, named in a plain list, leave the row check exact
                if tenant_column is None:
                    continue  # COPY TO: PostgreSQL refuses them itself
                names = _column_list(val, key)
                if tenant_column in names:
                    raise _refuse(f"COPY option {key} on the tenant column {tenant_column} is not supported "
                                  "through tenantgate")
                continue
            elif key in ("freeze", "force_quote"):
                continue
            else:
                raise _refuse(f"COPY option {key} is not supported through tenantgate")
    else:
        i = 0
        while i < len(toks):
            w = _word(toks[i])
            if w == "BINARY":
                raw["format"] = "binary"
            elif w == "CSV":
                raw["format"] = "csv"
            elif w == "HEADER":
                raw["header"] = "true"
            elif w in ("DELIMITER", "NULL", "QUOTE", "ESCAPE"):
                i += 1
                if i < len(toks) and toks[i].token_type == TokenType.ALIAS:
                    i += 1
                if i >= len(toks):
                    raise _refuse(f"COPY option {w} needs a value", SYNTAX_ERROR)
                raw[w.lower()] = _string(toks[i], w)
            else:
                raise _refuse(f"COPY option {toks[i].text} is not supported through tenantgate")
            i += 1
    fmt = raw.get("format", default_format)
    if fmt not in ("text", "csv", "binary"):
        raise _refuse(f"COPY format {fmt} is not supported")
    if raw.get("header") == "?":
        raise _refuse("unsupported COPY HEADER value")
    opts["format"] = fmt
    opts["header"] = raw.get("header", "false") in ("true", "match")
    opts["header_match"] = raw.get("header") == "match"
    opts["delimiter"] = raw.get("delimiter", "," if fmt == "csv" else "\t")
    opts["null"] = raw.get("null", "" if fmt == "csv" else "\\N")
    opts["quote"] = raw.get("quote", '"')
    opts["escape"] = raw.get("escape", opts["quote"])
    for k in ("delimiter", "quote", "escape"):
        if len(opts[k].encode()) != 1:
            raise _refuse(f"COPY {k} must be a single one-byte character")
    return opts


class TenantCopyInCheck:
    """Implements :class:`proxy.seam.CopyInCheck` for one COPY ... FROM STDIN."""

    fills = False  # forwards the client's data as sent (CopyFill rewrites it)

    def __init__(self, spec: CopyInSpec, tenant: str | None, type_: str):
        self.spec = spec
        self.tenant = tenant
        self.type_ = type_
        self.buf = bytearray()
        self.row = 0
        self.done = False
        self.header_pending = spec.header
        self.binary_header_done = False

    # -- public protocol
    def feed(self, data: bytes) -> str | None:
        self.buf += data
        return self._process(eof=False)

    def finish(self) -> str | None:
        err = self._process(eof=True)
        if err:
            return err
        if self.spec.format == "binary" and not self.done:
            return "COPY data ended without the binary trailer"
        if self.buf and not self.done:
            return "COPY data ended in the middle of a row"
        return None

    # -- helpers
    def _bad(self, why: str) -> str:
        return f"COPY into {self.spec.table} refused at row {self.row}: {why}"

    def _check_field(self, value: bytes | None, binary: bool = False) -> str | None:
        if self.tenant is None:
            return self._bad("no tenant is selected for this session")
        if value is None:
            return self._bad("the tenant column is NULL")
        ok = binary_matches(value, self.tenant, self.type_) if binary else text_matches(value, self.tenant, self.type_)
        return None if ok else self._bad("the tenant column is not the session's tenant")

    def _process(self, eof: bool) -> str | None:
        if self.done:
            if self.buf.strip():
                return "COPY data after the end-of-data marker"
            return None
        if self.spec.format == "text":
            return self._text(eof)
        if self.spec.format == "csv":
            return self._csv(eof)
        return self._binary()

    def _text(self, eof: bool) -> str | None:
        buf = self.buf
        delim = self.spec.delimiter.encode()[0]
        null = self.spec.null.encode()
        pos = 0
        for line, _ending, end in text_lines(buf, eof):
            pos = end
            if line == b"\\.":
                self.done = True
                rest = bytes(buf[pos:])
                del buf[:]
                return "COPY data after the end-of-data marker" if rest.strip() else None
            if self.header_pending:
                self.header_pending = False
                continue
            self.row += 1
            fields = split_text(line, delim)
            if len(fields) != self.spec.ncols:
                del buf[:pos]
                return self._bad(f"expected {self.spec.ncols} columns, got {len(fields)}")
            raw = fields[self.spec.tenant_index]
            err = self._check_field(None if raw == null else text_unescape(raw))
            if err:
                return err
        del buf[:pos]
        return None

    def _csv(self, eof: bool) -> str | None:
        buf = self.buf
        null = self.spec.null.encode()
        pos = 0
        for fields, _start, end in csv_records(buf, self.spec, eof):
            pos = end
            if fields is None:  # the end-of-data marker
                self.done = True
                rest = bytes(buf[pos:])
                del buf[:]
                return "COPY data after the end-of-data marker" if rest.strip() else None
            if self.header_pending:
                self.header_pending = False
                continue
            self.row += 1
            if len(fields) != self.spec.ncols:
                del buf[:pos]
                return self._bad(f"expected {self.spec.ncols} columns, got {len(fields)}")
            raw, quoted = fields[self.spec.tenant_index]
            err = self._check_field(None if (not quoted and raw == null) else raw)
            if err:
                return err
        del buf[:pos]
        return None

    def _binary(self) -> str | None:
        buf = self.buf
        pos = 0
        if not self.binary_header_done:
            try:
                end = binary_header_end(buf)
            except ValueError as e:
                return str(e)
            if end is None:
                return None
            pos = end
            self.binary_header_done = True
        while len(buf) - pos >= 2:
            nf = struct.unpack_from("!h", buf, pos)[0]
            if nf == -1:
                self.done = True
                rest = bytes(buf[pos + 2 :])
                del buf[:]
                return "COPY data after the binary trailer" if rest else None
            if nf != self.spec.ncols:
                self.row += 1
                return self._bad(f"expected {self.spec.ncols} columns, got {nf}")
            try:
                got = binary_tuple(buf, pos + 2, nf, self.spec.tenant_index)
            except ValueError as e:
                return self._bad(str(e))
            if got is None:
                break
            pos, tenant_val = got
            self.row += 1
            err = self._check_field(tenant_val, binary=True)
            if err:
                return err
        del buf[:pos]
        return None

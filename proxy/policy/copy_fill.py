"""COPY ... FROM STDIN without the tenant column: the proxy adds it to every row.

``INSERT`` without the tenant column gets the session's tenant added by the rewriter; COPY now
does the same (issue 14 item 6).  The statement's column list gets the tenant column appended
(:func:`proxy.policy.copy.copy_piece`), and :class:`CopyFill` rewrites the data stream row by
row, across CopyData chunk boundaries:

* text: each row (a line ending at an unescaped newline) gets ``<delimiter><tenant>`` before
  its line ending, the tenant escaped as COPY text requires;
* CSV: each record (quoted fields may hold newlines) gets ``<delimiter>"<tenant>"``, quoted, so it
  can never read as NULL;
* binary: each tuple's field count goes up by one and the tenant is appended in the column
  type's binary form (text, varchar, integer, bigint, uuid).

A header line, the ``\\.`` end marker and the binary header and trailer pass unchanged.  A row
with a field count other than the client's column list ends the COPY with an error (nothing is
committed), as does anything the parser cannot read exactly: rows are never forwarded
unchecked.  Memory is bounded: a single row larger than :data:`MAX_ROW_BYTES` is refused.

Interface (:class:`proxy.seam.CopyInCheck` plus ``fills``/``take``): ``feed(data)`` and
``finish()`` return an error message or None; ``take()`` returns the rewritten bytes to forward
in place of what the client sent.  Pure: no I/O.
"""

from __future__ import annotations

import struct
import uuid

from proxy.policy.copy import TenantCopyInCheck
from proxy.policy.copy_data import binary_header_end, binary_tuple, csv_records, split_text, text_lines
from proxy.policy.statement_result import CopyInSpec

#: a row (text line, CSV record or binary tuple) longer than this ends the COPY (54000)
MAX_ROW_BYTES = 64 * 1024 * 1024


def _binary_value(tenant: str, type_: str) -> bytes:
    if type_ in ("text", "varchar"):
        return tenant.encode("utf-8")
    if type_ == "integer":
        return struct.pack("!i", int(tenant))
    if type_ == "bigint":
        return struct.pack("!q", int(tenant))
    if type_ == "uuid":
        return uuid.UUID(tenant).bytes
    raise ValueError(f"tenant column type {type_} has no binary form known to tenantgate")


def _text_value(tenant: str, delimiter: str) -> str:
    out = tenant.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return out.replace(delimiter, "\\" + delimiter) if delimiter != "\\" else out


class CopyFill(TenantCopyInCheck):
    """Adds the session's tenant to every row of a COPY FROM STDIN stream (see module doc)."""

    fills = True

    def __init__(self, spec: CopyInSpec, tenant: str | None, type_: str):
        super().__init__(spec, tenant, type_)
        self.out = bytearray()
        if tenant is None:
            raise ValueError("no tenant is selected for this session")
        if spec.format == "binary":
            v = _binary_value(tenant, type_)
            self.suffix = struct.pack("!i", len(v)) + v
        elif spec.format == "csv":
            q, e = spec.quote, spec.escape
            body = tenant.replace(e, e + e).replace(q, e + q) if e != q else tenant.replace(q, q + q)
            self.suffix = (spec.delimiter + q + body + q).encode("utf-8")
        else:
            text = _text_value(tenant, spec.delimiter)
            if text == spec.null:
                raise ValueError("the tenant value reads as the COPY NULL string")
            self.suffix = (spec.delimiter + text).encode("utf-8")

    def take(self) -> bytes:
        out = bytes(self.out)
        self.out.clear()
        return out

    def _too_long(self) -> str | None:
        if len(self.buf) > MAX_ROW_BYTES:
            return self._bad(f"a row is longer than {MAX_ROW_BYTES} bytes")
        return None

    # ---- text -------------------------------------------------------------------------
    def _text(self, eof: bool) -> str | None:
        buf, out = self.buf, self.out
        delim = self.spec.delimiter.encode()[0]
        pos = 0
        for line, ending, end in text_lines(buf, eof):
            pos = end
            if line == b"\\.":
                self.done = True
                rest = bytes(buf[pos:])
                del buf[:]
                out += line + ending
                return "COPY data after the end-of-data marker" if rest.strip() else None
            if self.header_pending:
                self.header_pending = False
                out += line + ending
                continue
            self.row += 1
            n = len(split_text(line, delim))
            if n != self.spec.ncols:
                del buf[:pos]
                return self._bad(f"expected {self.spec.ncols} columns, got {n}")
            out += line + self.suffix + ending
        del buf[:pos]
        return self._too_long()

    # ---- CSV --------------------------------------------------------------------------
    def _csv(self, eof: bool) -> str | None:
        buf, out = self.buf, self.out
        pos = 0
        for fields, start, end in csv_records(buf, self.spec, eof):
            pos = end
            if fields is None:  # the end-of-data marker
                self.done = True
                rest = bytes(buf[pos:])
                out += buf[start:]
                del buf[:]
                return "COPY data after the end-of-data marker" if rest.strip() else None
            raw = bytes(buf[start:end])
            if raw.endswith(b"\r\n"):
                body, term = raw[:-2], b"\r\n"
            elif raw.endswith(b"\n") or raw.endswith(b"\r"):
                body, term = raw[:-1], raw[-1:]
            else:
                body, term = raw, b"\n"
            if self.header_pending:
                self.header_pending = False
                out += raw
                continue
            self.row += 1
            if len(fields) != self.spec.ncols:
                del buf[:pos]
                return self._bad(f"expected {self.spec.ncols} columns, got {len(fields)}")
            out += body + self.suffix + term
        del buf[:pos]
        return self._too_long()

    # ---- binary -----------------------------------------------------------------------
    def _binary(self) -> str | None:
        buf, out = self.buf, self.out
        pos = 0
        if not self.binary_header_done:
            try:
                end = binary_header_end(buf)
            except ValueError as e:
                return str(e)
            if end is None:
                return self._too_long()
            pos = end
            out += buf[:pos]
            self.binary_header_done = True
        while len(buf) - pos >= 2:
            nf = struct.unpack_from("!h", buf, pos)[0]
            if nf == -1:
                self.done = True
                rest = bytes(buf[pos + 2:])
                out += buf[pos:pos + 2]
                del buf[:]
                return "COPY data after the binary trailer" if rest else None
            if nf != self.spec.ncols:
                self.row += 1
                return self._bad(f"expected {self.spec.ncols} columns, got {nf}")
            try:
                got = binary_tuple(buf, pos + 2, nf)
            except ValueError as e:
                return self._bad(str(e))
            if got is None:
                break
            end = got[0]
            self.row += 1
            out += struct.pack("!h", nf + 1) + buf[pos + 2:end] + self.suffix
            pos = end
        del buf[:pos]
        return self._too_long()


def copy_in_check(spec: CopyInSpec, tenant: str | None, type_: str):
    """The data-stream check of one COPY FROM STDIN: check the tenant column, or add it."""
    if spec.fill:
        return CopyFill(spec, tenant, type_)
    return TenantCopyInCheck(spec, tenant, type_)

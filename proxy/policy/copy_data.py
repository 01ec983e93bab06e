"""The COPY data formats, framed without I/O: the lines of the text format (with its backslash
escapes), the records of CSV (quoted fields may hold newlines) and the tuples of the binary
format, each read across CopyData chunk boundaries from a growing buffer.

Used by the tenant checks of COPY ... FROM STDIN (:mod:`proxy.policy.copy`) and the stream
rewriter that adds the tenant column (:mod:`proxy.policy.copy_fill`).
"""

from __future__ import annotations

import struct

from proxy.policy.statement_result import CopyInSpec

_TEXT_ESCAPES = {ord("b"): 8, ord("f"): 12, ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("v"): 11}
BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"


def text_unescape(raw: bytes) -> bytes:
    if b"\\" not in raw:
        return raw
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c != 0x5C or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        d = raw[i + 1]
        if 0x30 <= d <= 0x37:
            j = i + 1
            v = 0
            while j < n and j < i + 4 and 0x30 <= raw[j] <= 0x37:
                v = v * 8 + raw[j] - 0x30
                j += 1
            out.append(v & 0xFF)
            i = j
        elif d == ord("x") and i + 2 < n and chr(raw[i + 2]) in "0123456789abcdefABCDEF":
            j = i + 2
            hx = ""
            while j < n and j < i + 4 and chr(raw[j]) in "0123456789abcdefABCDEF":
                hx += chr(raw[j])
                j += 1
            out.append(int(hx, 16))
            i = j
        else:
            out.append(_TEXT_ESCAPES.get(d, d))
            i += 2
    return bytes(out)


def split_text(line: bytes, delim: int) -> list[bytes]:
    if b"\\" not in line:
        return line.split(bytes([delim]))
    fields, cur, i, n = [], bytearray(), 0, len(line)
    while i < n:
        c = line[i]
        if c == 0x5C and i + 1 < n:
            cur += line[i : i + 2]
            i += 2
        elif c == delim:
            fields.append(bytes(cur))
            cur = bytearray()
            i += 1
        else:
            cur.append(c)
            i += 1
    fields.append(bytes(cur))
    return fields


def csv_record(buf, i, n, q, e, d, eof):
    """One CSV record starting at ``i``: (fields, where it ends), or None while incomplete."""
    fields: list[tuple[bytes, bool]] = []
    cur = bytearray()
    quoted = in_quote = False
    while True:
        if i >= n:
            if not eof or in_quote:
                return None
            fields.append((bytes(cur), quoted))
            return fields, i
        c = buf[i]
        if in_quote:
            if c == e and e != q:
                if i + 1 >= n and not eof:
                    return None
                if i + 1 < n and buf[i + 1] in (q, e):
                    cur.append(buf[i + 1])
                    i += 2
                    continue
                cur.append(c)
                i += 1
                continue
            if c == q:
                if e == q:
                    if i + 1 >= n and not eof:
                        return None
                    if i + 1 < n and buf[i + 1] == q:
                        cur.append(q)
                        i += 2
                        continue
                in_quote = False
                i += 1
                continue
            cur.append(c)
            i += 1
        else:
            if c == q:
                in_quote = quoted = True
                i += 1
            elif c == d:
                fields.append((bytes(cur), quoted))
                cur = bytearray()
                quoted = False
                i += 1
            elif c == 10:
                fields.append((bytes(cur), quoted))
                return fields, i + 1
            elif c == 13:
                if i + 1 >= n and not eof:
                    return None
                fields.append((bytes(cur), quoted))
                return fields, i + 2 if i + 1 < n and buf[i + 1] == 10 else i + 1
            else:
                cur.append(c)
                i += 1

def text_lines(buf, eof: bool):
    """The complete lines of a COPY text stream in ``buf``: (line, its ending, where it ends).  A
    newline after an odd number of backslashes is data; ``\\r\\n`` endings are kept apart from the
    line; a last line without a newline counts only at ``eof``.  Reads ``buf`` lazily: the caller
    may not change it while iterating."""
    pos = 0
    while True:
        nl = buf.find(b"\n", pos)
        while nl >= 0:
            k, bs = nl - 1, 0
            while k >= pos and buf[k] == 0x5C:
                bs += 1
                k -= 1
            if bs % 2 == 0:
                break
            nl = buf.find(b"\n", nl + 1)
        if nl < 0:
            if eof and pos < len(buf):
                yield bytes(buf[pos:]), b"\n", len(buf)
            return
        line, ending = bytes(buf[pos:nl]), b"\n"
        if line.endswith(b"\r") and not line.endswith(b"\\\r"):
            line, ending = line[:-1], b"\r\n"
        pos = nl + 1
        yield line, ending, pos


def csv_records(buf, spec: CopyInSpec, eof: bool):
    """The complete records of a COPY CSV stream in ``buf``: (fields, start, end), fields being
    (value, was quoted) pairs; ``fields`` is None for the end-of-data marker line (``end`` then
    points after ``\\.``).  Quoted fields may hold newlines.  Reads ``buf`` lazily."""
    q, e, d = spec.quote.encode()[0], spec.escape.encode()[0], spec.delimiter.encode()[0]
    pos = 0
    n = len(buf)
    while pos < n:
        if buf.startswith(b"\\.", pos) and (pos + 2 == n and eof or pos + 2 < n and buf[pos + 2] in (10, 13)):
            yield None, pos, pos + 2
            return
        if buf.startswith(b"\\.", pos) and pos + 2 == n and not eof:
            return
        rec = csv_record(buf, pos, n, q, e, d, eof)
        if rec is None:
            return
        fields, end = rec
        yield fields, pos, end
        pos = end


def binary_header_end(buf) -> int | None:
    """Where a binary COPY stream's header (signature, flags, extension area) ends; None while
    it is incomplete.  ValueError when it is not a binary COPY header."""
    n = len(buf)
    if n < 19:
        return None
    if bytes(buf[:11]) != BINARY_SIGNATURE:
        raise ValueError("COPY binary data has an invalid signature")
    ext = struct.unpack_from("!I", buf, 15)[0]
    return 19 + ext if n >= 19 + ext else None


def binary_tuple(buf, p: int, nf: int, want: int = -1) -> tuple[int, bytes | None] | None:
    """The ``nf`` fields of a binary COPY tuple starting at ``p`` (just after its field count):
    (where the tuple ends, the value of field ``want`` or None), or None while incomplete.
    ValueError on an invalid field length."""
    n = len(buf)
    value = None
    for k in range(nf):
        if n - p < 4:
            return None
        ln = struct.unpack_from("!i", buf, p)[0]
        p += 4
        if ln < -1:
            raise ValueError("invalid field length")
        if ln > 0:
            if n - p < ln:
                return None
            if k == want:
                value = bytes(buf[p : p + ln])
            p += ln
        elif ln == 0 and k == want:
            value = b""
    return p, value

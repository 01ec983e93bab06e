"""Error positions in the client's own statement text.

PostgreSQL's ErrorResponse carries the error's position (field ``P``, a 1-based character
offset) in the text it was sent.  For a tenant session that is the rewritten text, with the
tenant predicates spliced in, so the position points a few characters off in the statement the
client wrote: psql's ``LINE 1: ... ^`` marks the wrong token, and drivers that report the
position (node-postgres ``error.position``, Postgres.js, pgjdbc) disagree with a direct
connection.  This module maps a position in the text sent back to the client's text.

The rewritten text is the client's text with edits between its tokens (insertions, and a few
short replacements), so the two are aligned in one pass: equal runs are followed, and after an
edit the next few characters of the original are looked for in the sent text (difflib's
alignment was tried and is cubic on a bulk INSERT's many small edits).  A position in an
unchanged run maps exactly; a position inside text tenantgate added maps to where that text
was added.  Pure: no I/O, no SQL knowledge.
"""

from __future__ import annotations

import bisect

#: length of the piece of the original text looked for in the sent text to find where the
#: original resumes after an edit (shorter at the end of the text)
ANCHOR = 12
#: how many characters of the original an edit may replace; beyond that the rest is not mapped
MAX_REPLACED = 256
#: longer statements are not aligned (about 0.3 ms per kB; the error goes out as PostgreSQL
#: sent it), so a failing bulk statement does not hold up the event loop
MAX_CHARS = 1_000_000


def _kept_runs(original: str, sent: str) -> tuple[list[int], list[int], list[int], bool]:
    """The runs of ``original`` kept unchanged in ``sent``, in order: parallel lists of their
    start in the original, start in the sent text and length; and whether the alignment
    reached the end of the original.  Linear in the texts' length for tenantgate's edits
    (each edit inserts text, or replaces a little, between tokens of the original)."""
    ostart, sstart, length = [], [], []
    i = j = 0
    no, ns = len(original), len(sent)
    while i < no and j < ns:
        k = 0
        while i + k < no and j + k < ns and original[i + k] == sent[j + k]:
            k += 1
        if k:
            ostart.append(i)
            sstart.append(j)
            length.append(k)
            i += k
            j += k
            continue
        # an edit starts here: find where the original resumes in the sent text
        for r in range(min(MAX_REPLACED, no - i)):
            at = sent.find(original[i + r:i + r + ANCHOR], j)
            if at >= 0:
                i += r
                j = at
                break
        else:
            return ostart, sstart, length, False
    return ostart, sstart, length, i >= no


def original_position(original: str, sent: str, position: int) -> int | None:
    """The 1-based character position in ``original`` that corresponds to ``position`` in
    ``sent``; None when it cannot be computed."""
    if original == sent:
        return position
    if not 1 <= position <= len(sent) + 1:
        return None
    offset = position - 1
    if offset >= len(sent):  # "at end of input"
        return len(original) + 1
    if len(sent) > MAX_CHARS:
        return None
    ostart, sstart, length, complete = _kept_runs(original, sent)
    k = bisect.bisect_right(sstart, offset) - 1
    if k >= 0 and offset < sstart[k] + length[k]:  # in text kept from the original
        return ostart[k] + (offset - sstart[k]) + 1
    # in text tenantgate added: where it was added (after the kept run before it)
    if k + 1 < len(sstart):
        return ostart[k + 1] + 1 if k < 0 else ostart[k] + length[k] + 1
    return (ostart[k] + length[k] + 1 if k >= 0 else 1) if complete else None


def _fields(payload: bytes) -> list[tuple[int, bytes]] | None:
    """The (code, value) fields of an ErrorResponse/NoticeResponse body; None if malformed."""
    out, pos, n = [], 0, len(payload)
    while pos < n:
        code = payload[pos]
        if code == 0:
            return out if pos == n - 1 else None
        end = payload.find(b"\0", pos + 1)
        if end < 0:
            return None
        out.append((code, payload[pos + 1:end]))
        pos = end + 1
    return None


def remap_error_position(raw: bytes, original: str, sent: str) -> bytes:
    """``raw`` (a whole ErrorResponse message, type byte and length included) with its ``P``
    field moved from ``sent`` to ``original``.  Unchanged when there is no ``P`` field, the
    texts are equal, or the position cannot be mapped (PostgreSQL's answer is never lost)."""
    if original == sent or b"P" not in raw[5:]:
        return raw
    fields = _fields(raw[5:])
    if fields is None:
        return raw
    changed = False
    new_fields = []
    for code, value in fields:
        if code == ord("P") and value.isdigit():
            mapped = original_position(original, sent, int(value))
            if mapped is not None and mapped != int(value):
                value = str(mapped).encode()
                changed = True
        new_fields.append(bytes([code]) + value + b"\0")
    if not changed:
        return raw
    body = b"".join(new_fields) + b"\0"
    return raw[:1] + (len(body) + 4).to_bytes(4, "big") + body

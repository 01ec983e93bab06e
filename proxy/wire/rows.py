"""Encoders for result sets the proxy answers itself (the admin console): RowDescription,
DataRow, CommandComplete and EmptyQueryResponse, all in text format.  Sans-IO."""

from __future__ import annotations

import struct
from typing import Sequence

from proxy.wire import messages as m

TEXT_OID = 25
INT8_OID = 20


def encode_row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """RowDescription for text-format columns given as (name, type oid)."""
    parts = [struct.pack("!h", len(columns))]
    for name, oid in columns:
        size = 8 if oid == INT8_OID else -1
        parts.append(m.cstr(name) + struct.pack("!ihihih", 0, 0, oid, size, -1, 0))
    return m.frame(b"T", b"".join(parts))


def encode_data_row(values: Sequence[str | None]) -> bytes:
    """DataRow of text values (None is SQL NULL)."""
    parts = [struct.pack("!h", len(values))]
    for v in values:
        if v is None:
            parts.append(struct.pack("!i", -1))
        else:
            b = v.encode()
            parts.append(struct.pack("!i", len(b)) + b)
    return m.frame(b"D", b"".join(parts))


def encode_command_complete(tag: str) -> bytes:
    return m.frame(b"C", m.cstr(tag))


EMPTY_QUERY_RESPONSE = m.frame(b"I")

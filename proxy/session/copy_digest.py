"""What the operator audit keeps of the data loaded with COPY ... FROM STDIN (sans-IO).

The statement record is written before the COPY runs (audit before action); the rows arrive
afterwards as CopyData messages.  :class:`CopyDigest` follows them and gives the outcome
record's ``detail``: ``{"copy_in": {"bytes": n, "sha256": hex}}``, plus the data itself when
``audit.copy_data: full`` (``data`` as text, or ``data_base64`` when it is not UTF-8, e.g.
binary COPY).  The row count is PostgreSQL's own, from the ``COPY n`` command tag.
"""

from __future__ import annotations

import base64
import hashlib


class CopyDigest:
    __slots__ = ("_sha", "_bytes", "_chunks")

    def __init__(self, full: bool = False):
        self._sha = hashlib.sha256()
        self._bytes = 0
        self._chunks: list[bytes] | None = [] if full else None

    def feed(self, data: bytes) -> None:
        self._sha.update(data)
        self._bytes += len(data)
        if self._chunks is not None:
            self._chunks.append(data)

    def detail(self) -> dict:
        rec: dict = {"bytes": self._bytes, "sha256": self._sha.hexdigest()}
        if self._chunks is not None:
            data = b"".join(self._chunks)
            try:
                rec["data"] = data.decode("utf-8")
            except UnicodeDecodeError:
                rec["data_base64"] = base64.b64encode(data).decode("ascii")
        return {"copy_in": rec}

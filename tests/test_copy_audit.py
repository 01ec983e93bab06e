"""CopyDigest: the outcome detail of an operator's COPY ... FROM STDIN (audit.copy_data)."""

from __future__ import annotations

import base64
import hashlib

from proxy.config import AuditConfig
from proxy.session.copy_digest import CopyDigest


def test_digest_by_default():
    d = CopyDigest()
    d.feed(b"acme\t1\tx\n")
    d.feed(b"acme\t2\ty\n")
    data = b"acme\t1\tx\nacme\t2\ty\n"
    assert d.detail() == {"copy_in": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    assert AuditConfig().copy_data == "digest"


def test_full_keeps_the_data_text_or_base64():
    d = CopyDigest(full=True)
    d.feed(b"acme\t1\tx\n")
    assert d.detail()["copy_in"]["data"] == "acme\t1\tx\n"
    b = CopyDigest(full=True)
    b.feed(b"PGCOPY\n\xff\r\n\x00")
    assert base64.b64decode(b.detail()["copy_in"]["data_base64"]) == b"PGCOPY\n\xff\r\n\x00"
    assert AuditConfig(copy_data="full").copy_data == "full"

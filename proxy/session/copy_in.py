"""COPY FROM STDIN in a client session: the data check, the tenant fill and the audit digest.

While the client streams CopyData, the policy's check for this COPY (``Forward.copy_in_check``,
proxy/policy/copy.py) sees every chunk: a row for another tenant fails the COPY with CopyFail
before PostgreSQL commits anything, and a check that fills in the tenant column
(proxy/policy/copy_fill.py) hands on rewritten rows instead.  An operator's COPY is recorded
with its outcome (:class:`~proxy.session.copy_digest.CopyDigest`).  Pure: the relay core calls it.
"""

from __future__ import annotations

from proxy.session.copy_digest import CopyDigest
from proxy.wire import messages as m


class CopyIn:
    __slots__ = ("check", "failed")

    def __init__(self) -> None:
        self.check = None  # the policy's data check for the COPY running now
        self.failed = False  # CopyFail was sent in the client's place: drop the rest

    def reset(self) -> None:
        self.check = None
        self.failed = False

    def started(self, factory) -> str | None:
        """CopyInResponse: create the policy's check.  Returns an error for CopyFail, if it fails."""
        self.reset()
        if factory is None:
            return None
        try:
            self.check = factory()
        except Exception as e:  # noqa: BLE001 - fail closed: the COPY is refused
            self.failed = True
            return f"COPY data check could not start: {e}"
        return None

    def message(self, t: bytes, payload: bytes, out: list[bytes], audit_entry, full: bool, refuse) -> None:
        """One CopyData / CopyDone / CopyFail from the client: what goes to PostgreSQL is appended
        to ``out``.  ``audit_entry``: the audited statement whose data is recorded, if any.
        ``refuse(message)``: the data check refused the COPY; it sends the CopyFail."""
        check = self.check
        if t == b"d":
            if self.failed:
                return
            if audit_entry is not None:  # the data an operator loads is recorded with the outcome
                if audit_entry.copy is None:
                    audit_entry.copy = CopyDigest(full=full)
                audit_entry.copy.feed(payload)
            if check is not None:
                try:
                    err = check.feed(payload)
                except Exception as e:  # noqa: BLE001 - a broken check fails the COPY
                    err = f"COPY data check failed: {e}"
                    refuse(err, internal=True)
                    self.failed = True
                    return
                if err:
                    refuse(err)
                    self.failed = True
                    return
                if getattr(check, "fills", False):  # the rows with the tenant column added
                    rows = check.take()
                    if rows:
                        out.append(m.frame(t, rows))
                    return
            out.append(m.frame(t, payload))
        elif t == b"c":
            if self.failed:
                return
            err = None
            internal = False
            if check is not None:
                try:
                    err = check.finish()
                    if not err and getattr(check, "fills", False):
                        rows = check.take()
                        if rows:
                            out.append(m.frame(b"d", rows))
                except Exception as e:  # noqa: BLE001
                    err, internal = f"COPY data check failed: {e}", True
            if err:
                refuse(err, internal=internal)
            else:
                out.append(m.frame(t, payload))
        elif not self.failed:  # CopyFail
            out.append(m.frame(t, payload))

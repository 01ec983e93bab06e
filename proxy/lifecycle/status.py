"""What a tenant's lifecycle status means for its sessions (for the proxy's gate).

* ``purged``, or a purge has started (``purge_started_at``): the tenant's
  credentials and tokens are refused at connect (:func:`connect_refusal` ->
  :class:`proxy.seam.SessionRefused`, 28000).
* ``offboarded``: sessions may read and export but not write
  (:func:`write_refusal` -> :class:`proxy.seam.Refuse`, 25006, naming the
  retention end); the gate should also run the backend transaction read-only
  (:data:`READ_ONLY_SETUP_SQL`).
* ``active`` (or unknown to the control plane): no restriction from here.

Takes anything with ``name``, ``status`` and ``retention_end`` attributes
(e.g. :class:`proxy.control.model.Tenant`), or None.
"""

from __future__ import annotations

from datetime import timezone

from proxy.seam import Refuse, SessionRefused

READ_ONLY_TRANSACTION = "25006"
INVALID_AUTHORIZATION = "28000"
READ_ONLY_SETUP_SQL = "SET default_transaction_read_only = on"


def connect_refusal(tenant) -> SessionRefused | None:
    if tenant is not None and tenant.status == "purged":
        return SessionRefused(
            INVALID_AUTHORIZATION,
            f'tenant "{tenant.name}" has been purged',
            detail="its data was deleted; its credentials and tokens are no longer accepted",
        )
    if tenant is not None and getattr(tenant, "purge_started_at", None) is not None:
        return SessionRefused(
            INVALID_AUTHORIZATION,
            f'tenant "{tenant.name}" is being purged',
            detail="its data is being deleted; no session of it is accepted",
        )
    return None


def write_refusal(tenant) -> Refuse | None:
    if tenant is None or tenant.status != "offboarded":
        return None
    end = tenant.retention_end.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if tenant.retention_end else "?"
    return Refuse(
        READ_ONLY_TRANSACTION,
        f'tenant "{tenant.name}" is offboarded: its data is read-only, and it will be purged when its '
        f"retention period ends on {end}",
        hint="reading and exporting still work until then; to write again, ask an approver to restore the tenant "
             f"(tenantgate tenant restore {tenant.name})",
    )


def ended_message(name: str, status: str) -> str:
    """Why a live session of ``name`` was ended when its status changed to ``status`` (notify value)."""
    if status in ("purged", "purging"):
        return (f'tenant "{name}" is being purged: this session was ended and no new session of it is accepted'
                if status == "purging" else
                f'tenant "{name}" has been purged: this session was ended and no new session of it is accepted')
    if status == "offboarded":
        return (f'tenant "{name}" is now offboarded: this session was ended; '
                "a new session may read and export, not write")
    return f'tenant "{name}" is now {status}: this session was ended, reconnect to continue'

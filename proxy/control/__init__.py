"""The control plane: operator accounts, just-in-time grants, the audit chain, tenant lifecycle state.

* ``schema.sql`` / :mod:`.schema` — the control schema and its installer;
* :mod:`.plane` — :class:`~.plane.ControlPlane`, the API everything else uses;
* :mod:`.audit` — the hash chain, group-committed appends, signed checkpoints, verify, export;
* :mod:`.watcher` — LISTEN/NOTIFY plus timers that end sessions on grant expiry or revocation;
* :mod:`.operator_gate` — the SessionGate of operator sessions (audit before action);
* :mod:`.credentials` — SCRAM verifiers and TOTP; :mod:`.durations` — ``1h30m`` and friends.
"""

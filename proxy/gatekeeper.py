"""The production Gatekeeper: who a session is, and which SessionGate it gets.

It composes the independent parts; none of them knows about the others:

* users: application users from the config (:mod:`proxy.users`), then
  operators from the control schema (:class:`proxy.control.operators.OperatorDirectory`);
* tenant sessions: :func:`proxy.policy.session.open_tenant_session` over one
  shared :class:`proxy.policy.engine.PolicyEngine` (rules, live catalog,
  function/catalog allowlist);
* operator sessions: the grant is bound by the control plane and the tenant
  gate is wrapped in :class:`proxy.control.operator_gate.OperatorSessionGate`
  (audit before action, termination on expiry/revocation);
* tenant lifecycle: a purged tenant (or one whose purge has started) is
  refused at connect (28000); an offboarded tenant's sessions are read-only
  (25006, naming the retention end).  A status change, and the start of a
  purge, ends the tenant's live sessions, tenant and operator sessions alike,
  so that they reconnect under the new status (operator sessions also re-read
  the status before each statement: see proxy.control.operator_gate).

* passthrough users (``passthrough: true``, for the bare proxy only) are refused:
  with a policy configured nothing is forwarded unchecked.

Everything that needs I/O (catalog load, control plane) happens in
:func:`build_gatekeeper`; :meth:`Gatekeeper.open_session` does at most the
control-plane round trips an operator session needs.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
import logging
import weakref

from proxy.admin_console import refuse_admin_outside_console
from proxy.config import Config, ConfigError
from proxy.lifecycle.status import connect_refusal, ended_message, write_refusal
from proxy.seam import SessionGate, SessionKind, SessionRefused, StartupInfo, UserRecord
from proxy.users import ConfigUserDirectory

log = logging.getLogger("tenantgate.gatekeeper")

TENANT_ENDED_SQLSTATE = "57P01"


def backend_dsn(config: Config, region: str | None = None) -> str:
    """A libpq URL for the backend role of ``region`` (default: the default region's), used for
    catalog discovery."""
    backend = config.backend if region is None else config.backend_of(region)
    if not backend.database:
        raise ConfigError("backend.database must be set when rules_file is used (catalog discovery needs it)")
    return backend.url()


class UserDirectoryChain:
    """Config users first, then the control schema's operators."""

    def __init__(self, *directories):
        self.directories = list(directories)

    async def lookup(self, name: str) -> UserRecord | None:
        for d in self.directories:
            rec = await d.lookup(name)
            if rec is not None:
                return rec
        return None


class PolicyGatekeeper:
    """``engine`` and ``catalog``: the default region's.  ``regional``: region -> (engine, catalog)
    for every region, each engine over the catalog of its own region's PostgreSQL (tables,
    columns and the backstop's state can differ between servers); a session's gate uses the
    engine of the region it is routed to (:meth:`route`)."""

    def __init__(self, config: Config, engine, catalog, plane=None, *, regional: dict | None = None):
        self.config = config
        self.engine = engine
        self.catalog = catalog
        self.regional: dict[str, tuple] = dict(regional or {})
        self.plane = plane
        self.session_lock = False  # operator sessions hold the tenant's purge lock (see build_gatekeeper)
        self.auth_guard = None
        self.config_users = ConfigUserDirectory.from_config(config)
        dirs = [self.config_users]
        if plane is not None:
            from proxy.control.operators import OperatorDirectory

            from proxy.control.auth_guard import AuthGuard

            dirs.append(OperatorDirectory(plane))
            self.auth_guard = AuthGuard(plane)  # throttles and audits operator logins (proxy/session/startup.py)
        self.users = UserDirectoryChain(*dirs)
        self._tenants: dict[str, object] = {}  # name -> proxy.control.model.Tenant
        self._regions: dict[str, str] = {}  # tenant -> region (placements; absent: the default region)
        self._live: dict[str, weakref.WeakSet] = {}  # tenant -> live tenant gates
        self._subscription = None
        self._rules_task: asyncio.Task | None = None  # a rules reload waiting for its catalog load

    # ---- life cycle

    async def start(self) -> None:
        if self.plane is not None:
            for t in await self.plane.list_tenants():
                self._tenants[t.name] = t
            from proxy.control.placement import list_placements

            self._subscription = await self.plane.watch(on_tenant_changed=self._tenant_changed)
            w = await self.plane.watcher()
            # listening before reading: a placement made meanwhile is not missed
            self._placement_sub = w.subscribe(on_placement_changed=self._placement_changed)
            for p in await list_placements(self.plane):
                self._regions.setdefault(p.tenant, p.region)

    def reload(self, config: Config) -> None:
        """SIGHUP / RELOAD: the config's users now; the tenancy rules are validated here (a broken or
        missing file raises, and everything stays as it was) and swapped in once the catalog has
        been classified under them (:meth:`_swap_rules`)."""
        swap = None
        if config.rules_file:
            from proxy.policy.allowlist import FunctionChecker
            from proxy.policy.rules import load_rules

            rules = load_rules(config.rules_file)  # RulesError: the reload fails, nothing changes
            if rules != self.engine.rules:
                swap = (rules, FunctionChecker.from_rules(rules), config.rules_file)
        self.config = config
        self.config_users.replace(config.users)
        if swap is not None:
            self._rules_task = asyncio.get_running_loop().create_task(self._swap_rules(*swap))
        else:
            log.info("rules reloaded from %s: no change", config.rules_file)
            for catalog in self._catalogs():
                catalog.request_refresh("sighup")

    async def _swap_rules(self, rules, checker, path: str) -> None:
        from proxy.metrics import CONFIG_RELOADS_TOTAL
        from proxy.policy.rules import describe_change

        old = self.engine.rules
        try:
            for catalog in self._catalogs():
                await catalog.replace_rules(rules)
            for engine in self._engines():
                engine.replace_rules(rules, checker)
            pin_search_path(rules)  # backend connections opened from now on
        except Exception as e:
            CONFIG_RELOADS_TOTAL.labels(result="error").inc()
            log.error("rules reload from %s failed, keeping the old rules: %s", path, e)
            return
        log.info("rules reloaded from %s: %s", path, describe_change(old, rules))

    async def close(self) -> None:
        if getattr(self, "_placement_sub", None) is not None:
            self._placement_sub.close()
        if self._subscription is not None:
            close = getattr(self._subscription, "close", None)
            if close:
                r = close()
                if asyncio.iscoroutine(r):
                    await r
        for catalog in self._catalogs():
            await catalog.close()
        if self.plane is not None:
            await self.plane.close()

    def _catalogs(self) -> list:
        out = [] if self.catalog is None else [self.catalog]
        return out + [c for _e, c in self.regional.values() if c is not None and c is not self.catalog]

    def _engines(self) -> list:
        return [self.engine] + [e for e, _c in self.regional.values() if e is not self.engine]

    def engine_for(self, region: str | None):
        """The policy engine of ``region`` (the default region's for None or an unknown region)."""
        pair = self.regional.get(region) if region is not None else None
        return pair[0] if pair is not None else self.engine

    def catalog_for(self, region: str | None):
        pair = self.regional.get(region) if region is not None else None
        return pair[1] if pair is not None else self.catalog

    def _use_region(self, gate, region: str) -> None:
        gate.region = region
        if type(gate).__name__ == "TenantSessionGate":  # an operator gate's inner gate is made per region
            gate.engine = self.engine_for(region)

    # ---- tenant lifecycle

    def _tenant_changed(self, name: str, status: str) -> None:
        asyncio.get_running_loop().create_task(self._refresh_tenant(name, status))

    async def _refresh_tenant(self, name: str, status: str) -> None:
        try:
            t = await self.plane.get_tenant(name)
        except Exception:  # keep the old status; the next change retries
            log.exception("could not reload tenant %s", name)
            return
        if t is None:
            self._tenants.pop(name, None)
        else:
            self._tenants[name] = t
        for gate in list(self._live.get(name, ())):
            gate.terminate(TENANT_ENDED_SQLSTATE, ended_message(name, status))

    # ---- placement (docs/scale-out.md): which backend a session goes to

    def region_of(self, tenant: str | None) -> str:
        """The region ``tenant`` is placed in (the default region for None and unplaced tenants)."""
        if tenant is not None:
            r = self._regions.get(tenant)
            if r is not None:
                return r
        return self.config.default_region()

    def route(self, gate) -> str:
        """The region (backend entry) a new session's gate goes to: its tenant's (an operator's grant's)."""
        grant = getattr(gate, "grant", None)
        region = self.region_of(grant.tenant if grant is not None else getattr(gate, "tenant", None))
        try:
            self._use_region(gate, region)  # a later token switch must stay on this backend (_open_tenant)
        except AttributeError:  # pragma: no cover - a gate without attributes
            pass
        return region

    def _placement_changed(self, tenant: str, region: str | None, moving: bool) -> None:
        """Another instance (or the CLI) placed ``tenant``: new sessions go there; transaction-mode
        sessions between transactions follow (their next transaction borrows from the new backend's
        pool); other live sessions on the old backend end (57P01) and reconnect to the new one."""
        if not tenant:
            return
        old = self.region_of(tenant)
        if region is None:
            self._regions.pop(tenant, None)
        else:
            self._regions[tenant] = region
        new = self.region_of(tenant)
        if new != old:
            for gate in list(self._live.get(tenant, ())):
                if getattr(gate, "region", None) in (None, new):
                    continue
                grant = getattr(gate, "grant", None)
                if (grant.tenant if grant is not None else getattr(gate, "tenant", None)) != tenant:
                    continue  # a token session now serving another tenant of its backend (a switch back is refused)
                retarget = getattr(gate, "retarget", None)  # transaction mode, between transactions
                if retarget is not None and retarget(new):
                    self._use_region(gate, new)
                    continue
                gate.terminate(TENANT_ENDED_SQLSTATE, f'tenant "{tenant}" was moved to region {new}: reconnect')

    def _lifecycle(self, tenant: str | None) -> tuple[bool, str | None]:
        """(read_only, read_only_message) for ``tenant``; raises SessionRefused if it may not connect.

        What each status means is defined once, in :mod:`proxy.lifecycle.status`.
        """
        if tenant is None or self.plane is None:
            return False, None
        t = self._tenants.get(tenant)  # None: not registered in the control plane, an ordinary active tenant
        refusal = connect_refusal(t)
        if refusal is not None:
            raise refusal
        read_only = write_refusal(t)
        return (True, read_only.message) if read_only is not None else (False, None)

    def _token_tenant_status(self, tenant: str) -> tuple[bool, str | None]:
        """:func:`_lifecycle` for a tenant chosen later by ``SET tenantgate.tenant`` (refusal: PolicyRefusal)."""
        from proxy.policy.errors import PolicyRefusal

        try:
            return self._lifecycle(tenant)
        except SessionRefused as e:
            raise PolicyRefusal(e.sqlstate, e.message) from None

    # ---- sessions

    async def open_session(self, user: UserRecord, startup: StartupInfo) -> SessionGate:
        # admin users reach only the admin console (served by the session, never through a gate)
        refuse_admin_outside_console(user, self.config.admin.database)
        if user.kind is SessionKind.PASSTHROUGH:
            # with a policy configured, nothing is forwarded unchecked
            raise SessionRefused("28000", f'user "{user.name}" is a passthrough user, which a tenantgate with '
                                          "rules_file does not accept", hint="bind the user to a tenant instead")
        if user.kind is SessionKind.OPERATOR:
            return await self._open_operator(user, startup)
        from proxy.control.self_export import open_export_session, wants_export

        if wants_export(startup):  # a self-service export: audited before it opens, read-only
            gate = self._open_tenant(user, startup, read_only=True)
            await open_export_session(self.plane, gate, user, startup, rules=self.engine.rules,
                                      enabled=self.config.lifecycle.self_export)
            return gate
        return self._open_tenant(user, startup)

    def _open_tenant(self, user: UserRecord, startup: StartupInfo, read_only: bool = False) -> SessionGate:
        from proxy.policy.session import open_tenant_session

        if user.tenant is None and not user.token_tenants:
            bound = self.engine.rules.credentials.get(user.name)
            if bound is not None:
                user = replace(user, tenant=bound)
        tenant_status = _TenantStatus(self)
        engine = self.engine_for(self.region_of(user.tenant))
        gate = open_tenant_session(engine, user, startup, token_key=self.config.tokens.resolved_key(),
                                   tenant_status=tenant_status, read_only=read_only)
        tenant_status.gate = gate
        if gate.tenant is not None:
            self._live.setdefault(gate.tenant, weakref.WeakSet()).add(gate)
        if self.plane is not None:
            # refused tenant statements may be attacks: they go to the audit chain too
            from proxy.control.operator_gate import RefusalAuditor

            gate.refusal_hook = RefusalAuditor(self.plane, user=user.name, tenant=gate.tenant, startup=startup)
        return gate

    async def _open_operator(self, user: UserRecord, startup: StartupInfo) -> SessionGate:
        if self.plane is None:
            raise SessionRefused("28000", "operator sessions need the control plane (control.dsn) configured")
        from proxy.control.operator_gate import open_operator_session
        from proxy.control.placement import operator_regions, residency_message
        from proxy.policy.session import TenantSessionGate

        allowed = await operator_regions(self.plane, user.name)  # operator residency (None: every region)

        def make_inner(grant):
            region = self.region_of(grant.tenant)
            if allowed is not None and region not in allowed:
                # the grant was approved before the tenant was placed elsewhere (or the account restricted)
                raise SessionRefused("28000", residency_message(user.name, grant.tenant, region, allowed))
            read_only, message = self._lifecycle(grant.tenant)
            if grant.read_only:
                read_only = True
                message = message or (f"grant {grant.id} is a read grant: writes are refused "
                                      "(request a write grant if you need one)")
            return TenantSessionGate(self.engine_for(region), grant.tenant, read_only=read_only,
                                     read_only_message=message)

        try:
            gate = await open_operator_session(self.plane, user, startup, make_inner=make_inner,
                                               hold_session_lock=self.session_lock)
        except SessionRefused as e:
            if "operator residency" in e.message:  # refused by make_inner: into the audit chain too
                from proxy.control import audit as A

                await self.plane._audit_quietly(A.AuditRecord(
                    A.CONNECTION_REFUSED, operator=user.name, client_addr=startup.client_addr,
                    session_id=startup.session_id, sqlstate=e.sqlstate, detail={"message": e.message}))
            raise
        # operator sessions follow the tenant's status like tenant sessions: a change ends them
        self._live.setdefault(gate.grant.tenant, weakref.WeakSet()).add(gate)
        return gate


async def build_gatekeeper(config: Config):
    """The Gatekeeper for ``config``: the policy engine when ``rules_file`` is set,
    otherwise the pass-through gatekeeper (only ``passthrough: true`` users)."""
    if not config.rules_file:
        from proxy.passthrough import PassthroughGatekeeper

        return PassthroughGatekeeper(config)
    from proxy.policy.allowlist import FunctionChecker
    from proxy.catalog_sync import CatalogManager
    from proxy.policy.engine import PolicyEngine
    from proxy.policy.rules import load_rules

    rules = load_rules(config.rules_file)
    pin_search_path(rules)
    checker = FunctionChecker.from_rules(rules)
    regional = {}
    for region in config.region_names():  # each region's PostgreSQL has its own catalog
        dsn = backend_dsn(config, region)
        catalog = await CatalogManager.from_dsn(dsn, rules, refresh_interval_s=rules.catalog_refresh_s,
                                                backstop_key_configured=config.backstop.resolved_key() is not None)
        catalog.start_periodic()
        catalog.start_listening(dsn)  # DDL event trigger: refresh within a second
        regional[region] = (PolicyEngine(rules, catalog, checker), catalog)
    engine, catalog = regional[config.default_region()]
    plane = None
    if config.control.resolved_dsn():
        from proxy.control.plane import ControlPlane

        plane = ControlPlane.from_config(config)
        await plane.start()
    gk = PolicyGatekeeper(config, engine, catalog, plane, regional=regional)
    if plane is not None:
        gk.session_lock = await _backend_may_take_advisory_locks(backend_dsn(config))
    await gk.start()
    return gk


def pin_search_path(rules) -> None:
    """Backend sessions resolve names with the rules' schemas, as the policy engine does."""
    from proxy.backend_link import PINNED_SETTINGS
    from proxy.policy.names import quote_ident

    PINNED_SETTINGS["search_path"] = ", ".join(quote_ident(s) for s in rules.schemas)


async def _backend_may_take_advisory_locks(dsn: str) -> bool:
    """Whether the backend role may call pg_try_advisory_lock_shared (the hardened bootstrap revokes it)."""
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn)
    except Exception:
        return False
    try:
        return bool(await conn.fetchval(
            "SELECT has_function_privilege('pg_try_advisory_lock_shared(bigint)', 'EXECUTE')"))
    except Exception:
        return False
    finally:
        await conn.close()


class _TenantStatus:
    """A tenant session's ``tenant_status`` hook (at connect and on every token switch): the
    tenant's lifecycle applies, the tenant must be in the session's region, and the session is
    ended like the tenant's other sessions when its status changes.  (A small object rather
    than a closure: one per session.)"""

    __slots__ = ("keeper", "gate")

    def __init__(self, keeper) -> None:
        self.keeper = keeper
        self.gate = None  # set once the gate exists

    def __call__(self, chosen: str):
        keeper, gate = self.keeper, self.gate
        status = keeper._token_tenant_status(chosen)
        here = getattr(gate, "region", None)
        if here is not None and keeper.region_of(chosen) != here:
            # a session stays on the backend it connected to (docs/scale-out.md)
            from proxy.policy.errors import PolicyRefusal

            raise PolicyRefusal("0A000", f'tenant "{chosen}" is in region {keeper.region_of(chosen)}, but this '
                                f"session is connected to the backend of region {here}: a session cannot "
                                "switch to a tenant on another backend; open a new connection with that "
                                "tenant's token")
        if gate is not None:
            keeper._live.setdefault(chosen, weakref.WeakSet()).add(gate)
        return status

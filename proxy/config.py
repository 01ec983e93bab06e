"""tenantgate's YAML configuration, validated with pydantic.

One model is the single source of truth: validation, defaults and the JSON
Schema (``tenantgate config-schema``).  Unknown keys are errors, and every
error names the bad key (e.g. ``backend.port: Input should be a valid integer``).
Secrets may be given inline or as ``*_env`` (name of an environment variable)
or ``*_file`` (path to a file).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from proxy.yamlfile import format_validation_error, load_mapping


class ConfigError(Exception):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _secret(inline: str | None, env: str | None, file: str | None, what: str) -> str | None:
    if inline is not None:
        return inline
    if env is not None:
        v = os.environ.get(env)
        if v is None:
            raise ConfigError(f"{what}: environment variable {env} is not set")
        return v
    if file is not None:
        return Path(file).read_text().strip()
    return None


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(6432, ge=0, le=65535)


class TlsConfig(_Strict):
    """TLS toward clients.  With cert and key set, SSLRequest gets real TLS."""

    cert_file: str | None = None
    key_file: str | None = None
    required: bool = False  # refuse clients that do not use TLS


class BackendConfig(_Strict):
    """How tenantgate reaches PostgreSQL.  Credentials never come from the client."""

    host: str = "127.0.0.1"  # or a unix socket directory ("/..."), as in libpq
    port: int = Field(5432, ge=1, le=65535)
    database: str | None = None  # None: the database the client asked for
    user: str = "tenantgate_app"
    password: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    sslmode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] = "prefer"
    sslrootcert: str | None = None
    connect_timeout_s: float = Field(10.0, gt=0)

    def resolved_password(self) -> str | None:
        return _secret(self.password, self.password_env, self.password_file, "backend.password")

    def url(self) -> str:
        """A libpq URL for this role, TLS settings included (sslmode, sslrootcert)."""
        from urllib.parse import quote

        if not self.database:
            raise ConfigError("backend.database must be set")
        pw = self.resolved_password()
        auth = quote(self.user, safe="") + (":" + quote(pw, safe="") if pw else "")
        url = f"postgresql://{auth}@{self.host}:{self.port}/{quote(self.database, safe='')}?sslmode={self.sslmode}"
        if self.sslrootcert:
            url += f"&sslrootcert={quote(self.sslrootcert)}"
        return url


REGION_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
#: the region of a config that has only ``backend:`` (no ``regions:``)
IMPLICIT_REGION = "default"


class RegionConfig(BackendConfig):
    """One region's backend (``regions: {cn-east: {...}}``): a backend entry like ``backend:``, plus the
    lifecycle role of that server (export, import, offboard, purge act on the tenant's region)."""

    data_dsn: str | None = Field(None, description="lifecycle role of this region's server "
                                                   "(unset: lifecycle.data_dsn for the default region, "
                                                   "else built from this entry)")
    data_dsn_env: str | None = None

    def resolved_data_dsn(self) -> str | None:
        return _secret(self.data_dsn, self.data_dsn_env, None, "regions.*.data_dsn")

    def backend(self) -> BackendConfig:
        return BackendConfig(**self.model_dump(exclude={"data_dsn", "data_dsn_env"}))


class PlacementConfig(_Strict):
    """Where tenants live (docs/scale-out.md).  Placements are in the control schema
    (``tenantgate tenant place``); a tenant without one is in ``default_region``."""

    default_region: str | None = Field(None, description="region of tenants not placed explicitly "
                                                         "(unset: the first entry of regions)")


class UserConfig(_Strict):
    """An application user of tenantgate (operators live in the control schema)."""

    name: str
    scram_verifier: str  # from `tenantgate passwd`
    tenant: str | None = None  # credential-bound tenant
    token_tenants: bool = False  # may choose its tenant with a signed token
    passthrough: bool = False  # no policy at all; only for tests of the bare proxy
    pool_mode: Literal["session", "transaction"] | None = None  # None: pool.databases / pool.mode decide
    admin: bool = False  # may use the admin console (database ``admin.database``) and nothing else

    @field_validator("scram_verifier")
    @classmethod
    def _is_scram(cls, v: str) -> str:
        if not v.startswith("SCRAM-SHA-256$"):
            raise ValueError("must be a SCRAM-SHA-256 verifier made by `tenantgate passwd`")
        return v


class TimeoutsConfig(_Strict):
    startup_s: float = Field(10.0, gt=0)  # client must finish startup+auth within this
    drain_s: float = Field(30.0, ge=0)  # SIGTERM: wait this long for running transactions
    idle_in_transaction_s: float | None = None


class LimitsConfig(_Strict):
    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_clients: int = Field(1000, ge=1)
    max_statement_bytes: int = Field(
        1024 * 1024, ge=1024,
        description="a Query or Parse whose SQL text is longer is refused (54000); bulk data belongs in COPY")
    statement_offload_bytes: int = Field(
        64 * 1024, ge=0,
        description="statements longer than this are analysed in a worker thread, so the event loop "
                    "keeps serving other clients (0: always on the event loop)")
    statement_cpu_budget_s: float = Field(
        10.0, gt=0, description="a statement whose analysis takes longer is refused (57014)")


class TokensConfig(_Strict):
    """Signed tenant tokens (HS256 JWT with claims ``tenant`` and ``exp``)."""

    hmac_key: str | None = None
    hmac_key_env: str | None = None
    hmac_key_file: str | None = None

    def resolved_key(self) -> str | None:
        return _secret(self.hmac_key, self.hmac_key_env, self.hmac_key_file, "tokens.hmac_key")


class ControlConfig(_Strict):
    """The control schema (grants, operators, audit, tenant lifecycle)."""

    dsn: str | None = None  # role that owns the control schema; never used by client sessions
    dsn_env: str | None = None
    schema_: str = Field("tenantgate_control", alias="schema")

    def resolved_dsn(self) -> str | None:
        return _secret(self.dsn, self.dsn_env, None, "control.dsn")


class AuditConfig(_Strict):
    # what the outcome record of an operator's COPY ... FROM STDIN keeps of the loaded data:
    # "digest" (byte count and SHA-256), or "full" (also the data itself)
    copy_data: Literal["digest", "full"] = "digest"
    signing_key_file: str | None = None  # Ed25519 private key (PEM) for checkpoints
    signing_key_env: str | None = None
    checkpoint_every: int = Field(100, ge=1)  # records between signed checkpoints
    jsonl_path: str | None = None  # optional JSONL sink
    redact_params: bool = False  # log bound parameters as <redacted>
    verify_key_files: list[str] = []  # extra Ed25519 public keys (PEM) accepted on checkpoints (key rotation)
    # Checkpoint coverage (docs/operator-access.md, "Audit integrity and the witness file").
    checkpoint_interval_s: float = Field(30.0, gt=0, description="sign the head when records stayed unsigned this long")
    checkpoint_window_records: int | None = Field(
        None, ge=1, description="audit verify fails when more records than this lie between checkpoints or after "
                                "the last one (default: 2 x checkpoint_every)")
    checkpoint_window_s: float = Field(
        600.0, gt=0, description="audit verify fails when the oldest unsigned record is older than this")
    witness_file: str | None = Field(
        None, description="append every signed checkpoint here (JSON lines, fsynced); ship it off the host")

    @model_validator(mode="after")
    def _window_holds_a_checkpoint(self):
        if self.checkpoint_window_records is not None and self.checkpoint_window_records < self.checkpoint_every:
            raise ValueError("checkpoint_window_records must be at least checkpoint_every")
        return self


class GrantsConfig(_Strict):
    max_duration: str = "8h"
    approvals_required: int = Field(1, ge=1)
    pending_ttl: str = "24h"  # an unanswered request expires after this


class NoticesConfig(_Strict):
    """Retention notices to a tenant's contact (``tenantgate notices send``; docs/lifecycle.md)."""

    at_offboarding: bool = Field(True, description="send a notice when a tenant is offboarded")
    days_before: list[int] = Field([30, 7, 1], description="send a notice this many days before the purge; the "
                                                           "smallest is the final notice purge-expired waits for")
    webhook_secret: str | None = Field(None, description="HMAC-SHA256 key of the webhook signature (per deployment)")
    webhook_secret_env: str | None = Field(None, description="environment variable holding webhook_secret")
    webhook_secret_file: str | None = None
    timeout_s: float = Field(10.0, gt=0, description="one webhook request")
    attempts_per_run: int = Field(4, ge=1, le=20, description="tries of one notice in one `notices send` run")
    backoff_initial_s: float = Field(1.0, ge=0, description="wait before the 2nd try; doubled for each next try")
    backoff_max_s: float = Field(60.0, ge=0)
    max_attempts: int = Field(40, ge=1, description="after this many tries over all runs a notice is failed")
    require_final_for_purge: bool = Field(True, description="purge-expired skips a tenant whose final notice "
                                                            "was not delivered (an approver may force it)")

    @field_validator("days_before")
    @classmethod
    def _days(cls, v: list[int]) -> list[int]:
        if any(d < 0 for d in v):
            raise ValueError("days_before: days must be >= 0")
        return sorted(set(v), reverse=True)

    def resolved_secret(self) -> str | None:
        return _secret(self.webhook_secret, self.webhook_secret_env, self.webhook_secret_file,
                       "lifecycle.notices.webhook_secret")


class LifecycleConfig(_Strict):
    retention_days: int = Field(90, ge=0)
    purge_batch_rows: int = Field(5000, ge=1)
    # Role that reads/writes tenant tables for export, import and purge (never used
    # by client sessions).  Unset: built from backend.* (backend.database required).
    data_dsn: str | None = None
    data_dsn_env: str | None = None
    journal_schema: str = "tenantgate_lifecycle"  # purge progress journal, in the data database
    service_name: str = "tenantgate-retention"  # identity recorded by `tenant purge-expired`
    notices: NoticesConfig = Field(default_factory=NoticesConfig)
    self_export: bool = Field(True, description="tenants may export their own rows through the proxy "
                                                "(tenantgate export --dsn), audited, without a grant")
    # Tenant backups (`tenant backup`, proxy/lifecycle/keys.py): the master key that wraps the per-tenant
    # data keys; never stored in the database.  A file or an environment variable holding 32 random bytes
    # in base64 (`tenantgate tenant backup-keygen --out FILE` writes one).
    backup_master_key_file: str | None = None
    backup_master_key_env: str | None = None
    # Third-party demands (proxy/control/demands.py): where tenant notices are POSTed (JSON); "{tenant}"
    # in the URL is replaced by the tenant id (URL-quoted).  Unset: notices stay pending.
    demand_notice_url: str | None = None
    # Reading exports (verify-export, import): limits against decompression and field bombs.
    max_compression_ratio: float = Field(1000.0, gt=1, description="refuse archives expanding more than this")
    max_manifest_bytes: int = Field(16 << 20, ge=1024, description="largest manifest.json read")
    max_field_bytes: int = Field(16 << 20, ge=1024, description="largest CSV value read (columns with a "
                                                               "narrower type are capped at its limit)")

    def resolved_data_dsn(self) -> str | None:
        return _secret(self.data_dsn, self.data_dsn_env, None, "lifecycle.data_dsn")


PoolMode = Literal["session", "transaction"]


class PoolConfig(_Strict):
    """How client sessions share connections to PostgreSQL.

    ``session``: a client keeps one backend connection from connect to disconnect.
    ``transaction``: tenant sessions borrow a connection from a bounded pool for each
    transaction (PgBouncer's transaction mode); operator sessions always use session mode.
    The mode of a session: its user's ``pool_mode``, else ``databases[<database>]``, else ``mode``.
    """

    mode: PoolMode = "session"
    databases: dict[str, PoolMode] = {}
    size: int = Field(20, ge=1, description="backend connections per database in transaction mode")
    queue_timeout_s: float = Field(30.0, gt=0, description="a client waits this long for a free backend connection")
    server_idle_timeout_s: float = Field(600.0, gt=0, description="close pooled connections idle this long")
    server_lifetime_s: float = Field(3600.0, gt=0, description="close pooled connections this old when released")
    max_per_tenant: int = Field(0, ge=0, description="connections lent to one tenant's sessions at a time "
                                "(transaction mode; 0: no limit); a tenant at its limit queues, others go first")
    client_idle_timeout_s: float | None = Field(None, gt=0, description="close client connections idle this long")
    max_prepared_per_server: int = Field(2000, ge=1, description="close a pooled connection holding more")


class AdminConfig(_Strict):
    """The admin console: ``psql -d <database>`` as a user with ``admin: true`` (SHOW POOLS, ...)."""

    database: str = "tenantgate"


class MetricsConfig(_Strict):
    """The admin HTTP listener (/metrics, /healthz, /readyz; docs/observability.md)."""

    host: str = "127.0.0.1"
    port: int | None = Field(9187, ge=0, le=65535)  # None disables the endpoint
    tenant_labels: Literal["off", "top", "all"] = Field(
        "off", description="per-tenant statement counter: off, the top N tenants (+ 'other'), or every tenant")
    tenant_top_n: int = Field(10, ge=1, le=10000, description="N for tenant_labels: top")
    readiness_timeout_s: float = Field(2.0, gt=0, le=60, description="connect timeout of the /readyz probes")
    readiness_cache_s: float = Field(1.0, ge=0, le=60, description="reuse a readiness probe result this long")


class LoggingConfig(_Strict):
    """Log format and the per-connection / per-refusal event lines (logger ``tenantgate.events``)."""

    format: Literal["text", "json"] = "text"
    level: Literal["debug", "info", "warning", "error"] | None = None  # None: warning (info with --verbose)
    events: bool = Field(True, description="one line per connection and per refused statement")
    statement_max_chars: int = Field(200, ge=0, le=100000, description="refusal lines cut statement text to this")
    statement_literals: bool = Field(
        False, description="keep literals in logged statement text (default: replaced by ?, they may be values)")


class BackstopConfig(_Strict):
    """The PostgreSQL backstop (proxy/backstop.py): the key tenantgate binds backend connections
    with; the same key is installed by deploy/postgres/bootstrap.sql (-v backstop_key=...)."""

    key: str | None = Field(None, description="hex, 32 to 64 bytes; prefer key_env or key_file")
    key_env: str | None = None
    key_file: str | None = None

    def resolved_key(self) -> bytes | None:
        text = _secret(self.key, self.key_env, self.key_file, "backstop.key")
        if text is None:
            return None
        from proxy.backstop import BackstopError, parse_key

        try:
            return parse_key(text)
        except BackstopError as e:
            raise ConfigError(f"backstop.key: {e}") from None


class Config(_Strict):
    listen: ListenConfig = ListenConfig()
    workers: int = Field(
        1, ge=0, le=256,
        description="Worker processes sharing the listen address (SO_REUSEPORT); 0 means one per CPU. "
                    "Changing it needs a restart.",
    )
    tls: TlsConfig = TlsConfig()
    backend: BackendConfig = BackendConfig()
    regions: dict[str, RegionConfig] = Field(
        default_factory=dict,
        description="region name -> its backend; unset: `backend` is the one region, named 'default'. "
                    "With regions, `backend` is the default region's entry (do not set both)")
    placement: PlacementConfig = PlacementConfig()
    _region_backends: dict = PrivateAttr(default_factory=dict)
    users: list[UserConfig] = []
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    rules_file: str | None = None  # path to the rules YAML (rules/); relative to the config file
    tokens: TokensConfig = TokensConfig()
    control: ControlConfig = ControlConfig()
    audit: AuditConfig = AuditConfig()
    grants: GrantsConfig = GrantsConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    pool: PoolConfig = PoolConfig()
    admin: AdminConfig = AdminConfig()
    backstop: BackstopConfig = BackstopConfig()

    @model_validator(mode="after")
    def _regions(self):
        import re

        for name in self.regions:
            if not re.match(REGION_NAME, name):
                raise ValueError(f"regions: {name!r} is not a region name (lower case letters, digits, - and _)")
        if not self.regions:
            if self.placement.default_region not in (None, IMPLICIT_REGION):
                raise ValueError(f"placement.default_region: {self.placement.default_region!r} is not a region "
                                 f"(without regions: there is one region, {IMPLICIT_REGION!r})")
            return self
        if "backend" in self.model_fields_set:
            raise ValueError("set either backend or regions, not both (with regions, each region has its backend)")
        default = self.placement.default_region or next(iter(self.regions))
        if default not in self.regions:
            raise ValueError(f"placement.default_region: {default!r} is not one of regions "
                             f"({', '.join(self.regions)})")
        # everything that talks to "the" backend (catalog discovery, readiness, doctor) uses the default region
        self._region_backends = {name: r.backend() for name, r in self.regions.items()}
        self.backend = self._region_backends[default]
        self.__pydantic_fields_set__.discard("backend")
        return self

    def region_names(self) -> list[str]:
        """Every region, the default first."""
        if not self.regions:
            return [IMPLICIT_REGION]
        d = self.default_region()
        return [d] + [r for r in self.regions if r != d]

    def default_region(self) -> str:
        if not self.regions:
            return IMPLICIT_REGION
        return self.placement.default_region or next(iter(self.regions))

    def backend_of(self, region: str) -> BackendConfig:
        """The backend entry of ``region`` (ConfigError for an unknown region)."""
        if not self.regions:
            if region != IMPLICIT_REGION:
                raise ConfigError(f"region {region!r} is not configured (this config has one region, "
                                  f"{IMPLICIT_REGION!r})")
            return self.backend
        r = self.regions.get(region)
        if r is None:
            raise ConfigError(f"region {region!r} is not configured (regions: {', '.join(self.regions)})")
        return self._region_backends[region]  # the same object every time (pools are keyed by it)

    def pool_mode_for(self, user: str, database: str) -> PoolMode:
        for u in self.users:
            if u.name == user and u.pool_mode is not None:
                return u.pool_mode
        return self.pool.databases.get(database, self.pool.mode)


def check_rules_file(cfg: Config, where: str) -> None:
    """Application users and operators need the tenancy rules: without ``rules_file`` every one of
    them would be refused at connect time, so such a config does not start (ConfigError)."""
    needs = [u.name for u in cfg.users if not u.passthrough]
    if cfg.rules_file is None:
        if needs or cfg.control.resolved_dsn():
            who = (f"application users ({', '.join(needs[:5])}{', ...' if len(needs) > 5 else ''})" if needs
                   else "operators (control.dsn is set)")
            raise ConfigError(
                f"{where}: rules_file is not set, but the config has {who}: set rules_file to the tenancy "
                "rules (for example rules/tenancy.yaml; see rules/README.md). Only passthrough users work without it")
        return


def load_config(path: str | Path) -> Config:
    path = Path(path)
    raw = load_mapping(path, ConfigError)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, str(path)))
    if cfg.rules_file and not os.path.isabs(cfg.rules_file):
        cfg.rules_file = str((path.parent / cfg.rules_file).resolve())
    if (cfg.tls.cert_file is None) != (cfg.tls.key_file is None):
        raise ConfigError(f"{path}: tls.cert_file and tls.key_file must be set together")
    if cfg.tls.required and cfg.tls.cert_file is None:
        raise ConfigError(f"{path}: tls.required needs tls.cert_file and tls.key_file")
    return cfg

-- tenantgate control schema: operators, grants, approvals, the audit chain,
-- signed checkpoints and tenant lifecycle.
--
-- Installed by proxy.control.schema.install_control_schema(), which replaces
-- @schema@ with the quoted schema name and @channel@ with the NOTIFY channel.
-- Every statement is idempotent, so installing twice is harmless.
-- Client sessions never reach this schema: the proxy refuses any statement
-- that names it, and the backend role of tenant/operator sessions has no
-- privilege on it (REVOKE ALL ... FROM PUBLIC below).

CREATE SCHEMA IF NOT EXISTS @schema@;
REVOKE ALL ON SCHEMA @schema@ FROM PUBLIC;

CREATE TABLE IF NOT EXISTS @schema@.schema_version (
    version     integer PRIMARY KEY,
    installed_at timestamptz NOT NULL DEFAULT now()
);

-- People who may act: operators (request grants, connect) and approvers
-- (approve/deny other people's grants, manage operator accounts).
CREATE TABLE IF NOT EXISTS @schema@.operators (
    name           text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.@-]{1,63}$'),
    scram_verifier text NOT NULL CHECK (scram_verifier LIKE 'SCRAM-SHA-256$%'),
    roles          text[] NOT NULL DEFAULT '{operator}'
                   CHECK (roles <@ ARRAY['operator', 'approver']::text[] AND cardinality(roles) > 0),
    totp_secret    text,
    enabled        boolean NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Just-in-time access grants (Customer Lockbox states).
CREATE TABLE IF NOT EXISTS @schema@.grants (
    id                bigserial PRIMARY KEY,
    requester         text NOT NULL,          -- no FK: history outlives accounts
    tenant            text NOT NULL,
    access            text NOT NULL CHECK (access IN ('read', 'write')),
    reason            text NOT NULL CHECK (length(btrim(reason)) > 0),
    duration_s        integer NOT NULL CHECK (duration_s > 0),
    approvals_required integer NOT NULL CHECK (approvals_required >= 1),
    state             text NOT NULL DEFAULT 'pending'
                      CHECK (state IN ('pending', 'approved', 'denied', 'expired', 'revoked')),
    created_at        timestamptz NOT NULL DEFAULT now(),
    pending_until     timestamptz NOT NULL,   -- an unanswered request expires then
    approved_at       timestamptz,
    expires_at        timestamptz,            -- set on approval: approved_at + duration
    ended_at          timestamptz,            -- denied/expired/revoked at
    ended_by          text,
    end_reason        text
);
CREATE INDEX IF NOT EXISTS grants_requester_state ON @schema@.grants (requester, state);
CREATE INDEX IF NOT EXISTS grants_live ON @schema@.grants (state) WHERE state IN ('pending', 'approved');

CREATE TABLE IF NOT EXISTS @schema@.approvals (
    grant_id   bigint NOT NULL REFERENCES @schema@.grants (id),
    approver   text NOT NULL,
    decision   text NOT NULL CHECK (decision IN ('approve', 'deny')),
    comment    text,
    decided_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (grant_id, approver)
);

-- Tenant lifecycle (used by `tenantgate tenant ...`, see proxy.lifecycle).
CREATE TABLE IF NOT EXISTS @schema@.tenants (
    name          text PRIMARY KEY,
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'offboarded', 'purged')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    offboarded_at timestamptz,
    retention_end timestamptz,
    purged_at     timestamptz,
    CHECK (status <> 'offboarded' OR retention_end IS NOT NULL)
);

-- The audit chain.  seq is dense (1, 2, 3, ...) and assigned while holding
-- the row lock on audit_head; record_hash = sha256(canonical JSON of the
-- record's fields including prev_hash).  See proxy/control/audit.py.
CREATE TABLE IF NOT EXISTS @schema@.audit_log (
    seq             bigint PRIMARY KEY,
    prev_hash       text NOT NULL,
    record_hash     text NOT NULL,
    at              timestamptz NOT NULL,
    type            text NOT NULL,
    operator        text,
    grant_id        bigint,
    tenant          text,
    client_addr     text,
    session_id      text,
    statement_class text,
    original_sql    text,
    rewritten_sql   text,
    params          text,                     -- JSON, exactly as hashed
    ref_seq         bigint,                   -- outcome records: the statement record
    sqlstate        text,                     -- outcome: NULL = ok
    command_tag     text,
    rows            bigint,
    duration_us     bigint,
    detail          text                      -- JSON, exactly as hashed
);
CREATE INDEX IF NOT EXISTS audit_log_at ON @schema@.audit_log (at);

-- One row: the chain's tail.  Its row lock is the only serialisation point.
CREATE TABLE IF NOT EXISTS @schema@.audit_head (
    one  boolean PRIMARY KEY DEFAULT true CHECK (one),
    seq  bigint NOT NULL,
    hash text NOT NULL
);
INSERT INTO @schema@.audit_head (one, seq, hash)
VALUES (true, 0, '0000000000000000000000000000000000000000000000000000000000000000')
ON CONFLICT (one) DO NOTHING;

-- Ed25519-signed checkpoints over (seq, record_hash).
CREATE TABLE IF NOT EXISTS @schema@.audit_checkpoints (
    seq         bigint PRIMARY KEY,
    record_hash text NOT NULL,
    signed_at   timestamptz NOT NULL,
    key_id      text NOT NULL,
    signature   text NOT NULL                 -- base64
);

-- The audit log is append-only: UPDATE, DELETE and TRUNCATE raise.  (The
-- owner could disable the trigger; that is what the hash chain and the
-- signed checkpoints are for.)
CREATE OR REPLACE FUNCTION @schema@.audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the tenantgate audit log is append-only'
        USING ERRCODE = 'insufficient_privilege';
END $$;

DROP TRIGGER IF EXISTS audit_log_append_only ON @schema@.audit_log;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON @schema@.audit_log
    FOR EACH ROW EXECUTE FUNCTION @schema@.audit_append_only();
DROP TRIGGER IF EXISTS audit_log_no_truncate ON @schema@.audit_log;
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON @schema@.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION @schema@.audit_append_only();
DROP TRIGGER IF EXISTS audit_checkpoints_append_only ON @schema@.audit_checkpoints;
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON @schema@.audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION @schema@.audit_append_only();

-- NOTIFY every tenantgate instance when a grant changes state or a tenant
-- changes status (payload: JSON).  A trigger, so changes made by any
-- client (CLI, another instance, an admin's psql) are announced.
CREATE OR REPLACE FUNCTION @schema@.notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'grants' THEN
        IF TG_OP = 'INSERT' OR NEW.state IS DISTINCT FROM OLD.state THEN
            PERFORM pg_notify('@channel@', json_build_object(
                'kind', 'grant', 'id', NEW.id, 'state', NEW.state,
                'requester', NEW.requester, 'tenant', NEW.tenant)::text);
        END IF;
    ELSIF TG_TABLE_NAME = 'tenants' THEN
        IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status
           OR NEW.retention_end IS DISTINCT FROM OLD.retention_end
           OR to_jsonb(NEW) -> 'purge_started_at' IS DISTINCT FROM to_jsonb(OLD) -> 'purge_started_at' THEN
            -- status 'purging': a purge is about to start, every session of the tenant must end
            PERFORM pg_notify('@channel@', json_build_object(
                'kind', 'tenant', 'name', NEW.name,
                'status', CASE WHEN NEW.status <> 'purged' AND to_jsonb(NEW) ->> 'purge_started_at' IS NOT NULL
                               THEN 'purging' ELSE NEW.status END,
                'retention_end', NEW.retention_end)::text);
        END IF;
    END IF;
    RETURN NEW;
END $$;

DROP TRIGGER IF EXISTS grants_notify ON @schema@.grants;
CREATE TRIGGER grants_notify AFTER INSERT OR UPDATE ON @schema@.grants
    FOR EACH ROW EXECUTE FUNCTION @schema@.notify_change();
DROP TRIGGER IF EXISTS tenants_notify ON @schema@.tenants;
CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE ON @schema@.tenants
    FOR EACH ROW EXECUTE FUNCTION @schema@.notify_change();

INSERT INTO @schema@.schema_version (version) VALUES (1) ON CONFLICT DO NOTHING;

-- ---------------------------------------------------------------- oversight (v2)
-- The grant policy lives here, not in anyone's config file: one row, changed
-- only through a change request that a second approver approves (see
-- proxy/control/accounts.py).  Installing seeds it from the installer's
-- config (grants.*) the first time only.
CREATE TABLE IF NOT EXISTS @schema@.grant_policy (
    one                   boolean PRIMARY KEY DEFAULT true CHECK (one),
    max_duration_s        integer NOT NULL CHECK (max_duration_s > 0),
    approvals_required    integer NOT NULL CHECK (approvals_required >= 1),
    pending_ttl_s         integer NOT NULL CHECK (pending_ttl_s > 0),
    -- an approval by an account created or changed by (or at the request of) the
    -- requester within this window is refused
    account_change_window_s integer NOT NULL DEFAULT 604800 CHECK (account_change_window_s >= 0),
    -- authentication throttling (CLI and proxy): failures before a lockout, per
    -- account and per client address, counted over lockout_window_s
    max_failures_account  integer NOT NULL DEFAULT 5 CHECK (max_failures_account >= 1),
    max_failures_address  integer NOT NULL DEFAULT 20 CHECK (max_failures_address >= 1),
    lockout_window_s      integer NOT NULL DEFAULT 900 CHECK (lockout_window_s > 0),
    lockout_s             integer NOT NULL DEFAULT 900 CHECK (lockout_s > 0),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    updated_by            text
);

-- Set (by `tenant purge`) before a purge deletes anything: every session of the
-- tenant is ended and no new one is accepted; cleared if the tenant is restored.
ALTER TABLE @schema@.tenants ADD COLUMN IF NOT EXISTS purge_started_at timestamptz;

ALTER TABLE @schema@.operators ADD COLUMN IF NOT EXISTS totp_last_step bigint;   -- replay guard
ALTER TABLE @schema@.operators ADD COLUMN IF NOT EXISTS enrol_token_hash text;   -- sha256 hex of a one-time token
ALTER TABLE @schema@.operators ADD COLUMN IF NOT EXISTS enrol_expires_at timestamptz;

-- Who was involved in each change of an account (creation, roles, credential
-- reset, enable): the requester and the approver of the change request, and who
-- received the enrolment token.  Within grant_policy.account_change_window_s an
-- approval by that account for one of the involved, or by the token's receiver
-- for that account, is refused.
CREATE TABLE IF NOT EXISTS @schema@.account_events (
    id        bigserial PRIMARY KEY,
    account   text NOT NULL,
    at        timestamptz NOT NULL DEFAULT now(),
    change    text NOT NULL,
    involved  text[] NOT NULL,
    token_to  text             -- who received the enrolment token (the approver of the change)
);
CREATE INDEX IF NOT EXISTS account_events_account ON @schema@.account_events (account, at);

-- Requests to change accounts or the grant policy; a different approver decides.
CREATE TABLE IF NOT EXISTS @schema@.change_requests (
    id            bigserial PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('account.create', 'account.roles', 'account.reset',
                                                'account.enable', 'policy.set')),
    account       text,
    payload       jsonb NOT NULL DEFAULT '{}',
    requested_by  text NOT NULL,
    reason        text,
    state         text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'approved', 'denied', 'expired')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    pending_until timestamptz NOT NULL,
    decided_by    text,
    decided_at    timestamptz
);

-- Authentication throttling state, shared by every instance and the CLI.
-- key: 'account:<name>' or 'address:<ip>'.
CREATE TABLE IF NOT EXISTS @schema@.auth_throttle (
    key           text PRIMARY KEY,
    failures      integer NOT NULL DEFAULT 0,
    window_start  timestamptz NOT NULL DEFAULT now(),
    locked_until  timestamptz
);

INSERT INTO @schema@.schema_version (version) VALUES (2) ON CONFLICT DO NOTHING;

-- Signed checkpoints cannot be truncated away either (the append-only row
-- trigger above does not fire on TRUNCATE).  The owner can still disable
-- triggers: `audit verify` then finds the stretch without checkpoints, and
-- the witness file (audit.witness_file) the checkpoints themselves.
DROP TRIGGER IF EXISTS audit_checkpoints_no_truncate ON @schema@.audit_checkpoints;
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON @schema@.audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION @schema@.audit_append_only();
DROP TRIGGER IF EXISTS audit_head_no_truncate ON @schema@.audit_head;
CREATE TRIGGER audit_head_no_truncate BEFORE DELETE OR TRUNCATE ON @schema@.audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION @schema@.audit_append_only();

-- ---------------------------------------------------------------- retention notices (issue 18, part 1)
-- Where a tenant's retention notices go (`tenantgate tenant contact`, approver).
CREATE TABLE IF NOT EXISTS @schema@.tenant_contacts (
    tenant      text PRIMARY KEY,
    webhook_url text NOT NULL CHECK (webhook_url ~ '^https?://'),
    updated_by  text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per notice of one offboarding (retention_end tells offboardings apart):
-- scheduled when the tenant is offboarded (and by `notices send` if missing),
-- sent once by `tenantgate notices send` (rows claimed FOR UPDATE SKIP LOCKED).
CREATE TABLE IF NOT EXISTS @schema@.retention_notices (
    tenant          text NOT NULL,
    retention_end   timestamptz NOT NULL,
    kind            text NOT NULL,            -- 'offboarded' or 'days_before:N'
    due_at          timestamptz NOT NULL,
    final           boolean NOT NULL DEFAULT false,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed', 'cancelled')),
    attempts        integer NOT NULL DEFAULT 0,
    last_error      text,
    last_attempt_at timestamptz,
    delivered_at    timestamptz,
    PRIMARY KEY (tenant, retention_end, kind)
);
CREATE INDEX IF NOT EXISTS retention_notices_due ON @schema@.retention_notices (due_at) WHERE state = 'pending';
REVOKE ALL ON @schema@.tenant_contacts, @schema@.retention_notices FROM PUBLIC;
-- ---------------------------------------------------------------- tenant rights (issue 18, part 2)
-- Per-tenant data keys of tenantgate backups (proxy/lifecycle/keys.py).  The key
-- is stored only WRAPPED (AES key wrap, RFC 3394) by the master key, which is
-- not in the database (lifecycle.backup_master_key_file/_env).  A purge sets
-- wrapped_key to NULL: every backup encrypted with that key becomes unreadable.
CREATE TABLE IF NOT EXISTS @schema@.tenant_keys (
    key_id        text PRIMARY KEY,
    tenant        text NOT NULL,
    wrapped_key   bytea,                      -- NULL once destroyed
    master_key_id text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    destroyed_at  timestamptz,
    destroyed_by  text,
    CHECK ((wrapped_key IS NULL) = (destroyed_at IS NOT NULL))
);
CREATE UNIQUE INDEX IF NOT EXISTS tenant_keys_live ON @schema@.tenant_keys (tenant) WHERE destroyed_at IS NULL;
-- a destroyed key stays destroyed
CREATE OR REPLACE FUNCTION @schema@.tenant_keys_no_resurrect() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.destroyed_at IS NOT NULL THEN
        RAISE EXCEPTION 'tenant data key % was destroyed and cannot be changed', OLD.key_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS tenant_keys_no_resurrect ON @schema@.tenant_keys;
CREATE TRIGGER tenant_keys_no_resurrect BEFORE UPDATE ON @schema@.tenant_keys
    FOR EACH ROW EXECUTE FUNCTION @schema@.tenant_keys_no_resurrect();

-- Third-party demands (proxy/control/demands.py): a request by an authority for
-- one tenant's data, the disclosure grants bound to it, and the tenant notices.
CREATE TABLE IF NOT EXISTS @schema@.demands (
    id            bigserial PRIMARY KEY,
    tenant        text NOT NULL,
    authority     text NOT NULL CHECK (length(btrim(authority)) > 0),
    reference     text NOT NULL CHECK (length(btrim(reference)) > 0),
    gag_until     timestamptz,
    registered_by text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    record        jsonb                       -- the signed demand record
);
CREATE TABLE IF NOT EXISTS @schema@.disclosure_grants (
    id                 bigserial PRIMARY KEY,
    demand_id          bigint NOT NULL REFERENCES @schema@.demands (id),
    tenant             text NOT NULL,
    requester          text NOT NULL,
    reason             text NOT NULL CHECK (length(btrim(reason)) > 0),
    duration_s         integer NOT NULL CHECK (duration_s > 0),
    approvals_required integer NOT NULL CHECK (approvals_required >= 2),
    state              text NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'approved', 'denied', 'expired', 'used')),
    created_at         timestamptz NOT NULL DEFAULT now(),
    pending_until      timestamptz NOT NULL,
    approved_at        timestamptz,
    expires_at         timestamptz,
    ended_at           timestamptz
);
CREATE TABLE IF NOT EXISTS @schema@.disclosure_approvals (
    grant_id   bigint NOT NULL REFERENCES @schema@.disclosure_grants (id),
    approver   text NOT NULL,
    decision   text NOT NULL CHECK (decision IN ('approve', 'deny')),
    comment    text,
    decided_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (grant_id, approver)
);
CREATE TABLE IF NOT EXISTS @schema@.demand_notices (
    id          bigserial PRIMARY KEY,
    demand_id   bigint NOT NULL REFERENCES @schema@.demands (id),
    tenant      text NOT NULL,
    due_at      timestamptz NOT NULL,          -- registration, or the end of the gag
    state       text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'sent')),
    attempts    integer NOT NULL DEFAULT 0,
    last_error  text,
    sent_at     timestamptz
);
CREATE INDEX IF NOT EXISTS demand_notices_due ON @schema@.demand_notices (due_at) WHERE state = 'pending';
-- (no schema_version row of its own: these tables are created on first use too,
-- proxy.control.demands.ensure_schema, and other sections may claim version 3)
-- ---------------------------------------------------------------- tenant placement (issue 19, part 1)
-- Where each tenant's data lives (proxy/control/placement.py, docs/scale-out.md): a region, which
-- names a backend entry of the config (regions: {name: backend}).  A tenant without a row is in
-- the config's placement.default_region.  `moving` is set while `tenant move` copies the tenant.
CREATE TABLE IF NOT EXISTS @schema@.placements (
    tenant      text PRIMARY KEY,
    region      text NOT NULL CHECK (region ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    moving      boolean NOT NULL DEFAULT false,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text NOT NULL
);
REVOKE ALL ON @schema@.placements FROM PUBLIC;
-- Operator residency: the regions whose tenants an account may be granted (NULL: every region).
ALTER TABLE @schema@.operators ADD COLUMN IF NOT EXISTS regions text[];

-- Every instance learns a placement change (kind 'placement') and re-routes new sessions.
CREATE OR REPLACE FUNCTION @schema@.notify_placement() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('@channel@', json_build_object(
        'kind', 'placement', 'tenant', r.tenant,
        'region', CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE r.region END,
        'moving', CASE WHEN TG_OP = 'DELETE' THEN false ELSE r.moving END)::text);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS placements_notify ON @schema@.placements;
CREATE TRIGGER placements_notify AFTER INSERT OR UPDATE OR DELETE ON @schema@.placements
    FOR EACH ROW EXECUTE FUNCTION @schema@.notify_placement();

-- Online tenant moves (proxy/lifecycle/move.py, `tenantgate tenant move`): one row per move, the
-- step it reached, so a killed move can be resumed or rolled back (--resume / --abort).  The
-- publication (on the source) and the subscription (on the target) are named after the move.
CREATE TABLE IF NOT EXISTS @schema@.tenant_moves (
    id            bigserial PRIMARY KEY,
    tenant        text NOT NULL,
    source_region text NOT NULL,
    target_region text NOT NULL CHECK (target_region <> source_region),
    step          text NOT NULL DEFAULT 'requested'
                  CHECK (step IN ('requested', 'approved', 'checked', 'copying', 'synced', 'cutover',
                                  'flipped', 'cleaned', 'done', 'aborting', 'aborted')),
    publication   text NOT NULL,
    subscription  text NOT NULL,
    requested_by  text NOT NULL,
    approved_by   text CHECK (approved_by IS NULL OR approved_by <> requested_by),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    flipped_at    timestamptz,
    finished_at   timestamptz,
    error         text,
    detail        jsonb NOT NULL DEFAULT '{}'::jsonb
);
-- at most one unfinished move per tenant
CREATE UNIQUE INDEX IF NOT EXISTS tenant_moves_open ON @schema@.tenant_moves (tenant)
    WHERE step NOT IN ('done', 'aborted');

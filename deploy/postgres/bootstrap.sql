-- tenantgate hardened bootstrap for the application database.
--
-- Run as a superuser, connected to the APPLICATION database, after the
-- application's migrations (rerun after every migration: it is idempotent):
--
--   psql -X -1 -v ON_ERROR_STOP=1 \
--        -v app_password="$TENANTGATE_APP_PASSWORD" \
--        -v control_password="$TENANTGATE_CONTROL_PASSWORD" \
--        [-v tenant_column=tenant_id] [-v app_schemas=public] \
--        -d "$APP_DATABASE" -f deploy/postgres/bootstrap.sql
--
-- or with the passwords in TENANTGATE_APP_PASSWORD / TENANTGATE_CONTROL_PASSWORD
-- in the environment instead of -v (psql 15's \getenv).
--
-- (proxy/bootstrap.py's apply_bootstrap() does exactly this.)  The passwords
-- may be plaintext or ready-made SCRAM-SHA-256 verifiers; either way only a
-- SCRAM verifier is stored.
--
-- What it sets up:
--   * tenantgate_app      the least-privileged role tenantgate uses for tenant
--                         and operator sessions: LOGIN, no superuser,
--                         CREATEDB, CREATEROLE, REPLICATION or BYPASSRLS, member
--                         of no role (so none of pg_read_server_files,
--                         pg_write_server_files, pg_execute_server_program,
--                         pg_read_all_data, ...), SELECT/INSERT/UPDATE/DELETE on
--                         the application tables (never TRUNCATE, which ignores
--                         row-level security), USAGE on their sequences.
--   * tenantgate_control  owns schema tenantgate_control (grants, operators,
--                         audit, tenant lifecycle); tenantgate_app has no
--                         privilege there at all.
--   * CREATE on the application schemas (public included) is revoked from PUBLIC.
--   * Row-level security, enabled AND forced (the table owner is subject too),
--     on every tenant table: every ordinary or partitioned table in the
--     application schemas that has the tenant column.  Two policies keyed on
--     the GUC tenantgate sets for each session, tenantgate.tenant_id:
--       tenantgate_tenant_access     PERMISSIVE  (grants access to the tenant's rows)
--       tenantgate_tenant_isolation  RESTRICTIVE (no other permissive policy can
--                                                 widen access beyond the tenant)
--     The policies trust no setting SQL can change: they call the guard's
--     SECURITY DEFINER functions (section 0, "the backstop"), which return the
--     tenant tenantgate bound to THIS backend with a MAC only the guard can
--     check:
--       tenantgate_tenant_access     PERMISSIVE  FOR ALL USING (true) WITH CHECK (true)
--                                    (PostgreSQL needs one permissive policy;
--                                    the restrictive ones below do the filtering,
--                                    and nothing ORed beside it can widen them)
--       tenantgate_tenant_isolation  RESTRICTIVE FOR ALL
--                                    USING (tenant_id = (SELECT tenantgate_guard.current_tenant()))
--                                    WITH CHECK (tenant_id = (SELECT tenantgate_guard.current_writer()))
--       tenantgate_tenant_update     RESTRICTIVE FOR UPDATE USING (... current_writer())
--       tenantgate_tenant_delete     RESTRICTIVE FOR DELETE USING (... current_writer())
--     the function's result cast to the column's type; `(SELECT ...)` makes it
--     an initplan, evaluated once per statement.  Unbound, forged, replayed or
--     stale binding: no row is visible and no row can be written; a binding of
--     mode 'read' (operator read grants, offboarded tenants) sees the tenant's
--     rows and writes none.
--   * tenantgate_guard    NOLOGIN role owning schema tenantgate_guard: the
--                         backstop key and the bindings (see section 0).
--   * Cross-tenant channels PostgreSQL opens to PUBLIC are closed (section 6):
--     other sessions' activity, locks and statistics, large objects, TEMP,
--     advisory locks, pg_notify, setseed, prepared transactions, signalling
--     other backends, sequences' last values.  docs/security.md lists them.
--
-- The tenant tables must NOT be owned by tenantgate_app (an owner can switch
-- RLS off); the bootstrap stops with an error if one is.

\set ON_ERROR_STOP on

-- Passwords may also come from the environment (keeps them off psql's command line).
\if :{?app_password}
\else
\getenv app_password TENANTGATE_APP_PASSWORD
\endif
\if :{?control_password}
\else
\getenv control_password TENANTGATE_CONTROL_PASSWORD
\endif

\if :{?app_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'bootstrap.sql: pass -v app_password=... (and -v control_password=...)'; END $$;
\endif
\if :{?control_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'bootstrap.sql: pass -v control_password=...'; END $$;
\endif
\if :{?backstop_key}
\else
\getenv backstop_key TENANTGATE_BACKSTOP_KEY
\endif
\if :{?backstop_key}
\else
\set backstop_key ''
\endif
\if :{?tenant_column}
\else
\set tenant_column tenant_id
\endif
\if :{?app_schemas}
\else
\set app_schemas public
\endif

-- Parameters for the DO blocks below (psql variables are not expanded inside them).
SELECT set_config('tenantgate.bootstrap_tenant_column', :'tenant_column', false) AS tenant_column_set,
       set_config('tenantgate.bootstrap_schemas', :'app_schemas', false) AS schemas_set,
       set_config('tenantgate.bootstrap_backstop_key', :'backstop_key', false) IS NOT NULL AS key_set \gset bootstrap_

SET password_encryption = 'scram-sha-256';

-- 1. Roles -------------------------------------------------------------------
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tenantgate_app') THEN
        CREATE ROLE tenantgate_app;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tenantgate_control') THEN
        CREATE ROLE tenantgate_control;
    END IF;
END $$;

ALTER ROLE tenantgate_app WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    INHERIT PASSWORD :'app_password';
ALTER ROLE tenantgate_control WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    INHERIT PASSWORD :'control_password';

-- Neither role is a member of any other role: no pg_read_server_files,
-- pg_write_server_files, pg_execute_server_program, pg_read_all_data,
-- pg_write_all_data, pg_monitor, ..., and no table-owner role.
DO $$
DECLARE
    m record;
BEGIN
    FOR m IN
        SELECT g.rolname AS granted, u.rolname AS member
          FROM pg_auth_members am
          JOIN pg_roles g ON g.oid = am.roleid
          JOIN pg_roles u ON u.oid = am.member
         WHERE u.rolname IN ('tenantgate_app', 'tenantgate_control')
    LOOP
        EXECUTE format('REVOKE %I FROM %I', m.granted, m.member);
    END LOOP;
END $$;

-- 0. The backstop: a tenant binding SQL cannot forge ---------------------------
-- Role tenantgate_guard (NOLOGIN; tenantgate_app is not a member) owns schema
-- tenantgate_guard with the backstop key and the bindings.  tenantgate binds a
-- backend connection to a tenant by calling
--     tenantgate_guard.bind(tenant, mode, nonce, mac)
-- mac = hex(HMAC-SHA256(key, "<len(tenant)>:<tenant>|<mode>|<pid>|<backend start, us since epoch>|<nonce>")),
-- computed by tenantgate with the same key (config backstop.key / key_file).
-- bind checks the MAC against THIS backend (pid and start time, so a value
-- captured on another backend, or before the pid was reused, is refused) and
-- that the nonce is greater than the last one accepted on this backend (so an
-- earlier binding of the same backend cannot be replayed), then records the
-- binding in an UNLOGGED table only the guard can write.  The policies read it
-- through current_tenant()/current_writer(), once per statement.  A
-- set_config/SET/RESET/DISCARD changes nothing here; SET ROLE/SET SESSION
-- AUTHORIZATION are impossible for tenantgate_app (member of no role, not
-- superuser).  The key never leaves the guard's table (no grant on it).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tenantgate_guard') THEN
        CREATE ROLE tenantgate_guard;
    END IF;
END $$;
ALTER ROLE tenantgate_guard WITH NOLOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT;
-- the guard reads its own callers' backend_start (pg_stat_get_activity hides it from other roles)
GRANT pg_read_all_stats TO tenantgate_guard;
DO $$
DECLARE
    m record;
BEGIN
    -- nobody may act as the guard
    FOR m IN
        SELECT u.rolname AS member FROM pg_auth_members am
          JOIN pg_roles u ON u.oid = am.member
         WHERE am.roleid = 'tenantgate_guard'::regrole
    LOOP
        EXECUTE format('REVOKE tenantgate_guard FROM %I', m.member);
    END LOOP;
END $$;

CREATE SCHEMA IF NOT EXISTS tenantgate_guard AUTHORIZATION tenantgate_guard;
ALTER SCHEMA tenantgate_guard OWNER TO tenantgate_guard;
REVOKE ALL ON SCHEMA tenantgate_guard FROM PUBLIC;
GRANT USAGE ON SCHEMA tenantgate_guard TO PUBLIC;

CREATE TABLE IF NOT EXISTS tenantgate_guard.key (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    k_ipad bytea NOT NULL,      -- key XOR 0x36.. (HMAC inner pad)
    k_opad bytea NOT NULL,      -- key XOR 0x5c.. (HMAC outer pad)
    key_id text NOT NULL,       -- first 16 hex digits of sha256(key): tells which key is installed
    set_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE tenantgate_guard.key OWNER TO tenantgate_guard;
REVOKE ALL ON tenantgate_guard.key FROM PUBLIC;

CREATE UNLOGGED TABLE IF NOT EXISTS tenantgate_guard.binding (
    pid integer PRIMARY KEY,
    backend_start bigint NOT NULL,
    client_port integer NOT NULL,   -- -1 on a unix socket
    tenant text,
    mode text NOT NULL CHECK (mode IN ('read', 'write', 'none')),
    nonce bigint NOT NULL,
    bound_at timestamptz NOT NULL DEFAULT now(),
    -- SET LOCAL tenantgate.tenant: a binding for one transaction only
    local_xid xid8,
    local_tenant text,
    local_mode text CHECK (local_mode IN ('read', 'write', 'none'))
);
ALTER TABLE tenantgate_guard.binding OWNER TO tenantgate_guard;
ALTER TABLE tenantgate_guard.binding ADD COLUMN IF NOT EXISTS local_xid xid8;
ALTER TABLE tenantgate_guard.binding ADD COLUMN IF NOT EXISTS local_tenant text;
ALTER TABLE tenantgate_guard.binding ADD COLUMN IF NOT EXISTS local_mode text;
REVOKE ALL ON tenantgate_guard.binding FROM PUBLIC;

-- Install or rotate the key (-v backstop_key=<hex, at least 32 bytes> or TENANTGATE_BACKSTOP_KEY).
DO $$
DECLARE
    hexkey text := current_setting('tenantgate.bootstrap_backstop_key');
    k bytea;
    ipad bytea := '\x'::bytea;
    opad bytea := '\x'::bytea;
BEGIN
    IF hexkey IS NULL OR hexkey = '' THEN
        IF NOT EXISTS (SELECT 1 FROM tenantgate_guard.key) THEN
            RAISE WARNING 'tenantgate: no backstop key given (-v backstop_key=<hex> or TENANTGATE_BACKSTOP_KEY) and none installed: no tenant can be bound, so tenant tables show no rows to tenantgate_app';
        END IF;
        RETURN;
    END IF;
    BEGIN
        k := decode(hexkey, 'hex');
    EXCEPTION WHEN others THEN
        RAISE EXCEPTION 'bootstrap.sql: backstop_key must be hexadecimal';
    END;
    IF length(k) < 32 OR length(k) > 64 THEN
        RAISE EXCEPTION 'bootstrap.sql: backstop_key must be 32 to 64 bytes (64 to 128 hex digits)';
    END IF;
    k := k || decode(repeat('00', 64 - length(k)), 'hex');
    FOR i IN 0..63 LOOP
        ipad := ipad || set_byte('\x00'::bytea, 0, get_byte(k, i) # 54);
        opad := opad || set_byte('\x00'::bytea, 0, get_byte(k, i) # 92);
    END LOOP;
    INSERT INTO tenantgate_guard.key (one, k_ipad, k_opad, key_id)
    VALUES (true, ipad, opad, left(encode(sha256(decode(hexkey, 'hex')), 'hex'), 16))
    ON CONFLICT (one) DO UPDATE SET k_ipad = EXCLUDED.k_ipad, k_opad = EXCLUDED.k_opad,
                                    key_id = EXCLUDED.key_id, set_at = now();
END $$;
SELECT set_config('tenantgate.bootstrap_backstop_key', '', false) IS NOT NULL AS key_cleared \gset bootstrap_

-- This backend's start time in microseconds since the epoch (what the MAC covers).
CREATE OR REPLACE FUNCTION tenantgate_guard.backend_start() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT (extract(epoch FROM a.backend_start) * 1000000)::bigint
        FROM pg_catalog.pg_stat_get_activity(pg_catalog.pg_backend_pid()) a $$;

DROP FUNCTION IF EXISTS tenantgate_guard.bind(text, text, bigint, text);
-- p_local: for the current transaction only (SET LOCAL tenantgate.tenant); the MAC then covers "|local".
CREATE OR REPLACE FUNCTION tenantgate_guard.bind(p_tenant text, p_mode text, p_nonce bigint, p_mac text,
                                                 p_local boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    me integer := pg_backend_pid();
    started bigint := tenantgate_guard.backend_start();
    port integer := coalesce(inet_client_port(), -1);
    k record;
    prev record;
    msg text;
BEGIN
    IF p_mode IS NULL OR p_mode NOT IN ('read', 'write', 'none') OR p_nonce IS NULL OR p_mac IS NULL
       OR (p_mode <> 'none' AND (p_tenant IS NULL OR p_tenant = '')) THEN
        RAISE EXCEPTION 'tenantgate backstop: malformed binding' USING ERRCODE = '28000';
    END IF;
    SELECT * INTO k FROM tenantgate_guard.key;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenantgate backstop: no key installed'
            USING ERRCODE = '28000', HINT = 'rerun deploy/postgres/bootstrap.sql with -v backstop_key=<the proxy''s backstop key>';
    END IF;
    msg := length(coalesce(p_tenant, '')) || ':' || coalesce(p_tenant, '') || '|' || p_mode || '|' || me
           || '|' || started || '|' || p_nonce || CASE WHEN p_local THEN '|local' ELSE '' END;
    IF encode(sha256(k.k_opad || sha256(k.k_ipad || convert_to(msg, 'UTF8'))), 'hex') <> lower(p_mac) THEN
        RAISE EXCEPTION 'tenantgate backstop: binding refused (its MAC does not match this backend and the installed key)'
            USING ERRCODE = '28000';
    END IF;
    SELECT * INTO prev FROM tenantgate_guard.binding b WHERE b.pid = me FOR UPDATE;
    IF FOUND AND prev.backend_start = started AND p_nonce <= prev.nonce THEN
        RAISE EXCEPTION 'tenantgate backstop: binding refused (replayed or stale nonce)' USING ERRCODE = '28000';
    END IF;
    IF p_local THEN
        IF NOT FOUND OR prev.backend_start <> started THEN
            RAISE EXCEPTION 'tenantgate backstop: a transaction binding needs a session binding first' USING ERRCODE = '28000';
        END IF;
        UPDATE tenantgate_guard.binding b SET nonce = p_nonce, local_xid = pg_current_xact_id(),
               local_tenant = CASE WHEN p_mode = 'none' THEN NULL ELSE p_tenant END, local_mode = p_mode
         WHERE b.pid = me;
        RETURN true;
    END IF;
    IF NOT FOUND OR prev.backend_start <> started THEN
        -- a new backend: forget bindings of backends that are gone.  Not those bound after this
        -- transaction began: this backend's activity snapshot (taken at its first look, in
        -- backend_start()) does not list backends started since, and many new pool connections
        -- binding at once would otherwise delete each other's fresh bindings (their sessions'
        -- writes then fail the RLS WITH CHECK).  Found by the catalog2 branch's 16-client test.
        DELETE FROM tenantgate_guard.binding b
         WHERE b.pid <> me AND b.bound_at < now() AND NOT EXISTS (
               SELECT 1 FROM pg_stat_get_activity(NULL) a
                WHERE a.pid = b.pid AND (extract(epoch FROM a.backend_start) * 1000000)::bigint = b.backend_start);
    END IF;
    INSERT INTO tenantgate_guard.binding AS b (pid, backend_start, client_port, tenant, mode, nonce, bound_at)
    VALUES (me, started, port, CASE WHEN p_mode = 'none' THEN NULL ELSE p_tenant END, p_mode, p_nonce, now())
    ON CONFLICT (pid) DO UPDATE SET backend_start = EXCLUDED.backend_start, client_port = EXCLUDED.client_port,
        tenant = EXCLUDED.tenant, mode = EXCLUDED.mode, nonce = EXCLUDED.nonce, bound_at = EXCLUDED.bound_at,
        local_xid = NULL, local_tenant = NULL, local_mode = NULL;
    RETURN true;
END $$;

-- The hot path: no SET clause (it would cost a GUC save/restore per call), so
-- every name is schema-qualified, operators included.  STABLE: it reads with
-- the statement's snapshot, which holds every binding committed before the
-- statement began and, inside a transaction, the transaction's own SET LOCAL
-- binding (bindings are made between statements, never during one).  Once per
-- statement: `(SELECT ...)` is an initplan.
CREATE OR REPLACE FUNCTION tenantgate_guard.current_tenant() RETURNS pg_catalog.text
LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER
AS $$
DECLARE
    b record;
BEGIN
    SELECT g.tenant, g.mode, g.local_xid, g.local_tenant, g.local_mode INTO b FROM tenantgate_guard.binding g
     WHERE g.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
       AND g.client_port OPERATOR(pg_catalog.=) COALESCE(pg_catalog.inet_client_port(), -1);
    IF b.local_xid IS NOT NULL AND b.local_xid OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id_if_assigned() THEN
        RETURN b.local_tenant;
    END IF;
    RETURN b.tenant;
END $$;

CREATE OR REPLACE FUNCTION tenantgate_guard.current_writer() RETURNS pg_catalog.text
LANGUAGE plpgsql STABLE PARALLEL RESTRICTED SECURITY DEFINER
AS $$
DECLARE
    b record;
BEGIN
    SELECT g.tenant, g.mode, g.local_xid, g.local_tenant, g.local_mode INTO b FROM tenantgate_guard.binding g
     WHERE g.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
       AND g.client_port OPERATOR(pg_catalog.=) COALESCE(pg_catalog.inet_client_port(), -1);
    IF b.local_xid IS NOT NULL AND b.local_xid OPERATOR(pg_catalog.=) pg_catalog.pg_current_xact_id_if_assigned() THEN
        RETURN CASE WHEN b.local_mode OPERATOR(pg_catalog.=) 'write'::pg_catalog.text THEN b.local_tenant END;
    END IF;
    RETURN CASE WHEN b.mode OPERATOR(pg_catalog.=) 'write'::pg_catalog.text THEN b.tenant END;
END $$;

-- "<mode>:<tenant>" of this backend's binding, or NULL (the proxy reads it back after a transaction).
CREATE OR REPLACE FUNCTION tenantgate_guard.current_binding() RETURNS text
LANGUAGE sql STABLE PARALLEL RESTRICTED SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT b.mode || ':' || coalesce(b.tenant, '') FROM tenantgate_guard.binding b
       WHERE b.pid = pg_backend_pid() AND b.client_port = coalesce(inet_client_port(), -1) $$;

CREATE OR REPLACE FUNCTION tenantgate_guard.key_id() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$ SELECT key_id FROM tenantgate_guard.key $$;

DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
              WHERE p.pronamespace = 'tenantgate_guard'::regnamespace
    LOOP
        EXECUTE format('ALTER FUNCTION %s OWNER TO tenantgate_guard', f.sig);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.sig);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO PUBLIC', f.sig);
    END LOOP;
END $$;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) TO tenantgate_guard;

-- 2. The control schema --------------------------------------------------------
CREATE SCHEMA IF NOT EXISTS tenantgate_control AUTHORIZATION tenantgate_control;
ALTER SCHEMA tenantgate_control OWNER TO tenantgate_control;
REVOKE ALL ON SCHEMA tenantgate_control FROM PUBLIC;
REVOKE ALL ON SCHEMA tenantgate_control FROM tenantgate_app;
REVOKE ALL ON ALL TABLES IN SCHEMA tenantgate_control FROM PUBLIC, tenantgate_app;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA tenantgate_control FROM PUBLIC, tenantgate_app;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA tenantgate_control FROM PUBLIC, tenantgate_app;
ALTER DEFAULT PRIVILEGES FOR ROLE tenantgate_control REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;

-- 3. Database-level privileges ------------------------------------------------
DO $$
BEGIN
    EXECUTE format('REVOKE CREATE ON DATABASE %I FROM PUBLIC, tenantgate_app', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO tenantgate_app, tenantgate_control', current_database());
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'public') THEN
        REVOKE CREATE ON SCHEMA public FROM PUBLIC;
        REVOKE CREATE ON SCHEMA public FROM tenantgate_app;
    END IF;
END $$;

-- 4. Application schemas: DML privileges and the RLS backstop -----------------
DO $$
DECLARE
    tenant_column text := current_setting('tenantgate.bootstrap_tenant_column');
    schemas text[] := string_to_array(replace(current_setting('tenantgate.bootstrap_schemas'), ' ', ''), ',');
    s text;
    t record;
    pred text;
    wpred text;
    old_policy text;
BEGIN
    IF tenant_column IS NULL OR tenant_column = '' THEN
        RAISE EXCEPTION 'bootstrap.sql: tenant_column must not be empty';
    END IF;
    FOREACH s IN ARRAY schemas LOOP
        IF s = 'tenantgate_control' THEN
            RAISE EXCEPTION 'bootstrap.sql: the control schema cannot be an application schema';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = s) THEN
            RAISE EXCEPTION 'bootstrap.sql: application schema "%" does not exist', s;
        END IF;
        EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC, tenantgate_app', s);
        EXECUTE format('GRANT USAGE ON SCHEMA %I TO tenantgate_app', s);
        EXECUTE format('REVOKE TRUNCATE, REFERENCES, TRIGGER ON ALL TABLES IN SCHEMA %I FROM PUBLIC, tenantgate_app', s);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO tenantgate_app', s);
        -- nextval/currval only: SELECT (last_value) would show other tenants' activity
        EXECUTE format('REVOKE ALL ON ALL SEQUENCES IN SCHEMA %I FROM PUBLIC, tenantgate_app', s);
        EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO tenantgate_app', s);

        FOR t IN
            SELECT c.relname, pg_get_userbyid(c.relowner) AS owner,
                   format_type(a.atttypid, a.atttypmod) AS coltype
              FROM pg_class c
              JOIN pg_namespace n ON n.oid = c.relnamespace
              JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = tenant_column
                                 AND a.attnum > 0 AND NOT a.attisdropped
             WHERE n.nspname = s AND c.relkind IN ('r', 'p')
             ORDER BY c.relname
        LOOP
            IF pg_has_role('tenantgate_app', t.owner, 'MEMBER') THEN
                RAISE EXCEPTION 'bootstrap.sql: tenant table %.% is owned by % (tenantgate_app could switch row-level security off); ALTER TABLE %I.%I OWNER TO <migrations role> first',
                    s, t.relname, t.owner, s, t.relname;
            END IF;
            pred := format('%I = (SELECT tenantgate_guard.current_tenant()::%s)', tenant_column, t.coltype);
            wpred := format('%I = (SELECT tenantgate_guard.current_writer()::%s)', tenant_column, t.coltype);
            EXECUTE format('ALTER TABLE %I.%I ENABLE ROW LEVEL SECURITY', s, t.relname);
            EXECUTE format('ALTER TABLE %I.%I FORCE ROW LEVEL SECURITY', s, t.relname);
            FOR old_policy IN
                SELECT policyname FROM pg_policies
                 WHERE schemaname = s AND tablename = t.relname
                   AND policyname IN ('tenantgate_tenant_access', 'tenantgate_tenant_isolation',
                                      'tenantgate_tenant_update', 'tenantgate_tenant_delete')
            LOOP
                EXECUTE format('DROP POLICY %I ON %I.%I', old_policy, s, t.relname);
            END LOOP;
            EXECUTE format('CREATE POLICY tenantgate_tenant_access ON %I.%I AS PERMISSIVE FOR ALL TO PUBLIC USING (true) WITH CHECK (true)',
                           s, t.relname);
            EXECUTE format('CREATE POLICY tenantgate_tenant_isolation ON %I.%I AS RESTRICTIVE FOR ALL TO PUBLIC USING (%s) WITH CHECK (%s)',
                           s, t.relname, pred, wpred);
            EXECUTE format('CREATE POLICY tenantgate_tenant_update ON %I.%I AS RESTRICTIVE FOR UPDATE TO PUBLIC USING (%s)',
                           s, t.relname, wpred);
            EXECUTE format('CREATE POLICY tenantgate_tenant_delete ON %I.%I AS RESTRICTIVE FOR DELETE TO PUBLIC USING (%s)',
                           s, t.relname, wpred);
            RAISE NOTICE 'tenantgate: row-level security on %.% (tenant column %, %)', s, t.relname, tenant_column, t.coltype;
        END LOOP;
    END LOOP;
END $$;

-- 5. COPY FROM STDIN under row-level security ---------------------------------
-- PostgreSQL refuses COPY FROM into a table with row-level security for roles
-- subject to it ("COPY FROM not supported with row-level security").  For
-- every tenant table the bootstrap makes a view in schema tenantgate_copy
-- (named "<schema>.<table>") with the table's columns and defaults and an
-- INSTEAD OF INSERT trigger that inserts each row into the table as the
-- invoking role, so the RLS WITH CHECK policy still applies row by row and one
-- bad row aborts the whole COPY.  tenantgate rewrites a tenant session's
-- `COPY t FROM STDIN` to `COPY tenantgate_copy."public.t" FROM STDIN` when the
-- view exists (and checks every row itself first).  Rerun after migrations.
CREATE SCHEMA IF NOT EXISTS tenantgate_copy;
REVOKE ALL ON SCHEMA tenantgate_copy FROM PUBLIC;
GRANT USAGE ON SCHEMA tenantgate_copy TO tenantgate_app;

DO $do$
DECLARE
    tenant_column text := current_setting('tenantgate.bootstrap_tenant_column');
    schemas text[] := string_to_array(replace(current_setting('tenantgate.bootstrap_schemas'), ' ', ''), ',');
    t record;
    col record;
    view_name text;
    fn_name text;
    cols text;
    vals text;
BEGIN
    -- drop what an earlier run made (tables may have changed since)
    FOR t IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'tenantgate_copy' AND c.relkind = 'v'
    LOOP
        EXECUTE format('DROP VIEW tenantgate_copy.%I CASCADE', t.relname);
    END LOOP;
    FOR t IN SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'tenantgate_copy'
    LOOP
        EXECUTE format('DROP FUNCTION tenantgate_copy.%I() CASCADE', t.proname);
    END LOOP;
    FOR t IN
        SELECT n.nspname, c.relname, c.oid
          FROM pg_class c
          JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = tenant_column
                             AND a.attnum > 0 AND NOT a.attisdropped
         WHERE n.nspname = ANY (schemas) AND c.relkind IN ('r', 'p')
         ORDER BY 1, 2
    LOOP
        view_name := t.nspname || '.' || t.relname;
        fn_name := 'insert_' || md5(view_name);
        SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum),
               string_agg('NEW.' || quote_ident(attname), ', ' ORDER BY attnum)
          INTO cols, vals
          FROM pg_attribute
         WHERE attrelid = t.oid AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
        EXECUTE format('CREATE VIEW tenantgate_copy.%I AS SELECT %s FROM %I.%I', view_name, cols, t.nspname, t.relname);
        FOR col IN
            SELECT a.attname, pg_get_expr(d.adbin, d.adrelid) AS dflt, a.attidentity,
                   pg_get_serial_sequence(format('%I.%I', t.nspname, t.relname), a.attname) AS seq
              FROM pg_attribute a
              LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
               AND (d.adbin IS NOT NULL OR a.attidentity <> '')
        LOOP
            EXECUTE format('ALTER VIEW tenantgate_copy.%I ALTER COLUMN %I SET DEFAULT %s', view_name, col.attname,
                           CASE WHEN col.attidentity <> '' THEN format('nextval(%L::regclass)', col.seq) ELSE col.dflt END);
        END LOOP;
        EXECUTE format($f$CREATE FUNCTION tenantgate_copy.%I() RETURNS trigger LANGUAGE plpgsql SECURITY INVOKER
                          SET search_path = pg_catalog AS $body$
                          BEGIN
                              INSERT INTO %I.%I (%s) OVERRIDING SYSTEM VALUE VALUES (%s);
                              RETURN NEW;
                          END $body$ $f$, fn_name, t.nspname, t.relname, cols, vals);
        EXECUTE format('CREATE TRIGGER tenantgate_copy_insert INSTEAD OF INSERT ON tenantgate_copy.%I '
                       'FOR EACH ROW EXECUTE FUNCTION tenantgate_copy.%I()', view_name, fn_name);
        EXECUTE format('REVOKE ALL ON tenantgate_copy.%I FROM PUBLIC', view_name);
        EXECUTE format('GRANT INSERT ON tenantgate_copy.%I TO tenantgate_app', view_name);
        EXECUTE format('REVOKE ALL ON FUNCTION tenantgate_copy.%I() FROM PUBLIC', fn_name);
        EXECUTE format('GRANT EXECUTE ON FUNCTION tenantgate_copy.%I() TO tenantgate_app', fn_name);
    END LOOP;
END $do$;

-- 6. Cross-tenant channels PostgreSQL opens to PUBLIC ---------------------------
-- Every tenant's statements run as the same role (tenantgate_app), so anything
-- PostgreSQL shares between sessions of one role, or grants to PUBLIC, is a
-- channel between tenants when SQL slips past the proxy.  Closed here (in this
-- database: pg_proc and the system views' ACLs are per database), checked by
-- `tenantgate doctor` (proxy/doctor.py, "channel.*"), listed in
-- docs/security.md.  tenantgate_control keeps no access to any of it either.
DO $$
DECLARE
    f record;
    v text;
BEGIN
    -- TEMP: temporary tables, views and functions (pg_temp is searched before
    -- everything for relations, and is a place to create objects at all)
    EXECUTE format('REVOKE TEMP ON DATABASE %I FROM PUBLIC, tenantgate_app, tenantgate_control', current_database());

    -- functions: other sessions' activity, locks and statistics; large objects;
    -- advisory locks; pg_notify; setseed; prepared transactions; signalling
    -- other backends of the same role; sequences' last values; xid status
    FOR f IN
        SELECT p.oid::regprocedure AS sig
          FROM pg_proc p
         WHERE p.pronamespace = 'pg_catalog'::regnamespace
           AND (p.proname LIKE 'pg\_stat\_get\_%' OR p.proname LIKE 'pg\_stat\_statements%'
                OR p.proname LIKE 'lo\_%' OR p.proname IN ('loread', 'lowrite')
                OR ((p.proname LIKE 'pg\_advisory%' OR p.proname LIKE 'pg\_try\_advisory%')
                    AND p.proname <> 'pg_advisory_unlock_all')  -- own session's locks only (asyncpg's reset)
                OR p.proname IN ('pg_notify', 'setseed', 'pg_prepared_xact', 'pg_lock_status',
                                 'pg_blocking_pids', 'pg_safe_snapshot_blocking_pids',
                                 'pg_isolation_test_session_is_blocked',
                                 'pg_cancel_backend', 'pg_terminate_backend',
                                 'pg_sequence_last_value', 'pg_listening_channels',
                                 'pg_notification_queue_usage', 'pg_xact_status', 'txid_status',
                                 'pg_get_backend_memory_contexts', 'pg_log_backend_memory_contexts',
                                 'pg_cursor', 'pg_prepared_statement'))
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.sig);
    END LOOP;
    -- extensions' copies (pg_stat_statements, dblink, ...) wherever they are installed
    FOR f IN
        SELECT p.oid::regprocedure AS sig
          FROM pg_proc p JOIN pg_depend d ON d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid
         WHERE e.extname IN ('pg_stat_statements', 'dblink', 'postgres_fdw', 'file_fdw', 'adminpack', 'lo',
                             'pg_buffercache', 'pg_visibility', 'pgstattuple', 'pageinspect', 'pg_freespacemap')
    LOOP
        EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM PUBLIC', f.sig);
    END LOOP;

    -- views over the same data
    FOR v IN
        SELECT format('%I.%I', n.nspname, c.relname)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = 'pg_catalog' AND c.relkind IN ('v', 'r')
           AND ((c.relkind = 'v' AND (c.relname LIKE 'pg\_stat\_%' OR c.relname LIKE 'pg\_statio\_%'))
                OR c.relname IN ('pg_locks', 'pg_prepared_xacts', 'pg_largeobject_metadata', 'pg_sequences',
                                 'pg_stats', 'pg_stats_ext', 'pg_stats_ext_exprs', 'pg_backend_memory_contexts',
                                 'pg_cursors', 'pg_prepared_statements'))
    LOOP
        EXECUTE format('REVOKE SELECT ON %s FROM PUBLIC', v);
    END LOOP;
    FOR v IN
        SELECT format('%I.%I', n.nspname, c.relname)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e'
          JOIN pg_extension e ON e.oid = d.refobjid
         WHERE e.extname IN ('pg_stat_statements', 'pg_buffercache') AND c.relkind = 'v'
    LOOP
        EXECUTE format('REVOKE SELECT ON %s FROM PUBLIC', v);
    END LOOP;

    -- foreign data wrappers (dblink_fdw, postgres_fdw, file_fdw): no USAGE for PUBLIC
    FOR v IN SELECT quote_ident(fdwname) FROM pg_foreign_data_wrapper LOOP
        EXECUTE format('REVOKE USAGE ON FOREIGN DATA WRAPPER %s FROM PUBLIC', v);
    END LOOP;
    -- procedural languages beyond the defaults: no USAGE for PUBLIC (untrusted ones never had it)
    FOR v IN SELECT quote_ident(lanname) FROM pg_language WHERE lanpltrusted AND lanname NOT IN ('sql', 'plpgsql')
    LOOP
        EXECUTE format('REVOKE USAGE ON LANGUAGE %s FROM PUBLIC', v);
    END LOOP;
END $$;

-- The guard itself still reads its callers' start time; the control role (trusted, never
-- used for tenant SQL) keeps advisory locks and pg_notify, which the control plane uses.
GRANT EXECUTE ON FUNCTION pg_catalog.pg_stat_get_activity(integer) TO tenantgate_guard;
DO $$
DECLARE
    f record;
BEGIN
    FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
              WHERE p.pronamespace = 'pg_catalog'::regnamespace
                AND (p.proname LIKE 'pg\_advisory%' OR p.proname LIKE 'pg\_try\_advisory%' OR p.proname = 'pg_notify')
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO tenantgate_control', f.sig);
    END LOOP;
END $$;

-- 7. Catalog changes reach every tenantgate instance within a second -------------
-- Migrations run straight on PostgreSQL.  This event trigger NOTIFYs channel
-- tenantgate_catalog after every DDL command; each tenantgate instance LISTENs on
-- it (as tenantgate_app) and reloads its catalog snapshot.  (A statement naming a
-- relation the snapshot lacks also waits for a fresh one before it is refused.)
-- SECURITY DEFINER as the guard: pg_notify is revoked from PUBLIC above.
CREATE OR REPLACE FUNCTION tenantgate_guard.notify_catalog_change() RETURNS event_trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('tenantgate_catalog', tg_tag);
END $$;
REVOKE ALL ON FUNCTION tenantgate_guard.notify_catalog_change() FROM PUBLIC;
-- every function of the guard's schema is the guard's own (doctor checks it); the guard may notify
ALTER FUNCTION tenantgate_guard.notify_catalog_change() OWNER TO tenantgate_guard;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_notify(text, text) TO tenantgate_guard;
DROP EVENT TRIGGER IF EXISTS tenantgate_catalog_notify;
CREATE EVENT TRIGGER tenantgate_catalog_notify ON ddl_command_end
    EXECUTE FUNCTION tenantgate_guard.notify_catalog_change();
DROP EVENT TRIGGER IF EXISTS tenantgate_catalog_notify_drop;
CREATE EVENT TRIGGER tenantgate_catalog_notify_drop ON sql_drop
    EXECUTE FUNCTION tenantgate_guard.notify_catalog_change();

-- 8. A purge ends every backend bound to the tenant ------------------------------
-- Before a purge deletes, each backend connection the backstop has bound to the
-- tenant (operator sessions under a grant, tenant sessions, pooled connections)
-- is terminated and waited for, on every proxy at once: a statement already
-- running cannot commit a row after the purge counted zero.  Run by the purge's
-- role (lifecycle.data_dsn); GRANT EXECUTE to it when it is not a superuser.
-- (pg_read_all_stats: to tell a bound backend from a later one that reuses its pid)
GRANT pg_signal_backend, pg_read_all_stats TO tenantgate_guard;
GRANT EXECUTE ON FUNCTION pg_catalog.pg_terminate_backend(integer, bigint) TO tenantgate_guard;
CREATE OR REPLACE FUNCTION tenantgate_guard.end_tenant_backends(p_tenant text, p_timeout_ms integer DEFAULT 5000)
    RETURNS integer LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    r record;
    n integer := 0;
BEGIN
    FOR r IN SELECT b.pid FROM tenantgate_guard.binding b
               JOIN pg_catalog.pg_stat_get_activity(NULL) a
                 ON a.pid = b.pid AND (extract(epoch FROM a.backend_start) * 1000000)::bigint = b.backend_start
              WHERE (b.tenant = p_tenant OR b.local_tenant = p_tenant) AND b.pid <> pg_catalog.pg_backend_pid()
    LOOP
        -- waits up to p_timeout_ms for the backend to be gone (its transaction rolled back)
        IF pg_catalog.pg_terminate_backend(r.pid, p_timeout_ms) THEN
            n := n + 1;
        END IF;
    END LOOP;
    RETURN n;
EXCEPTION WHEN insufficient_privilege THEN
    RAISE EXCEPTION 'tenantgate_guard.end_tenant_backends: the guard may not end a backend of this tenant'
        USING ERRCODE = 'insufficient_privilege', HINT = 'GRANT pg_signal_backend TO tenantgate_guard';
END $$;
ALTER FUNCTION tenantgate_guard.end_tenant_backends(text, integer) OWNER TO tenantgate_guard;
REVOKE ALL ON FUNCTION tenantgate_guard.end_tenant_backends(text, integer) FROM PUBLIC;

RESET password_encryption;

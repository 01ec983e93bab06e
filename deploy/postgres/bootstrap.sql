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
--     both USING (tenant_id = current_setting('tenantgate.tenant_id', true))
--     WITH CHECK (the same), the setting cast to the column's type.  With the
--     GUC unset or empty, no row is visible and no row can be written.
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
       set_config('tenantgate.bootstrap_schemas', :'app_schemas', false) AS schemas_set \gset bootstrap_

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
        EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA %I TO tenantgate_app', s);

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
            pred := format('%I = NULLIF(current_setting(%L, true), %L)::%s',
                           tenant_column, 'tenantgate.tenant_id', '', t.coltype);
            EXECUTE format('ALTER TABLE %I.%I ENABLE ROW LEVEL SECURITY', s, t.relname);
            EXECUTE format('ALTER TABLE %I.%I FORCE ROW LEVEL SECURITY', s, t.relname);
            FOR old_policy IN
                SELECT policyname FROM pg_policies
                 WHERE schemaname = s AND tablename = t.relname
                   AND policyname IN ('tenantgate_tenant_access', 'tenantgate_tenant_isolation')
            LOOP
                EXECUTE format('DROP POLICY %I ON %I.%I', old_policy, s, t.relname);
            END LOOP;
            EXECUTE format('CREATE POLICY tenantgate_tenant_access ON %I.%I AS PERMISSIVE FOR ALL TO PUBLIC USING (%s) WITH CHECK (%s)',
                           s, t.relname, pred, pred);
            EXECUTE format('CREATE POLICY tenantgate_tenant_isolation ON %I.%I AS RESTRICTIVE FOR ALL TO PUBLIC USING (%s) WITH CHECK (%s)',
                           s, t.relname, pred, pred);
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

RESET password_encryption;

#!/bin/sh
# Runs once at the first start of the postgres container (docker-entrypoint-initdb.d),
# and by hand after schema migrations:
#   docker compose exec -u postgres postgres sh /docker-entrypoint-initdb.d/20-tenantgate-bootstrap.sh
#
# 1. applies deploy/postgres/bootstrap.sql to the application database (the
#    passwords travel in the environment, read by psql's \getenv);
# 2. renders deploy/postgres/pg_hba.conf.template into $PGDATA/pg_hba.conf:
#    the application database only from tenantgate's address ($TENANTGATE_ADDR),
#    with scram-sha-256 over TLS; local peer for postgres; everything else rejected.
set -eu

dir="${TENANTGATE_POSTGRES_DIR:-/tenantgate/postgres}"
db="${POSTGRES_DB:-app}"
: "${TENANTGATE_ADDR:?set TENANTGATE_ADDR to tenantgate's address, e.g. 172.28.0.10/32}"
: "${PGDATA:?PGDATA is not set}"

TENANTGATE_APP_PASSWORD="$(cat "${TENANTGATE_APP_PASSWORD_FILE:?}")"
TENANTGATE_CONTROL_PASSWORD="$(cat "${TENANTGATE_CONTROL_PASSWORD_FILE:?}")"
export TENANTGATE_APP_PASSWORD TENANTGATE_CONTROL_PASSWORD
if [ -n "${TENANTGATE_BACKSTOP_KEY_FILE:-}" ]; then   # the backstop key, shared with tenantgate's config
    TENANTGATE_BACKSTOP_KEY="$(cat "$TENANTGATE_BACKSTOP_KEY_FILE")"
    export TENANTGATE_BACKSTOP_KEY
fi

psql -X -q -1 -v ON_ERROR_STOP=1 --username "${POSTGRES_USER:-postgres}" --dbname "$db" \
     -f "$dir/bootstrap.sql"

sed -e '/^#/b' \
    -e '/@ADMIN_ADDR@/d' \
    -e 's/@HOST_TYPE@/hostssl/g' \
    -e "s/@APP_DATABASE@/$db/g" \
    -e 's/@APP_ROLES@/tenantgate_app,tenantgate_control/g' \
    -e "s#@TENANTGATE_ADDR@#$TENANTGATE_ADDR#g" \
    -e 's/@LOCAL_AUTH@/peer/g' \
    "$dir/pg_hba.conf.template" > "$PGDATA/pg_hba.conf.new"
mv "$PGDATA/pg_hba.conf.new" "$PGDATA/pg_hba.conf"
# a running server (the rerun case) picks the new rules up
pg_ctl -D "$PGDATA" reload >/dev/null 2>&1 || true
echo "tenantgate: bootstrap applied to database $db; pg_hba.conf admits it only from $TENANTGATE_ADDR"

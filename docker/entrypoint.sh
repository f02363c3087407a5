#!/bin/sh
# Container entrypoint: bring both schemas up to date, then exec the command (gunicorn unless
# the container is started with another one, e.g. the outbox relay).
#
# FHIR_MIGRATE_ON_START=0 skips the schema step. Set it on every container but one when
# several start together (the shipper, app replicas): concurrent migrate runs race each other.
set -eu

# chdb (the embedded ClickHouse) lets only one process open a data path, so more than one
# gunicorn worker would fail on the first request that touches the roster.
case "${CLICKHOUSE_URL:-chdb://}" in
    chdb://*)
        if [ "${WEB_CONCURRENCY:-1}" != "1" ] && [ "${1:-}" = "gunicorn" ]; then
            echo "fhirservice: CLICKHOUSE_URL is chdb (one process per data path):" \
                "set WEB_CONCURRENCY=1 or point CLICKHOUSE_URL at a ClickHouse server" >&2
            exit 64
        fi
        ;;
esac

# Prometheus multiprocess mode (several gunicorn workers, one /metrics): the directory holds
# the workers' counter files and must start empty, or a restart would count twice.
if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ] && [ "${1:-}" = "gunicorn" ]; then
    rm -rf "$PROMETHEUS_MULTIPROC_DIR"
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
fi

if [ "${FHIR_MIGRATE_ON_START:-1}" = "1" ]; then
    python manage.py migrate --noinput
    python manage.py createcachetable  # CACHE_URL=dbcache://…; nothing for other caches
    python manage.py migrate_clickhouse
fi

exec "$@"

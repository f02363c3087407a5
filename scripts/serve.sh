#!/usr/bin/env bash
# `make run`: serve the FHIR API with gunicorn on 127.0.0.1:$PORT.
#
# Access control (FHIR_AUTH) is OFF here unless the caller sets FHIR_AUTH=on: the embedded
# default is a local playground. Production deployments leave FHIR_AUTH unset (= on).
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
PORT=${PORT:-8000}
VENV=${VENV:-.venv}
export FHIR_AUTH=${FHIR_AUTH:-off}
base="http://127.0.0.1:${PORT}/${FHIR_BASE_PATH:-4_0_0}"

# Worker processes: WEB_CONCURRENCY (gunicorn's own variable), one by default. chdb, the
# embedded default, allows one process per data path (threads are fine), so more than one
# worker needs a ClickHouse server (CLICKHOUSE_URL=clickhouse://...).
WORKERS=${WEB_CONCURRENCY:-1}
if [ "$WORKERS" != "1" ]; then
    case "${CLICKHOUSE_URL:-chdb://}" in
        chdb://*)
            echo "serve.sh: CLICKHOUSE_URL is chdb (one process per data path):" \
                "set WEB_CONCURRENCY=1 or point CLICKHOUSE_URL at a ClickHouse server" >&2
            exit 64
            ;;
    esac
    # Several workers, one /metrics: Prometheus multiprocess mode, in a directory that starts
    # empty at each start (or a restart would count twice).
    export PROMETHEUS_MULTIPROC_DIR=${PROMETHEUS_MULTIPROC_DIR:-${FHIR_VAR_DIR:-var}/prometheus}
    rm -rf "$PROMETHEUS_MULTIPROC_DIR"
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
fi

if [ "$FHIR_AUTH" = "off" ]; then
    cat <<BANNER
################################################################################
#  WARNING: ACCESS CONTROL IS OFF (FHIR_AUTH=off).                             #
#  Anyone who can reach this port can read and change ALL data, with no        #
#  token and no organization boundary. Fine for a local playground only.       #
#  Serve with tokens, scopes and boundaries:   FHIR_AUTH=on make run           #
################################################################################
BANNER
else
    cat <<HOWTO
Access control is ON: every FHIR request needs a bearer token (metadata is public).
  1. create a client (prints its id and secret once):
       $VENV/bin/python manage.py create_fhir_client --name my-system \\
           --organization org-a --scopes "system/*.*"
  2. get a token (client-credentials grant):
       curl -s -X POST http://127.0.0.1:${PORT}/oauth/token/ \\
           -u "\$CLIENT_ID:\$CLIENT_SECRET" -d grant_type=client_credentials
  3. call the API:
       curl -s $base/Patient -H "Authorization: Bearer \$ACCESS_TOKEN"
HOWTO
fi
echo "Serving $base/. Defaults: SQLite + chdb under var/ (set DATABASE_URL / CLICKHOUSE_URL to change)."
# The admin's CSS and scripts, gathered into STATIC_ROOT, which WhiteNoise serves: gunicorn
# itself serves no static files.
"$VENV/bin/python" manage.py collectstatic --noinput --verbosity 0
# The worker's heartbeat file, touched on every request, on tmpfs where there is one (as in
# the Docker image): on a disk or overlay file system each touch is file system work inside
# the request's time.
worker_tmp=
if [ -d /dev/shm ] && [ -w /dev/shm ]; then worker_tmp=/dev/shm; fi
# fhirservice.gunicorn_conf: each request thread opens its metadata connection before the
# worker accepts a connection (fhirservice.serving.warm_request_threads).
exec "$VENV/bin/gunicorn" fhirservice.wsgi:application --bind "127.0.0.1:${PORT}" \
    --config python:fhirservice.gunicorn_conf \
    --workers "$WORKERS" --threads 8 ${worker_tmp:+--worker-tmp-dir "$worker_tmp"}

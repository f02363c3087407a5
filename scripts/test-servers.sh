#!/usr/bin/env bash
# Throwaway PostgreSQL and ClickHouse servers for tests and benchmarks.
#
#   scripts/test-servers.sh start DIR   # start both on loopback, all state under DIR
#   scripts/test-servers.sh stop DIR    # stop both (safe to call twice, or after a failed start)
#
# Ports: PG_PORT (55432), CH_TCP_PORT (19000), CH_HTTP_PORT (18123), CH_INTERSERVER_PORT (19009).
# Databases created on start: PG_DATABASE (fhirservice), CH_DATABASE (fhir_test).
# START_TIMEOUT (seconds, 60) bounds the wait for each server.
#
# PostgreSQL: user postgres, trust auth, 127.0.0.1 only; durability is off (fsync etc.)
# because the data is thrown away; PG_OPTS replaces those settings.
# ClickHouse: user default, no password, 127.0.0.1 only; it runs from a config written into
# DIR so that nothing under /etc or /var/lib/clickhouse is read or written.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop DIR" >&2
    exit 2
}
[ $# -eq 2 ] || usage
cmd=$1
dir=$2

PG_PORT=${PG_PORT:-55432}
CH_TCP_PORT=${CH_TCP_PORT:-19000}
CH_HTTP_PORT=${CH_HTTP_PORT:-18123}
CH_INTERSERVER_PORT=${CH_INTERSERVER_PORT:-19009}
PG_DATABASE=${PG_DATABASE:-fhirservice}
CH_DATABASE=${CH_DATABASE:-fhir_test}
START_TIMEOUT=${START_TIMEOUT:-60}
PG_OPTS=${PG_OPTS:--c fsync=off -c synchronous_commit=off -c full_page_writes=off}

die() {
    echo "test-servers: $*" >&2
    exit 1
}
log() { echo "test-servers: $*"; }

# Debian installs the server binaries outside PATH, one directory per major version.
pg_bindir() {
    local d best=""
    for d in /usr/lib/postgresql/*/bin; do
        [ -x "$d/initdb" ] && best=$(printf '%s\n%s\n' "$best" "$d" | sort -V | tail -n 1)
    done
    if [ -z "$best" ]; then
        die "PostgreSQL server not installed (run scripts/bootstrap.sh --servers)"
    fi
    echo "$best"
}

# initdb and postgres refuse to run as root: run them as the postgres system user then.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Prints the last lines of each log given, for error messages.
show_logs() {
    local f
    for f in "$@"; do
        [ -s "$f" ] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2
    done
}

# True when something already accepts TCP connections on 127.0.0.1:$1.
port_busy() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# True when ClickHouse answers /ping on its HTTP port ("Ok.").
ch_http_ok() {
    local reply
    reply=$(
        exec 3<>"/dev/tcp/127.0.0.1/$CH_HTTP_PORT" || exit 1
        printf 'GET /ping HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
        timeout 2 cat <&3
    ) 2>/dev/null || return 1
    [[ $reply == *"Ok."* ]]
}

pid_alive() {
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_postgres() {
    local bin pgdir=$dir/pg
    bin=$(pg_bindir)
    if [ -f "$pgdir/data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$pgdir/data" status >/dev/null 2>&1; then
        log "PostgreSQL already running from $pgdir"
        return
    fi
    if port_busy "$PG_PORT"; then
        die "port $PG_PORT is already in use (another server?); set PG_PORT"
    fi
    mkdir -p "$pgdir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$pgdir"
        # The postgres user must be able to reach DIR (mktemp makes 0700 dirs).
        chmod a+x "$dir"
        as_pg test -x "$pgdir" || die "user postgres cannot enter $pgdir: make its parent directories world-searchable (chmod a+x) or use a DIR under /tmp"
    fi
    if [ ! -f "$pgdir/data/PG_VERSION" ]; then
        as_pg "$bin/initdb" -D "$pgdir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
            >"$pgdir/initdb.log" 2>&1 || { show_logs "$pgdir/initdb.log"; die "initdb failed"; }
    fi
    # The socket goes into DIR too, so nothing under /var/run/postgresql is needed.
    # shellcheck disable=SC2086 # PG_OPTS is a list of options
    if ! as_pg "$bin/pg_ctl" -D "$pgdir/data" -l "$pgdir/server.log" -w -t "$START_TIMEOUT" \
        -o "-p $PG_PORT -k $pgdir -c listen_addresses=127.0.0.1 $PG_OPTS" start >/dev/null; then
        show_logs "$pgdir/server.log"
        die "PostgreSQL did not start on 127.0.0.1:$PG_PORT within ${START_TIMEOUT}s"
    fi
    local psql=("$bin/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1)
    if [ -z "$("${psql[@]}" -Atc "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'")" ]; then
        "${psql[@]}" -c "CREATE DATABASE \"$PG_DATABASE\"" >/dev/null
    fi
    log "PostgreSQL $("${psql[@]}" -Atc 'SHOW server_version') on 127.0.0.1:$PG_PORT (user postgres, database $PG_DATABASE)"
}

write_clickhouse_config() {
    local chdir=$1
    # Minimal stand-alone config: the packaged one writes preprocessed copies and creates
    # directories under /var/lib/clickhouse before command-line overrides apply.
    cat >"$chdir/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>$chdir/server.log</log>
        <errorlog>$chdir/err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <tcp_port>$CH_TCP_PORT</tcp_port>
    <http_port>$CH_HTTP_PORT</http_port>
    <interserver_http_port>$CH_INTERSERVER_PORT</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <path>$chdir/data/</path>
    <tmp_path>$chdir/tmp/</tmp_path>
    <user_files_path>$chdir/user_files/</user_files_path>
    <format_schema_path>$chdir/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <max_connections>1024</max_connections>
    <max_concurrent_queries>100</max_concurrent_queries>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
EOF
    # One user, "default", without password, reachable only over loopback.
    cat >"$chdir/users.xml" <<'EOF'
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF
}

start_clickhouse() {
    local chdir=$dir/clickhouse
    command -v clickhouse-server >/dev/null || die "clickhouse-server not installed (run scripts/bootstrap.sh --servers)"
    if pid_alive "$chdir/server.pid"; then
        log "ClickHouse already running from $chdir"
        return
    fi
    local p
    for p in "$CH_TCP_PORT" "$CH_HTTP_PORT" "$CH_INTERSERVER_PORT"; do
        if port_busy "$p"; then
            die "port $p is already in use (another server?); set CH_TCP_PORT / CH_HTTP_PORT / CH_INTERSERVER_PORT"
        fi
    done
    mkdir -p "$chdir/data" "$chdir/tmp" "$chdir/user_files" "$chdir/format_schemas"
    write_clickhouse_config "$chdir"
    # setsid + closed stdio: the server outlives this script and never holds the caller's
    # pipes open (a CI log reader would otherwise wait for it).
    setsid clickhouse-server --config-file="$chdir/config.xml" \
        </dev/null >"$chdir/stdout.log" 2>&1 &
    echo $! >"$chdir/server.pid"
    local client=(clickhouse-client --host 127.0.0.1 --port "$CH_TCP_PORT")
    local deadline=$((SECONDS + START_TIMEOUT))
    until "${client[@]}" -q 'SELECT 1' >/dev/null 2>&1 && ch_http_ok; do
        if ! pid_alive "$chdir/server.pid"; then
            show_logs "$chdir/stdout.log" "$chdir/err.log"
            die "ClickHouse exited during start-up"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_logs "$chdir/stdout.log" "$chdir/err.log"
            die "ClickHouse did not answer on 127.0.0.1:$CH_TCP_PORT/$CH_HTTP_PORT within ${START_TIMEOUT}s"
        fi
        sleep 0.1
    done
    "${client[@]}" -q "CREATE DATABASE IF NOT EXISTS \`$CH_DATABASE\`"
    log "ClickHouse $("${client[@]}" -q 'SELECT version()') on 127.0.0.1:$CH_TCP_PORT (tcp), :$CH_HTTP_PORT (http) (user default, database $CH_DATABASE)"
}

stop_postgres() {
    local pgdir=$dir/pg bin
    [ -f "$pgdir/data/postmaster.pid" ] || return 0
    bin=$(pg_bindir)
    # Fast shutdown: roll back open sessions, no need to wait for clients.
    as_pg "$bin/pg_ctl" -D "$pgdir/data" -m fast -w -t 30 stop >/dev/null 2>&1 ||
        as_pg "$bin/pg_ctl" -D "$pgdir/data" -m immediate -w stop >/dev/null 2>&1 || true
    log "PostgreSQL stopped"
}

stop_clickhouse() {
    local pidfile=$dir/clickhouse/server.pid pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    # Only signal the process we started (the pid could have been reused since).
    if kill -0 "$pid" 2>/dev/null && grep -qa clickhouse "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "ClickHouse did not stop within 30s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "ClickHouse stopped"
    fi
    rm -f "$pidfile"
}

on_start_exit() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        stop_clickhouse
        stop_postgres
    fi
}

case $cmd in
start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    # A half-started pair is worse than none: stop whatever started if the other fails.
    trap on_start_exit EXIT
    started=$SECONDS
    start_postgres
    start_clickhouse
    log "both servers up in $((SECONDS - started))s; data under $dir"
    ;;
stop)
    [ -d "$dir" ] || exit 0
    dir=$(cd "$dir" && pwd)
    # Stop both even if one of them fails to stop.
    stop_clickhouse || true
    stop_postgres || true
    ;;
*)
    usage
    ;;
esac

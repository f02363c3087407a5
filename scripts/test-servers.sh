#!/usr/bin/env bash
# Throwaway PostgreSQL and ClickHouse servers for tests and benchmarks.
#
#   scripts/test-servers.sh start DIR   # start both on loopback, all state under DIR
#   scripts/test-servers.sh stop DIR    # stop what runs under DIR (safe to call twice, or
#                                       # after a failed start)
#
# Ports: PG_PORT (25432), CH_TCP_PORT (19000), CH_HTTP_PORT (18123), CH_INTERSERVER_PORT (19009).
# Databases created on start: PG_DATABASE (fhirservice), CH_DATABASE (fhir_test).
#
# Cluster mode (a ClickHouse cluster of one shard with CH_REPLICAS replicas, default 2, named
# CH_CLUSTER, default fhir; ZooKeeper coordinates it). No PostgreSQL: start one with `start`.
#
#   scripts/test-servers.sh start-cluster DIR      # ZooKeeper and the replicas, state under DIR
#   scripts/test-servers.sh kill-replica DIR N     # kill -9 replica N (1-based): fault tests
#   scripts/test-servers.sh start-replica DIR N    # (re)start replica N from its config
#   scripts/test-servers.sh kill-zookeeper DIR     # kill -9 ZooKeeper; start-zookeeper DIR
#
# Replica N listens on CH_TCP_PORT+N, CH_HTTP_PORT+N and CH_INTERSERVER_PORT+N (so a single
# server and a cluster started with the same variables do not collide); ZooKeeper on ZK_PORT
# (CH_TCP_PORT+5).
# START_TIMEOUT (seconds, 60) bounds the wait for each server.
#
# PostgreSQL: user postgres, trust auth, 127.0.0.1 only; durability is off (fsync etc.)
# because the data is thrown away; PG_OPTS replaces those settings.
# ClickHouse: user default, no password, 127.0.0.1 only; it runs from a config written into
# DIR so that nothing under /etc or /var/lib/clickhouse is read or written. ZooKeeper
# (Debian's zookeeper package) likewise runs from a zoo.cfg in DIR.
set -euo pipefail

usage() {
    echo "usage: $0 start|start-cluster|stop|kill-zookeeper|start-zookeeper DIR," \
        "or $0 kill-replica|start-replica DIR N" >&2
    exit 2
}
[ $# -eq 2 ] || [ $# -eq 3 ] || usage
cmd=$1
dir=$2
replica=${3:-}

PG_PORT=${PG_PORT:-25432}
CH_TCP_PORT=${CH_TCP_PORT:-19000}
CH_HTTP_PORT=${CH_HTTP_PORT:-18123}
CH_INTERSERVER_PORT=${CH_INTERSERVER_PORT:-19009}
CH_REPLICAS=${CH_REPLICAS:-2}
CH_CLUSTER=${CH_CLUSTER:-fhir}
ZK_PORT=${ZK_PORT:-$((CH_TCP_PORT + 5))}
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

# True when ClickHouse answers /ping on HTTP port $1 ("Ok.").
ch_http_ok() {
    local reply
    reply=$(
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
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

# write_clickhouse_config CHDIR TCP HTTP INTERSERVER [EXTRA_XML]
write_clickhouse_config() {
    local chdir=$1 tcp=$2 http=$3 interserver=$4 extra=${5:-}
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
    <tcp_port>$tcp</tcp_port>
    <http_port>$http</http_port>
    <interserver_http_port>$interserver</interserver_http_port>
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
$extra
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

# run_clickhouse CHDIR TCP HTTP INTERSERVER: start a server from CHDIR/config.xml (written
# beforehand) and wait until it answers.
run_clickhouse() {
    local chdir=$1 tcp=$2 http=$3 interserver=$4
    local p
    for p in "$tcp" "$http" "$interserver"; do
        if port_busy "$p"; then
            die "port $p is already in use (another server?); set CH_TCP_PORT / CH_HTTP_PORT / CH_INTERSERVER_PORT"
        fi
    done
    mkdir -p "$chdir/data" "$chdir/tmp" "$chdir/user_files" "$chdir/format_schemas"
    # setsid + closed stdio: the server outlives this script and never holds the caller's
    # pipes open (a CI log reader would otherwise wait for it).
    setsid clickhouse-server --config-file="$chdir/config.xml" \
        </dev/null >"$chdir/stdout.log" 2>&1 &
    echo $! >"$chdir/server.pid"
    local client=(clickhouse-client --host 127.0.0.1 --port "$tcp")
    local deadline=$((SECONDS + START_TIMEOUT))
    until "${client[@]}" -q 'SELECT 1' >/dev/null 2>&1 && ch_http_ok "$http"; do
        if ! pid_alive "$chdir/server.pid"; then
            show_logs "$chdir/stdout.log" "$chdir/err.log"
            die "ClickHouse exited during start-up"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_logs "$chdir/stdout.log" "$chdir/err.log"
            die "ClickHouse did not answer on 127.0.0.1:$tcp/$http within ${START_TIMEOUT}s"
        fi
        sleep 0.1
    done
}

start_clickhouse() {
    local chdir=$dir/clickhouse
    command -v clickhouse-server >/dev/null || die "clickhouse-server not installed (run scripts/bootstrap.sh --servers)"
    if pid_alive "$chdir/server.pid"; then
        log "ClickHouse already running from $chdir"
        return
    fi
    mkdir -p "$chdir"
    write_clickhouse_config "$chdir" "$CH_TCP_PORT" "$CH_HTTP_PORT" "$CH_INTERSERVER_PORT"
    run_clickhouse "$chdir" "$CH_TCP_PORT" "$CH_HTTP_PORT" "$CH_INTERSERVER_PORT"
    local client=(clickhouse-client --host 127.0.0.1 --port "$CH_TCP_PORT")
    "${client[@]}" -q "CREATE DATABASE IF NOT EXISTS \`$CH_DATABASE\`"
    log "ClickHouse $("${client[@]}" -q 'SELECT version()') on 127.0.0.1:$CH_TCP_PORT (tcp), :$CH_HTTP_PORT (http) (user default, database $CH_DATABASE)"
}

# --- cluster mode ----------------------------------------------------------------------

# True when ZooKeeper answers "srvr" (enabled in its four-letter-word whitelist).
zk_ok() {
    local reply
    reply=$(
        exec 2>/dev/null 3<>"/dev/tcp/127.0.0.1/$ZK_PORT" || exit 1
        printf 'srvr' >&3
        timeout 2 cat <&3
    ) 2>/dev/null || return 1
    [[ $reply == *"Mode: standalone"* ]]
}

start_zookeeper() {
    local zkdir=$dir/zookeeper jar=/usr/share/java/zookeeper.jar
    [ -f "$jar" ] && command -v java >/dev/null ||
        die "ZooKeeper not installed (run scripts/bootstrap.sh --servers)"
    if pid_alive "$zkdir/server.pid"; then
        log "ZooKeeper already running from $zkdir"
        return
    fi
    if [ -f "$zkdir/zoo.cfg" ]; then
        # A restart (start-zookeeper) keeps the port the cluster was started with.
        ZK_PORT=$(sed -n 's/^clientPort=//p' "$zkdir/zoo.cfg")
    fi
    port_busy "$ZK_PORT" && die "port $ZK_PORT is already in use (another server?); set ZK_PORT"
    mkdir -p "$zkdir/data"
    # A short tick: sessions of a killed replica expire in seconds, not the default minute.
    cat >"$zkdir/zoo.cfg" <<EOF
tickTime=500
dataDir=$zkdir/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=srvr
autopurge.purgeInterval=1
EOF
    # The jar's manifest names its dependencies; the conf dir on the class path is ours.
    setsid java -Xms64m -Xmx512m -cp "$zkdir:$jar" \
        org.apache.zookeeper.server.quorum.QuorumPeerMain "$zkdir/zoo.cfg" \
        </dev/null >"$zkdir/server.log" 2>&1 &
    echo $! >"$zkdir/server.pid"
    local deadline=$((SECONDS + START_TIMEOUT))
    until zk_ok; do
        if ! pid_alive "$zkdir/server.pid"; then
            show_logs "$zkdir/server.log"
            die "ZooKeeper exited during start-up"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_logs "$zkdir/server.log"
            die "ZooKeeper did not answer on 127.0.0.1:$ZK_PORT within ${START_TIMEOUT}s"
        fi
        sleep 0.2
    done
    log "ZooKeeper on 127.0.0.1:$ZK_PORT"
}

# The cluster's part of each replica's config: who the replicas are, where ZooKeeper is,
# and this replica's macros (the ReplicatedMergeTree paths of the migrations use them).
cluster_xml() {
    local n=$1 i replicas=""
    for i in $(seq 1 "$CH_REPLICAS"); do
        replicas+="<replica><host>127.0.0.1</host><port>$((CH_TCP_PORT + i))</port></replica>"
    done
    cat <<EOF
    <remote_servers>
        <$CH_CLUSTER>
            <shard><internal_replication>true</internal_replication>$replicas</shard>
        </$CH_CLUSTER>
    </remote_servers>
    <zookeeper>
        <node><host>127.0.0.1</host><port>$ZK_PORT</port></node>
        <session_timeout_ms>10000</session_timeout_ms>
    </zookeeper>
    <macros><shard>01</shard><replica>r$n</replica></macros>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
EOF
}

# config_value CHDIR TAG: the value of <TAG> in CHDIR/config.xml.
config_value() {
    sed -n "s:.*<$2>\(.*\)</$2>.*:\1:p" "$1/config.xml" | head -n 1
}

start_replica() {
    local n=$1 chdir=$dir/clickhouse-$1
    command -v clickhouse-server >/dev/null || die "clickhouse-server not installed (run scripts/bootstrap.sh --servers)"
    if pid_alive "$chdir/server.pid"; then
        log "ClickHouse replica $n already running from $chdir"
        return
    fi
    local tcp=$((CH_TCP_PORT + n)) http=$((CH_HTTP_PORT + n)) interserver=$((CH_INTERSERVER_PORT + n))
    if [ -f "$chdir/config.xml" ]; then
        # A restart (start-replica) keeps the ports the cluster was started with.
        tcp=$(config_value "$chdir" tcp_port)
        http=$(config_value "$chdir" http_port)
        interserver=$(config_value "$chdir" interserver_http_port)
    else
        mkdir -p "$chdir"
        write_clickhouse_config "$chdir" "$tcp" "$http" "$interserver" "$(cluster_xml "$n")"
    fi
    run_clickhouse "$chdir" "$tcp" "$http" "$interserver"
    log "ClickHouse replica $n of cluster $CH_CLUSTER on 127.0.0.1:$tcp (tcp), :$http (http)"
}

start_cluster() {
    local n
    start_zookeeper
    for n in $(seq 1 "$CH_REPLICAS"); do
        start_replica "$n"
    done
    # The database on every replica: the app's migrations create tables ON CLUSTER in it.
    clickhouse-client --host 127.0.0.1 --port "$((CH_TCP_PORT + 1))" \
        -q "CREATE DATABASE IF NOT EXISTS \`$CH_DATABASE\` ON CLUSTER \`$CH_CLUSTER\`" >/dev/null
    log "ClickHouse $(clickhouse-client --host 127.0.0.1 --port "$((CH_TCP_PORT + 1))" -q 'SELECT version()') cluster $CH_CLUSTER: $CH_REPLICAS replicas of one shard (database $CH_DATABASE)"
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

# stop_pidfile NAME PIDFILE PATTERN: TERM the process we started (its command line matching
# PATTERN, as the pid could have been reused since), KILL it after 30 s.
stop_pidfile() {
    local name=$1 pidfile=$2 pattern=$3 pid
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null && grep -qa "$pattern" "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name did not stop within 30s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "$name stopped"
    fi
    rm -f "$pidfile"
}

stop_clickhouse() {
    local d
    stop_pidfile ClickHouse "$dir/clickhouse/server.pid" clickhouse
    for d in "$dir"/clickhouse-*/; do
        [ -d "$d" ] && stop_pidfile "ClickHouse $(basename "$d")" "${d}server.pid" clickhouse
    done
    stop_pidfile ZooKeeper "$dir/zookeeper/server.pid" QuorumPeerMain
}

# kill_pidfile NAME PIDFILE PATTERN: kill -9 (its data stays), what a crash looks like to
# the rest of the cluster.
kill_pidfile() {
    local pid
    [ -s "$2" ] || die "$1 is not running under $dir"
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null && grep -qa "$3" "/proc/$pid/cmdline" 2>/dev/null; then
        kill -KILL "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    fi
    rm -f "$2"
    log "$1 killed"
}

on_start_exit() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        stop_clickhouse
        stop_postgres
    fi
}

case $cmd in
start | start-cluster)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    # A half-started set is worse than none: stop whatever started if another part fails.
    trap on_start_exit EXIT
    started=$SECONDS
    if [ "$cmd" = start ]; then
        start_postgres
        start_clickhouse
    else
        start_cluster
    fi
    log "servers up in $((SECONDS - started))s; data under $dir"
    ;;
kill-replica | start-replica)
    [ -n "$replica" ] || usage
    dir=$(cd "$dir" && pwd)
    if [ "$cmd" = kill-replica ]; then
        kill_pidfile "ClickHouse replica $replica" "$dir/clickhouse-$replica/server.pid" clickhouse
    else
        start_replica "$replica"
    fi
    ;;
kill-zookeeper)
    dir=$(cd "$dir" && pwd)
    kill_pidfile ZooKeeper "$dir/zookeeper/server.pid" QuorumPeerMain
    ;;
start-zookeeper)
    dir=$(cd "$dir" && pwd)
    start_zookeeper
    ;;
stop)
    [ -d "$dir" ] || exit 0
    dir=$(cd "$dir" && pwd)
    # Stop all even if one of them fails to stop.
    stop_clickhouse || true
    stop_postgres || true
    ;;
*)
    usage
    ;;
esac

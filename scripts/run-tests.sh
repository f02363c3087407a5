#!/usr/bin/env bash
# Runs the pytest suite twice, once per backend pair, then the roster suite on a cluster, then
# the fault tests:
#   embedded: SQLite + chdb (the `make run` defaults)
#   servers:  PostgreSQL + ClickHouse server (throwaway instances on loopback, started here)
#   cluster:  PostgreSQL + a ClickHouse cluster (ZooKeeper, one shard of two replicas, on
#             loopback; CLICKHOUSE_CLUSTER set): $CLUSTER_TESTS (tests/groups, tests/operations,
#             tests/cluster; paths among the arguments replace them). FHIR_TEST_CLUSTER=0
#             leaves this pass out.
#   faults:   only the tests marked `faults` (tests/faults), on a PostgreSQL + ClickHouse pair
#             of their own (FAULTS_PG_PORT, FAULTS_CH_TCP_PORT, FAULTS_CH_HTTP_PORT,
#             FAULTS_CH_INTERSERVER_PORT; default the usual ports + 20): they kill and restart
#             those servers. The other passes deselect them. FHIR_TEST_FAULTS=0 leaves it out.
# Extra arguments go to pytest (in every pass):  scripts/run-tests.sh -k patient -x
#
# All passes always run; the exit status is non-zero if any failed (including pytest's
# "no tests collected", exit 5). Per-pass artefacts (junit.xml, whatever tests write to
# $FHIR_TEST_ARTIFACTS) land in test-artifacts/<pass>/.
set -uo pipefail # no -e: a failing pass must not stop the other one
cd "$(dirname "$0")/.." || exit 1
root=$PWD

bash scripts/bootstrap.sh --servers || exit 1
# Artefacts of an earlier run must not be mistaken for this run's.
rm -rf "$root/test-artifacts/embedded" "$root/test-artifacts/servers" "$root/test-artifacts/cluster" \
    "$root/test-artifacts/faults"

PG_PORT=${PG_PORT:-25432}
CH_TCP_PORT=${CH_TCP_PORT:-19000}
export PG_PORT CH_TCP_PORT

tmp=$(mktemp -d "${TMPDIR:-/tmp}/fhir-tests.XXXXXX")
# The servers run as other users in part (PostgreSQL as postgres): let them enter tmp.
chmod 755 "$tmp"
mkdir -p "$tmp/var" "$tmp/var2" "$tmp/var3" "$tmp/var4" # FHIR_VAR_DIR of each pass; SQLite won't create directories
FHIR_TEST_CLUSTER=${FHIR_TEST_CLUSTER:-1}
CLUSTER_TESTS=${CLUSTER_TESTS:-tests/groups tests/operations tests/cluster}
FAULT_TESTS=tests/faults # collecting the whole suite only to deselect it takes ~20 s
# Paths among the arguments choose what every pass runs, the cluster and faults passes included.
for arg in "$@"; do
    [[ $arg == tests* ]] && CLUSTER_TESTS="" FAULT_TESTS=""
done
passes=(embedded servers)
[ "$FHIR_TEST_CLUSTER" = 1 ] && passes+=(cluster)
FHIR_TEST_FAULTS=${FHIR_TEST_FAULTS:-1}
[ "$FHIR_TEST_FAULTS" = 1 ] && passes+=(faults)
fault_ports=(
    PG_PORT="${FAULTS_PG_PORT:-$((PG_PORT + 20))}"
    CH_TCP_PORT="${FAULTS_CH_TCP_PORT:-$((CH_TCP_PORT + 20))}"
    CH_HTTP_PORT="${FAULTS_CH_HTTP_PORT:-$((${CH_HTTP_PORT:-18123} + 20))}"
    CH_INTERSERVER_PORT="${FAULTS_CH_INTERSERVER_PORT:-$((${CH_INTERSERVER_PORT:-19009} + 20))}"
)
cleanup() {
    env "${fault_ports[@]}" bash scripts/test-servers.sh stop "$tmp/fault-servers" || true
    bash scripts/test-servers.sh stop "$tmp/cluster" || true
    bash scripts/test-servers.sh stop "$tmp/servers" || true
    rm -rf "$tmp"
}
trap cleanup EXIT
# Turn Ctrl-C / TERM into a normal exit so the EXIT trap stops the servers.
trap 'exit 130' INT
trap 'exit 143' TERM

servers_up=1
if ! bash scripts/test-servers.sh start "$tmp/servers"; then
    servers_up=0
    echo "run-tests: the test servers did not start; the servers pass will be reported as failed" >&2
fi

declare -A status
# run_pass NAME VAR=VALUE... : one pytest run with the pass's environment.
# run_pass NAME VAR=VALUE... [-- PATH...] : one pytest run with the pass's environment, on
# PATHs (default: the whole suite).
run_pass() {
    local name=$1
    shift
    local env_vars=() paths=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        env_vars+=("$1")
        shift
    done
    [ $# -gt 0 ] && shift && paths=("$@")
    local artifacts=$root/test-artifacts/$name
    mkdir -p "$artifacts"
    echo
    echo "=============== pass: $name (${env_vars[*]}) ==============="
    env "${env_vars[@]}" FHIR_TEST_PASS="$name" FHIR_TEST_ARTIFACTS="$artifacts" \
        .venv/bin/python -m pytest --junitxml="$artifacts/junit.xml" "${paths[@]}" "${pytest_args[@]}"
    status[$name]=$?
}
pytest_args=("$@")
# Fault tests run in their own pass only (through PYTEST_ADDOPTS: a -m of the caller wins).
not_faults="${PYTEST_ADDOPTS:-} -m 'not faults'"

run_pass embedded \
    PYTEST_ADDOPTS="$not_faults" \
    DATABASE_URL="sqlite:///$tmp/embedded.sqlite3" \
    CLICKHOUSE_URL="chdb:///$tmp/chdb" \
    FHIR_VAR_DIR="$tmp/var"

if [ "$servers_up" = 1 ]; then
    run_pass servers \
        PYTEST_ADDOPTS="$not_faults" \
        DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/fhirservice" \
        CLICKHOUSE_URL="clickhouse://default@127.0.0.1:$CH_TCP_PORT/fhir_test" \
        FHIR_VAR_DIR="$tmp/var2"
else
    status[servers]=1
fi

# The cluster: its replicas on CH_TCP_PORT+1.., beside the single server, and the same
# PostgreSQL. CLICKHOUSE_URL names the first replica and the others as failover hosts.
cluster_up=0
if [ "$FHIR_TEST_CLUSTER" = 1 ] && [ "$servers_up" = 1 ]; then
    if bash scripts/test-servers.sh start-cluster "$tmp/cluster"; then
        cluster_up=1
        # shellcheck disable=SC2086 # CLUSTER_TESTS is a list of paths
        run_pass cluster \
            PYTEST_ADDOPTS="$not_faults" \
            DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/fhirservice" \
            CLICKHOUSE_URL="clickhouse://default@127.0.0.1:$((CH_TCP_PORT + 1))/fhir_test?alt_hosts=127.0.0.1:$((CH_TCP_PORT + 2))" \
            CLICKHOUSE_CLUSTER=fhir FHIR_TEST_CLUSTER_DIR="$tmp/cluster" \
            FHIR_VAR_DIR="$tmp/var3" -- $CLUSTER_TESTS
    else
        echo "run-tests: the ClickHouse cluster did not start; the cluster pass will be reported as failed" >&2
    fi
fi
[ "$cluster_up" = 1 ] || status[cluster]=${status[cluster]:-1}
# The fault servers start only once the others are gone: memory on a 2-core CI machine, and
# the long-lived connections between replicas, ZooKeeper and PostgreSQL hold local ports that
# must not be the ones the fault servers are about to bind.
bash scripts/test-servers.sh stop "$tmp/cluster" || true
bash scripts/test-servers.sh stop "$tmp/servers" || true

# Its PostgreSQL commits synchronously: a crash must not lose what it acknowledged (the
# tests would take that for the service losing writes; tests/faults/processes.py restarts it
# with the same PG_OPTS).
faults_up=0
if [ "$FHIR_TEST_FAULTS" = 1 ] && env "${fault_ports[@]}" PG_OPTS="-c fsync=off -c full_page_writes=off" \
    bash scripts/test-servers.sh start "$tmp/fault-servers"; then
    faults_up=1
    run_pass faults "${fault_ports[@]}" \
        PYTEST_ADDOPTS="${PYTEST_ADDOPTS:-} -m faults" \
        FHIR_FAULT_SERVERS="$tmp/fault-servers" \
        DATABASE_URL="postgres://postgres@127.0.0.1:${fault_ports[0]#*=}/fhirservice" \
        CLICKHOUSE_URL="clickhouse://default@127.0.0.1:${fault_ports[1]#*=}/fhir_test" \
        FHIR_VAR_DIR="$tmp/var4" -- ${FAULT_TESTS:+"$FAULT_TESTS"}
fi
[ "$faults_up" = 1 ] || status[faults]=${status[faults]:-1}

# Stop the servers now rather than in the EXIT trap, so the summary is the log's last word.
cleanup
trap - EXIT

# Summary: one line per pass, then one closing line over both passes (counts from the
# junit files) so a log reader sees the total. Expected failures (xfail) are reported on a
# line of their own and left out of the closing line, which stays the plain
# "N passed, N failed, N skipped" that CI reads (junit files count them as skipped).
echo
rc=0
for name in "${passes[@]}"; do
    code=${status[$name]}
    case $code in
    0) verdict="passed" ;;
    5)
        verdict="FAILED (no tests collected)"
        # A -k or -m of the caller may match nothing among the roster or the fault tests.
        if { [ "$name" = cluster ] || [ "$name" = faults ]; } && [ $# -gt 0 ]; then
            verdict="passed (no test selected)" code=0
        fi
        ;;
    *) verdict="FAILED (pytest exit $code)" ;;
    esac
    [ "$name" = servers ] && [ "$servers_up" = 0 ] && verdict="FAILED (servers did not start)"
    [ "$name" = cluster ] && [ "$cluster_up" = 0 ] && verdict="FAILED (cluster did not start)"
    [ "$name" = faults ] && [ "$faults_up" = 0 ] && verdict="FAILED (fault servers did not start)"
    [ "$code" = 0 ] || rc=1
    echo "run-tests: pass $name: $verdict"
done
junits=()
for name in "${passes[@]}"; do junits+=("$root/test-artifacts/$name/junit.xml"); done
.venv/bin/python - "${junits[@]}" <<'EOF'
import sys
import xml.etree.ElementTree as ET

tests = failed = skipped = xfailed = 0
for path in sys.argv[1:]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        continue
    for suite in root.iter("testsuite"):
        tests += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    xfailed += sum(1 for s in root.iter("skipped") if s.get("type") == "pytest.xfail")
if xfailed:
    print(f"run-tests: {xfailed} xfailed (expected failures, not counted as skipped below)")
print(f"total: {tests - failed - skipped} passed, {failed} failed, {skipped - xfailed} skipped")
EOF
exit $rc

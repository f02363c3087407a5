#!/usr/bin/env bash
# Idempotent set-up of a (fresh) Debian machine for this project.
#
#   scripts/bootstrap.sh            # .venv with the project and its dev extras
#   scripts/bootstrap.sh --servers  # also the Debian packages the tests need:
#                                   # clickhouse-server/-client, postgresql, chromium,
#                                   # zookeeper (the cluster pass)
#
# Nothing is started: tests start throwaway servers themselves (scripts/test-servers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

servers=0
for arg in "$@"; do
    case $arg in
    --servers) servers=1 ;;
    -h | --help)
        sed -n '2,9p' "$0"
        exit 0
        ;;
    *)
        echo "bootstrap: unknown argument: $arg" >&2
        exit 2
        ;;
    esac
done

log() { echo "bootstrap: $*"; }

# --- Debian packages -------------------------------------------------------------------
if [ "$servers" = 1 ]; then
    wanted=(clickhouse-server clickhouse-client postgresql chromium zookeeper)
    missing=()
    for pkg in "${wanted[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        sudo=()
        [ "$(id -u)" = 0 ] || sudo=(sudo)
        # policy-rc.d answering 101 keeps the packages' maintainer scripts from starting
        # their services (PostgreSQL's cluster on 5432, ClickHouse on 9000, ZooKeeper on
        # 2181): the tests never use them. Only installed for this run, and only if the
        # machine has none of its own.
        policy=/usr/sbin/policy-rc.d
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
            "${sudo[@]}" chmod 755 "$policy"
            trap '"${sudo[@]}" rm -f "$policy"' EXIT
        fi
        export DEBIAN_FRONTEND=noninteractive
        "${sudo[@]}" apt-get update -q
        "${sudo[@]}" apt-get install -y -q "${missing[@]}"
    else
        log "Debian packages present: ${wanted[*]}"
    fi
fi

# --- Python virtualenv -------------------------------------------------------------------
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    if ! python3 -m venv .venv; then
        # Debian's own python3 ships venv/ensurepip separately.
        rm -rf .venv
        sudo=()
        [ "$(id -u)" = 0 ] || sudo=(sudo)
        export DEBIAN_FRONTEND=noninteractive
        "${sudo[@]}" apt-get update -q
        "${sudo[@]}" apt-get install -y -q python3-venv
        python3 -m venv .venv
    fi
fi

# Re-install only when the dependency list (or the interpreter) changed since the last
# successful install: a full install resolves ~600 MB of wheels (chdb alone is ~530 MB).
stamp=.venv/.bootstrap-stamp
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -c 'import sys; print(sys.version.split()[0])')"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing the project into .venv (pip install -e .[dev])"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"
    echo "$want" >"$stamp"
else
    log ".venv up to date with pyproject.toml"
fi

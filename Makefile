# Developer entry points. Everything runs from the project's .venv (scripts/bootstrap.sh).
#
#   make run            serve on 127.0.0.1:$(PORT) with the embedded backends (SQLite + chdb),
#                       access control off; FHIR_AUTH=on make run turns it on
#   make test           the suite on both backend pairs; make test ARGS="-k patient"
#   make lint           ruff, import contracts (lint-imports), Django system checks,
#                       missing migrations
#   make bench          benchmarks (python -m bench) on both backend pairs, as served: each
#                       pass starts scripts/serve.sh itself on a free port and times over HTTP
#   make migrate        metadata store and ClickHouse schema

SHELL := /bin/bash
PORT ?= 8000
ARGS ?=
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench migrate bootstrap bootstrap-servers

bootstrap:
	@bash scripts/bootstrap.sh

bootstrap-servers:
	@bash scripts/bootstrap.sh --servers

# SQLite cannot create the directory of its database file: make the var dir first.
migrate: bootstrap
	@mkdir -p "$${FHIR_VAR_DIR:-var}"
	$(PY) manage.py migrate --noinput
	$(PY) manage.py createcachetable
	$(PY) manage.py migrate_clickhouse

# Access control is off unless FHIR_AUTH=on (scripts/serve.sh says so loudly). serve.sh
# also runs collectstatic: the admin's styles are served by WhiteNoise from STATIC_ROOT.
run: migrate
	@PORT=$(PORT) VENV=$(VENV) bash scripts/serve.sh

test:
	@bash scripts/run-tests.sh $(ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-logo
	$(PY) manage.py check
	$(PY) manage.py makemigrations --check --dry-run

# The same two backend pairs as `make test`, on throwaway servers started here.
bench: bootstrap-servers
	@set -u; \
	tmp=$$(mktemp -d "$${TMPDIR:-/tmp}/fhir-bench.XXXXXX"); chmod 755 "$$tmp"; \
	trap 'bash scripts/test-servers.sh stop "$$tmp/servers"; rm -rf "$$tmp"' EXIT; \
	trap 'exit 130' INT; trap 'exit 143' TERM; \
	bash scripts/test-servers.sh start "$$tmp/servers" || exit 1; \
	mkdir -p "$$tmp/var" "$$tmp/var2"; \
	rc=0; \
	echo "=== bench: embedded (SQLite + chdb)"; \
	env FHIR_BENCH_PASS=embedded \
		DATABASE_URL="sqlite:///$$tmp/embedded.sqlite3" \
		CLICKHOUSE_URL="chdb:///$$tmp/chdb" \
		FHIR_VAR_DIR="$$tmp/var" \
		$(PY) -m bench $(ARGS) || rc=1; \
	echo "=== bench: servers (PostgreSQL + ClickHouse server)"; \
	env FHIR_BENCH_PASS=servers \
		DATABASE_URL="postgres://postgres@127.0.0.1:$${PG_PORT:-25432}/fhirservice" \
		CLICKHOUSE_URL="clickhouse://default@127.0.0.1:$${CH_TCP_PORT:-19000}/fhir_test" \
		FHIR_VAR_DIR="$$tmp/var2" FHIR_BENCH_SERVERS_DIR="$$tmp/servers" \
		$(PY) -m bench $(ARGS) || rc=1; \
	exit $$rc

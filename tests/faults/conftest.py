"""Fixtures of the fault tests: the servers they kill, the app they drive (see stack.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.processes import App, Servers
from tests.faults.roster import Api
from tests.faults.scenario import CreateProfile, profile_create
from tests.faults.stack import SERVERS_DIR, TRIED, Stack


@pytest.fixture(scope="session")
def servers() -> Servers:
    """The faults pass's own servers (skip outside that pass: these tests kill them)."""
    if not SERVERS_DIR:
        pytest.skip("fault tests run in the faults pass (FHIR_FAULT_SERVERS is not set)")
    found = Servers(Path(SERVERS_DIR))
    found.start()
    with found.pg_connect() as connection:
        setting = connection.execute("SHOW synchronous_commit").fetchone()[0]
    # With asynchronous commit a crashed PostgreSQL loses commits it acknowledged, which
    # would pass for the service losing acknowledged writes.
    assert setting == "on", "the faults pass's PostgreSQL must run with synchronous_commit=on"
    return found


@pytest.fixture(scope="session")
def stack(servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The app serving a fresh PostgreSQL and ClickHouse database of this session."""
    database = f"faults_{uuid.uuid4().hex[:12]}"
    with servers.pg_connect() as connection:
        connection.execute(f'CREATE DATABASE "{database}"')
    servers.clickhouse(f"CREATE DATABASE {database}")
    workdir = tmp_path_factory.mktemp("faults")
    (workdir / "var").mkdir()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:{servers.pg_port}/{database}",
        "CLICKHOUSE_URL": f"clickhouse://default@127.0.0.1:{servers.ch_tcp_port}/{database}",
        "FHIR_VAR_DIR": str(workdir / "var"),
    }
    app = App(env, workdir)
    for command in (("migrate", "--noinput"), ("migrate_clickhouse",)):
        result = app.manage(*command)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    app.start()
    try:
        yield Stack(servers, app, Api(app.base), database)
    finally:
        app.stop()
        servers.ensure_up()
        with servers.pg_connect() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        # Waits for the tables' background merges: a minute and more on a busy machine.
        servers.clickhouse(f"DROP DATABASE IF EXISTS {database}", timeout=600)


@pytest.fixture(scope="session")
def create_profile(stack: Stack) -> CreateProfile:
    """One undisturbed 200k create, timed: the kill timings of the creates are fractions of
    its phases."""
    return profile_create(stack)


@pytest.fixture
def faults(stack: Stack) -> Stack:
    """The stack with both servers and the app up (a failed round may have left one down)."""
    stack.servers.ensure_up()
    if not stack.app.alive:
        stack.app.start()
    return stack


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """List the rounds this run tried: replay key, result, fault timings."""
    if TRIED:
        terminalreporter.section(f"fault rounds tried: {len(TRIED)}")
        for line in TRIED:
            terminalreporter.write_line(line)

"""Shared fixtures: the FHIR client, and which backend pair this run tests."""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator
from typing import Any

import pytest

from fhirservice import conf
from fhirservice.clickhouse import get_clickhouse
from fhirservice.clickhouse import migrations as ch_migrations
from tests.support import FhirClient

# The suite exercises the API without credentials; access control is on by default in the
# service, so it is switched off here (in the defaults table, so that tests replacing the
# whole FHIR_SERVICE dict keep it off). Tests in tests/access switch it on. FHIR_AUTH in the
# environment still wins.
if "FHIR_AUTH" not in os.environ:
    conf.DEFAULTS["AUTH"] = False
    conf.fhir_settings.reload()


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Name the backend pair in the test run's header."""
    return [
        f"backends: DATABASE_URL={os.environ.get('DATABASE_URL', 'sqlite (default)')} "
        f"CLICKHOUSE_URL={os.environ.get('CLICKHOUSE_URL', 'chdb (default)')}"
    ]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Shipping a test's writes queued in the background ends before its fixtures are torn
    down: the shipper's recount holds a Group's row lock while it reads the versions, and the
    TRUNCATE that empties a transactional test's database takes the same tables in the other
    order (a deadlock seen in CI at the teardown of test_read_your_writes)."""
    from groups.outbox import background

    background.flush(timeout=60.0)  # a shipper still stuck then is the test's own finding


@pytest.fixture(scope="session", autouse=True)
def clickhouse_schema(django_db_blocker: Any) -> None:
    """The member event tables exist before any test runs.

    chdb migrates itself; a server is migrated by the deploy step (``migrate_clickhouse``),
    which the throwaway test servers do not run. Applying is idempotent.
    """
    with django_db_blocker.unblock():
        ch_migrations.apply(get_clickhouse())


@pytest.fixture
def api(db: None) -> FhirClient:
    """A FHIR client against a fresh database (each test in a rolled-back transaction)."""
    return FhirClient()


@pytest.fixture
def live_api(transactional_db: None) -> FhirClient:
    """A FHIR client whose writes really commit (for threads and on-commit hooks)."""
    return FhirClient()


@pytest.fixture(autouse=True)
def _fresh_roster_digests() -> None:
    """Each test starts with no roster digests: the test database is emptied between tests,
    so a digest kept from an earlier test could describe another roster of the same key."""
    from groups.digest import digests

    digests.clear()


@pytest.fixture(autouse=True)
def _no_outbox_relay_left_running() -> Iterator[None]:
    """A test that starts a server process's outbox relay (``warm_up`` does) stops it after:
    its thread would ship other tests' pending batches, or outlive the test database. The
    exit hook ``warm_up`` registers goes too: at the end of the run it would read the outbox
    of a test database that no longer exists."""
    yield
    from fhirservice.serving import service_stop
    from groups.outbox import background
    from operations.export.worker import worker_thread_stop

    background.relay_stop()
    atexit.unregister(service_stop)
    worker_thread_stop()  # warm_up starts the export worker thread as well

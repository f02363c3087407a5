"""A backing store that cannot serve answers 503 ``transient`` with ``Retry-After`` on every
route, logged in one line without a traceback, and an outage under load in one line per
``UNAVAILABLE_LOG_INTERVAL``; a wrong query stays a bug.

The metadata store is made unreachable for real: the request thread's connection is replaced
by one whose settings point where nothing answers (PostgreSQL: a loopback port where nothing
listens, so the driver's connect is refused, as with the server stopped; SQLite: a file in a
directory that does not exist). The test's own connection, with its rolled-back
transaction, is put back after. ClickHouse: the ``clickhouse_unreachable`` fixture.
"""

from __future__ import annotations

import copy
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
from django.db import DatabaseError, connection, connections, transaction
from django.test import Client, override_settings

from fhirservice.db import is_unavailable
from fhirservice.errorlog import StoreErrorLogFilter
from fhirservice.errors import MSG_CLICKHOUSE_DOWN, MSG_METADATA_STORE_DOWN
from tests.fhirservice.conftest import closed_port
from tests.fhirservice.test_operability import group_of
from tests.support import BASE, FHIR_JSON, FhirClient, patient

RETRY_AFTER = "5"  # the UNAVAILABLE_RETRY_AFTER default


@contextmanager
def replaced_connection(**changes: Any) -> Iterator[None]:
    """This thread's default connection replaced by one whose settings carry ``changes``
    (``OPTIONS`` merged); the original is put back, untouched, after."""
    original = connections["default"]
    settings_dict = copy.deepcopy(original.settings_dict)
    options = {**(settings_dict.get("OPTIONS") or {}), **changes.pop("OPTIONS", {})}
    settings_dict.update(changes, OPTIONS=options)
    replacement = type(original)(settings_dict, "default")
    connections["default"] = replacement
    try:
        yield
    finally:
        connections["default"] = original
        replacement.close()


@pytest.fixture(autouse=True)
def store_error_log() -> Iterator[StoreErrorLogFilter]:
    """A fresh rate limit of 503 log lines for each test (the process's one remembers the
    503s of earlier tests)."""
    logger = logging.getLogger("django.request")
    configured = [f for f in logger.filters if isinstance(f, StoreErrorLogFilter)]
    assert configured, "settings.LOGGING puts the filter on django.request"
    for log_filter in configured:
        logger.removeFilter(log_filter)
    fresh = StoreErrorLogFilter()
    logger.addFilter(fresh)
    try:
        yield fresh
    finally:
        logger.removeFilter(fresh)
        for log_filter in configured:
            logger.addFilter(log_filter)


@pytest.fixture
def metadata_store_down(db: None, tmp_path: Path) -> Iterator[None]:
    """The metadata store cannot be reached from the requests of the test."""
    if connection.vendor == "postgresql":
        changes: dict[str, Any] = {"HOST": "127.0.0.1", "PORT": closed_port()}
    elif connection.vendor == "sqlite":
        changes = {"NAME": str(tmp_path / "missing" / "fhirservice.sqlite3")}
    else:
        pytest.skip(f"no unreachable setup for {connection.vendor}")
    with replaced_connection(**changes):
        yield


def send(method: str, path: str, body: Any = None) -> Any:
    """One request; an exception the server raises is answered as a server answers it."""
    data = orjson.dumps(body) if body is not None else b""
    client = Client(raise_request_exception=False)
    return client.generic(method, path, data=data, content_type=FHIR_JSON if data else None)


def assert_unavailable(response: Any, detail_code: str, diagnostics: str) -> None:
    """A 503 OperationOutcome (transient) with Retry-After."""
    assert response.status_code == 503, response.content
    assert response["Content-Type"].startswith(FHIR_JSON)
    assert response["Retry-After"] == RETRY_AFTER
    [issue] = response.json()["issue"]
    assert issue["code"] == "transient"
    assert issue["details"]["coding"][0]["code"] == detail_code
    assert issue["diagnostics"] == diagnostics


def no_traceback_logged(records: list[logging.LogRecord]) -> bool:
    """No log record carries a traceback."""
    return all(record.exc_info is None and not record.exc_text for record in records)


TRANSACTION = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [{"resource": patient(), "request": {"method": "POST", "url": "Patient"}}],
}
ADD_MEMBER = {
    "resourceType": "Parameters",
    "parameter": [{"name": "identifier", "valueIdentifier": {"system": "urn:x", "value": "1"}}],
}
REQUESTS = [
    ("GET", f"{BASE}/Patient/p1", None),
    ("GET", f"{BASE}/Patient?family=Chalmers", None),
    ("POST", f"{BASE}/Patient", patient()),
    ("PUT", f"{BASE}/Patient/p1", {**patient(), "id": "p1"}),
    ("GET", f"{BASE}/_history", None),
    ("GET", f"{BASE}/Group/g1/$members", None),
    ("POST", f"{BASE}/Group/g1/$add-member", ADD_MEMBER),
    ("POST", BASE, TRANSACTION),
    # Outside the REST views: a plain Django view (Django's 500 handler answers).
    ("GET", "/metrics", None),
]


@pytest.mark.parametrize(("method", "path", "body"), REQUESTS)
def test_the_metadata_store_down_answers_503_transient_with_retry_after(
    metadata_store_down, caplog, method, path, body
):
    with caplog.at_level(logging.WARNING):
        response = send(method, path, body)
    assert_unavailable(response, "MSG_METADATA_STORE_DOWN", MSG_METADATA_STORE_DOWN)
    assert no_traceback_logged(caplog.records)
    assert any("OperationalError" in record.getMessage() for record in caplog.records)


def warnings_and_errors(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    """The records of WARNING and above (the request log's INFO lines left out)."""
    return [record for record in records if record.levelno >= logging.WARNING]


def test_an_outage_logs_its_first_503_at_error_then_one_line_per_interval(
    metadata_store_down, caplog
):
    with override_settings(FHIR_SERVICE={"UNAVAILABLE_LOG_INTERVAL": 3600}):
        with caplog.at_level(logging.WARNING):
            for _ in range(5):
                assert send("GET", f"{BASE}/Patient/p1").status_code == 503
        # Before: ten lines (Django's ERROR and a WARNING of fhirservice.errors per request).
        [first] = warnings_and_errors(caplog.records)
        assert first.levelno == logging.ERROR
        assert first.name == "django.request"
        message = first.getMessage()
        assert message.startswith(f"Service Unavailable: {BASE}/Patient/p1 (")
        assert MSG_METADATA_STORE_DOWN in message
        assert "OperationalError" in message
        assert "not logged" not in message
        assert no_traceback_logged(caplog.records)
    caplog.clear()
    # The interval has passed (here: is 0): the next line counts the four left out.
    with override_settings(FHIR_SERVICE={"UNAVAILABLE_LOG_INTERVAL": 0}):
        with caplog.at_level(logging.WARNING):
            send("POST", f"{BASE}/Patient", patient())
    [summary] = warnings_and_errors(caplog.records)
    assert summary.levelno == logging.ERROR
    assert "OperationalError" in summary.getMessage()
    assert "; 4 more 503 answers in the last " in summary.getMessage()


def test_readiness_reports_the_metadata_store_down(metadata_store_down):
    response = send("GET", "/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down"
    assert body["checks"]["metadata_store"] == {"status": "down", "error": "OperationalError"}


def test_a_batch_answers_each_entry_503(metadata_store_down):
    batch = {**TRANSACTION, "type": "batch"}
    response = send("POST", BASE, batch)
    assert response.status_code == 200
    [entry] = response.json()["entry"]
    assert entry["response"]["status"].startswith("503")
    [issue] = entry["response"]["outcome"]["issue"]
    assert issue["code"] == "transient"


def test_a_sqlite_lock_held_beyond_the_busy_timeout_is_a_503_not_a_retry_loop(transactional_db):
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's file lock")
    holder = sqlite3.connect(connection.settings_dict["NAME"])
    holder.execute("BEGIN IMMEDIATE")  # a writer that does not let go (a stuck process)
    try:
        with replaced_connection(OPTIONS={"timeout": 0.2}):
            response = send("POST", f"{BASE}/Patient", patient())
    finally:
        holder.rollback()
        holder.close()
    # Before: 100 retries of the 0.2 s wait, then 409 "Too many concurrent writes".
    assert_unavailable(response, "MSG_METADATA_STORE_DOWN", MSG_METADATA_STORE_DOWN)


def test_a_wrong_query_is_not_an_unavailable_store(db):
    with pytest.raises(DatabaseError) as caught, transaction.atomic(), connection.cursor() as cur:
        cur.execute("SELECT no_such_column FROM fhirservice_storedresource")
    assert not is_unavailable(caught.value)


def test_a_roster_read_with_clickhouse_down_is_a_503_with_retry_after(
    api: FhirClient, clickhouse_unreachable, caplog
):
    created = api.post("/Group", group_of("Patient/a"))
    with clickhouse_unreachable, caplog.at_level(logging.WARNING):
        response = send("GET", f"{BASE}/Group/{created.body['id']}/$members")
    assert_unavailable(response, "MSG_MEMBER_STORE_DOWN", MSG_CLICKHOUSE_DOWN)
    [line] = warnings_and_errors(caplog.records)
    assert f"({MSG_CLICKHOUSE_DOWN} (ClickHouseUnavailable: " in line.getMessage()
    assert no_traceback_logged(caplog.records)

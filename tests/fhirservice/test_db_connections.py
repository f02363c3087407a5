"""Kept connections to PostgreSQL: a dropped one is replaced before a request uses it, and a
healthy one is reused without a round trip (``fhirservice.pgbackend``)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from django.db import connection, connections

MARKER = "SELECT 'fhir-health-check-marker'"


@pytest.fixture
def kept(db) -> Iterator[object]:
    """A second connection to the test database, as a server thread keeps one between
    requests (health checks on)."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's kept connections")
    wrapper = connections.create_connection("default")
    wrapper.settings_dict["CONN_HEALTH_CHECKS"] = True
    wrapper.settings_dict["CONN_MAX_AGE"] = 600
    wrapper.ensure_connection()
    try:
        yield wrapper
    finally:
        wrapper.close()


def backend_pid(wrapper) -> int:
    with wrapper.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def next_request(wrapper) -> None:
    """What Django does between two requests of a thread (request_started/finished)."""
    wrapper.close_if_unusable_or_obsolete()


def last_statement(pid: int) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT query FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone()[0]


def test_a_healthy_kept_connection_is_reused_without_a_round_trip(kept):
    pid = backend_pid(kept)
    with kept.cursor() as cursor:
        cursor.execute(MARKER)
    next_request(kept)
    kept.close_if_health_check_failed()  # as the request's first query does
    # Django's own check would have sent SELECT 1 on that session.
    assert last_statement(pid) == MARKER
    assert backend_pid(kept) == pid


def test_a_connection_the_server_dropped_is_replaced_before_the_next_request_uses_it(kept):
    pid = backend_pid(kept)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
            if cursor.fetchone()[0] == 0:
                break
        time.sleep(0.05)
    next_request(kept)
    # The request's first query runs on a new session: no error, so no 503.
    assert backend_pid(kept) != pid

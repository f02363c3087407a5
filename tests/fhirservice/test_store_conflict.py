"""A transaction PostgreSQL aborts because it lost a race (a serialization failure, SQLSTATE
40001, or a deadlock, 40P01) is a 409 ``conflict``, not the 503 "store unavailable" of an
outage: the store is up, and an operator paged for an outage would find none.

The races are real: two connections to the test database run two transactions against a
table of the test's own, as two requests would against the store's. The error that escapes is
then answered by the REST views' handler and by Django's 500 handler (the path of plain views
and middleware), as a request that met it would be. The outage side (a refused connection
stays a 503) is ``test_store_unavailable``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from django.db import OperationalError, connection, connections, transaction
from django.test import RequestFactory

from fhirservice import db
from fhirservice.errors import MSG_STORE_CONFLICT, exception_handler
from fhirservice.rest.errors import server_error
from tests.support import BASE

PROBE = "relay_conflict_probe"


@pytest.fixture
def probe(transactional_db: None) -> Iterator[Any]:
    """A two-row table (ids 1 and 2) and a second connection to the test database."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's serialization failures and deadlocks")
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {PROBE} (id integer PRIMARY KEY, v integer)")
        cursor.execute(f"INSERT INTO {PROBE} VALUES (1, 0), (2, 0)")
    other = connections.create_connection("default")
    try:
        yield other
    finally:
        other.close()
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TABLE {PROBE}")


def serialization_failure(other: Any) -> OperationalError:
    """The error of a serializable transaction that lost a write-skew race: each of two
    transactions reads the row the other writes, and the other commits first."""
    other.set_autocommit(False)
    with other.cursor() as cursor:
        cursor.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
        cursor.execute(f"SELECT v FROM {PROBE} WHERE id = 1")
        cursor.execute(f"UPDATE {PROBE} SET v = v + 1 WHERE id = 2")
    with pytest.raises(OperationalError) as caught, transaction.atomic():
        db.serializable()
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT v FROM {PROBE} WHERE id = 2")
            cursor.execute(f"UPDATE {PROBE} SET v = v + 1 WHERE id = 1")
        other.commit()
    return caught.value


def deadlock(other: Any) -> OperationalError:
    """The error of a transaction PostgreSQL chose to break a deadlock: two transactions lock
    rows 1 and 2 in opposite orders. The other one waits longer before it checks for a
    deadlock, so this one finds it and is the one aborted."""
    locked = threading.Event()
    errors: list[BaseException] = []

    def other_side() -> None:
        try:
            other.set_autocommit(False)
            with other.cursor() as cursor:
                cursor.execute("SET LOCAL deadlock_timeout = '10s'")
                cursor.execute(f"UPDATE {PROBE} SET v = v + 1 WHERE id = 2")
                locked.set()
                cursor.execute(f"UPDATE {PROBE} SET v = v + 1 WHERE id = 1")  # waits for us
            other.commit()
        except BaseException as exc:  # reported to the test, not lost in the thread
            errors.append(exc)
            locked.set()

    thread = threading.Thread(target=other_side)
    other.inc_thread_sharing()  # the fixture's connection, used from the thread
    with pytest.raises(OperationalError) as caught, transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL deadlock_timeout = '100ms'")
            cursor.execute(f"UPDATE {PROBE} SET v = v + 1 WHERE id = 1")
            thread.start()
            assert locked.wait(10)
            cursor.execute(f"UPDATE {PROBE} SET v = v + 1 WHERE id = 2")
    thread.join(20)
    other.dec_thread_sharing()
    assert not errors, errors
    return caught.value


RACES = {"40001": serialization_failure, "40P01": deadlock}


def assert_conflict(status: int, headers: Any, body: bytes) -> None:
    """A 409 OperationOutcome (conflict) that does not claim the store is down."""
    assert status == 409, body
    assert "Retry-After" not in headers
    [issue] = orjson.loads(body)["issue"]
    assert issue["code"] == "conflict"
    assert issue["details"]["coding"][0]["code"] == "MSG_CONCURRENT_WRITE"
    assert issue["diagnostics"] == MSG_STORE_CONFLICT


@pytest.mark.parametrize("sqlstate", sorted(RACES))
def test_a_lost_race_is_a_conflict_not_an_unavailable_store(probe, sqlstate):
    exc = RACES[sqlstate](probe)
    assert exc.__cause__.sqlstate == sqlstate
    assert db.is_conflict(exc)
    assert not db.is_unavailable(exc)  # before: True, answered 503 "store unavailable"

    response = exception_handler(exc, {})  # the REST views
    assert_conflict(response.status_code, response, orjson.dumps(response.data))

    request = RequestFactory().get(f"{BASE}/Patient")
    try:  # Django calls its 500 handler while it handles the exception
        raise exc
    except OperationalError:
        assert sys.exc_info()[1] is exc
        answer = server_error(request)
    assert_conflict(answer.status_code, answer, answer.content)

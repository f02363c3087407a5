"""Everything that differs between the metadata backends (SQLite, PostgreSQL, MongoDB).

Store, group and operation code never asks which backend runs; it calls these:

- :func:`atomic`: ``django.db.transaction.atomic`` does nothing on django-mongodb-backend,
  whose own ``atomic`` runs a MongoDB transaction (replica sets only), so that a version, its
  history row and its outbox rows commit together on every backend;
- :func:`no_savepoints`: nested atomic blocks without savepoints, for a unit that fails whole;
- :func:`lock_rows`: row locks where the backend has them (PostgreSQL);
- :func:`serializable`: PostgreSQL's ``SERIALIZABLE`` isolation (SQLite serializes writers
  with ``BEGIN IMMEDIATE``, see settings; MongoDB runs snapshot transactions);
- :func:`is_transient`: the backend errors that mean "lost a race, run it again";
- :func:`is_conflict`: PostgreSQL's "lost a race" errors that escaped every retry (409);
- :func:`is_unavailable`: the backend errors that mean "the store cannot serve now" (503);
- :func:`run_retrying`: the one retry loop of writes and operation regions.
"""

from __future__ import annotations

import random
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    transaction,
)

T = TypeVar("T")

# Where the connection says that nested atomic blocks take no savepoint (no_savepoints).
NO_SAVEPOINTS_ATTR = "fhir_no_savepoints"
# PostgreSQL's serialization failure and deadlock (SQLSTATE): the transaction lost a race.
TRANSIENT_SQLSTATES = ("40001", "40P01")
# SQLite primary result codes that mean the file cannot be used now: BUSY and LOCKED (a lock
# held beyond the busy timeout), IOERR, FULL, CANTOPEN. A wrong statement (SQLITE_ERROR) is an
# OperationalError too, and stays a bug.
SQLITE_UNAVAILABLE_CODES = frozenset({5, 6, 10, 13, 14})
# Python's sqlite3 waits this long for a lock when the settings name no "timeout".
SQLITE_DEFAULT_TIMEOUT = 5.0


def atomic(**kwargs: Any) -> Any:
    """The backend's atomic block (a context manager); inside :func:`no_savepoints`, a block
    nested in another takes no savepoint."""
    if connection.vendor == "mongodb":
        # Imported on MongoDB only: importing the package registers its checks, lookups and
        # expressions with Django, which SQL backends need not carry.
        from django_mongodb_backend import transaction as mongo_transaction

        return mongo_transaction.atomic(**kwargs)
    if getattr(connection, NO_SAVEPOINTS_ATTR, False) and connection.in_atomic_block:
        kwargs.setdefault("savepoint", False)
    return transaction.atomic(**kwargs)


@contextmanager
def no_savepoints() -> Iterator[None]:
    """Inside, :func:`atomic` blocks nested in the current one take no savepoint.

    For a unit whose every error rolls back its whole transaction (an operation region:
    nothing in it catches an error and goes on), where a savepoint only costs two round
    trips (``SAVEPOINT``, ``RELEASE SAVEPOINT``). A nested block that fails then marks the
    transaction for rollback instead of rolling back to its savepoint; a statement run after
    catching such an error raises Django's ``TransactionManagementError``.
    """
    before = getattr(connection, NO_SAVEPOINTS_ATTR, False)
    setattr(connection, NO_SAVEPOINTS_ATTR, True)
    try:
        yield
    finally:
        setattr(connection, NO_SAVEPOINTS_ATTR, before)


def in_transaction() -> bool:
    """Whether the caller already runs inside an atomic block."""
    return transaction.get_connection().in_atomic_block


def lock_rows(queryset: Any) -> Any:
    """``queryset`` with its rows locked until commit, where the backend can lock rows.

    Writers of one resource then queue on its row (PostgreSQL ``SELECT ... FOR UPDATE``)
    instead of racing on the version check and retrying: optimistic retries alone starve
    some writers when many hit one hot Group. SQLite needs no lock (``BEGIN IMMEDIATE``
    already serializes writers); elsewhere the version check still catches every race.
    """
    if connection.features.has_select_for_update:
        return queryset.select_for_update()
    return queryset


def serializable() -> None:
    """Run the current transaction at ``SERIALIZABLE`` isolation where the backend has it.

    PostgreSQL's serializable snapshot isolation also catches predicate conflicts ("no
    Patient with this identifier yet, so both create one"). It accepts the level only
    before the transaction's first query: a transaction that has not begun yet begins with
    it (``BEGIN ISOLATION LEVEL SERIALIZABLE``, ``pgbackend``), else ``SET TRANSACTION`` is a
    round trip of its own. SQLite's ``BEGIN IMMEDIATE`` already runs writers one after
    another; MongoDB's transactions abort on write conflicts.
    """
    if connection.vendor == "postgresql":
        begin = getattr(connection, "begin_serializable", None)
        if begin is not None and begin():
            return
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")


def is_transient(exc: DatabaseError) -> bool:
    """Whether a database error means the transaction lost a race and may simply run again:
    a PostgreSQL serialization failure or deadlock, SQLite's "database is locked"."""
    code = getattr(getattr(exc, "__cause__", None), "sqlstate", None)
    text = str(exc).lower()
    return (
        code in TRANSIENT_SQLSTATES
        or "could not serialize" in text
        or "locked" in text
        or "deadlock" in text
    )


def is_conflict(exc: BaseException) -> bool:
    """Whether ``exc`` is a PostgreSQL serialization failure or deadlock (SQLSTATE 40001,
    40P01) that no retry loop caught, or whose retries were used up: the transaction lost a
    race with concurrent writers. The store is up; a request then answers 409 Conflict
    (``fhirservice.errors.store_error``), never 503 "store unavailable"."""
    return (
        isinstance(exc, DatabaseError)
        and getattr(exc.__cause__, "sqlstate", None) in TRANSIENT_SQLSTATES
    )


def is_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` says the metadata store cannot serve right now rather than that the
    query is wrong: PostgreSQL stopped, refusing or gone mid-session, SQLite's file locked
    beyond the busy timeout or not openable, MongoDB not reachable. A request then answers
    503 and the client may try again (``fhirservice.errors.store_unavailable``)."""
    mongo = sys.modules.get("pymongo.errors")  # loaded only where MongoDB is the store
    if mongo is not None and any(
        isinstance(error, mongo.ConnectionFailure) for error in (exc, exc.__cause__)
    ):
        return True
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    code = getattr(exc.__cause__, "sqlite_errorcode", None)
    if isinstance(exc.__cause__, sqlite3.Error) and code is not None:
        return code & 0xFF in SQLITE_UNAVAILABLE_CODES
    # PostgreSQL: the driver's OperationalError is the server or the connection failing (a
    # wrong statement is a ProgrammingError), its InterfaceError a connection already closed;
    # except a lost race, which is an OperationalError too (psycopg's SerializationFailure and
    # DeadlockDetected) and says the server works.
    return not is_conflict(exc)


def _lock_waited_out(exc: OperationalError, seconds: float) -> bool:
    """SQLite gave up on its lock after waiting the whole busy timeout: whoever holds it
    holds it long (a stuck writer, a backup), and another attempt would only wait again."""
    if connection.vendor != "sqlite" or "locked" not in str(exc).lower():
        return False
    options = connection.settings_dict.get("OPTIONS") or {}
    return seconds >= options.get("timeout", SQLITE_DEFAULT_TIMEOUT)


def run_retrying(
    unit: Callable[[], T],
    *,
    races: tuple[type[Exception], ...],
    retries: int,
    exhausted: Exception,
) -> T:
    """Run ``unit`` in a transaction; after a lost race roll back and run it again.

    A race is one of ``races``, an ``IntegrityError`` (a concurrent insert of the same key)
    or a transient backend error (:func:`is_transient`); anything else propagates, and so does
    SQLite's lock error once an attempt waited out the busy timeout for it (the store is
    unavailable, not raced: 100 retries of 30 s would hold the request for 50 minutes). Attempts
    back off by a random few milliseconds. After ``retries`` retries, ``exhausted`` is raised.
    """
    for attempt in range(retries + 1):
        started = time.monotonic()
        try:
            with atomic():
                return unit()
        except (*races, IntegrityError):
            pass
        except OperationalError as exc:
            if not is_transient(exc) or _lock_waited_out(exc, time.monotonic() - started):
                raise
        time.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))  # noqa: S311
    raise exhausted


def on_commit(func: Any) -> None:
    """Run ``func`` after the current transaction commits (at once outside one).

    ``robust``: a failing callback (e.g. ClickHouse down while shipping) is logged and does
    not turn a committed write into an error.
    """
    if connection.vendor == "mongodb":
        from django_mongodb_backend import transaction as mongo_transaction  # see atomic()

        mongo_transaction.on_commit(func, robust=True)
    else:
        transaction.on_commit(func, robust=True)

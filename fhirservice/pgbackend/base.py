"""Django's PostgreSQL backend, with a health check that does not ask the server.

Connections live across requests (``CONN_MAX_AGE``), so one the server dropped (a restart,
``pg_terminate_backend``, an idle timeout) must be noticed before a request uses it, or that
request answers 503. Django's check (``CONN_HEALTH_CHECKS``) sends ``SELECT 1`` before each
request's first query: a round trip on every request, ~10% of a plain read as served. A
server that ends a session sends its last message and closes the socket, so the socket of a
dropped connection is readable while that of a healthy idle one is not: polling it without
waiting tells the two apart. When it is readable, or the session is not idle, Django's own
check decides. A connection lost without a word (a network partition) goes unnoticed by
either check until a query fails; the request then answers 503 as before.

:meth:`DatabaseWrapper.prepared_cursor` is the cursor of the few fixed statements every
request runs (the bearer token's lookup, the current row of a read): Django's cursors bind
parameters on the client, so PostgreSQL parsed and planned each of them anew, and planning
the token lookup's three-table join was ~0.3-0.5 ms of the server's time, several times what
running it takes. This cursor binds on the server and prepares each statement after it ran
``prepare_threshold`` times on a connection: 0 in the settings, so at its first run, which
the request threads' warm-up (``fhirservice.serving``) makes before the worker serves; with
psycopg's default of 5 the first five requests of every thread after a restart planned
each lookup anew. Later runs skip parse and plan (psycopg keeps a connection's 100 most
recent). The single statement of a plain create (:meth:`DatabaseWrapper.run_alone`) runs on
it too: its text is the same for every create with as many search rows, and its hundreds of
values are then bound rather than parsed (~0.1-0.3 ms of the server's CPU per create).
Django's cursors never prepare. Django turns
preparing off by default (``prepare_threshold`` None) so that transaction-mode poolers
(PgBouncer before 1.21) keep working; the settings turn it on, and behind such a pooler
``FHIR_DB_PREPARED=false`` turns it off again. A migration that changes the
type of a column these statements select needs the workers restarted (PostgreSQL refuses a
prepared statement whose result type changed).
"""

from __future__ import annotations

import select
from typing import Any

from django.db.backends.postgresql import base
from django.db.backends.postgresql.psycopg_any import register_tzloader
from psycopg import IsolationLevel
from psycopg.pq import Format, TransactionStatus


class DatabaseOperations(base.DatabaseOperations):
    """Django's, with the text of a prepared statement in the query log."""

    def last_executed_query(self, cursor: Any, sql: str, params: Any) -> str | None:
        """The statement as Django logs it (``django.db.backends``, captured queries). A run
        of a prepared statement leaves psycopg no query text, so Django's answer is None:
        the statement as sent then, ``%s`` where its parameters go (logged beside it)."""
        return super().last_executed_query(cursor, sql, params) or sql


class DatabaseWrapper(base.DatabaseWrapper):
    """PostgreSQL, checked for a dropped connection by polling its socket."""

    ops_class = DatabaseOperations
    # The isolation level to restore when the transaction that began serializable ends
    # (see begin_serializable); None: no such transaction.
    _isolation_after: tuple[IsolationLevel | None] | None = None

    def close_if_health_check_failed(self) -> None:
        """Close the connection when the server ended it (once per request, as Django's)."""
        if (
            self.pool
            or self.connection is None
            or not self.health_check_enabled
            or self.health_check_done
        ):
            return
        if not self._seems_usable():
            self.close()
        self.health_check_done = True

    def prepared_cursor(self) -> Any:
        """A cursor (wrapped as ``cursor()`` wraps one) that binds on the server, so that
        psycopg prepares a statement it runs again and again; ``cursor()`` when the
        connection prepares nothing (``prepare_threshold`` None).

        For statements whose text the ORM compiled, with ``%s`` only where a value goes:
        server-side binding refuses parameters in places the ORM may put them elsewhere
        (why Django binds on the client by default).
        """
        self.close_if_health_check_failed()
        self.ensure_connection()
        if self.connection.prepare_threshold is None:
            return self.cursor()
        with self.wrap_database_errors:
            cursor = base.ServerBindingCursor(self.connection)
            # As create_cursor(): timestamps in the connection's time zone.
            loader = self.connection.adapters.get_loader(base.TIMESTAMPTZ_OID, Format.TEXT)
            if self.timezone != loader.timezone:
                register_tzloader(self.timezone, cursor)
            return self._prepare_cursor(cursor)

    def transaction_unbegun(self) -> bool:
        """Whether this thread is in its outermost atomic block only (no savepoint) and no
        statement ran in it yet: psycopg sends BEGIN with a transaction's first statement,
        so the server knows of no transaction."""
        return (
            self.in_atomic_block
            and not self.savepoint_ids
            and self.connection is not None
            and self.connection.info.transaction_status == TransactionStatus.IDLE
        )

    def begin_serializable(self) -> bool:
        """Begin the current, unbegun transaction (:meth:`transaction_unbegun`) at
        ``SERIALIZABLE``; False, doing nothing, when it began already.

        psycopg sends ``BEGIN ISOLATION LEVEL SERIALIZABLE`` with the transaction's first
        statement: one round trip, where ``BEGIN`` and ``SET TRANSACTION`` were two. The
        connection's own level comes back when the outermost atomic block ends, before its
        on-commit callbacks run (:meth:`_set_autocommit`), so no later transaction inherits it.
        """
        if not self.transaction_unbegun():
            return False
        raw = self.connection
        if self._isolation_after is None:
            self._isolation_after = (raw.isolation_level,)
        raw.isolation_level = IsolationLevel.SERIALIZABLE
        return True

    def _set_autocommit(self, autocommit: bool) -> None:
        if autocommit and self._isolation_after is not None:
            (level,) = self._isolation_after
            self._isolation_after = None
            # IDLE after the COMMIT or ROLLBACK; otherwise the connection broke, Django
            # closes it, and a new one starts at the configured level.
            if self.connection.info.transaction_status == TransactionStatus.IDLE:
                self.connection.isolation_level = level
        super()._set_autocommit(autocommit)

    def run_alone(self, sql: str, params: Any) -> None:
        """Run ``sql`` as the whole of the current, unbegun transaction (see
        :meth:`transaction_unbegun`; the caller runs nothing else in it): sent in autocommit,
        the statement commits by itself, with no BEGIN and COMMIT round trips.

        Django's atomic block stays open around it; the COMMIT or ROLLBACK that ends the
        block finds no transaction on the connection and sends nothing (psycopg ends only a
        transaction it began). A failing statement changes nothing (its own transaction
        rolls back) and raises as any statement would, inside the block.
        """
        raw = self.connection
        raw.autocommit = True
        try:
            # Prepared as the lookups are: a create's statement has one text per number of
            # search rows (a Patient's ~20: ~280 values to parse as literals each time).
            with self.prepared_cursor() as cursor:
                cursor.execute(sql, params)
        finally:
            if raw.info.transaction_status == TransactionStatus.IDLE:
                raw.autocommit = False  # else the connection broke, and Django closes it

    def _seems_usable(self) -> bool:
        connection = self.connection
        if connection.closed or connection.broken:
            return False
        if connection.info.transaction_status != TransactionStatus.IDLE or _readable(
            connection.fileno()
        ):
            # Something to read on an idle session (the server's goodbye, or a notice), or
            # a session left mid-transaction: Django's round trip decides.
            return self.is_usable()
        return True


def _readable(fileno: int) -> bool:
    """Whether the socket has data or an end-of-stream to read, without waiting."""
    poller = select.poll()
    poller.register(fileno, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))

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
"""

from __future__ import annotations

import select

from django.db.backends.postgresql import base
from psycopg.pq import TransactionStatus


class DatabaseWrapper(base.DatabaseWrapper):
    """PostgreSQL, checked for a dropped connection by polling its socket."""

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

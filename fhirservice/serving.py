"""What a server process does before it takes its first request and after its last one
(``fhirservice.wsgi``).

A client meets a restarted service at its first requests: work left to them is paid there.
``warm_up`` opens the ClickHouse client (chdb's import and session open were ~0.5 s of the
first request) and sends ``service_starting``, whose receivers prepare their own caches (the
Group app builds the roster digests of its largest recent rosters). Management commands and
tests do not run it: only the WSGI entry point does.

``warm_up`` also registers :func:`service_stop` to run at the process's exit. A gunicorn
worker told to stop (SIGTERM to it or to its master) finishes its requests and then exits
normally, which runs the exit hooks; ``service_stopping`` then lets receivers finish what
the process still holds (the Group app ships its queued member events, within a bound). A
process killed outright (SIGKILL, or gunicorn's ``graceful_timeout`` running out) runs
nothing: what it held is what the outbox's relay is for.
"""

from __future__ import annotations

import atexit
import logging

from django.db import connections
from django.dispatch import Signal

from fhirservice.clickhouse import ClickHouseUnavailable, get_clickhouse

logger = logging.getLogger(__name__)

# Sent once per server process, before it serves; receivers take keyword arguments only.
service_starting = Signal()
# Sent once per server process as it exits, after its last request, while both stores are
# still open; receivers take keyword arguments only and must bound their own time.
service_stopping = Signal()


def warm_up() -> None:
    """Prepare this process to serve; a failing step is logged, never fatal (the requests
    then do that work themselves, as before)."""
    try:
        get_clickhouse()
    except ClickHouseUnavailable:
        logger.warning("ClickHouse is unavailable at start; its client opens on first use")
    for receiver, result in service_starting.send_robust(sender=None):
        if isinstance(result, Exception):
            logger.error("Warm-up step %r failed", receiver, exc_info=result)
    connections.close_all()  # the boot thread's connections; requests open their own
    # Registered after the ClickHouse client opened: exit hooks run last registered first,
    # so this one runs while the client (and chdb's session) is still usable. Registering
    # twice (warm_up called again) would run the receivers twice.
    atexit.unregister(service_stop)
    atexit.register(service_stop)


def service_stop() -> None:
    """Send ``service_stopping`` (at the exit of a process that ran ``warm_up``); a failing
    receiver is logged and the others still run."""
    for receiver, result in service_stopping.send_robust(sender=None):
        if isinstance(result, Exception):
            logger.error("Shutdown step %r failed", receiver, exc_info=result)
    connections.close_all()

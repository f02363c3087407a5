"""What a server process does before it takes its first request (``fhirservice.wsgi``).

A client meets a restarted service at its first requests: work left to them is paid there.
``warm_up`` opens the ClickHouse client (chdb's import and session open were ~0.5 s of the
first request) and sends ``service_starting``, whose receivers prepare their own caches (the
Group app builds the roster digests of its largest recent rosters). Management commands and
tests do not run it: only the WSGI entry point does.
"""

from __future__ import annotations

import logging

from django.db import connections
from django.dispatch import Signal

from fhirservice.clickhouse import ClickHouseUnavailable, get_clickhouse

logger = logging.getLogger(__name__)

# Sent once per server process, before it serves; receivers take keyword arguments only.
service_starting = Signal()


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

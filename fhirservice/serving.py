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
import gc
import logging
import threading
from concurrent import futures

from django.apps import apps
from django.db import close_old_connections, connections
from django.dispatch import Signal
from django.urls import URLResolver, get_resolver

from fhirservice.clickhouse import ClickHouseUnavailable, get_clickhouse

logger = logging.getLogger(__name__)

# Sent once per server process, before it serves; receivers take keyword arguments only.
service_starting = Signal()
# Sent once per server process as it exits, after its last request, while both stores are
# still open; receivers take keyword arguments only and must bound their own time.
service_stopping = Signal()
# Sent once in each request thread of a server process before it serves, on that thread's
# own metadata connection; receivers take keyword arguments only and write nothing.
request_thread_starting = Signal()

# The cyclic collector's thresholds in a serving process (settle_collector): the youngest
# generation collected after 100,000 allocations net instead of CPython's 700, the older
# ones after 1,000 collections of the one below instead of 10.
GC_THRESHOLDS = (100_000, 1_000, 1_000)

# The longest wait for the request threads' warm-up (gunicorn gives a booting worker 30 s
# before it counts as hung; the digests' warm-up may already have taken 5).
THREADS_SECONDS = 10.0


def warm_up() -> None:
    """Prepare this process to serve; a failing step is logged, never fatal (the requests
    then do that work themselves, as before)."""
    try:
        get_clickhouse()
    except ClickHouseUnavailable:
        logger.warning("ClickHouse is unavailable at start; its client opens on first use")
    _compile_url_patterns(get_resolver())
    _fill_model_caches()
    for receiver, result in service_starting.send_robust(sender=None):
        if isinstance(result, Exception):
            logger.error("Warm-up step %r failed", receiver, exc_info=result)
    connections.close_all()  # the boot thread's connections; requests open their own
    # Registered after the ClickHouse client opened: exit hooks run last registered first,
    # so this one runs while the client (and chdb's session) is still usable. Registering
    # twice (warm_up called again) would run the receivers twice.
    atexit.unregister(service_stop)
    atexit.register(service_stop)


def settle_collector() -> None:
    """Set the cyclic garbage collector for serving, once the process is warm.

    What the process holds by then (the application, its modules, the warm caches) lives as
    long as the process: ``gc.freeze`` takes it out of every later collection, after one
    last collection so no garbage of the start is kept. A request allocates tens of
    thousands of objects, nearly all freed by reference counting; at CPython's thresholds
    the collector ran several times per request, each time stopping every request thread
    of the process (they share the GIL). Measured as served (row 8's mix paced to 100 member
    writes/s, servers pair, 2 workers): median latency 26 → 11 ms for a PATCH, 12 → 5 ms
    for a Patient read; paced to 150/s, the service's CPU per request 4.08 → 3.52 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _compile_url_patterns(resolver: URLResolver) -> None:
    """Compile every URL pattern's regular expression (Django compiles each on its first
    match attempt: ~1 ms of the first requests whose paths reach the FHIR patterns)."""
    for pattern in resolver.url_patterns:
        pattern.pattern.regex  # noqa: B018 - the property compiles and keeps it
        if isinstance(pattern, URLResolver):
            _compile_url_patterns(pattern)


def _fill_model_caches() -> None:
    """Fill the field caches of every model (Django fills each on first use; the reverse
    relation tree walks all models: ~0.5 ms of the first write of a server process)."""
    for model in apps.get_models():
        model._meta.concrete_fields  # noqa: B018 - cached properties, filled once
        model._meta.fields_map  # noqa: B018
        model._meta.related_objects  # noqa: B018


def warm_request_threads(pool: futures.Executor | None, threads: int) -> int:
    """Warm each of the ``threads`` threads of ``pool`` (gunicorn's ``gthread`` pool) with
    :func:`request_thread_warm_up`, or this thread when ``pool`` is None (a ``sync`` worker
    serves on its main thread); how many threads were warmed within ``THREADS_SECONDS``.

    A pool starts a thread per task until it has ``threads`` of them, but hands a task to an
    idle thread when there is one: every task waits at a barrier until all have started,
    so each runs on a thread of its own and the pool ends up with all of its threads.
    """
    if pool is None:
        request_thread_warm_up()
        return 1
    barrier = threading.Barrier(threads)
    tasks = [pool.submit(_warm_at, barrier) for _ in range(threads)]
    done, _ = futures.wait(tasks, timeout=THREADS_SECONDS)
    warmed = sum(1 for task in done if task.exception() is None)
    if warmed < threads:
        barrier.abort()  # a thread still waiting gives up; requests warm what is left
        logger.warning("Warmed %d of %d request threads before serving", warmed, threads)
    return warmed


def _warm_at(barrier: threading.Barrier) -> None:
    barrier.wait(THREADS_SECONDS)
    request_thread_warm_up()


def request_thread_warm_up() -> None:
    """Open this thread's metadata connections and send ``request_thread_starting``, then
    close what Django would close at the end of a request (all of them with
    ``CONN_MAX_AGE=0``); a failing step is logged (the first request then does it)."""
    for alias in connections:
        try:
            connections[alias].ensure_connection()
        except Exception:
            logger.exception("Request thread warm-up: opening the %r connection failed", alias)
    for receiver, result in request_thread_starting.send_robust(sender=None):
        if isinstance(result, Exception):
            logger.error("Request thread warm-up step %r failed", receiver, exc_info=result)
    close_old_connections()


def service_stop() -> None:
    """Send ``service_stopping`` (at the exit of a process that ran ``warm_up``); a failing
    receiver is logged and the others still run."""
    for receiver, result in service_stopping.send_robust(sender=None):
        if isinstance(result, Exception):
            logger.error("Shutdown step %r failed", receiver, exc_info=result)
    connections.close_all()

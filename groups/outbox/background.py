"""When a committed write's member event batches ship: in the request, or in a thread; and
each server process's relay for what is left behind.

A write is acknowledged when its version and its outbox rows commit (see ADR 0004); shipping
to ClickHouse is then only a matter of when. With ``MEMBER_SHIPPING = "background"`` (the
default) a per-process thread ships what HTTP requests wrote, so the client never waits for
the ClickHouse insert and its materialized views: tens of milliseconds per insert, most of a
small PATCH. Reads merge unshipped batches, so every client still reads its own writes.

Writes queued while the thread is busy are shipped together in its next round, which turns
a burst of small PATCHes into few inserts; and when writes were queued while the last round
ran (they come faster than rounds: a load) the next round starts ``MEMBER_SHIP_INTERVAL``
seconds (0.5) after it at the soonest, so under a steady load each round gathers what came
in meanwhile. Every ClickHouse insert costs the server ~3-13 ms of CPU however few rows it holds
(three parts: the log and its two views), and, worse, a merge: at 10^7 rows 18.16 merges
each new small part of a state table into the same growing part (2-6 parts per merge,
rewriting 10^4-10^5 rows for a few dozen new ones), so ClickHouse's CPU grows with the
inserts per second, not with the rows. An idle shipper, and one to which nothing came while
its last round ran (one client writing and reading in turn), ships a write at once.
``"request"`` ships in the request right after commit instead (one insert per write: simpler
to reason about, slower to answer).

A server process that is told to stop (SIGTERM; see ``fhirservice.serving``) ships what it
queued before it exits, for at most ``MEMBER_SHUTDOWN_WAIT`` seconds (:func:`shutdown_drain`):
a rolling restart then leaves no backlog behind. What it could not ship in that time is
marked for the relays (shipped by their next round instead of after ``LEFT_BEHIND_AFTER``)
and logged, with the outbox's whole backlog.

Nothing is lost if the process dies with a queue: the batches stay pending in the outbox.
A server process runs a relay of its own (:class:`Relay`, started when it starts serving):
every ``MEMBER_RELAY_INTERVAL`` seconds it ships whatever any process left behind, on any
roster, and corrects the quantities of versions written while ClickHouse was down; while
that fails (ClickHouse still down) its wait doubles up to ``MEMBER_RELAY_MAX_INTERVAL``.
The next write of a roster, ``ship_member_events`` (once, or ``--loop`` as a side process)
and ``repair_group_members`` ship them too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from django.db import DatabaseError, connections

from fhirservice.conf import fhir_settings
from fhirservice.db import is_conflict, is_unavailable
from groups.models import MemberOutbox
from groups.outbox import ship
from groups.outbox.pending import outbox_backlog

logger = logging.getLogger(__name__)

# The last_error of a batch a stopping process queued and could not ship in time: the relays
# ship batches with an error at their next round.
MSG_LEFT_AT_EXIT = "Left pending when its server process stopped"
LOG_SHIPPING_FAILED = "Shipping member events of %d rosters failed"
LOG_RELAY_FAILED = "Outbox relay round failed"
LOG_DRAINED = "Stopping: every member event batch this process queued is shipped (%.1f s)"
LOG_LEFT = (
    "Stopping: %d member event batches this process queued are not shipped after %.1f s; "
    "the outbox holds %d pending batches (%d events, oldest %.0f s), which the relay of any "
    "server process or ship_member_events ships"
)
LOG_LEFT_UNKNOWN = (
    "Stopping: %d member event batches this process queued were not shipped within %.1f s, "
    "and the outbox could not be read (%s); the relays ship what is pending"
)


def _log_failure(message: str, exc: Exception, *args: object) -> None:
    """Log a failed shipping round: one line when the metadata store is down (a relay
    retrying every few seconds would print a traceback each time) or aborted the round as a
    lost race (the next round ships it), else with the traceback."""
    if is_unavailable(exc) or is_conflict(exc):
        logger.warning(f"{message} (%s: %s)", *args, type(exc).__name__, exc)
    else:
        logger.exception(message, *args)


class BackgroundShipper:
    """One daemon thread per process that ships queued (roster, batch keys) pairs; what
    was queued meanwhile, on any roster, goes out in one call."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: dict[str, list[str]] = {}
        self._busy = False
        self._round: dict[str, list[str]] = {}  # the keys being shipped now
        self._thread: threading.Thread | None = None
        self._started = float("-inf")  # when the last round started (time.monotonic)
        self._loaded = False  # writes were queued while the last round ran

    def submit(self, roster: str, keys: list[str]) -> None:
        """Queue a committed write's batches; returns at once."""
        with self._cond:
            self._queue.setdefault(roster, []).extend(keys)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="member-event-shipper", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is shipped (or failed); False on timeout."""
        return not self.drain(timeout)

    def drain(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` seconds for everything queued to ship; the keys left:
        still queued, or in the round that had not finished (it may yet)."""
        with self._cond:
            if self._cond.wait_for(lambda: not self._queue and not self._busy, timeout):
                return []
            return [
                key for work in (self._round, self._queue) for keys in work.values() for key in keys
            ]

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
            # Under a load (writes came while the last round ran) not before
            # MEMBER_SHIP_INTERVAL after the last round started: writes committed meanwhile
            # join this round (submit queues without waiting for the lock's owner).
            if self._loaded:
                pause = self._started + fhir_settings.MEMBER_SHIP_INTERVAL - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
            with self._cond:
                self._started = time.monotonic()
                work, self._queue = self._queue, {}
                self._busy = True
                self._round = work
            try:
                ship.written_batches_ship(work)
            except Exception as exc:  # a failed round must not end the thread
                _log_failure(LOG_SHIPPING_FAILED, exc, len(work))
            finally:
                with self._cond:
                    more = self._loaded = bool(self._queue)
                _release_connections(keep=more)
                with self._cond:
                    self._busy = False
                    self._round = {}
                    self._cond.notify_all()


def _release_connections(*, keep: bool) -> None:
    """After a shipping round: close the thread's metadata connections when it goes idle (an
    idle process then holds none, and a restarted database is reconnected), and keep them
    while more work is queued, unless one is unusable (a failed round) or past its age.

    Under a load of member writes rounds follow each other at once; opening and closing a
    PostgreSQL connection per round was ~10% of the worker's CPU at 160 PATCHes/s.
    """
    if not keep:
        connections.close_all()
        return
    for connection in connections.all(initialized_only=True):
        connection.close_if_unusable_or_obsolete()


class Relay:
    """The service's own outbox relay: a daemon thread that runs a relay round
    (``ship.outbox_relay_round``; True: it succeeded) at once and then every ``interval``
    seconds; after a failed round the wait
    doubles, up to ``max_interval``, and is back to ``interval`` after a success."""

    def __init__(self, *, interval: float, max_interval: float) -> None:
        self.interval = interval
        self.max_interval = max_interval
        self.wait = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def ensure_running(self) -> None:
        """Start the thread unless it runs in this process already."""
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current round, waiting for it up to ``timeout`` seconds (shutdown,
        tests)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                succeeded = ship.outbox_relay_round()
            except Exception as exc:  # a failed round must not end the relay
                _log_failure(LOG_RELAY_FAILED, exc)
                succeeded = False
            finally:
                connections.close_all()  # as the shipper: no idle connection held
            self.wait = self.interval if succeeded else min(self.wait * 2, self.max_interval)
            self._stop.wait(self.wait)


_relay: Relay | None = None


def relay_start(*, interval: float, max_interval: float) -> Relay | None:
    """Run this process's relay (a server process, when it starts; None when ``interval``
    is 0: relaying is left to ``ship_member_events --loop``)."""
    global _relay
    if interval <= 0:
        return None
    with _shipper_lock:
        if _relay is not None:
            _relay.stop()
        _relay = Relay(interval=interval, max_interval=max(max_interval, interval))
    _relay.ensure_running()
    return _relay


def outbox_relay_start(**_: Any) -> None:
    """Receiver of ``service_starting``: run this server process's relay."""
    relay_start(
        interval=fhir_settings.MEMBER_RELAY_INTERVAL,
        max_interval=fhir_settings.MEMBER_RELAY_MAX_INTERVAL,
    )


def relay_stop(timeout: float = 10.0) -> None:
    """Stop this process's relay, if it runs (shutdown, tests), waiting for its round up to
    ``timeout`` seconds."""
    global _relay
    with _shipper_lock:
        relay, _relay = _relay, None
    if relay is not None:
        relay.stop(timeout)


def shutdown_drain(**_: Any) -> None:
    """Receiver of ``service_stopping``: ship what this process queued, waiting at most
    ``MEMBER_SHUTDOWN_WAIT`` seconds in all, stop its relay, and log what is left.

    Batches still queued are marked (``MSG_LEFT_AT_EXIT``) so that the relays of the other
    processes, or of this one's successor, ship them at their next round. The log line names
    the outbox's whole backlog (every process's), so an operator sees what a restart left.
    """
    started = time.monotonic()
    wait = fhir_settings.MEMBER_SHUTDOWN_WAIT
    shipper = _shipper
    left = shipper.drain(wait) if shipper is not None else []
    relay_stop(max(wait - (time.monotonic() - started), 0.0))
    marked = 0
    try:
        if left:  # the round in flight may have shipped some of them since
            marked = MemberOutbox.objects.filter(key__in=left, shipped_at__isnull=True).update(
                last_error=MSG_LEFT_AT_EXIT
            )
        backlog = outbox_backlog()
    except DatabaseError as exc:
        logger.warning(LOG_LEFT_UNKNOWN, len(left), wait, type(exc).__name__)
        return
    finally:
        connections.close_all()
    if not marked and not backlog.batches:
        logger.info(LOG_DRAINED, time.monotonic() - started)
        return
    logger.warning(
        LOG_LEFT,
        marked,
        wait,
        backlog.batches,
        backlog.events,
        backlog.oldest_age,
    )


_shipper: BackgroundShipper | None = None
_shipper_lock = threading.Lock()
_local = threading.local()


@contextlib.contextmanager
def serving_request() -> Iterator[None]:
    """Mark this thread as serving an HTTP request (the middleware's block).

    Only then do writes ship in the background: commands, the relay and code calling the
    services directly ship before the write returns, so what they report afterwards holds.
    """
    if _relay is not None:
        _relay.ensure_running()  # a forked worker has no thread of its parent's
    previous = getattr(_local, "serving", False)
    _local.serving = True
    try:
        yield
    finally:
        _local.serving = previous


def after_commit(
    roster: str,
    keys: list[str],
    *,
    events: int,
    known: dict[str, Sequence[list[Any]]] | None = None,
) -> None:
    """Ship a committed write's batches (``events`` in all) as MEMBER_SHIPPING says.

    A write of ``MEMBER_BATCH_SIZE`` events or more (a large create or PUT) ships before
    answering even in background mode: its insert is a small part of its time, and while its
    batches were pending every read and write of the roster would fetch and scan them
    (a 10^6-member create left 45 MB of pending events; a PATCH +1 then took 200 ms).
    ``known``: the decoded events of such a write, by batch key, shipped without reading
    them back from the outbox.
    """
    if (
        fhir_settings.MEMBER_SHIPPING == "request"
        or not getattr(_local, "serving", False)
        or events >= fhir_settings.MEMBER_BATCH_SIZE
    ):
        ship.written_batches_ship({roster: keys}, known=known)
        return
    global _shipper
    with _shipper_lock:
        if _shipper is None:
            _shipper = BackgroundShipper()
    _shipper.submit(roster, keys)


def on_clickhouse_closing(**kwargs: object) -> None:
    """Receiver of ``clickhouse_closing``: let queued shipping finish on the old client."""
    if not flush():
        logger.warning("Background shipping still busy while the ClickHouse client closes")


def flush(timeout: float = 30.0) -> bool:
    """Wait for this process's background shipping to drain (tests, commands, shutdown)."""
    shipper = _shipper
    return True if shipper is None else shipper.flush(timeout)

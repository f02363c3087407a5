"""When a committed write's member event batches ship: in the request, or in a thread; and
each server process's relay for what is left behind.

A write is acknowledged when its version and its outbox rows commit (see ADR 0004); shipping
to ClickHouse is then only a matter of when. With ``MEMBER_SHIPPING = "background"`` (the
default) a per-process thread ships what HTTP requests wrote, so the client never waits for
the ClickHouse insert and its materialized views: tens of milliseconds per insert, most of a
small PATCH. Reads merge unshipped batches, so every client still reads its own writes.

Writes queued while the thread is busy are shipped together in its next round, which turns
a burst of small PATCHes into few inserts. ``"request"`` ships in the request right after
commit instead (one insert per write: simpler to reason about, slower to answer).

Nothing is lost if the process dies with a queue: the batches stay pending in the outbox.
A server process runs a relay of its own (:class:`Relay`, started when it starts serving):
every ``MEMBER_RELAY_INTERVAL`` seconds it ships whatever any process left behind, on any
roster, and corrects the quantities of versions written while ClickHouse was down; while
that fails (ClickHouse still down) its wait doubles up to ``MEMBER_RELAY_MAX_INTERVAL``.
The next write of a roster, ``ship_member_events`` (once, or ``--loop`` as a side process)
and ``repair_group_members`` ship them too.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from typing import Any

from django.db import connections

from fhirservice.conf import fhir_settings
from groups.outbox import ship

logger = logging.getLogger(__name__)


class BackgroundShipper:
    """One daemon thread per process that ships queued (roster, batch keys) pairs; a
    roster's keys queued meanwhile go out in one call."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: dict[str, list[str]] = {}
        self._busy = False
        self._thread: threading.Thread | None = None

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
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                work, self._queue = self._queue, {}
                self._busy = True
            try:
                for roster, keys in work.items():
                    try:
                        ship.written_batches_ship(roster, keys)
                    except Exception:  # a failed round must not end the thread
                        logger.exception("Shipping member events of %s failed", roster)
            finally:
                # The thread's own metadata connection: closed between rounds so an idle
                # process holds none and a restarted database is reconnected.
                connections.close_all()
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


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
        """Stop after the current round (shutdown, tests)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                succeeded = ship.outbox_relay_round()
            except Exception:  # a failed round must not end the relay
                logger.exception("Outbox relay round failed")
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
        atexit.register(_relay.stop)
    _relay.ensure_running()
    return _relay


def outbox_relay_start(**_: Any) -> None:
    """Receiver of ``service_starting``: run this server process's relay."""
    relay_start(
        interval=fhir_settings.MEMBER_RELAY_INTERVAL,
        max_interval=fhir_settings.MEMBER_RELAY_MAX_INTERVAL,
    )


def relay_stop() -> None:
    """Stop this process's relay, if it runs (tests)."""
    global _relay
    with _shipper_lock:
        relay, _relay = _relay, None
    if relay is not None:
        relay.stop()


_shipper: BackgroundShipper | None = None
_shipper_lock = threading.Lock()
_local = threading.local()
# How long a finishing process waits for queued batches before leaving them to the relay.
EXIT_WAIT_SECONDS = 10.0


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
    known: dict[str, list[list[Any]]] | None = None,
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
        ship.written_batches_ship(roster, keys, known=known)
        return
    global _shipper
    with _shipper_lock:
        if _shipper is None:
            _shipper = BackgroundShipper()
            atexit.register(_shipper.flush, EXIT_WAIT_SECONDS)
    _shipper.submit(roster, keys)


def on_clickhouse_closing(**kwargs: object) -> None:
    """Receiver of ``clickhouse_closing``: let queued shipping finish on the old client."""
    if not flush():
        logger.warning("Background shipping still busy while the ClickHouse client closes")


def flush(timeout: float = 30.0) -> bool:
    """Wait for this process's background shipping to drain (tests, commands, shutdown)."""
    shipper = _shipper
    return True if shipper is None else shipper.flush(timeout)

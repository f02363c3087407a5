"""Roster digests: which members a roster may hold, so writes need not ask ClickHouse about
members it certainly does not hold.

Every member write must know whether the member is already in the roster: the event is
"added" or "updated", and ``quantity`` stays exact. Asking ClickHouse is a point query of
5-10 ms (chdb or a server), half of a PATCH adding one member, and most writes add members
the roster never held. A digest answers "certainly not held" from memory:

- It holds a hash of every member reference that an ``added`` or ``updated`` event of the
  roster named, up to its ``version``: a superset of the members present at that version
  (removals are not taken out, so a removed member is looked up as before).
- It is built from the outbox, the metadata store's record of every committed member event
  (ADR 0004), not from ClickHouse: no race with shipping, and it works while ClickHouse is
  down. Outbox rows are never deleted; a future pruning must drop digests too.
- A write, under its row lock, brings the digest up to the version it builds on by reading
  the outbox batches of the versions in between (written by other processes); its own
  members join when it commits. ``version`` moves forward only on commit, so a rolled-back
  write never counts as covered (members it read in stay: a superset is harmless).

A reference the digest may hold (or whose hash collides) is looked up in ClickHouse as
before. Digests live in each process; rosters of up to ``MEMBER_DIGEST_SYNC_MAX`` members
are digested inside the write that first needs it, larger ones by a background thread while
writes keep looking up, and a server process digests its largest recent rosters before it
serves (``DigestRegistry.warm_up``). Least recently used digests go first once all of them
hold more than ``MEMBER_DIGEST_ENTRIES`` references; 0 turns digests off. A metadata store
restored from a backup under running processes needs them restarted (or
``digests.clear()``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import orjson
from django.db import connections
from django.db.models import Sum

from fhirservice import db
from fhirservice.conf import fhir_settings
from fhirservice.models import StoredResource
from groups.models import MemberOutbox

logger = logging.getLogger(__name__)

# References kept in a set beside the sorted array before they are merged into it.
_RECENT_MAX = 65_536
# Warm-up when a server process starts: the most recently updated Groups looked at, and the
# time it may take (gunicorn gives a booting worker 30 s before it counts as hung).
WARM_CANDIDATES = 200
WARM_SECONDS = 5.0
# Outbox batches read per statement when a digest catches up (one batch holds up to
# MEMBER_BATCH_SIZE events: a page stays a few batches, as the streamed read's chunks were).
CATCH_UP_ROWS = 4


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``values`` sorted without repeats (sorts in place).

    Not ``np.unique``: since NumPy 2.3 it dedupes int64 through a hash table, ~1 s for 10^6
    random 64-bit hashes against ~0.06 s for a sort and a mask.
    """
    values.sort()
    if len(values) < 2:
        return values
    keep = np.empty(len(values), dtype=bool)
    keep[0] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _merged(hashes: np.ndarray, more: np.ndarray) -> np.ndarray:
    """Sorted unique ``hashes`` with the unique values ``more`` inserted (a new array).

    Insertion at searched positions copies the array once (~5 ms at 10^6), under the
    digest's lock; ``np.union1d`` sorted everything again (~1 s with NumPy 2.3's hash-table
    ``unique``), and every write of the roster waited for it.
    """
    more = np.sort(more)
    positions = np.searchsorted(hashes, more)
    if len(hashes):
        known = hashes[np.minimum(positions, len(hashes) - 1)] == more
        more, positions = more[~known], positions[~known]
    return np.insert(hashes, positions, more)


def _held_hashes(events: Iterable[list[Any]]) -> Iterable[int]:
    """Hashes of the references an outbox batch's events leave possibly present."""
    return (hash(event[0]) for event in events if event[1] != "removed")


class RosterDigest:
    """A superset of one roster's members at ``version``, as hashes of their references.

    Python's ``hash`` of a string is per process (randomized), which is all an in-process
    filter needs: 64 bits, so a collision only costs one ClickHouse lookup.
    """

    def __init__(self, roster_key: str, version: int, hashes: np.ndarray) -> None:
        self.roster_key = roster_key
        self.version = version
        self.hashes = hashes  # sorted, unique int64; replaced (never changed) on a merge
        self.recent: set[int] = set()
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.hashes) + len(self.recent)

    def absent(self, refs: list[str]) -> set[str]:
        """The references certainly not in the roster (as of ``version`` plus what was added)."""
        hashed = np.fromiter((hash(ref) for ref in refs), dtype=np.int64, count=len(refs))
        values = hashed.tolist()
        # Under the lock, as ``add`` writes: a merge swaps ``hashes`` and ``recent`` in two
        # steps, and a reader between them would find a held member in neither (issue 16,
        # D6: a remove then became a no-op).
        with self.lock:
            hashes = self.hashes
            if len(hashes):
                positions = np.minimum(np.searchsorted(hashes, hashed), len(hashes) - 1)
                stored = (hashes[positions] == hashed).tolist()
            else:
                stored = [False] * len(refs)
            return {
                ref
                for ref, value, held in zip(refs, values, stored, strict=True)
                if not held and value not in self.recent
            }

    def add(self, hashes: Iterable[int]) -> None:
        """Count more references as possibly held."""
        with self.lock:
            self.recent.update(hashes)
            if len(self.recent) > _RECENT_MAX:
                merged = np.fromiter(self.recent, dtype=np.int64, count=len(self.recent))
                self.hashes = _merged(self.hashes, merged)
                self.recent = set()

    def advance(self, *, covered: int, to: int) -> None:
        """After commit: the digest covers ``to`` if it covered ``covered`` already."""
        with self.lock:
            if self.version >= covered and to > self.version:
                self.version = to


def digest_build(roster_key: str, version: int) -> RosterDigest:
    """A digest of the roster's events up to ``version`` as the metadata store shows them."""
    rows = MemberOutbox.objects.filter(roster_key=roster_key, version__lte=version)
    parts = [
        np.fromiter(_held_hashes(orjson.loads(events)), dtype=np.int64)
        for events in rows.values_list("events", flat=True).iterator(chunk_size=4)
    ]
    hashes = _sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    return RosterDigest(roster_key, version, hashes)


class DigestRegistry:
    """The digests of one process, least recently used first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digests: OrderedDict[str, RosterDigest] = OrderedDict()
        self._queued: list[str] = []
        self._builder: threading.Thread | None = None
        self._idle = threading.Condition(self._lock)

    # -- the write path -------------------------------------------------------------------

    def absent(self, roster_key: str, version: int, refs: list[str], *, size: int) -> set[str]:
        """References certainly not in the roster at ``version``, the version the calling
        write builds on (read under its row lock, in its transaction). ``size``: about how
        many members the roster has (chooses between building now and in the background).
        """
        if not refs or fhir_settings.MEMBER_DIGEST_ENTRIES == 0:
            return set()
        with self._lock:
            digest = self._digests.get(roster_key)
            if digest is not None:
                self._digests.move_to_end(roster_key)
        if digest is None:
            if size > fhir_settings.MEMBER_DIGEST_SYNC_MAX:
                # Queued once this write commits: a build started now would read the version
                # before it and keep a digest one write behind (caught up by the next write).
                db.on_commit(lambda: self._build_later(roster_key))
                return set()
            digest = digest_build(roster_key, version)
            db.on_commit(lambda: self._keep(digest))
        elif digest.version > version:
            return set()  # not this roster's history (the store was reset): never trust it
        elif digest.version < version:
            self._catch_up(digest, version)
        return digest.absent(refs)

    def _catch_up(self, digest: RosterDigest, version: int) -> None:
        """Add the batches of versions after the digest's, up to ``version`` (other writers).

        Under a load on several processes about every other write catches up a version or
        two, so this is on the write path: the batches are read by ``(group_id, version)``,
        the outbox index that holds just that range (by ``roster_key`` the read visited
        every batch of the roster's history, ~220 pages at 350 versions, and grew with it),
        in pages of ``CATCH_UP_ROWS`` by key set, each one statement (a server-side cursor,
        which ``iterator`` opens on PostgreSQL, was three or four: DECLARE, FETCHes, CLOSE).
        """
        covered = digest.version
        group_id = digest.roster_key.rpartition("/")[0]
        rows = (
            MemberOutbox.objects.filter(
                group_id=group_id, roster_key=digest.roster_key, version__lte=version
            )
            .order_by("version", "chunk")
            .values_list("version", "chunk", "events")
        )
        page = rows.filter(version__gt=covered)
        while True:
            batches = list(page[:CATCH_UP_ROWS])
            for _, _, events in batches:
                digest.add(_held_hashes(orjson.loads(events)))
            if len(batches) < CATCH_UP_ROWS:
                break
            last_version, last_chunk, _ = batches[-1]
            page = rows.filter(version__gte=last_version).exclude(
                version=last_version, chunk__lte=last_chunk
            )
        db.on_commit(lambda: digest.advance(covered=covered, to=version))

    def note_write(self, roster_key: str, version: int, events: Sequence[list[Any]]) -> None:
        """A write (in its transaction) stores these events as ``version`` of the roster;
        the roster's digest learns them when it commits."""

        def committed() -> None:
            with self._lock:
                digest = self._digests.get(roster_key)
            if digest is not None:
                digest.add(_held_hashes(events))
                digest.advance(covered=version - 1, to=version)
                self._trim()

        db.on_commit(committed)

    def note_new_roster(self, roster_key: str, version: int, events: Sequence[list[Any]]) -> None:
        """A write (in its transaction) creates the roster with these events, its whole
        history, as ``version``; a roster too large to digest inside a later write gets its
        digest from them when the write commits.

        Otherwise the roster's first later write queued a background build that read the
        whole outbox back (10^6 members: ~1 s of CPU, 14 MB of JSON decoded) while the next
        writes competed with it; hashing the events in hand costs ~0.15 s per 10^6.
        """
        limit = fhir_settings.MEMBER_DIGEST_ENTRIES
        if len(events) <= fhir_settings.MEMBER_DIGEST_SYNC_MAX or len(events) > limit:
            return

        def committed() -> None:
            held = np.fromiter(_held_hashes(events), dtype=np.int64)
            self._keep(RosterDigest(roster_key, version, _sorted_unique(held)))

        db.on_commit(committed)

    # -- keeping digests ----------------------------------------------------------------

    def _keep(self, digest: RosterDigest) -> None:
        with self._lock:
            known = self._digests.get(digest.roster_key)
            if known is None or known.version < digest.version:
                self._digests[digest.roster_key] = digest
        self._trim()

    def _trim(self) -> None:
        limit = fhir_settings.MEMBER_DIGEST_ENTRIES
        with self._lock:
            total = sum(len(d) for d in self._digests.values())
            while self._digests and total > limit:
                _, dropped = self._digests.popitem(last=False)
                total -= len(dropped)

    def get(self, roster_key: str) -> RosterDigest | None:
        """The digest kept for a roster, if any."""
        with self._lock:
            return self._digests.get(roster_key)

    def clear(self) -> None:
        """Forget every digest (tests; after restoring the metadata store)."""
        with self._lock:
            self._digests.clear()

    # -- background builds ----------------------------------------------------------------

    def _build_later(self, roster_key: str) -> None:
        with self._lock:
            if roster_key in self._queued:
                return
            self._queued.append(roster_key)
            if self._builder is None or not self._builder.is_alive():
                self._builder = threading.Thread(
                    target=self._run, name="roster-digest-builder", daemon=True
                )
                self._builder.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queued:
                    self._builder = None
                    self._idle.notify_all()
                    return
                roster_key = self._queued[0]
            try:
                digest = self._build_committed(roster_key)
                if digest is not None:
                    self._keep(digest)
            except Exception:  # a failed build only means lookups go on
                logger.exception("Building the roster digest of %s failed", roster_key)
            finally:
                connections.close_all()  # this thread's own metadata connection
                with self._lock:
                    self._queued.remove(roster_key)

    @staticmethod
    def _build_committed(roster_key: str) -> RosterDigest | None:
        """Digest the roster at its latest committed version (None: the roster is gone).

        The version is read first: every batch of a version up to it committed with or
        before it, so the outbox read after it holds them all.
        """
        group_id, _, incarnation = roster_key.rpartition("/")
        row = (
            StoredResource.objects.filter(key=f"Group/{group_id}")
            .values_list("version_id", "incarnation", "deleted")
            .first()
        )
        if row is None or row[2] or str(row[1]) != incarnation:
            return None
        return digest_build(roster_key, row[0])

    # -- warm-up ------------------------------------------------------------------------

    def warm_up(self, **_: Any) -> list[str]:
        """Digest the most recently updated rosters too large to digest inside a write,
        newest first, within ``MEMBER_DIGEST_ENTRIES`` and ``WARM_SECONDS``; the roster
        keys digested.

        A server process runs this before it takes requests (``fhirservice.serving``):
        otherwise the first write of each large roster after a restart asks ClickHouse
        while a background build of ~1 s per 10^6 members competes with the requests for
        the interpreter (PATCH +1 at 10^6, first 20 after a restart: ~0.4 s instead of
        ~15 ms as served). Also a ``service_starting`` receiver.
        """
        limit = fhir_settings.MEMBER_DIGEST_ENTRIES
        if limit == 0:
            return []
        started = time.monotonic()
        recent = (
            StoredResource.objects.filter(resource_type="Group", deleted=False)
            .order_by("-last_updated")
            .values_list("resource_id", "incarnation")[:WARM_CANDIDATES]
        )
        built: list[str] = []
        total = 0
        for group_id, incarnation in recent:
            if time.monotonic() - started > WARM_SECONDS:
                break
            key = f"{group_id}/{incarnation}"
            size = MemberOutbox.objects.filter(roster_key=key).aggregate(n=Sum("event_count"))
            events = size["n"] or 0
            if events <= fhir_settings.MEMBER_DIGEST_SYNC_MAX or total + events > limit:
                continue
            digest = self._build_committed(key)
            if digest is not None:
                self._keep(digest)
                built.append(key)
                total += len(digest)
        return built

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until queued background builds are done (tests, the benchmark)."""
        with self._lock:
            return self._idle.wait_for(lambda: self._builder is None, timeout)


digests = DigestRegistry()

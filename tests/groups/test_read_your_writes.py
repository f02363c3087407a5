"""Read-your-writes while the background thread ships (issue 15, point 1).

A roster read merges ClickHouse with the outbox's unshipped batches. A batch shipped between
the two reads must be seen in one of them, never in neither.
"""

from __future__ import annotations

import time
import uuid

import pytest

from fhirservice.store.handlers import WriteContext
from groups.members import parse_member
from groups.models import MemberOutbox
from groups.outbox import background as shipping
from groups.outbox.ship import member_batches_ship
from groups.repository import MemberEventRepository
from groups.selectors import groups_with_members, iter_members, roster_page
from groups.services import RosterDelta, group_members_change
from tests.groups.conftest import create_group, current_key
from tests.support import run_threads

pytestmark = pytest.mark.django_db(transaction=True)

PAIRS = 3
SECONDS = 20.0


def change(gid: str, *, put: str, remove: str | None = None) -> None:
    """A member write as an HTTP request makes it: its batch ships in the background."""
    delta = RosterDelta(puts=[parse_member({"entity": {"reference": put}}, "test")])
    if remove is not None:
        delta.removes.append(remove)
    with shipping.serving_request():
        group_members_change(group_id=gid, delta=delta, context=WriteContext())


def test_readers_see_acknowledged_writes_while_batches_ship(live_api) -> None:
    """Writers add members one by one; readers, meanwhile, search for the newest member
    acknowledged before their read began, and page the roster from the one before it. Later
    writes only add members, so every read must find it. Bounded in time: on an idle
    machine a thousand reads and more, on a loaded one (2 cores, 8 test runs) a few hundred.
    The test after it makes the interleaving certain."""
    run = uuid.uuid4().hex[:8]
    prefixes = [f"Patient/ryw-{run}-{p}-" for p in range(PAIRS)]
    gids = [create_group(live_api, [f"{prefix}00000"]) for prefix in prefixes]
    keys = [current_key(gid) for gid in gids]
    acknowledged = [0] * PAIRS  # the newest write each writer saw committed
    deadline = time.monotonic() + SECONDS

    def writer(p: int) -> int:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            change(gids[p], put=f"{prefixes[p]}{n:05d}")
            acknowledged[p] = n
            # Readers read while this batch ships, before the next write adds to it.
            pending = MemberOutbox.objects.filter(roster_key=keys[p], shipped_at__isnull=True)
            while pending.exists() and time.monotonic() < deadline:
                time.sleep(0.002)
        return n

    def reader(p: int) -> tuple[int, list[str]]:
        reads, misses = 0, []
        expected = sorted(f"Group/{gid}" for gid in gids)
        while time.monotonic() < deadline:
            # Every roster's newest member in one search: each read spans whichever batch
            # is shipping at the time.
            newest = list(acknowledged)
            refs = [f"{prefix}{n:05d}" for prefix, n in zip(prefixes, newest, strict=True)]
            found = groups_with_members(refs, active_only=reads % 2 == 1)
            if found != expected:
                misses.append(f"writes {newest}: search found {len(found)} of {PAIRS}")
            if reads % 4 == 0:  # a roster read ($members, GET) now and then
                before = f"{prefixes[p]}{newest[p] - 1:05d}"
                page = [state.ref for state in roster_page(keys[p], after=before, count=1)]
                if page != [refs[p]]:
                    misses.append(f"write {newest[p]}: page {page}")
            reads += 1
        return reads, misses

    results = run_threads(
        lambda i: writer(i) if i < PAIRS else reader(i - PAIRS), 2 * PAIRS, timeout=120
    )
    assert shipping.flush()
    writes = sum(results[:PAIRS])
    reads = sum(done for done, _ in results[PAIRS:])
    misses = [miss for _, found in results[PAIRS:] for miss in found]
    assert writes >= 20 and reads >= 100, (writes, reads)
    assert misses == [], f"{len(misses)} misses in {reads} reads of {writes} writes: {misses[:5]}"


def read_then_ship(name: str):
    """A repository read that ships every pending batch as soon as ClickHouse answered."""
    read = getattr(MemberEventRepository, name)

    def wrapped(self, *args, **kwargs):
        rows = list(read(self, *args, **kwargs))
        member_batches_ship()
        return iter(rows)

    return wrapped


def test_a_batch_shipped_between_the_two_reads_is_seen(
    live_api, clickhouse_down, monkeypatch
) -> None:
    """The shipper finishing right after a read's ClickHouse half, made certain instead of
    likely: each ClickHouse roster read is followed at once by shipping what is pending."""
    gid = create_group(live_api, ["Patient/ryw-a"])
    key = current_key(gid)
    with clickhouse_down():
        change(gid, put="Patient/ryw-b", remove="Patient/ryw-a")  # pending
    for name in ("rosters_of", "iter_roster"):
        monkeypatch.setattr(MemberEventRepository, name, read_then_ship(name))
    assert groups_with_members(["Patient/ryw-b"]) == [f"Group/{gid}"]
    assert MemberOutbox.objects.filter(roster_key=key, shipped_at__isnull=True).count() == 0
    with clickhouse_down():
        change(gid, put="Patient/ryw-c", remove="Patient/ryw-b")
    assert groups_with_members(["Patient/ryw-b"]) == []
    with clickhouse_down():
        change(gid, put="Patient/ryw-d", remove="Patient/ryw-c")
    assert [state.ref for state in iter_members(key)] == ["Patient/ryw-d"]

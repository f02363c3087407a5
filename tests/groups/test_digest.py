"""Roster digests (groups.digest): writes skip the ClickHouse lookup of members a roster
certainly does not hold, and never take a held member for a new one.

"Another process" is a registry of its own: the writes it makes do not touch this process's
digests, exactly as a second server process's would not. ClickHouse being unreachable shows
whether a write asked it: a write that needed the lookup then records its events blind
(``recount``), one answered by the digest does not.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import groups.outbox.record
import groups.session
import groups.storage
from fhirservice.conf import fhir_settings
from fhirservice.store.handlers import WriteContext
from groups.conf import DEFAULTS
from groups.digest import CATCH_UP_ROWS, DigestRegistry, RosterDigest, digests
from groups.members import parse_member
from groups.outbox.ship import member_batches_ship
from groups.services import RosterDelta, group_members_change
from tests.groups.conftest import (
    add,
    create_group,
    current_key,
    outbox_events,
    outbox_rows,
    patched,
    read,
    refs_of,
    remove_ref,
    stored_version,
)
from tests.support import round_trips, run_threads

A, B, C, D, X, Y = (f"Patient/dg-{n}" for n in "abcdxy")

pytestmark = pytest.mark.django_db(transaction=True)


def service_settings(**values: Any) -> Any:
    """``override_settings`` of some FHIR_SERVICE keys (the others keep their values)."""
    from django.conf import settings

    return override_settings(FHIR_SERVICE={**(settings.FHIR_SERVICE or {}), **values})


@contextmanager
def other_process(monkeypatch: pytest.MonkeyPatch):
    """Writes in the block use a digest registry of their own, as another process would."""
    registry = DigestRegistry()
    with monkeypatch.context() as patcher:
        patcher.setattr(groups.session, "digests", registry)
        patcher.setattr(groups.outbox.record, "digests", registry)
        patcher.setattr(groups.storage, "digests", registry)
        yield


def last_batch_recount(gid: str) -> bool:
    return outbox_rows(gid)[-1].recount


def events_of(gid: str, ref: str) -> list[str]:
    return [event for _, _, event, member in outbox_events(gid) if member == ref]


def test_new_members_need_no_clickhouse_once_digested(live_api, clickhouse_down) -> None:
    gid = create_group(live_api, [A, B])
    patched(live_api, gid, [add(C)])  # digests the roster; kept when the write commits
    digest = digests.get(current_key(gid))
    assert digest is not None and digest.version == stored_version(gid)

    with clickhouse_down():
        patched(live_api, gid, [add(D)])
        assert not last_batch_recount(gid), "a new member was looked up in ClickHouse"
        # A member the roster holds is still looked up: blind without ClickHouse.
        patched(live_api, gid, [add(A, inactive=True)])
        assert last_batch_recount(gid)
    member_batches_ship(roster_keys=[current_key(gid)])
    assert read(live_api, gid)["quantity"] == 3  # A is inactive now


def test_members_written_by_another_process_are_caught_up(live_api, monkeypatch) -> None:
    gid = create_group(live_api, [A])
    patched(live_api, gid, [add(B)])
    key = current_key(gid)
    assert digests.get(key).version == stored_version(gid)

    with other_process(monkeypatch):
        patched(live_api, gid, [add(C)])
        patched(live_api, gid, [add(X)])
    assert digests.get(key).version < stored_version(gid)

    body = patched(live_api, gid, [add(C), add(X, inactive=True), add(D)])
    assert body["quantity"] == 4  # A, B, C, D active; X inactive
    assert events_of(gid, C) == ["added"]  # already held: no change, no second "added"
    assert events_of(gid, X) == ["added", "updated"]
    assert events_of(gid, D) == ["added"]
    assert digests.get(key).version == stored_version(gid)
    assert refs_of(read(live_api, gid)) == [A, B, C, D, X]


def test_a_catch_up_reads_pages_of_the_versions_range(live_api, monkeypatch) -> None:
    """Under a load on several processes about every other write catches up: it reads the
    other writers' batches by (group_id, version), the index that holds just that range,
    a page of CATCH_UP_ROWS per statement and one round trip each (no server-side cursor:
    DECLARE, FETCHes and CLOSE were 3-4 round trips, and by ``roster_key`` alone
    PostgreSQL visited every batch of the roster's history)."""
    refs = [f"Patient/dg-cu{n}" for n in range(6)]
    gid = create_group(live_api, [A])
    patched(live_api, gid, [add(B)])
    key = current_key(gid)
    with other_process(monkeypatch):
        patched(live_api, gid, [add(refs[0])])
        with service_settings(MEMBER_BATCH_SIZE=1):  # one version of three batches
            patched(live_api, gid, [add(refs[1]), add(refs[2]), add(refs[3])])
        patched(live_api, gid, [add(refs[4])])
    covered, version = digests.get(key).version, stored_version(gid)
    batches = [row for row in outbox_rows(gid) if row.version > covered]
    assert len(batches) == CATCH_UP_ROWS + 1

    with transaction.atomic():
        connection.cursor().execute("SELECT 1")  # the transaction's BEGIN goes before
        with CaptureQueriesContext(connection) as captured:
            if connection.vendor == "postgresql":
                with round_trips() as count:
                    absent = digests.absent(key, version, refs, size=8)
                assert count == [2]
            else:
                absent = digests.absent(key, version, refs, size=8)
    assert absent == {refs[5]}
    reads = [query["sql"] for query in captured.captured_queries]
    assert len(reads) == 2
    assert all('"group_id" = ' in sql and "groups_memberoutbox" in sql for sql in reads)
    assert digests.get(key).version == version


def test_rolled_back_write_never_counts_as_covered(live_api, monkeypatch) -> None:
    gid = create_group(live_api, [A])
    patched(live_api, gid, [add(B)])
    key = current_key(gid)
    covered = digests.get(key).version

    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        group_members_change(
            group_id=gid,
            delta=RosterDelta(puts=[parse_member({"entity": {"reference": X}}, "test")]),
            context=WriteContext(actor="test", source="operation"),
        )
        raise Abort
    assert digests.get(key).version == covered
    assert stored_version(gid) == covered

    # Another process writes the version number the rolled-back write had, adding Y.
    with other_process(monkeypatch):
        patched(live_api, gid, [add(Y)])
    body = patched(live_api, gid, [add(Y), add(X)])
    assert body["quantity"] == 4
    assert events_of(gid, Y) == ["added"]
    assert events_of(gid, X) == ["added"]


def test_removed_and_re_added_member(live_api) -> None:
    gid = create_group(live_api, [A, B])
    patched(live_api, gid, [remove_ref(A)])
    body = patched(live_api, gid, [add(A), add(C)])
    assert body["quantity"] == 3
    assert events_of(gid, A) == ["added", "removed", "added"]
    body = patched(live_api, gid, [add(A)])  # present: no event, no new quantity
    assert body["quantity"] == 3
    assert events_of(gid, A) == ["added", "removed", "added"]


def test_large_rosters_are_digested_in_the_background(live_api, clickhouse_down) -> None:
    gid = create_group(live_api, [A, B, C])
    with service_settings(MEMBER_DIGEST_SYNC_MAX=2):
        patched(live_api, gid, [add(D)])  # looked up; queues a background build
        assert digests.wait_idle()
        digest = digests.get(current_key(gid))
        assert digest is not None and digest.version == stored_version(gid)
        assert digest.absent([A, B, C, D, X]) == {X}
        with clickhouse_down():
            patched(live_api, gid, [add(X)])
        assert not last_batch_recount(gid)
        assert read(live_api, gid)["quantity"] == 5


def test_a_starting_server_digests_its_large_rosters_before_the_first_write(
    live_api, clickhouse_down
) -> None:
    # A restarted process used to learn a large roster only at its first write, then build
    # in the background while writes asked ClickHouse (as served: the first 20 PATCHes).
    from fhirservice.serving import warm_up

    large = create_group(live_api, [A, B, C])
    small = create_group(live_api, [D])
    gone = create_group(live_api, [X, Y, A])
    assert live_api.delete(f"/Group/{gone}").status == 204
    digests.clear()  # a new process
    with service_settings(MEMBER_DIGEST_SYNC_MAX=2):
        warm_up()
        digest = digests.get(current_key(large))
        assert digest is not None and digest.version == stored_version(large)
        assert digests.get(current_key(small)) is None  # digested inside its first write
        assert digests.get(current_key(gone)) is None
        with clickhouse_down():
            patched(live_api, large, [add(X)])
        assert not last_batch_recount(large)  # the digest answered, ClickHouse was not asked
        assert read(live_api, large)["quantity"] == 4
    digests.clear()
    with service_settings(MEMBER_DIGEST_SYNC_MAX=2, MEMBER_DIGEST_ENTRIES=3):
        digests.warm_up()  # 4 events: more than the digests may hold
        assert digests.get(current_key(large)) is None


def test_a_created_large_roster_is_digested_from_its_own_events(live_api, clickhouse_down):
    # Was: the first write after the create queued a background build reading the outbox.
    with service_settings(MEMBER_DIGEST_SYNC_MAX=2):
        large = create_group(live_api, [A, B, C])
        small = create_group(live_api, [D])
        digest = digests.get(current_key(large))
        assert digest is not None and digest.version == stored_version(large)
        assert digest.absent([A, B, C, X]) == {X}
        assert digests.get(current_key(small)) is None
        with clickhouse_down():
            patched(live_api, large, [add(X)])
        assert not last_batch_recount(large)  # the digest answered, ClickHouse was not asked
    assert read(live_api, large)["quantity"] == 4


def test_least_recently_used_digests_make_room(live_api) -> None:
    with service_settings(MEMBER_DIGEST_ENTRIES=3):
        first = create_group(live_api, [A])
        patched(live_api, first, [add(B)])
        assert digests.get(current_key(first)) is not None
        second = create_group(live_api, [C, D])
        patched(live_api, second, [add(X)])
        assert digests.get(current_key(first)) is None
        assert digests.get(current_key(second)) is not None
        body = patched(live_api, first, [add(A), add(Y)])
        assert body["quantity"] == 3
        assert events_of(first, A) == ["added"]


def test_digests_off(live_api, clickhouse_down) -> None:
    gid = create_group(live_api, [A])
    with service_settings(MEMBER_DIGEST_ENTRIES=0):
        patched(live_api, gid, [add(B)])
        assert digests.get(current_key(gid)) is None
        with clickhouse_down():
            patched(live_api, gid, [add(C)])
        assert last_batch_recount(gid)
    assert fhir_settings.MEMBER_DIGEST_ENTRIES > 0


def test_the_default_bound_holds_the_rosters_of_the_load_budget() -> None:
    # Issue 16's load writes at random to 100 Groups of 10^5: with room for fewer references
    # every process evicted and rebuilt digests all the time, and most writes asked
    # ClickHouse (23 instead of 99 member writes/s as served).
    assert DEFAULTS["MEMBER_DIGEST_ENTRIES"] >= 100 * 10**5


def test_digest_lookup() -> None:
    held = ["Patient/1", "Patient/2", "Patient/3"]
    digest = RosterDigest("g/1", 3, np.unique(np.array([hash(r) for r in held], dtype=np.int64)))
    assert digest.absent([*held, "Patient/4", "Patient/0"]) == {"Patient/4", "Patient/0"}
    digest.add([hash("Patient/4")])
    assert digest.absent(["Patient/4", "Patient/5"]) == {"Patient/5"}
    empty = RosterDigest("g/1", 1, np.zeros(0, dtype=np.int64))
    assert empty.absent(["Patient/1"]) == {"Patient/1"}
    digest.advance(covered=2, to=5)
    assert digest.version == 5
    digest.advance(covered=6, to=7)  # did not cover 6: stays
    assert digest.version == 5


def test_a_held_member_is_never_absent_while_another_thread_merges(monkeypatch) -> None:
    """``add`` merges ``recent`` into ``hashes`` on overflow; a reader must see one or the
    other, never the new ``hashes`` without the old ``recent`` (issue 16, D6)."""
    monkeypatch.setattr("groups.digest._RECENT_MAX", 64)
    digest = RosterDigest("g/1", 1, np.zeros(0, dtype=np.int64))
    overflows = 300
    added = [0]  # members Patient/held-0 … held-(n-1) are held
    misses: list[int] = []

    def write() -> None:
        for round_ in range(overflows):
            digest.add([hash(f"Patient/held-{round_}")])  # merged at the next overflow
            added[0] = round_ + 1
            start = (round_ + 1) * 1000
            digest.add(range(start, start + 65))  # overflows

    def read() -> None:
        while added[0] < overflows:
            held = [f"Patient/held-{n}" for n in range(added[0])]
            if digest.absent(held):
                misses.append(added[0])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the window is small
    try:
        run_threads(lambda index: write() if index == 0 else read(), 2, timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert misses == []


def test_digest_sets_are_sorted_unique_as_numpy_would_make_them() -> None:
    # The build and the overflow merge replaced np.unique / np.union1d (slow since NumPy 2.3
    # for 64-bit hashes); the arrays must stay exactly what absent() searches.
    from groups.digest import _merged, _sorted_unique

    rng = np.random.default_rng(7)
    values = rng.integers(-(2**63), 2**63 - 1, size=5000, dtype=np.int64)
    values = np.concatenate([values, values[:300], [0, 0, -1]]).astype(np.int64)
    built = _sorted_unique(values.copy())
    assert np.array_equal(built, np.unique(values))
    more = np.array(
        sorted({*rng.integers(-(2**63), 2**63 - 1, size=700).tolist(), *built[:50].tolist()})
    )
    rng.shuffle(more)
    assert np.array_equal(_merged(built, more.astype(np.int64)), np.union1d(built, more))
    empty = np.zeros(0, dtype=np.int64)
    assert np.array_equal(_merged(empty, np.array([3, 1], dtype=np.int64)), [1, 3])
    assert len(_sorted_unique(empty.copy())) == 0

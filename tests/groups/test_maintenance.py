"""Roster maintenance services (``groups.maintenance``): verify, rebuild, repair, backfill.

Damage is made by writing bad rows straight into the stores, the way an outage, a crash or
a botched manual fix would leave them: stray events inserted into the ClickHouse log, bogus
rows in the current-state tables, committed events deleted from the log, a corrupted
``quantity`` in the metadata body, batches left unshipped in the outbox. Each test checks
that the scan names exactly that damage and that the fix leaves every copy consistent and
the roster as the client wrote it.

Writes commit for real (transactional tests) so that batches ship after commit, as in
production; ClickHouse keeps its data between tests, so every test uses fresh Groups.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter

import orjson
import pytest
from django.test import override_settings

from fhirservice.models import ResourceVersion, StoredResource
from fhirservice.store.handlers import WriteContext
from groups.maintenance.backfill import (
    backfill_candidates,
    group_roster_backfill,
    groups_backfill,
)
from groups.maintenance.common import MaintenanceError, wait_for_mutations
from groups.maintenance.repair import group_batches_ship, group_roster_rebuild, rosters_repair
from groups.maintenance.scan import (
    MISSING_EVENTS,
    PENDING,
    QUANTITY,
    STATE,
    STRAY_EVENTS,
    STRAY_ROSTER,
    STRAY_VERSION,
    roster_verify,
    rosters_scan,
)
from groups.models import MemberOutbox
from groups.repository import MemberEventRepository
from tests.groups.conftest import (
    add,
    clickhouse_roster,
    create_group,
    current_key,
    group,
    member,
    outbox_rows,
    patched,
    patients,
    read,
    refs_of,
    remove_ref,
    stored_version,
)

pytestmark = pytest.mark.django_db(transaction=True)

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
INLINE = {"GROUP_ROSTER_STORAGE": "inline"}


# --- damage --------------------------------------------------------------------------------


def stray_event(key: str, version: int, seq: int, ref: str, event_type: str = "added") -> None:
    """Insert one event straight into the ClickHouse log (no outbox row, no version)."""
    row = (
        key,
        ref,
        ref.partition("/")[0],
        event_type,
        version,
        seq,
        "",
        "",
        0,
        "",
        NOW,
        "x",
        "test",
        "intruder",
    )
    MemberEventRepository().insert_events([row])


def bogus_state(key: str, ref: str, *, present: int, version: int = 1 << 20) -> None:
    """Insert a MemberState row that no event backs."""
    client = MemberEventRepository().client
    pos = version << 32
    at = "toUInt64(%(p)s)"
    client.command(
        "INSERT INTO Group_4_0_0_MemberState (roster_key, member_ref, pos, present, member_type, "
        f"period_start, period_end, inactive, extra) SELECT %(k)s, %(r)s, maxState({at}), "
        f"argMaxState(toUInt8(%(present)s), {at}), argMaxState('Patient', {at}), "
        f"argMaxState('', {at}), argMaxState('', {at}), argMaxState(toUInt8(0), {at}), "
        f"argMaxState('', {at})",
        {"k": key, "r": ref, "p": pos, "present": present},
    )


def bogus_reverse(key: str, ref: str) -> None:
    """Insert a MemberGroups row claiming ``ref`` is in the roster."""
    MemberEventRepository().client.command(
        "INSERT INTO Group_4_0_0_MemberGroups (member_ref, roster_key, pos, present, inactive) "
        "SELECT %(r)s, %(k)s, maxState(toUInt64(1)), argMaxState(toUInt8(1), toUInt64(1)), "
        "argMaxState(toUInt8(0), toUInt64(1))",
        {"k": key, "r": ref},
    )


def lose_version(key: str, version: int) -> None:
    """Delete a committed version's events from the log only (a lost ClickHouse part)."""
    repository = MemberEventRepository()
    repository.delete_events(key, version=version)
    wait_for_mutations(repository)


def corrupt_quantity(gid: str, value: int) -> None:
    """Overwrite Group.quantity in the stored body (no version)."""
    row = StoredResource.objects.get(key=f"Group/{gid}")
    body = orjson.loads(row.body)
    body["quantity"] = value
    StoredResource.objects.filter(key=row.key).update(body=orjson.dumps(body).decode())


def kinds(findings) -> Counter:
    """How many findings of each kind."""
    return Counter(f.kind for f in findings)


def roster_group(api, n: int = 30) -> str:
    """A Group of ``n`` fresh members with two versions, shipped."""
    prefix = uuid.uuid4().hex[:6]
    gid = create_group(api, patients(n, prefix))
    patched(
        api, gid, [remove_ref(f"Patient/{prefix}0001"), add(f"Patient/{prefix}zz", inactive=True)]
    )
    assert not MemberOutbox.objects.filter(group_id=gid, shipped_at__isnull=True).exists()
    return gid


def assert_healthy(api, gid: str, refs: list[str]) -> None:
    """Verify passes and the API serves exactly ``refs``."""
    report = roster_verify(group_id=gid)
    assert report.ok, report.findings
    assert refs_of(read(api, gid)) == refs
    assert clickhouse_roster(current_key(gid)) == refs


# --- verify --------------------------------------------------------------------------------


def test_verify_measures_a_consistent_roster(live_api):
    gid = roster_group(live_api)
    report = roster_verify(group_id=gid)
    assert report.ok, report.findings
    assert report.roster_key == current_key(gid)
    assert report.version_id == 2
    stats = report.stats
    assert stats.quantity == 29
    assert (stats.consistency.log_present, stats.consistency.log_active) == (30, 29)
    assert (stats.clickhouse_versions, stats.clickhouse_events) == (2, 32)
    assert (stats.outbox_versions, stats.outbox_events) == (2, 32)
    assert stats.pending_batches == 0
    assert "consistent" in report.summary()


def test_verify_of_an_unknown_group_raises(live_api):
    with pytest.raises(MaintenanceError, match="No Group with id 'nope'"):
        roster_verify(group_id="nope")


def test_verify_sees_pending_batches_and_ship_sends_them(live_api, no_shipping):
    gid = create_group(live_api, ["Patient/pa", "Patient/pb"])
    report = roster_verify(group_id=gid)
    assert kinds(report.findings) == {PENDING: 1}
    assert report.stats.pending_batches == 1 and report.stats.pending_events == 2
    shipped = group_batches_ship(group_ids=[gid])
    assert (shipped.batches, shipped.events) == (1, 2)
    assert_healthy(live_api, gid, ["Patient/pa", "Patient/pb"])


# --- each kind of damage: found, then fixed --------------------------------------------------


def repaired(gid: str, expected: Counter) -> None:
    """Repair finds exactly ``expected`` for the Group, fixes it, and nothing remains."""
    report = rosters_repair(group_ids=[gid], fix=True)
    assert kinds(report.found.findings) == expected, report.found.findings
    assert report.remaining == [], report.remaining


def test_stray_events_of_an_uncommitted_version_are_removed(live_api):
    gid = roster_group(live_api)
    refs = refs_of(read(live_api, gid))
    key = current_key(gid)
    stray_event(key, stored_version(gid) + 1, 0, "Patient/ghost")
    report = roster_verify(group_id=gid)
    # The materialized view took the ghost into the state too, so the log-derived count
    # disagrees with quantity: both are reported.
    assert kinds(report.findings) == {STRAY_VERSION: 1, QUANTITY: 1}
    assert "newer than the Group's version 2" in report.findings[0].detail
    repaired(gid, Counter({STRAY_VERSION: 1, QUANTITY: 1}))
    assert_healthy(live_api, gid, refs)
    assert read(live_api, gid)["quantity"] == 29


def test_stray_events_of_a_version_without_outbox_row_are_removed(live_api):
    gid = create_group(live_api)  # version 1 has no member events, so no outbox row
    patched(live_api, gid, [add("Patient/real")])
    stray_event(current_key(gid), 1, 0, "Patient/ghost", "added")
    report = roster_verify(group_id=gid)
    assert kinds(report.findings) == {STRAY_VERSION: 1, QUANTITY: 1}
    assert "has no outbox record" in report.findings[0].detail
    repaired(gid, Counter({STRAY_VERSION: 1, QUANTITY: 1}))
    assert_healthy(live_api, gid, ["Patient/real"])


def test_stray_events_beyond_a_committed_version_are_removed(live_api):
    gid = roster_group(live_api)
    refs = refs_of(read(live_api, gid))
    key = current_key(gid)
    stray_event(key, 2, 17, "Patient/ghost", "added")
    report = roster_verify(group_id=gid)
    assert kinds(report.findings) == {STRAY_EVENTS: 1, QUANTITY: 1}
    finding = next(f for f in report.findings if f.kind == STRAY_EVENTS)
    assert (finding.version, finding.min_seq) == (2, 2)
    repaired(gid, Counter({STRAY_EVENTS: 1, QUANTITY: 1}))
    assert_healthy(live_api, gid, refs)


def test_rows_of_a_roster_key_of_no_incarnation_are_removed(live_api):
    gid = roster_group(live_api)
    refs = refs_of(read(live_api, gid))
    stray_key = f"{gid}/99"
    stray_event(stray_key, 99, 0, "Patient/ghost")
    report = roster_verify(group_id=gid)
    assert kinds(report.findings) == {STRAY_ROSTER: 1}
    assert report.findings[0].roster_key == stray_key
    repaired(gid, Counter({STRAY_ROSTER: 1}))
    assert MemberEventRepository().roster_keys(prefix=f"{gid}/") == {current_key(gid)}
    assert_healthy(live_api, gid, refs)


def test_a_full_scan_finds_rosters_of_groups_that_do_not_exist(live_api):
    orphan = f"{uuid.uuid4()}/1"
    stray_event(orphan, 1, 0, "Patient/ghost")
    bogus_state(f"{uuid.uuid4()}/1", "Patient/ghost", present=1)
    report = rosters_scan()
    strays = {f.roster_key for f in report.findings if f.kind == STRAY_ROSTER}
    assert orphan in strays
    assert report.rosters >= 2


def test_missing_committed_events_are_reinserted_from_the_outbox(live_api):
    gid = roster_group(live_api)
    refs = refs_of(read(live_api, gid))
    lose_version(current_key(gid), 2)
    report = roster_verify(group_id=gid)
    found = kinds(report.findings)
    assert found[MISSING_EVENTS] == 1 and found[STATE] == 1, report.findings
    assert "2 of 2 committed events missing" in next(
        f.detail for f in report.findings if f.kind == MISSING_EVENTS
    )
    repaired(gid, found)
    assert_healthy(live_api, gid, refs)


def test_bogus_state_rows_are_rebuilt_from_the_log(live_api):
    gid = roster_group(live_api)
    refs = refs_of(read(live_api, gid))
    key = current_key(gid)
    bogus_state(key, refs[0], present=0)  # hides a real member
    bogus_state(key, "Patient/ghost", present=1)  # adds one that never was
    bogus_reverse(key, "Patient/ghost2")
    assert refs[0] not in clickhouse_roster(key)
    report = roster_verify(group_id=gid)
    assert kinds(report.findings) == {STATE: 1}
    assert report.stats.consistency.state_mismatches == 2
    assert report.stats.consistency.reverse_mismatches == 1
    repaired(gid, Counter({STATE: 1}))
    assert_healthy(live_api, gid, refs)


def test_rebuild_service_restores_state_and_reports_members(live_api):
    gid = roster_group(live_api)
    refs = refs_of(read(live_api, gid))
    bogus_state(current_key(gid), "Patient/ghost", present=1)
    result = group_roster_rebuild(group_id=gid)
    assert (result.roster_key, result.members) == (current_key(gid), 30)
    assert_healthy(live_api, gid, refs)


def test_a_corrupted_quantity_is_recounted_without_a_new_version(live_api):
    gid = roster_group(live_api)
    corrupt_quantity(gid, 999)
    report = roster_verify(group_id=gid)
    assert kinds(report.findings) == {QUANTITY: 1}
    assert report.findings[0].detail == "quantity is 999; the roster has 29 active members"
    repaired(gid, Counter({QUANTITY: 1}))
    assert read(live_api, gid)["quantity"] == 29
    assert stored_version(gid) == 2


def test_pending_batches_are_shipped_even_without_fix(live_api, no_shipping):
    gid = create_group(live_api, ["Patient/qa"])
    patched(live_api, gid, [add("Patient/qb")])
    assert len(outbox_rows(gid)) == 2
    report = rosters_repair(group_ids=[gid], fix=False)
    assert kinds(report.found.findings) == {PENDING: 1}
    assert report.remaining == []
    assert_healthy(live_api, gid, ["Patient/qa", "Patient/qb"])


def test_a_dry_scan_changes_nothing(live_api):
    gid = roster_group(live_api)
    corrupt_quantity(gid, 5)
    report = rosters_repair(group_ids=[gid], fix=False, ship=False)
    assert kinds(report.remaining) == {QUANTITY: 1}
    assert report.fixed == []
    assert orjson.loads(StoredResource.objects.get(key=f"Group/{gid}").body)["quantity"] == 5


def test_review_can_refuse_the_repair(live_api):
    gid = roster_group(live_api)
    corrupt_quantity(gid, 5)
    report = rosters_repair(group_ids=[gid], fix=True, review=lambda found: False)
    assert kinds(report.remaining) == {QUANTITY: 1}
    assert report.fixed == []


def test_every_kind_of_damage_at_once_in_many_groups(live_api):
    gids = [roster_group(live_api) for _ in range(5)]
    refs = {gid: refs_of(read(live_api, gid)) for gid in gids}
    stray_event(current_key(gids[0]), 3, 0, "Patient/ghost")
    stray_event(current_key(gids[1]), 2, 40, "Patient/ghost")
    lose_version(current_key(gids[2]), 1)
    bogus_state(current_key(gids[3]), "Patient/ghost", present=1)
    corrupt_quantity(gids[4], 0)
    stray_event(f"{gids[4]}/7", 7, 0, "Patient/ghost")
    report = rosters_repair(group_ids=gids, fix=True, batch_size=2)
    assert set(kinds(report.found.findings)) == {
        STRAY_VERSION,
        STRAY_EVENTS,
        MISSING_EVENTS,
        STATE,
        QUANTITY,
        STRAY_ROSTER,
    }
    assert report.remaining == []
    for gid in gids:
        assert_healthy(live_api, gid, refs[gid])


# --- backfill ------------------------------------------------------------------------------


def inline_group(api, refs: list[str], **extra) -> str:
    """A Group written while rosters were stored inline (``member`` in the stored body)."""
    with override_settings(FHIR_SERVICE=INLINE):
        gid = create_group(api, refs, **extra)
    assert '"member":' in StoredResource.objects.get(key=f"Group/{gid}").body
    return gid


def test_backfill_moves_one_group_with_one_new_version(live_api):
    refs = patients(12, uuid.uuid4().hex[:6])
    with override_settings(FHIR_SERVICE=INLINE):
        sent = group()
        sent["member"] = [
            member(r, inactive=True) if i % 4 == 0 else member(r) for i, r in enumerate(refs)
        ]
        gid = live_api.post("/Group", sent).body["id"]
    moved = group_roster_backfill(
        group_id=gid, context=WriteContext(actor="ops", source="backfill")
    )
    assert moved == 12
    row = StoredResource.objects.get(key=f"Group/{gid}")
    assert row.version_id == 2
    assert "member" not in orjson.loads(row.body)
    version = ResourceVersion.objects.get(key=f"Group/{gid}/_history/2")
    assert (version.method, version.actor) == ("PUT", "ops")
    body = read(live_api, gid)
    assert refs_of(body) == sorted(refs)
    assert body["quantity"] == 9
    batch = outbox_rows(gid)[0]
    assert (batch.source, batch.actor, batch.event_count) == ("backfill", "ops", 12)
    assert clickhouse_roster(current_key(gid)) == sorted(refs)
    # The version before the backfill still reads as it was stored.
    old = live_api.get(f"/Group/{gid}/_history/1").body
    assert sorted(refs_of(old)) == sorted(refs)
    # Idempotent: nothing left to move, no new version.
    assert group_roster_backfill(group_id=gid, context=WriteContext()) is None
    assert stored_version(gid) == 2
    assert roster_verify(group_id=gid).ok


def test_backfill_replaces_an_older_clickhouse_roster_of_the_same_key(live_api):
    gid = create_group(live_api, ["Patient/ka", "Patient/kb"])
    with override_settings(FHIR_SERVICE=INLINE):
        response = live_api.put(f"/Group/{gid}", {**group(["Patient/kb", "Patient/kc"]), "id": gid})
        assert response.status == 200, response
    assert group_roster_backfill(group_id=gid, context=WriteContext()) == 2
    assert refs_of(read(live_api, gid)) == ["Patient/kb", "Patient/kc"]
    assert read(live_api, gid)["quantity"] == 2
    assert roster_verify(group_id=gid).ok


def test_backfill_refuses_to_run_in_inline_mode(live_api):
    with override_settings(FHIR_SERVICE=INLINE), pytest.raises(MaintenanceError, match="inline"):
        groups_backfill()


def test_backfill_skips_invalid_rosters_and_reports_them(live_api):
    good = inline_group(live_api, ["Patient/g1"])
    bad = inline_group(live_api, ["Patient/g2"])
    row = StoredResource.objects.get(key=f"Group/{bad}")
    body = orjson.loads(row.body)
    body["member"].append({"entity": {"reference": "Observation/1"}})
    StoredResource.objects.filter(key=row.key).update(body=orjson.dumps(body).decode())
    assert backfill_candidates() == (2, 3)
    report = groups_backfill(batch_size=1)
    assert report.moved == 1 and report.members == 1
    assert list(report.failed) == [bad]
    assert "Observation/1" in report.failed[bad]
    assert stored_version(good) == 2 and stored_version(bad) == 1

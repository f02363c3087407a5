"""The six invariants of the member pipeline, one by one.

They are stated in docs/design.md, "The member pipeline and its invariants".

1. One write = one version (identical content: none; delete: one, 410 afterwards).
2. Events are ordered by (version, seq), never the wall clock; re-shipping never duplicates.
3. Nothing becomes visible without its version (see test_outage.py for "nothing is lost").
4. The roster is a set keyed by reference; state = argMax by (version, seq), as of v: ≤ v.
5. ``quantity`` = active members, exact in the metadata row.
6. A deleted and re-created id starts an empty roster.

Plus the write-side guarantees the issue names: index ops on a roster read at the same
version hit the right member; bad member input changes nothing; the op limit is too-costly.
"""

from __future__ import annotations

import random
import uuid
from datetime import timedelta

import orjson
import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from fhirservice.models import StoredResource
from groups.models import MemberOutbox
from groups.outbox.ship import member_batches_ship
from groups.repository import MemberEventRepository
from groups.selectors import iter_roster_as_of
from groups.storage import MSG_TOO_MANY_OPS
from tests.fhirservice.test_api_errors import assert_outcome
from tests.groups.conftest import (
    add,
    clickhouse_events,
    clickhouse_roster,
    create_group,
    current_key,
    group,
    history_versions,
    member,
    member_page,
    outbox_events,
    outbox_rows,
    page_refs,
    patch,
    patched,
    patients,
    read,
    refs_of,
    remove_ref,
    search_ids,
    snapshot,
    stored_version,
    version_of,
)

A, B, C, X = "Patient/a", "Patient/b", "Patient/c", "Patient/x"


# --- 1. one write = one version ----------------------------------------------------------------


def test_every_write_is_exactly_one_version(any_api):
    gid = create_group(any_api, [A])
    etags = [
        patch(any_api, gid, [add(B)]).etag,
        patch(any_api, gid, [{"op": "add", "path": "/name", "value": "n"}, add(C)]).etag,
        any_api.put(f"/Group/{gid}", {**group([A, C], name="n"), "id": gid}).etag,
        patch(any_api, gid, [remove_ref(A), remove_ref(C), add(X)]).etag,
    ]
    assert etags == ['W/"2"', 'W/"3"', 'W/"4"', 'W/"5"']
    assert history_versions(gid) == [1, 2, 3, 4, 5]
    assert sorted({v for v, *_ in outbox_events(gid)}) == [1, 2, 3, 4, 5]
    assert [r.version for r in outbox_rows(gid)] == [1, 2, 3, 4, 5]  # one batch per version


def test_writes_without_change_make_no_version(any_api):
    gid = create_group(any_api, [A, B], name="n")
    before = snapshot(any_api, gid)
    for response in (
        patch(any_api, gid, [add(A)]),
        patch(any_api, gid, [remove_ref(X)]),
        patch(any_api, gid, [{"op": "replace", "path": "/name", "value": "n"}]),
        patch(any_api, gid, []),
        any_api.put(f"/Group/{gid}", before["body"]),
    ):
        assert (response.status, response.etag) == (200, 'W/"1"'), response
    assert snapshot(any_api, gid) == before


def test_delete_is_a_version_of_its_own_and_reads_answer_410(any_api):
    gid = create_group(any_api, [A, B])
    patched(any_api, gid, [add(C)])
    response = any_api.delete(f"/Group/{gid}")
    assert (response.status, response.etag) == (204, 'W/"3"')
    assert history_versions(gid) == [1, 2, 3]
    assert outbox_events(gid)[-1][0] == 2  # delete emits no member events
    issue = assert_outcome(any_api.get(f"/Group/{gid}"), 410, "MSG_DELETED")
    assert issue["code"] == "deleted"
    assert_outcome(member_page(any_api, gid), 410, "MSG_DELETED")
    assert any_api.delete(f"/Group/{gid}").status == 204  # deleting again: no new version
    assert history_versions(gid) == [1, 2, 3]


# --- 2. order by (version, seq); re-shipping -----------------------------------------------------


def test_add_remove_add_across_versions_ends_present(any_api):
    gid = create_group(any_api, [A])
    patched(any_api, gid, [add(X)])
    patched(any_api, gid, [remove_ref(X)])
    patched(any_api, gid, [add(X, period={"start": "2022"})])
    assert read(any_api, gid)["member"] == [member(A), member(X, period={"start": "2022"})]
    assert refs_of(read(any_api, gid, "/_history/3")) == [A]
    assert read(any_api, gid)["quantity"] == 2


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        ([add(X), remove_ref(X)], [member(A)]),
        ([add(X), remove_ref(X), add(X)], [member(A), member(X)]),
        ([remove_ref(A), add(A, inactive=True)], [member(A, inactive=True)]),
        ([add(A, inactive=True), remove_ref(A)], []),
    ],
)
def test_ops_on_one_member_in_one_patch_apply_in_seq_order(any_api, ops, expected):
    gid = create_group(any_api, [A])
    body = patched(any_api, gid, ops)
    assert (body.get("member", []), body["quantity"]) == (expected, active_count(expected))
    assert read(any_api, gid).get("member", []) == expected
    assert [e[1] for e in outbox_events(gid) if e[0] == 2] == list(range(len(ops)))
    if any_api.shipped:
        assert clickhouse_roster(current_key(gid)) == [m["entity"]["reference"] for m in expected]


def active_count(members: list[dict]) -> int:
    return sum(1 for m in members if not m.get("inactive"))


def test_wall_clock_order_never_decides(live_api, no_shipping):
    gid = create_group(live_api, [A])
    patched(live_api, gid, [add(X)])
    patched(live_api, gid, [remove_ref(X)])
    patched(live_api, gid, [add(X, inactive=True), remove_ref(A)])
    # Later versions get earlier clocks, and ship first.
    rows = outbox_rows(gid)
    start = timezone.now()
    for row in rows:
        MemberOutbox.objects.filter(key=row.key).update(
            recorded_at=start - timedelta(hours=row.version)
        )
    for row in reversed(rows):
        assert member_batches_ship(keys=[row.key]).batches == 1
    key = current_key(gid)
    assert clickhouse_roster(key) == [X]
    assert read(live_api, gid)["member"] == [member(X, inactive=True)]
    assert read(live_api, gid)["quantity"] == 0
    assert [refs_of(read(live_api, gid, f"/_history/{v}")) for v in (1, 2, 3)] == [
        [A],
        [A, X],
        [A],
    ]
    assert MemberEventRepository().count_active(key) == 0


def test_reshipping_batches_never_duplicates_what_reads_return(live_api):
    refs = patients(5, prefix=uuid.uuid4().hex)  # unique: rosters_of looks at every roster
    gid = create_group(live_api, refs)
    patched(live_api, gid, [remove_ref(refs[1]), add(X, inactive=True)])
    patched(live_api, gid, [add(refs[1])])
    key = current_key(gid)
    events = clickhouse_events(key)
    before = (read(live_api, gid), page_refs(member_page(live_api, gid).body))
    keys = [row.key for row in outbox_rows(gid)]
    MemberOutbox.objects.filter(key__in=keys).update(shipped_at=None)
    report = member_batches_ship(keys=keys)  # the hot path inserts without looking
    assert (report.batches, report.events, report.skipped) == (3, 8, 0)
    MemberOutbox.objects.filter(key__in=keys).update(shipped_at=None)
    call_command("ship_member_events", min_age=0, verbosity=0)  # the relay checks first
    assert all(row.shipped_at is not None for row in outbox_rows(gid))
    assert clickhouse_events(key) == events
    repository = MemberEventRepository()
    assert [repository.count_events(key, v) for v in (1, 2, 3)] == [5, 2, 1]
    assert repository.versions_with_events(key) == {1: 5, 2: 2, 3: 1}
    assert (read(live_api, gid), page_refs(member_page(live_api, gid).body)) == before
    assert repository.count_active(key) == before[0]["quantity"] == 5
    assert [s.ref for s in repository.iter_roster(key)] == [*refs, X]
    assert [s.ref for s in repository.iter_roster_as_of(key, 2)] == [
        refs[0],
        *refs[2:],
        X,
    ]
    assert repository.rosters_of([refs[1]]) == [(refs[1], key)]
    assert search_ids(live_api, f"member={refs[1]}") == ([gid], 1)


# --- 3. nothing visible without its version ---------------------------------------------------


def test_uncommitted_writes_never_reach_clickhouse(api):
    """With ``api`` the test transaction never commits: the outbox holds the events, reads
    merge them for the writer, and ClickHouse has seen none of them."""
    gid = create_group(api, [A, B])
    patched(api, gid, [add(C)])
    assert refs_of(read(api, gid)) == [A, B, C]
    assert clickhouse_events(current_key(gid)) == []
    assert [row.shipped_at for row in outbox_rows(gid)] == [None, None]


def test_a_failed_write_leaves_nothing_anywhere(live_api):
    gid = create_group(live_api, [A, B])
    before = snapshot(live_api, gid)
    failing = [add(C), remove_ref(A), {"op": "test", "path": "/member/0/inactive", "value": True}]
    assert_outcome(patch(live_api, gid, failing), 422, "MSG_PATCH_TEST_FAILED")
    assert snapshot(live_api, gid) == before
    assert MemberOutbox.objects.filter(group_id=gid, version=2).count() == 0


# --- 4. a set keyed by reference -------------------------------------------------------------


def test_the_roster_is_a_set_keyed_by_reference(any_api):
    sent = group()
    sent["member"] = [member(B), member(A, inactive=True), member(B), member(A)]
    gid = any_api.post("/Group", sent).body["id"]
    assert read(any_api, gid)["member"] == [member(A), member(B)]
    body = patched(any_api, gid, [add(A), add(B, period={"end": "2030"}), add(B)])
    assert body["member"] == [member(A), member(B)]
    assert version_of(body) == 2  # B updated and back: still a write with events
    assert [e[2:] for e in outbox_events(gid) if e[0] == 2] == [
        ("updated", B),
        ("updated", B),
    ]


def test_a_roster_walk_as_of_a_version_sees_the_events_up_to_it(any_api):
    # iter_roster_as_of (an export's roster walk) reads the state table a window at a time
    # and takes the members changed since the version from the event log: each version's
    # roster exactly, whether the batches are pending in the outbox or shipped.
    refs = patients(7, prefix=uuid.uuid4().hex)
    gid = create_group(any_api, refs)
    patched(any_api, gid, [remove_ref(refs[1]), add(refs[2], inactive=True), add(X)])
    patched(any_api, gid, [add(refs[1]), remove_ref(refs[3]), add(refs[2]), add(C)])
    key = current_key(gid)
    expected = {
        1: [(ref, False) for ref in refs],
        2: [(ref, ref == refs[2]) for ref in [refs[0], *refs[2:], X]],
        3: [(ref, False) for ref in [*refs[:3], *refs[4:], C, X]],
    }
    for version, roster in expected.items():
        walked = [(s.ref, s.inactive) for s in iter_roster_as_of(key, as_of=version)]
        assert walked == sorted(roster), version
    if any_api.shipped:
        repository = MemberEventRepository()
        for version in expected:
            # windows of two state rows: every window boundary inside the roster
            windowed = list(repository.iter_roster_windows_as_of(key, version, window=2))
            assert windowed == list(
                repository.iter_roster_as_of(key, version, include_removed=True)
            ), version


# --- 5. quantity ---------------------------------------------------------------------------------


def test_quantity_stays_exact_through_random_writes(any_api):
    rng = random.Random(20260101)
    pool = patients(12)
    gid = create_group(any_api, pool[:4])
    model: dict[str, bool] = dict.fromkeys(pool[:4], False)  # ref -> inactive
    for _ in range(25):
        ops = []
        for _ in range(rng.randint(1, 4)):
            ref = rng.choice(pool)
            if rng.random() < 0.35:
                ops.append(remove_ref(ref))
                model.pop(ref, None)
            else:
                inactive = rng.random() < 0.3
                ops.append(add(ref, inactive=True) if inactive else add(ref))
                model[ref] = inactive
        body = patch(any_api, gid, ops).body
        active = sum(1 for inactive in model.values() if not inactive)
        assert body["quantity"] == active
        assert refs_of(body) == sorted(model)
    stored = orjson.loads(StoredResource.objects.get(key=f"Group/{gid}").body)
    assert stored["quantity"] == active
    if any_api.shipped:
        assert MemberEventRepository().count_active(current_key(gid)) == active


# --- 6. a re-created id starts empty -----------------------------------------------------------


def test_a_re_created_id_starts_an_empty_roster(any_api):
    gid = f"recreated-{random.Random().getrandbits(48):x}"
    assert any_api.put(f"/Group/{gid}", {**group([A, B]), "id": gid}).status == 201
    assert any_api.delete(f"/Group/{gid}").status == 204
    assert_outcome(any_api.get(f"/Group/{gid}"), 410, "MSG_DELETED")
    response = any_api.put(f"/Group/{gid}", {**group([C]), "id": gid})
    assert (response.status, response.etag) == (201, 'W/"3"')
    assert response.body["member"] == [member(C)]
    assert response.body["quantity"] == 1
    assert current_key(gid) == f"{gid}/3"
    assert outbox_events(gid)[-1] == (3, 0, "added", C)
    body = patched(any_api, gid, [add(X)])
    assert (refs_of(body), body["quantity"]) == ([C, X], 2)
    assert page_refs(member_page(any_api, gid).body) == [C, X]
    assert refs_of(read(any_api, gid, "/_history/1")) == [A, B]
    assert search_ids(any_api, f"member={A}&_id={gid}") == ([], 0)
    if any_api.shipped:
        assert clickhouse_roster(f"{gid}/1") == [A, B]
        assert clickhouse_roster(f"{gid}/3") == [C, X]


def test_a_group_re_created_without_members_is_empty(any_api):
    gid = f"recreated-{random.Random().getrandbits(48):x}"
    any_api.put(f"/Group/{gid}", {**group([A, B]), "id": gid})
    any_api.delete(f"/Group/{gid}")
    body = any_api.put(f"/Group/{gid}", {**group(), "id": gid}).body
    assert ("member" in body, body["quantity"]) == (False, 0)
    assert "member" not in read(any_api, gid)


# --- index ops at the version they were read at --------------------------------------------------


@pytest.mark.parametrize("index", [0, 3, 6])
def test_index_ops_hit_the_member_read_at_that_version(any_api, index):
    refs = patients(7)
    gid = create_group(any_api, [refs[i] for i in (5, 1, 6, 0, 3)])
    patched(any_api, gid, [add(refs[2]), add(refs[4]), remove_ref(refs[6])])
    patched(any_api, gid, [add(refs[6], inactive=True)])
    response = any_api.get(f"/Group/{gid}")
    roster, version = refs_of(response.body), version_of(response.body)
    assert roster == refs
    chosen = roster[index]
    body = patched(any_api, gid, [{"op": "remove", "path": f"/member/{index}"}], version=version)
    assert refs_of(body) == [r for r in roster if r != chosen]
    assert [e[2:] for e in outbox_events(gid) if e[0] == version + 1] == [("removed", chosen)]


def test_index_ops_over_shipped_and_pending_batches(live_api, no_shipping):
    refs = patients(8)
    gid = create_group(live_api, refs[::2])  # 0, 2, 4, 6
    key = current_key(gid)
    member_batches_ship(roster_keys=[key])
    patched(live_api, gid, [add(refs[3]), add(refs[7]), remove_ref(refs[2])])  # pending
    roster = refs_of(read(live_api, gid))
    assert roster == [refs[0], refs[3], refs[4], refs[6], refs[7]]
    for index in (4, 2, 1):
        version = stored_version(gid)
        roster = refs_of(read(live_api, gid))
        chosen = roster[index]
        ops = [
            {"op": "test", "path": f"/member/{index}/entity/reference", "value": chosen},
            {"op": "add", "path": f"/member/{index}/inactive", "value": True},
        ]
        body = patched(live_api, gid, ops, version=version)
        served = {m["entity"]["reference"]: m for m in body["member"]}
        assert served[chosen] == member(chosen, inactive=True)
        assert list(served) == roster
    body = read(live_api, gid)
    assert [m["entity"]["reference"] for m in body["member"] if m.get("inactive")] == [
        refs[3],
        refs[4],
        refs[7],
    ]
    assert body["quantity"] == 2


def test_index_ops_against_a_stale_read_are_refused(any_api):
    refs = patients(4)
    gid = create_group(any_api, refs)
    roster = refs_of(read(any_api, gid))
    patched(any_api, gid, [add("Patient/p0000a")])  # shifts every index after 0
    before = snapshot(any_api, gid)
    assert_outcome(
        patch(any_api, gid, [{"op": "remove", "path": "/member/1"}], version=1),
        412,
        "MSG_VERSION_MISMATCH",
    )
    assert snapshot(any_api, gid) == before
    assert roster[1] in refs_of(before["body"])


# --- bad input changes nothing -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("ops", "detail_code", "where"),
    [
        ([add(C), add("Observation/1")], "MSG_MEMBER_REFERENCE_INVALID", "op 1 (add /member/-)"),
        (
            [add(C), add(X, period={"start": "2020-02", "end": "2020-01"})],
            "MSG_MEMBER_PERIOD_INVALID",
            "op 1 (add /member/-)",
        ),
        (
            [add(C), remove_ref(A), {"op": "add", "path": "/member/-", "value": {"who": A}}],
            "MSG_MEMBER_INVALID",
            "op 2 (add /member/-)",
        ),
        (
            [remove_ref(A), {"op": "remove", "path": "/member", "value": {"entity": {}}}],
            "MSG_MEMBER_INVALID",
            "op 1 (remove /member)",
        ),
        (
            [add(C), {"op": "replace", "path": "/member/0", "value": member(A, inactive=1)}],
            "MSG_MEMBER_INVALID",
            "op 1 (replace /member/0)",
        ),
        (
            [add(C), {"op": "add", "path": "/member", "value": [member(X), member("Patient/")]}],
            "MSG_MEMBER_REFERENCE_INVALID",
            "op 1 (add /member) value[1]",
        ),
    ],
)
def test_bad_member_input_changes_nothing(live_api, ops, detail_code, where):
    gid = create_group(live_api, [A, B])
    patched(live_api, gid, [add(X)])
    before = snapshot(live_api, gid)
    assert before["clickhouse"]  # shipped: ClickHouse is part of what must not change
    issue = assert_outcome(patch(live_api, gid, ops), 400, detail_code)
    assert issue["expression"] == [where]
    assert issue["diagnostics"].startswith(f"{where}: ")
    assert snapshot(live_api, gid) == before


def test_the_op_limit_is_too_costly_and_changes_nothing(live_api):
    gid = create_group(live_api, [A])
    before = snapshot(live_api, gid)
    ops = [add(B), {"op": "add", "path": "/name", "value": "n"}, add(C), add(X)]
    with override_settings(FHIR_SERVICE={"MAX_PATCH_OPS": 3}):
        issue = assert_outcome(patch(live_api, gid, ops), 400, "MSG_TOO_MANY_OPERATIONS")
        assert issue["code"] == "too-costly"
        assert issue["diagnostics"] == MSG_TOO_MANY_OPS.format(count=4, limit=3)
        assert snapshot(live_api, gid) == before
        assert refs_of(patched(live_api, gid, ops[:3])) == [A, B, C]

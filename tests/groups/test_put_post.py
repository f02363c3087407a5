"""Whole-resource writes of Groups: POST, PUT, transaction Bundles, outbox batching.

These writes carry no members-written flag, so the Group post-save handler diffs the incoming
roster against the current one and emits added / removed / updated events. The roster is a
set keyed by member reference (a repeated reference: the last one wins), served in
reference order, with ``quantity`` computed by the server.
"""

from __future__ import annotations

import uuid

import pytest
from django.test import override_settings

from fhirservice.errors import MSG_VERSION_MISMATCH
from fhirservice.models import StoredResource
from groups.models import MemberOutbox
from tests.fhirservice.test_api_errors import assert_outcome
from tests.groups.conftest import (
    clickhouse_events,
    clickhouse_roster,
    create_group,
    current_key,
    group,
    member,
    outbox_events,
    outbox_rows,
    read,
    refs_of,
    snapshot,
    version_of,
)

A, B, C, Z = "Patient/a", "Patient/b", "Patient/c", "Patient/z"


def put(api, gid, body, **kwargs):
    return api.put(f"/Group/{gid}", {**body, "id": gid}, **kwargs)


def store_counts() -> tuple[int, int]:
    """Groups and outbox rows in the metadata store."""
    return StoredResource.objects.filter(
        resource_type="Group"
    ).count(), MemberOutbox.objects.count()


# --- POST ----------------------------------------------------------------------------------


def test_post_stores_the_roster_as_events_in_reference_order(any_api):
    sent = group(quantity=99)
    sent["member"] = [
        member(C),
        member(A, period={"start": "2020"}),
        member(B, inactive=True),
        member(A),  # the roster is a set: the last A wins
    ]
    response = any_api.post("/Group", sent)
    assert response.status == 201, response
    body = response.body
    gid = body["id"]
    assert body["member"] == [member(A), member(B, inactive=True), member(C)]
    assert body["quantity"] == 2
    assert read(any_api, gid) == body
    assert outbox_events(gid) == [(1, 0, "added", A), (1, 1, "added", B), (1, 2, "added", C)]
    stored = StoredResource.objects.get(key=f"Group/{gid}")
    assert '"member"' not in stored.body
    assert '"quantity":2' in stored.body


def test_post_without_members_has_an_empty_roster(any_api):
    gid = create_group(any_api)
    body = read(any_api, gid)
    assert "member" not in body
    assert body["quantity"] == 0
    assert outbox_rows(gid) == []


@pytest.mark.parametrize(
    ("bad", "detail_code"),
    [
        ({"entity": {"reference": "Observation/1"}}, "MSG_MEMBER_REFERENCE_INVALID"),
        (
            {"entity": {"reference": A}, "period": {"start": "2021", "end": "2020"}},
            "MSG_MEMBER_PERIOD_INVALID",
        ),
        ({"entity": {}}, "MSG_MEMBER_INVALID"),
        ("Patient/a", "MSG_MEMBER_INVALID"),
    ],
)
def test_post_with_a_bad_member_stores_nothing(api, bad, detail_code):
    before = store_counts()
    sent = group([A])
    sent["member"].append(bad)
    issue = assert_outcome(api.post("/Group", sent), 400, detail_code)
    assert issue["expression"] == ["Group.member[1]"]
    assert issue["diagnostics"].startswith("Group.member[1]: ")
    assert store_counts() == before


def test_member_must_be_an_array(api):
    before = store_counts()
    sent = {**group(), "member": member(A)}
    issue = assert_outcome(api.post("/Group", sent), 400, "MSG_MEMBER_INVALID")
    assert issue["expression"] == ["Group.member"]
    assert store_counts() == before


def test_the_group_without_its_roster_is_validated_by_the_models(api):
    before = store_counts()
    sent = {"resourceType": "Group", "member": [member(A)]}  # type and actual are required
    assert_outcome(api.post("/Group", sent), 400, "MSG_INVALID_RESOURCE")
    sent = {**group([A]), "actual": "yes"}
    assert_outcome(api.post("/Group", sent), 400, "MSG_INVALID_RESOURCE")
    assert store_counts() == before


# --- PUT -----------------------------------------------------------------------------------


def test_put_replaces_the_roster_with_a_diff(any_api):
    gid = create_group(any_api, [A, B, C])
    sent = group()
    sent["member"] = [member(Z), member(C), member(B, inactive=True)]
    response = put(any_api, gid, sent)
    assert response.status == 200, response
    body = response.body
    assert version_of(body) == 2
    assert body["member"] == [member(B, inactive=True), member(C), member(Z)]
    assert body["quantity"] == 2
    assert sorted(e[2:] for e in outbox_events(gid) if e[0] == 2) == [
        ("added", Z),
        ("removed", A),
        ("updated", B),
    ]
    assert read(any_api, gid) == body


def test_put_without_member_empties_the_roster(any_api):
    gid = create_group(any_api, [A, B])
    response = put(any_api, gid, group())
    assert response.status == 200, response
    assert "member" not in response.body
    assert response.body["quantity"] == 0
    assert sorted(e[2:] for e in outbox_events(gid) if e[0] == 2) == [
        ("removed", A),
        ("removed", B),
    ]
    assert "member" not in read(any_api, gid)


def test_put_of_identical_content_makes_no_version(any_api):
    gid = create_group(any_api, [A, B], name="n")
    before = snapshot(any_api, gid)
    response = put(any_api, gid, before["body"])
    assert (response.status, response.etag) == (200, 'W/"1"')
    # Member order, a client quantity and repeated members are not content.
    sent = group([B, A, B], name="n", quantity=7)
    response = put(any_api, gid, sent)
    assert (response.status, response.etag) == (200, 'W/"1"')
    assert snapshot(any_api, gid) == before


def test_put_of_other_elements_keeps_the_roster_and_emits_nothing(any_api):
    gid = create_group(any_api, [A, B])
    response = put(any_api, gid, group([A, B], name="renamed"))
    assert response.status == 200, response
    assert (version_of(response.body), response.body["name"]) == (2, "renamed")
    assert refs_of(response.body) == [A, B]
    assert [e for e in outbox_events(gid) if e[0] == 2] == []


def test_put_with_a_stale_if_match_changes_nothing(api):
    gid = create_group(api, [A])
    assert put(api, gid, group([A, B])).status == 200
    before = snapshot(api, gid)
    issue = assert_outcome(
        put(api, gid, group([C]), headers={"If-Match": 'W/"1"'}), 412, "MSG_VERSION_MISMATCH"
    )
    assert issue["diagnostics"] == MSG_VERSION_MISMATCH.format(expected=1, current=2)
    assert snapshot(api, gid) == before


def test_put_with_a_bad_member_changes_nothing(api):
    gid = create_group(api, [A])
    before = snapshot(api, gid)
    sent = group([B, C])
    sent["member"][1] = {"entity": {"reference": C}, "inactive": "no"}
    issue = assert_outcome(put(api, gid, sent), 400, "MSG_MEMBER_INVALID")
    assert issue["expression"] == ["Group.member[1]"]
    assert snapshot(api, gid) == before


def test_put_creates_a_group_with_a_client_id(any_api):
    gid = f"cohort-{uuid.uuid4().hex[:12]}"
    response = put(any_api, gid, group([B, A]))
    assert response.status == 201, response
    assert (version_of(response.body), refs_of(response.body)) == (1, [A, B])
    assert outbox_events(gid) == [(1, 0, "added", A), (1, 1, "added", B)]


# --- transaction Bundles -------------------------------------------------------------------


def test_a_transaction_bundle_writes_rosters_through_the_diff(any_api):
    gid = create_group(any_api, [A, B])
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:7b5f4b0e-0b7e-4c55-9d3c-7e4f6a1b2c3d",
                "resource": group([C, Z]),
                "request": {"method": "POST", "url": "Group"},
            },
            {
                "resource": {**group([B, C]), "id": gid},
                "request": {"method": "PUT", "url": f"Group/{gid}"},
            },
        ],
    }
    response = any_api.post("", bundle)
    assert response.status == 200, response
    statuses = [e["response"]["status"] for e in response.body["entry"]]
    assert [s.split()[0] for s in statuses] == ["201", "200"]
    new_id = response.body["entry"][0]["response"]["location"].split("/")[-3]
    assert refs_of(read(any_api, new_id)) == [C, Z]
    assert refs_of(read(any_api, gid)) == [B, C]
    assert sorted(e[2:] for e in outbox_events(gid) if e[0] == 2) == [
        ("added", C),
        ("removed", A),
    ]


def test_a_failed_transaction_leaves_no_events(api):
    gid = create_group(api, [A])
    before = snapshot(api, gid)
    counts = store_counts()
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {**group([B, C]), "id": gid},
                "request": {"method": "PUT", "url": f"Group/{gid}"},
            },
            {
                "resource": group([Z, "Observation/1"]),
                "request": {"method": "POST", "url": "Group"},
            },
        ],
    }
    response = api.post("", bundle)
    assert response.status == 400, response
    assert snapshot(api, gid) == before
    assert store_counts() == counts


# --- outbox batches ------------------------------------------------------------------------


def test_large_writes_are_split_into_outbox_batches(any_api):
    refs = [f"Patient/m{i}" for i in range(5)]
    with override_settings(FHIR_SERVICE={"MEMBER_BATCH_SIZE": 2}):
        gid = create_group(any_api, refs)
        rows = outbox_rows(gid)
        assert [(r.version, r.chunk, r.event_count) for r in rows] == [
            (1, 0, 2),
            (1, 1, 2),
            (1, 2, 1),
        ]
        assert [e[1] for e in outbox_events(gid)] == [0, 1, 2, 3, 4]
        assert refs_of(read(any_api, gid)) == refs
        body = read(any_api, gid)
        assert body["quantity"] == 5
        if any_api.shipped:
            # Shipped before the answer from the events in hand (not read back): the same
            # rows as the outbox holds.
            assert all(r.shipped_at is not None for r in outbox_rows(gid))
            assert clickhouse_events(current_key(gid)) == [
                (1, seq, "added", ref) for seq, ref in enumerate(refs)
            ]


def test_committed_writes_are_shipped_and_marked(live_api):
    gid = create_group(live_api, [A, B])
    rows = outbox_rows(gid)
    assert [r.shipped_at is not None for r in rows] == [True]
    assert rows[0].attempts == 1
    key = current_key(gid)
    assert clickhouse_roster(key) == [A, B]
    assert clickhouse_events(key) == [(1, 0, "added", A), (1, 1, "added", B)]

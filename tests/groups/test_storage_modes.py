"""The roster storage settings: ``GROUP_ROSTER_STORAGE`` and ``GROUP_PUT_KEEPS_ROSTER``.

``inline`` stores a Group whole, roster included, like any other resource (the benchmark
baseline and the backfill source): no member events, members served as stored.
``GROUP_PUT_KEEPS_ROSTER`` lets seed-system clients PUT a Group without ``member`` and keep
its roster, instead of FHIR's replace-everything rule.
"""

from __future__ import annotations

import pytest
from django.test import override_settings

from fhirservice.models import StoredResource
from groups.models import MemberOutbox
from groups.storage import MSG_INLINE, MSG_NOT_BACKFILLED
from tests.fhirservice.test_api_errors import assert_outcome
from tests.groups.conftest import (
    add,
    create_group,
    group,
    history_versions,
    member,
    member_page,
    outbox_events,
    page_refs,
    page_value,
    patch,
    patched,
    read,
    refs_of,
    remove_ref,
    search_ids,
    snapshot,
    version_of,
)

A, B, C = "Patient/a", "Patient/b", "Patient/c"


@pytest.fixture
def inline():
    with override_settings(FHIR_SERVICE={"GROUP_ROSTER_STORAGE": "inline"}):
        yield


@pytest.fixture
def keeps_roster():
    with override_settings(FHIR_SERVICE={"GROUP_PUT_KEEPS_ROSTER": True}):
        yield


# --- inline --------------------------------------------------------------------------------


def test_inline_groups_store_and_serve_the_roster_in_the_body(any_api, inline, clickhouse_down):
    sent = group([B, A], quantity=2)
    sent["member"][0]["period"] = {"start": "2020"}
    response = any_api.post("/Group", sent)
    assert response.status == 201, response
    gid = response.body["id"]
    assert response.body["member"] == sent["member"]  # stored as sent, order included
    stored = StoredResource.objects.get(key=f"Group/{gid}")
    assert '"member":[' in stored.body
    assert MemberOutbox.objects.filter(group_id=gid).count() == 0
    with clickhouse_down():  # inline reads need no member store
        assert read(any_api, gid)["member"] == sent["member"]
        body = patched(any_api, gid, [add(C), {"op": "remove", "path": "/member/0"}])
    assert refs_of(body) == [A, C]  # plain JSON Patch on the stored array
    assert version_of(body) == 2
    assert refs_of(read(any_api, gid, "/_history/1")) == [B, A]
    assert outbox_events(gid) == []


def test_inline_groups_still_validate_members_on_the_fast_path(api, inline):
    sent = group([A])
    sent["member"].append({"entity": {"reference": "Observation/1"}})
    issue = assert_outcome(api.post("/Group", sent), 400, "MSG_MEMBER_REFERENCE_INVALID")
    assert issue["expression"] == ["Group.member[1]"]


def test_inline_groups_have_no_members_operation(api, inline):
    gid = create_group(api, [A])
    issue = assert_outcome(member_page(api, gid), 404, "MSG_OPERATION_UNAVAILABLE")
    assert issue["diagnostics"] == MSG_INLINE


def test_member_search_finds_inline_groups(api, inline):
    gid = create_group(api, ["Patient/inline-only"])
    assert search_ids(api, "member=Patient/inline-only") == ([gid], 1)


def test_member_search_of_inline_groups_matches_members_only(any_api, inline):
    """A reference elsewhere in the body (managingEntity) is no membership; inactive members
    count for Group?member= (as in clickhouse mode) but not for $group-memberships."""
    practitioner = "Practitioner/inline-manager"
    managed = create_group(any_api, [A], managingEntity={"reference": practitioner})
    holding = create_group(any_api, [practitioner, B])
    inactive = any_api.post("/Group", {**group(), "member": [member(C, inactive=True)]})
    assert inactive.status == 201, inactive
    assert search_ids(any_api, f"member={practitioner}") == ([holding], 1)
    assert search_ids(any_api, f"member={C}")[0] == [inactive.body["id"]]
    assert sorted(search_ids(any_api, f"member={A},{B}")[0]) == sorted([managed, holding])
    any_api.delete(f"/Group/{holding}")
    assert search_ids(any_api, f"member={practitioner}") == ([], 0)


def test_group_memberships_finds_inline_groups(any_api, inline):
    response = any_api.post("/Patient", {"resourceType": "Patient"})
    pid = response.body["id"]
    active = create_group(any_api, [f"Patient/{pid}", A])
    any_api.post("/Group", {**group(), "member": [member(f"Patient/{pid}", inactive=True)]})
    create_group(any_api, [A])
    found = any_api.get(f"/Patient/{pid}/$group-memberships")
    assert found.status == 200, found
    assert [e["resource"]["id"] for e in found.body.get("entry", [])] == [active]


def test_members_of_a_group_stored_inline_before_backfill(any_api):
    """Written inline, read after the switch to clickhouse and before backfill: $members
    pages the roster the Group's body still holds (it answered an empty roster)."""
    with override_settings(FHIR_SERVICE={"GROUP_ROSTER_STORAGE": "inline"}):
        sent = group([C, A], quantity=2)
        sent["member"].append(member(B, inactive=True))
        gid = any_api.post("/Group", sent).body["id"]
    assert refs_of(read(any_api, gid)) == [C, A, B]  # the body as stored
    first = member_page(any_api, gid, "?_count=2")
    assert first.status == 200, first
    assert page_refs(first.body) == [A, B]
    assert page_value(first.body, "quantity") == 2
    rest = any_api.get(page_value(first.body, "next").removeprefix("http://testserver/4_0_0"))
    assert page_refs(rest.body) == [C]
    assert page_refs(member_page(any_api, gid, "?active=false").body) == [B]
    assert page_refs(member_page(any_api, gid, "?version=1").body) == [A, B, C]


def test_the_default_storage_keeps_the_roster_out_of_the_body(api):
    gid = create_group(api, [A])
    stored = StoredResource.objects.get(key=f"Group/{gid}")
    assert '"member"' not in stored.body
    assert outbox_events(gid) == [(1, 0, "added", A)]


# --- GROUP_PUT_KEEPS_ROSTER ----------------------------------------------------------------


def test_put_without_member_keeps_the_roster_when_configured(any_api, keeps_roster):
    gid = create_group(any_api, [A, B])
    patched(any_api, gid, [add(C, inactive=True)])
    response = any_api.put(f"/Group/{gid}", {**group(name="renamed"), "id": gid})
    assert response.status == 200, response
    body = response.body
    assert (version_of(body), body["name"]) == (3, "renamed")
    assert body["member"] == [member(A), member(B), member(C, inactive=True)]
    assert body["quantity"] == 2
    assert [e for e in outbox_events(gid) if e[0] == 3] == []
    assert read(any_api, gid) == body


def test_put_without_member_and_no_other_change_makes_no_version(any_api, keeps_roster):
    gid = create_group(any_api, [A, B], name="n")
    before = snapshot(any_api, gid)
    response = any_api.put(f"/Group/{gid}", {**group(name="n"), "id": gid})
    assert (response.status, response.etag) == (200, 'W/"1"')
    assert snapshot(any_api, gid) == before


def test_put_with_member_still_replaces_the_roster(any_api, keeps_roster):
    gid = create_group(any_api, [A, B])
    body = any_api.put(f"/Group/{gid}", {**group([C]), "id": gid}).body
    assert (refs_of(body), body["quantity"]) == ([C], 1)
    body = any_api.put(f"/Group/{gid}", {**group([]), "id": gid}).body
    assert ("member" in body, body["quantity"]) == (False, 0)  # an empty array empties it


def test_keeping_the_roster_does_not_cross_a_delete(any_api, keeps_roster):
    gid = create_group(any_api, [A, B])
    any_api.delete(f"/Group/{gid}")
    response = any_api.put(f"/Group/{gid}", {**group(), "id": gid})
    assert response.status == 201, response
    assert ("member" in response.body, response.body["quantity"]) == (False, 0)
    assert history_versions(gid) == [1, 2, 3]


def test_put_without_member_empties_the_roster_by_default(any_api):
    gid = create_group(any_api, [A, B])
    body = any_api.put(f"/Group/{gid}", {**group(), "id": gid}).body
    assert ("member" in body, body["quantity"]) == (False, 0)
    body = patched(any_api, gid, [add(A)])
    assert refs_of(body) == [A]
    assert patched(any_api, gid, [remove_ref(A)])["quantity"] == 0


def test_patches_wait_for_the_backfill_of_a_group_stored_inline(any_api):
    """PATCH of a Group whose body still holds its roster is refused (member ops went to an
    empty ClickHouse roster while the body kept the old one; other ops dropped the body's
    roster); a whole new roster (PUT) is accepted."""
    with override_settings(FHIR_SERVICE={"GROUP_ROSTER_STORAGE": "inline"}):
        gid = create_group(any_api, [A, B])
    before = snapshot(any_api, gid)
    issue = assert_outcome(patch(any_api, gid, [add(C)]), 409, "MSG_ROSTER_NOT_BACKFILLED")
    assert issue["diagnostics"] == MSG_NOT_BACKFILLED.format(key=f"Group/{gid}")
    rename = [{"op": "add", "path": "/name", "value": "renamed"}]
    assert_outcome(patch(any_api, gid, rename), 409, "MSG_ROSTER_NOT_BACKFILLED")
    assert snapshot(any_api, gid) == before
    response = any_api.put(f"/Group/{gid}", {**group([B, C]), "id": gid})
    assert response.status == 200, response
    assert refs_of(read(any_api, gid)) == [B, C]
    assert refs_of(patched(any_api, gid, [add(A)])) == [A, B, C]

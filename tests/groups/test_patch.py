"""PATCH of Group rosters with JSON Patch: every member op, mixed patches, limits, errors.

Member ops become member events (one version per PATCH, ``seq`` in op order); the roster is
a set ordered by member reference, and ``/member/N`` indexes that order. Most tests run
twice (``any_api``): with the write's batch still pending in the outbox and with it shipped
to ClickHouse, because reads and index lookups merge both.
"""

from __future__ import annotations

import pytest

from fhirservice.errors import MSG_DELETED, MSG_NOT_FOUND, MSG_VERSION_MISMATCH
from fhirservice.store.handlers import VersionWrite, WriteContext
from fhirservice.store.rows import insert_all
from groups.members import parse_member
from groups.middleware import FLAG, GroupMemberEventsMiddleware
from groups.models import MemberOutbox
from groups.services import group_post_save
from groups.session import (
    MSG_MEMBER_INDEX,
    MSG_MEMBER_MOVE,
    MSG_MEMBER_OP,
    MSG_MEMBER_TEST,
    MSG_ROSTER_NOT_LIST,
    Replace,
)
from tests.fhirservice.test_api_errors import assert_outcome
from tests.groups.conftest import (
    add,
    create_group,
    group,
    history_versions,
    member,
    outbox_events,
    outbox_rows,
    patch,
    patched,
    read,
    refs_of,
    remove_ref,
    snapshot,
    version_of,
)

A, B, C, Q, Z = "Patient/a", "Patient/b", "Patient/c", "Patient/q", "Patient/z"


def events_of(gid: str, version: int) -> list[tuple[int, str, str]]:
    """(seq, event type, reference) of one version's outbox events."""
    return [(s, t, r) for v, s, t, r in outbox_events(gid) if v == version]


# --- add and remove ------------------------------------------------------------------------


def test_adding_members_is_one_version_with_events_in_op_order(any_api):
    gid = create_group(any_api, [B])
    response = patch(any_api, gid, [add(C), add(A, inactive=True)])
    assert response.status == 200, response
    assert response.etag == 'W/"2"'
    body = response.body
    assert version_of(body) == 2
    assert refs_of(body) == [A, B, C]
    assert body["member"][0] == member(A, inactive=True)
    assert body["quantity"] == 2
    assert events_of(gid, 2) == [(0, "added", C), (1, "added", A)]
    assert history_versions(gid) == [1, 2]
    assert read(any_api, gid) == body
    assert [row.shipped_at is not None for row in outbox_rows(gid)] == [any_api.shipped] * 2


def test_adding_a_present_member_updates_it(any_api):
    gid = create_group(any_api, [A, B])
    body = patched(any_api, gid, [add(A, period={"start": "2020-01-01"})])
    assert body["member"][0] == member(A, period={"start": "2020-01-01"})
    assert body["quantity"] == 2
    body = patched(any_api, gid, [add(A, inactive=True)])
    assert body["member"][0] == member(A, inactive=True)  # the whole member is replaced
    assert body["quantity"] == 1
    assert events_of(gid, 2) == [(0, "updated", A)]
    assert events_of(gid, 3) == [(0, "updated", A)]


def test_adding_an_identical_member_makes_no_version(any_api):
    gid = create_group(any_api, [A])
    before = snapshot(any_api, gid)
    response = patch(any_api, gid, [add(A)])
    assert response.status == 200, response
    assert response.etag == 'W/"1"'
    assert snapshot(any_api, gid) == before


@pytest.mark.parametrize("path", ["/member", "/member/-"])
def test_remove_by_reference_is_the_documented_extension(any_api, path):
    gid = create_group(any_api, [A, B])
    body = patched(any_api, gid, [{"op": "remove", "path": path, "value": member(A)}])
    assert refs_of(body) == [B]
    assert body["quantity"] == 1
    assert events_of(gid, 2) == [(0, "removed", A)]


def test_removing_an_absent_member_changes_nothing(any_api):
    gid = create_group(any_api, [A])
    before = snapshot(any_api, gid)
    response = patch(any_api, gid, [remove_ref(Z)])
    assert response.status == 200, response
    assert response.etag == 'W/"1"'
    assert snapshot(any_api, gid) == before


def test_remove_by_index_follows_reference_order(any_api):
    gid = create_group(any_api, [C, A, B])
    body = patched(any_api, gid, [{"op": "remove", "path": "/member/1"}])
    assert refs_of(body) == [A, C]
    assert events_of(gid, 2) == [(0, "removed", B)]
    assert body["quantity"] == 2


def test_add_at_an_index_adds_to_the_set(any_api):
    gid = create_group(any_api, [A, B])
    body = patched(any_api, gid, [{"op": "add", "path": "/member/0", "value": member(Z)}])
    assert refs_of(body) == [A, B, Z]


# --- replace and sub-element ops -------------------------------------------------------------


def test_replace_at_an_index_updates_the_member(any_api):
    gid = create_group(any_api, [A, B])
    value = member(B, period={"start": "2020", "end": "2021"})
    body = patched(any_api, gid, [{"op": "replace", "path": "/member/1", "value": value}])
    assert body["member"] == [member(A), value]
    assert events_of(gid, 2) == [(0, "updated", B)]


def test_replace_with_another_reference_swaps_the_member(any_api):
    gid = create_group(any_api, [A, B])
    body = patched(any_api, gid, [{"op": "replace", "path": "/member/0", "value": member(Z)}])
    assert refs_of(body) == [B, Z]
    assert body["quantity"] == 2
    assert events_of(gid, 2) == [(0, "removed", A), (1, "added", Z)]


def test_ops_below_a_member_change_that_member_only(any_api):
    gid = create_group(any_api, [A])
    patched(any_api, gid, [add(B, period={"start": "2020-01-01"})])
    steps = [
        (
            {"op": "replace", "path": "/member/1/period/start", "value": "2021-05"},
            {"start": "2021-05"},
        ),
        (
            {"op": "add", "path": "/member/1/period/end", "value": "2022"},
            {"start": "2021-05", "end": "2022"},
        ),
        ({"op": "remove", "path": "/member/1/period/start"}, {"end": "2022"}),
    ]
    for version, (op, period) in enumerate(steps, start=3):
        body = patched(any_api, gid, [op])
        assert version_of(body) == version
        assert body["member"] == [member(A), member(B, period=period)]
    body = patched(any_api, gid, [{"op": "add", "path": "/member/1/inactive", "value": True}])
    assert body["member"][1] == member(B, period={"end": "2022"}, inactive=True)
    assert body["quantity"] == 1
    body = patched(any_api, gid, [{"op": "remove", "path": "/member/1/period"}])
    assert body["member"][1] == member(B, inactive=True)
    body = patched(
        any_api, gid, [{"op": "replace", "path": "/member/0/entity/reference", "value": Q}]
    )
    assert body["member"] == [member(B, inactive=True), member(Q)]
    assert body["quantity"] == 1
    assert events_of(gid, 8) == [(0, "removed", A), (1, "added", Q)]


@pytest.mark.parametrize(
    ("op", "status", "detail_code"),
    [
        (
            {"op": "add", "path": "/member/0/period/end", "value": "2019"},
            400,
            "MSG_MEMBER_PERIOD_INVALID",
        ),
        (
            {"op": "replace", "path": "/member/0/entity/reference", "value": "Observation/1"},
            400,
            "MSG_MEMBER_REFERENCE_INVALID",
        ),
        ({"op": "remove", "path": "/member/0/entity"}, 400, "MSG_MEMBER_INVALID"),
        ({"op": "add", "path": "/member/0/colour", "value": "red"}, 400, "MSG_MEMBER_INVALID"),
        ({"op": "remove", "path": "/member/1/period"}, 422, "MSG_PATCH_FAILED"),
        ({"op": "replace", "path": "/member/0/nothing/here", "value": 1}, 422, "MSG_PATCH_FAILED"),
    ],
)
def test_a_sub_element_op_that_breaks_the_member_writes_nothing(any_api, op, status, detail_code):
    gid = create_group(any_api, [A, B])
    patched(any_api, gid, [add(A, period={"start": "2020-06-01"})])
    before = snapshot(any_api, gid)
    issue = assert_outcome(patch(any_api, gid, [add(Z), op]), status, detail_code)
    assert issue["diagnostics"].startswith(f"op 1 ({op['op']} {op['path']}): ")
    assert snapshot(any_api, gid) == before


# --- test ------------------------------------------------------------------------------------


def test_test_ops_on_members_guard_the_patch(any_api):
    gid = create_group(any_api, [A, B])
    body = patched(
        any_api,
        gid,
        [
            {"op": "test", "path": "/member/0/entity/reference", "value": A},
            {"op": "test", "path": "/member/1", "value": member(B)},
            add(C),
        ],
    )
    assert refs_of(body) == [A, B, C]


@pytest.mark.parametrize(
    "test_op",
    [
        {"op": "test", "path": "/member/0/entity/reference", "value": B},
        {"op": "test", "path": "/member/1", "value": member(B, inactive=True)},
        {"op": "test", "path": "/member/0/period", "value": {"start": "2020"}},
    ],
)
def test_a_failing_test_op_writes_nothing(any_api, test_op):
    gid = create_group(any_api, [A, B])
    before = snapshot(any_api, gid)
    issue = assert_outcome(patch(any_api, gid, [add(C), test_op]), 422, "MSG_PATCH_TEST_FAILED")
    assert issue["diagnostics"] == MSG_MEMBER_TEST.format(index=1, path=test_op["path"])
    assert snapshot(any_api, gid) == before


def test_ops_see_the_roster_as_earlier_ops_left_it(any_api):
    gid = create_group(any_api, [A, C])
    body = patched(
        any_api,
        gid,
        [
            add(B),  # [a, b, c]
            {"op": "remove", "path": "/member/2"},  # c
            {"op": "test", "path": "/member/1/entity/reference", "value": B},
        ],
    )
    assert refs_of(body) == [A, B]
    assert events_of(gid, 2) == [(0, "added", B), (1, "removed", C)]


# --- the whole roster ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["add", "replace"])
def test_setting_the_whole_roster_replaces_it(any_api, name):
    gid = create_group(any_api, [A, B])
    value = [member(Z), member(B, inactive=True)]
    body = patched(any_api, gid, [{"op": name, "path": "/member", "value": value}])
    assert body["member"] == [member(B, inactive=True), member(Z)]
    assert body["quantity"] == 1
    assert sorted(events_of(gid, 2), key=lambda e: e[2]) == [
        (0, "removed", A),
        (1, "updated", B),
        (2, "added", Z),
    ]


def test_removing_the_whole_roster_empties_it(any_api):
    gid = create_group(any_api, [A, B])
    body = patched(any_api, gid, [{"op": "remove", "path": "/member"}])
    assert "member" not in body
    assert body["quantity"] == 0
    assert [e[1] for e in events_of(gid, 2)] == ["removed", "removed"]


def test_the_whole_roster_must_be_an_array(api):
    gid = create_group(api, [A])
    before = snapshot(api, gid)
    issue = assert_outcome(
        patch(api, gid, [{"op": "add", "path": "/member", "value": member(B)}]),
        400,
        "MSG_MEMBER_INVALID",
    )
    assert issue["diagnostics"] == f"op 0 (add /member): {MSG_ROSTER_NOT_LIST}"
    issue = assert_outcome(
        patch(api, gid, [{"op": "replace", "path": "/member", "value": [member(B), {}]}]),
        400,
        "MSG_MEMBER_INVALID",
    )
    assert issue["expression"] == ["op 0 (replace /member) value[1]"]
    assert snapshot(api, gid) == before


# --- unsupported ops -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "index"),
    [
        ({"op": "move", "from": "/member/0", "path": "/name"}, 1),
        ({"op": "copy", "from": "/name", "path": "/member/-"}, 1),
        ({"op": "move", "from": "/member/0", "path": "/member/1"}, 1),
    ],
)
def test_move_and_copy_on_members_are_refused(api, op, index):
    gid = create_group(api, [A, B], name="n")
    before = snapshot(api, gid)
    issue = assert_outcome(patch(api, gid, [add(C), op]), 422, "MSG_PATCH_FAILED")
    assert issue["diagnostics"] == MSG_MEMBER_MOVE.format(index=index)
    assert snapshot(api, gid) == before


@pytest.mark.parametrize(
    "op",
    [
        {"op": "replace", "path": "/member/-", "value": member(B)},
        {"op": "add", "path": "/member/-/period", "value": {"start": "2020"}},
        {"op": "remove", "path": "/member/-"},
        {"op": "remove", "path": "/member/01"},
        {"op": "test", "path": "/member", "value": []},
    ],
)
def test_member_paths_without_a_meaning_are_refused(api, op):
    gid = create_group(api, [A, B])
    before = snapshot(api, gid)
    issue = assert_outcome(patch(api, gid, [op]), 422, "MSG_PATCH_FAILED")
    assert issue["diagnostics"] == MSG_MEMBER_OP.format(index=0, op=op["op"], path=op["path"])
    assert snapshot(api, gid) == before


@pytest.mark.parametrize("n", [2, 3, 1000])
def test_an_index_past_the_roster_is_refused(any_api, n):
    gid = create_group(any_api, [A, B])
    before = snapshot(any_api, gid)
    op = {"op": "remove", "path": f"/member/{n}"}
    issue = assert_outcome(patch(any_api, gid, [op]), 422, "MSG_PATCH_FAILED")
    assert issue["diagnostics"] == MSG_MEMBER_INDEX.format(
        index=0, op="remove", path=op["path"], n=n
    )
    assert snapshot(any_api, gid) == before


# --- mixed patches -------------------------------------------------------------------------


def test_a_mixed_patch_is_one_version(any_api):
    gid = create_group(any_api, [A])
    body = patched(
        any_api,
        gid,
        [
            {"op": "add", "path": "/name", "value": "Cohort"},
            add(B),
            {"op": "test", "path": "/name", "value": "Cohort"},
            {"op": "remove", "path": "/member/0"},
            {"op": "add", "path": "/code", "value": {"text": "c"}},
        ],
    )
    assert version_of(body) == 2
    assert history_versions(gid) == [1, 2]
    assert (body["name"], body["code"], refs_of(body), body["quantity"]) == (
        "Cohort",
        {"text": "c"},
        [B],
        1,
    )
    assert events_of(gid, 2) == [(0, "added", B), (1, "removed", A)]


@pytest.mark.parametrize(
    ("op", "status", "detail_code"),
    [
        ({"op": "replace", "path": "/name", "value": "x"}, 422, "MSG_PATCH_FAILED"),
        ({"op": "test", "path": "/type", "value": "device"}, 422, "MSG_PATCH_FAILED"),
        ({"op": "replace", "path": "/actual", "value": "yes"}, 400, "MSG_INVALID_RESOURCE"),
        ({"op": "remove", "path": "/actual"}, 400, "MSG_INVALID_RESOURCE"),
        ({"op": "replace", "path": "/id", "value": "other"}, 422, "MSG_PATCH_FAILED"),
    ],
)
def test_a_mixed_patch_with_a_bad_other_op_writes_nothing(any_api, op, status, detail_code):
    gid = create_group(any_api, [A])
    before = snapshot(any_api, gid)
    assert_outcome(patch(any_api, gid, [add(B), op, add(C)]), status, detail_code)
    assert snapshot(any_api, gid) == before


def test_quantity_is_server_owned(any_api):
    gid = create_group(any_api, [A, B])
    response = patch(any_api, gid, [{"op": "replace", "path": "/quantity", "value": 99}])
    assert response.status == 200, response
    assert (response.etag, response.body["quantity"]) == ('W/"1"', 2)
    body = patched(any_api, gid, [{"op": "replace", "path": "/quantity", "value": 99}, add(C)])
    assert body["quantity"] == 3


# --- preconditions, limits, errors -----------------------------------------------------------


def test_if_match_guards_the_version(any_api):
    gid = create_group(any_api, [A])
    patched(any_api, gid, [add(B)], version=1)
    before = snapshot(any_api, gid)
    issue = assert_outcome(patch(any_api, gid, [add(C)], version=1), 412, "MSG_VERSION_MISMATCH")
    assert issue["diagnostics"] == MSG_VERSION_MISMATCH.format(expected=1, current=2)
    assert snapshot(any_api, gid) == before
    assert refs_of(patched(any_api, gid, [add(C)], version=2)) == [A, B, C]


def test_a_malformed_if_match_is_400(api):
    gid = create_group(api, [A])
    response = api.patch(f"/Group/{gid}", [add(B)], headers={"If-Match": "yesterday"})
    assert_outcome(response, 400, "MSG_BAD_IF_MATCH")


def test_patch_of_an_unknown_or_deleted_group(api):
    issue = assert_outcome(patch(api, "nope", [add(A)]), 404, "MSG_NO_EXIST")
    assert issue["diagnostics"] == MSG_NOT_FOUND.format(type="Group", id="nope")
    gid = create_group(api, [A])
    assert api.delete(f"/Group/{gid}").status == 204
    issue = assert_outcome(patch(api, gid, [add(B)]), 410, "MSG_DELETED")
    assert issue["diagnostics"] == MSG_DELETED.format(type="Group", id=gid, version=2)
    assert outbox_events(gid) == [(1, 0, "added", A)]


@pytest.mark.parametrize(
    "ops",
    [{"op": "add", "path": "/member/-"}, [{"op": "add", "path": "/member/-"}], [{"path": "/x"}]],
)
def test_a_malformed_patch_document_is_400(api, ops):
    gid = create_group(api, [A])
    assert_outcome(patch(api, gid, ops), 400, "MSG_PATCH_INVALID")


# --- the members-written flag ----------------------------------------------------------------


def test_the_middleware_clears_the_flag_on_every_request():
    seen = []

    class Request:
        pass

    request = Request()
    setattr(request, FLAG, True)
    GroupMemberEventsMiddleware(lambda r: seen.append(getattr(r, FLAG)) or "response")(request)
    assert seen == [False]


@pytest.mark.django_db
def test_the_post_save_handler_skips_rosters_a_patch_already_wrote():
    context = WriteContext()
    roster = {A: parse_member(member(A), "Group.member[0]")}

    def write(flag: bool) -> VersionWrite:
        setattr(context, FLAG, flag)  # a server-side write: the flag lives on its context
        return VersionWrite(
            resource_type="Group",
            resource_id="g-flag",
            version_id=1,
            incarnation=1,
            method="PUT",
            context=context,
            previous=None,
            body=group(),
            payload=Replace(roster),
        )

    skipped = write(True)
    group_post_save(skipped)
    assert skipped.rows == []
    assert not MemberOutbox.objects.filter(group_id="g-flag").exists()
    assert skipped.body == group()
    diffed = write(False)
    group_post_save(diffed)
    # The outbox row is handed to the write, which stores it with the version's rows.
    insert_all(diffed.rows)
    assert outbox_events("g-flag") == [(1, 0, "added", A)]
    assert diffed.body["quantity"] == 1

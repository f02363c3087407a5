"""``Group/[id]/$remove-member``: discharge a member (mode remove, or inactivate).

Out: ``groupVersion``. Errors: not a member 422 ``MSG_NOT_A_MEMBER``; inactivating an
inactive member 422 ``MSG_MEMBER_INACTIVE``; unknown identifier 404; ambiguous 409; stale
``groupVersion`` 409 ``MSG_VERSION_AWARE_CONFLICT`` with both versions.
"""

from __future__ import annotations

from tests.operations.conftest import (
    add_member,
    assert_error,
    assert_version_conflict,
    create_group,
    create_patient,
    diagnostics,
    group_version,
    ident,
    members_roster,
    new_identifier,
    out_value,
    read_group,
    ref,
    remove_member,
    roster,
    text,
)

INACTIVATE = {"name": "mode", "valueCode": "inactivate"}
REMOVE = {"name": "mode", "valueCode": "remove"}


def memberships(api, pid: str) -> list[str]:
    """Group ids of ``$group-memberships`` for a Patient."""
    response = api.get(f"/{pid}/$group-memberships")
    assert response.status == 200, response
    return [e["resource"]["id"] for e in response.body.get("entry", [])]


def test_remove_by_identifier(any_api):
    api = any_api
    identifier = new_identifier()
    pid, other = create_patient(api, identifier), create_patient(api)
    gid = create_group(api, [pid, other])
    response = remove_member(api, gid, ident(identifier))
    assert response.status == 200, response
    assert response.body == {
        "resourceType": "Parameters",
        "parameter": [{"name": "groupVersion", "valueString": "2"}],
    }
    assert read_group(api, gid)["quantity"] == 1
    assert roster(api, gid) == {other: False}
    assert members_roster(api, gid) == {other: False}
    assert memberships(api, pid) == []
    assert memberships(api, other) == [gid]


def test_remove_by_reference_with_explicit_mode(any_api):
    api = any_api
    pid, other = create_patient(api), create_patient(api)
    gid = create_group(api, [pid, other])
    response = remove_member(api, gid, ref(pid, "member"), REMOVE)
    assert response.status == 200, response
    assert out_value(response, "groupVersion") == "2"
    assert roster(api, gid) == {other: False}


def test_remove_a_non_patient_member_by_reference(api):
    practitioner = "Practitioner/p-1"
    pid = create_patient(api)
    gid = create_group(api, [pid, practitioner])
    response = remove_member(api, gid, ref(practitioner, "member"))
    assert response.status == 200, response
    assert roster(api, gid) == {pid: False}


def test_inactivate_keeps_the_member_inactive(any_api):
    api = any_api
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api)
    period = {"start": "2020-01-01"}
    added = add_member(api, gid, ident(identifier), {"name": "period", "valuePeriod": period})
    assert added.status == 200, added
    response = remove_member(api, gid, ident(identifier), INACTIVATE)
    assert response.status == 200, response
    assert out_value(response, "groupVersion") == "3"
    group = read_group(api, gid)
    assert group["quantity"] == 0
    assert group["member"] == [{"entity": {"reference": pid}, "period": period, "inactive": True}]
    assert members_roster(api, gid) == {pid: True}
    assert memberships(api, pid) == []


def test_inactivating_an_inactive_member_is_422(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api, [pid])
    assert remove_member(api, gid, ident(identifier), INACTIVATE).status == 200
    response = remove_member(api, gid, ident(identifier), INACTIVATE)
    assert_error(response, 422, "processing", "MSG_MEMBER_INACTIVE")
    assert diagnostics(response) == f"{pid} is already inactive in Group/{gid}"
    assert group_version(api, gid) == 2


def test_removing_an_inactive_member_removes_it(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api, [pid])
    assert remove_member(api, gid, ident(identifier), INACTIVATE).status == 200
    response = remove_member(api, gid, ident(identifier))
    assert response.status == 200, response
    assert out_value(response, "groupVersion") == "3"
    assert roster(api, gid) == {}
    assert read_group(api, gid)["quantity"] == 0


def test_not_a_member_is_422(any_api):
    api = any_api
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api, [create_patient(api)])
    response = remove_member(api, gid, ident(identifier))
    assert_error(response, 422, "processing", "MSG_NOT_A_MEMBER")
    assert diagnostics(response) == f"{pid} is not a member of Group/{gid}"
    assert group_version(api, gid) == 1


def test_removing_twice_is_422_the_second_time(any_api):
    api = any_api
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api, [pid])
    assert remove_member(api, gid, ident(identifier)).status == 200
    response = remove_member(api, gid, ref(pid, "member"))
    assert_error(response, 422, "processing", "MSG_NOT_A_MEMBER")
    assert group_version(api, gid) == 2


def test_inactivating_a_non_member_is_422_not_a_member(api):
    pid = create_patient(api)
    gid = create_group(api)
    response = remove_member(api, gid, ref(pid, "member"), INACTIVATE)
    assert_error(response, 422, "processing", "MSG_NOT_A_MEMBER")


def test_current_group_version_is_accepted(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api, [pid])
    response = remove_member(api, gid, ident(identifier), text("groupVersion", "1"))
    assert response.status == 200, response
    assert out_value(response, "groupVersion") == "2"


def test_stale_group_version_is_409_with_both_versions(any_api):
    api = any_api
    identifier = new_identifier()
    pid, other = create_patient(api, identifier), create_patient(api)
    gid = create_group(api, [pid, other])
    assert remove_member(api, gid, ref(other, "member")).status == 200
    response = remove_member(api, gid, ident(identifier), text("groupVersion", "1"))
    assert_version_conflict(response, f"Group/{gid}", "1", 2)
    assert roster(api, gid) == {pid: False}


def test_version_is_checked_before_membership(api):
    pid = create_patient(api)
    gid = create_group(api, [create_patient(api)])
    response = remove_member(api, gid, ref(pid, "member"), text("groupVersion", "3"))
    assert_version_conflict(response, f"Group/{gid}", "3", 1)


def test_unknown_identifier_is_404(api):
    gid = create_group(api, [create_patient(api)])
    response = remove_member(api, gid, ident(new_identifier()))
    assert_error(response, 404, "not-found", "MSG_PATIENT_NOT_FOUND")
    assert group_version(api, gid) == 1


def test_ambiguous_identifier_is_409(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    create_patient(api, identifier)
    gid = create_group(api, [pid])
    response = remove_member(api, gid, ident(identifier))
    assert_error(response, 409, "conflict", "MSG_PATIENT_AMBIGUOUS")
    assert roster(api, gid) == {pid: False}


def test_remove_on_unknown_group_is_404(api):
    response = remove_member(api, "no-such-group", ref("Patient/x", "member"))
    assert_error(response, 404, "not-found", "MSG_NO_EXIST")


def test_remove_on_deleted_group_is_410(api):
    pid = create_patient(api)
    gid = create_group(api, [pid])
    assert api.delete(f"/Group/{gid}").status == 204
    response = remove_member(api, gid, ref(pid, "member"))
    assert_error(response, 410, "deleted", "MSG_DELETED")

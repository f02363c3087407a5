"""``Group/$transfer-member``: move a member between two Groups atomically.

Out: ``sourceVersion`` and ``targetVersion``. The membership content (period, inactive) moves
unchanged. Errors: not a member of the source 422 ``MSG_NOT_A_MEMBER``; stale
``sourceVersion`` / ``targetVersion`` 409 ``MSG_VERSION_AWARE_CONFLICT`` with both versions;
unknown / deleted Groups 404 / 410; unknown or ambiguous identifier 404 / 409. A failed
transfer changes neither Group.
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
    transfer,
)


def memberships(api, pid: str) -> list[str]:
    """Group ids of ``$group-memberships`` for a Patient."""
    response = api.get(f"/{pid}/$group-memberships")
    assert response.status == 200, response
    return [e["resource"]["id"] for e in response.body.get("entry", [])]


def test_transfer_by_identifier(any_api):
    api = any_api
    identifier = new_identifier()
    pid, stays, there = create_patient(api, identifier), create_patient(api), create_patient(api)
    source, target = create_group(api, [pid, stays]), create_group(api, [there])
    response = transfer(api, source, target, ident(identifier))
    assert response.status == 200, response
    assert response.body == {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "sourceVersion", "valueString": "2"},
            {"name": "targetVersion", "valueString": "2"},
        ],
    }
    assert roster(api, source) == {stays: False}
    assert roster(api, target) == {pid: False, there: False}
    assert members_roster(api, source) == {stays: False}
    assert members_roster(api, target) == {pid: False, there: False}
    assert read_group(api, source)["quantity"] == 1
    assert read_group(api, target)["quantity"] == 2
    assert memberships(api, pid) == [target]


def test_transfer_by_reference_keeps_period_and_inactive(any_api):
    api = any_api
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    source, target = create_group(api), create_group(api)
    period = {"start": "2023-05-01", "end": "2025-04-30"}
    added = add_member(api, source, ident(identifier), {"name": "period", "valuePeriod": period})
    assert added.status == 200, added
    inactivated = remove_member(
        api, source, ident(identifier), {"name": "mode", "valueCode": "inactivate"}
    )
    assert inactivated.status == 200, inactivated
    response = transfer(api, source, target, ref(pid, "member"))
    assert response.status == 200, response
    assert (out_value(response, "sourceVersion"), out_value(response, "targetVersion")) == (
        "4",
        "2",
    )
    assert read_group(api, target)["member"] == [
        {"entity": {"reference": pid}, "period": period, "inactive": True}
    ]
    assert read_group(api, target)["quantity"] == 0
    assert "member" not in read_group(api, source)


def test_transfer_back_and_forth(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    a, b = create_group(api, [pid]), create_group(api)
    assert transfer(api, a, b, ident(identifier)).status == 200
    response = transfer(api, b, a, ident(identifier))
    assert response.status == 200, response
    assert (out_value(response, "sourceVersion"), out_value(response, "targetVersion")) == (
        "3",
        "3",
    )
    assert roster(api, a) == {pid: False}
    assert roster(api, b) == {}


def test_transfer_with_current_versions(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    source, target = create_group(api, [pid]), create_group(api)
    assert add_member(api, target, ident(new_identifier_patient(api))).status == 200
    response = transfer(
        api,
        source,
        target,
        ident(identifier),
        text("sourceVersion", "1"),
        text("targetVersion", "2"),
    )
    assert response.status == 200, response
    assert (out_value(response, "sourceVersion"), out_value(response, "targetVersion")) == (
        "2",
        "3",
    )


def new_identifier_patient(api) -> dict[str, str]:
    """A fresh identifier with a Patient carrying it."""
    identifier = new_identifier()
    create_patient(api, identifier)
    return identifier


def test_transfer_with_absolute_references(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    source, target = create_group(api, [pid]), create_group(api)
    response = api.post(
        "/Group/$transfer-member",
        {
            "resourceType": "Parameters",
            "parameter": [
                ref(f"http://testserver/4_0_0/Group/{source}", "source"),
                ref(f"http://testserver/4_0_0/Group/{target}", "target"),
                ident(identifier),
            ],
        },
    )
    assert response.status == 200, response
    assert roster(api, target) == {pid: False}


def test_not_a_member_of_the_source_is_422(any_api):
    api = any_api
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    source, target = create_group(api, [create_patient(api)]), create_group(api, [pid])
    response = transfer(api, source, target, ident(identifier))
    assert_error(response, 422, "processing", "MSG_NOT_A_MEMBER")
    assert diagnostics(response) == f"{pid} is not a member of Group/{source}"
    assert (group_version(api, source), group_version(api, target)) == (1, 1)
    assert roster(api, target) == {pid: False}


def test_stale_source_version_is_409_with_both_versions(any_api):
    api = any_api
    identifier = new_identifier()
    pid, other = create_patient(api, identifier), create_patient(api)
    source, target = create_group(api, [pid, other]), create_group(api)
    assert remove_member(api, source, ref(other, "member")).status == 200
    response = transfer(api, source, target, ident(identifier), text("sourceVersion", "1"))
    assert_version_conflict(response, f"Group/{source}", "1", 2)
    assert roster(api, source) == {pid: False}
    assert roster(api, target) == {}
    assert (group_version(api, source), group_version(api, target)) == (2, 1)


def test_stale_target_version_is_409_with_both_versions(any_api):
    api = any_api
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    source, target = create_group(api, [pid]), create_group(api)
    assert add_member(api, target, ident(new_identifier_patient(api))).status == 200
    response = transfer(
        api,
        source,
        target,
        ident(identifier),
        text("sourceVersion", "1"),
        text("targetVersion", "1"),
    )
    assert_version_conflict(response, f"Group/{target}", "1", 2)
    assert roster(api, source) == {pid: False}
    assert pid not in roster(api, target)
    assert (group_version(api, source), group_version(api, target)) == (1, 2)


def test_unknown_source_is_404(api):
    identifier = new_identifier()
    create_patient(api, identifier)
    target = create_group(api)
    response = transfer(api, "no-such-group", target, ident(identifier))
    assert_error(response, 404, "not-found", "MSG_NO_EXIST")
    assert group_version(api, target) == 1


def test_unknown_target_is_404(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    source = create_group(api, [pid])
    response = transfer(api, source, "no-such-group", ident(identifier))
    assert_error(response, 404, "not-found", "MSG_NO_EXIST")
    assert roster(api, source) == {pid: False}
    assert group_version(api, source) == 1


def test_deleted_target_is_410(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    source, target = create_group(api, [pid]), create_group(api)
    assert api.delete(f"/Group/{target}").status == 204
    response = transfer(api, source, target, ident(identifier))
    assert_error(response, 410, "deleted", "MSG_DELETED")
    assert roster(api, source) == {pid: False}


def test_unknown_identifier_is_404(api):
    source, target = create_group(api, [create_patient(api)]), create_group(api)
    response = transfer(api, source, target, ident(new_identifier()))
    assert_error(response, 404, "not-found", "MSG_PATIENT_NOT_FOUND")


def test_ambiguous_identifier_is_409(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    create_patient(api, identifier)
    source, target = create_group(api, [pid]), create_group(api)
    response = transfer(api, source, target, ident(identifier))
    assert_error(response, 409, "conflict", "MSG_PATIENT_AMBIGUOUS")
    assert roster(api, source) == {pid: False}
    assert (group_version(api, source), group_version(api, target)) == (1, 1)


def test_same_group_is_400(api):
    pid = create_patient(api)
    gid = create_group(api, [pid])
    response = transfer(api, gid, gid, ref(pid, "member"))
    assert_error(response, 400, "invalid", "MSG_BAD_FORMAT")
    assert diagnostics(response) == "source and target must be different Groups"
    assert group_version(api, gid) == 1

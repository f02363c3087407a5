"""``Group/[id]/$add-member``: enrol a Patient named by identifier, or sent as a DTO.

Out: ``member`` (the Patient's reference, built by the server) and ``groupVersion``.
Errors: unknown identifier 404 ``MSG_PATIENT_NOT_FOUND``; an identifier that several
Patients carry 409 ``MSG_PATIENT_AMBIGUOUS``; a stale ``groupVersion`` 409
``MSG_VERSION_AWARE_CONFLICT`` with both versions; unknown / deleted Group 404 / 410.
"""

from __future__ import annotations

from fhirservice.models import StoredResource
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
    remove_member,
    roster,
    text,
)


def patients_with(api, identifier: dict[str, str]) -> list[str]:
    """``Patient/id`` of every Patient a token search by the identifier finds."""
    query = f"identifier={identifier.get('system', '')}|{identifier['value']}"
    if "system" not in identifier:
        query = f"identifier={identifier['value']}"
    response = api.get(f"/Patient?{query}")
    assert response.status == 200, response
    return sorted(f"Patient/{e['resource']['id']}" for e in response.body.get("entry", []))


def test_add_by_identifier(any_api):
    api = any_api
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    other = create_patient(api)
    gid = create_group(api, [other])
    response = add_member(api, gid, ident(identifier))
    assert response.status == 200, response
    assert response.body == {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "member", "valueReference": {"reference": pid}},
            {"name": "groupVersion", "valueString": "2"},
        ],
    }
    group = read_group(api, gid)
    assert group["meta"]["versionId"] == "2"
    assert group["quantity"] == 2
    assert roster(api, gid) == {pid: False, other: False}
    assert members_roster(api, gid) == {pid: False, other: False}
    # The version before the operation still has the old roster.
    old = api.get(f"/Group/{gid}/_history/1")
    assert [m["entity"]["reference"] for m in old.body["member"]] == [other]


def test_identifier_without_system_matches_any_system(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api)
    response = add_member(api, gid, ident({"value": identifier["value"]}))
    assert response.status == 200, response
    assert out_value(response, "member") == {"reference": pid}


def test_identifier_of_another_system_does_not_match(api):
    identifier = new_identifier()
    create_patient(api, identifier)
    gid = create_group(api)
    other = {"system": "urn:test:other", "value": identifier["value"]}
    response = add_member(api, gid, ident(other))
    assert_error(response, 404, "not-found", "MSG_PATIENT_NOT_FOUND")
    assert diagnostics(response) == f"No Patient has the identifier urn:test:other|{other['value']}"


def test_add_with_period(any_api):
    api = any_api
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api)
    period = {"start": "2024-01-01", "end": "2024-12-31T23:59:59Z"}
    response = add_member(api, gid, ident(identifier), {"name": "period", "valuePeriod": period})
    assert response.status == 200, response
    assert read_group(api, gid)["member"] == [{"entity": {"reference": pid}, "period": period}]
    page = api.get(f"/Group/{gid}/$members").body
    member = next(p for p in page["parameter"] if p["name"] == "member")
    assert {"name": "period", "valuePeriod": period} in member["part"]


def test_add_with_current_group_version(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api)
    response = add_member(api, gid, ident(identifier), text("groupVersion", "1"))
    assert response.status == 200, response
    assert out_value(response, "groupVersion") == "2"
    assert roster(api, gid) == {pid: False}


def test_stale_group_version_is_409_with_both_versions(any_api):
    api = any_api
    first, second = new_identifier(), new_identifier()
    pid = create_patient(api, first)
    create_patient(api, second)
    gid = create_group(api)
    assert add_member(api, gid, ident(first), text("groupVersion", "1")).status == 200
    response = add_member(api, gid, ident(second), text("groupVersion", "1"))
    assert_version_conflict(response, f"Group/{gid}", "1", 2)
    assert group_version(api, gid) == 2
    assert roster(api, gid) == {pid: False}


def test_future_group_version_is_409_too(api):
    identifier = new_identifier()
    create_patient(api, identifier)
    gid = create_group(api)
    response = add_member(api, gid, ident(identifier), text("groupVersion", "7"))
    assert_version_conflict(response, f"Group/{gid}", "7", 1)
    assert group_version(api, gid) == 1


def test_unknown_identifier_is_404(api):
    gid = create_group(api)
    identifier = new_identifier()
    response = add_member(api, gid, ident(identifier))
    assert_error(response, 404, "not-found", "MSG_PATIENT_NOT_FOUND")
    assert diagnostics(response) == (
        f"No Patient has the identifier {identifier['system']}|{identifier['value']}"
    )
    assert group_version(api, gid) == 1


def test_identifier_of_a_deleted_patient_is_404(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    assert api.delete(f"/{pid}").status == 204
    gid = create_group(api)
    response = add_member(api, gid, ident(identifier))
    assert_error(response, 404, "not-found", "MSG_PATIENT_NOT_FOUND")


def test_ambiguous_identifier_is_409(api):
    identifier = new_identifier()
    create_patient(api, identifier)
    create_patient(api, identifier)
    gid = create_group(api)
    response = add_member(api, gid, ident(identifier))
    assert_error(response, 409, "conflict", "MSG_PATIENT_AMBIGUOUS")
    assert diagnostics(response) == (
        f"2 Patients match the identifier(s) {identifier['value']}; the match must be unique"
    )
    assert group_version(api, gid) == 1


def test_patient_dto_without_match_creates_the_patient(any_api):
    api = any_api
    identifier = new_identifier()
    gid = create_group(api)
    dto = {
        "resourceType": "Patient",
        "identifier": [identifier],
        "name": [{"family": "Chalmers", "given": ["Peter"]}],
        "birthDate": "1974-12-25",
    }
    response = add_member(api, gid, {"name": "patient", "resource": dto})
    assert response.status == 200, response
    pid = out_value(response, "member")["reference"]
    assert patients_with(api, identifier) == [pid]
    stored = api.get(f"/{pid}").body
    assert stored["meta"]["versionId"] == "1"
    assert stored["identifier"] == [identifier]
    assert stored["name"] == dto["name"]
    assert stored["birthDate"] == "1974-12-25"
    assert roster(api, gid) == {pid: False}
    assert read_group(api, gid)["quantity"] == 1


def test_patient_dto_matching_an_existing_patient_links_it_unchanged(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier, gender="female")
    gid = create_group(api)
    before = StoredResource.objects.filter(resource_type="Patient").count()
    dto = {
        "resourceType": "Patient",
        "identifier": [new_identifier(), identifier],
        "gender": "male",
    }
    response = add_member(api, gid, {"name": "patient", "resource": dto})
    assert response.status == 200, response
    assert out_value(response, "member") == {"reference": pid}
    assert StoredResource.objects.filter(resource_type="Patient").count() == before
    stored = api.get(f"/{pid}").body
    assert stored["meta"]["versionId"] == "1"
    assert stored["gender"] == "female"
    assert stored["identifier"] == [identifier]


def test_patient_dto_matching_two_patients_is_409(api):
    first, second = new_identifier(), new_identifier()
    create_patient(api, first)
    create_patient(api, second)
    gid = create_group(api)
    before = StoredResource.objects.count()
    dto = {"resourceType": "Patient", "identifier": [first, second]}
    response = add_member(api, gid, {"name": "patient", "resource": dto})
    assert_error(response, 409, "conflict", "MSG_PATIENT_AMBIGUOUS")
    assert diagnostics(response) == (
        f"2 Patients match the identifier(s) {first['value']}, {second['value']}; "
        "the match must be unique"
    )
    assert StoredResource.objects.count() == before
    assert group_version(api, gid) == 1


def test_patient_dto_without_identifier_is_400(api):
    gid = create_group(api)
    dto = {"resourceType": "Patient", "name": [{"family": "Nobody"}]}
    response = add_member(api, gid, {"name": "patient", "resource": dto})
    assert_error(response, 400, "invalid", "MSG_BAD_FORMAT")
    assert response.body["issue"][0]["expression"] == [
        "Parameters.parameter(patient).resource.identifier"
    ]
    assert group_version(api, gid) == 1


def test_invalid_patient_dto_is_400_and_creates_nothing(api):
    identifier = new_identifier()
    gid = create_group(api)
    dto = {"resourceType": "Patient", "identifier": [identifier], "birthDate": "not a date"}
    response = add_member(api, gid, {"name": "patient", "resource": dto})
    assert response.status == 400, response
    assert response.issue_codes() == ["invalid"]
    assert patients_with(api, identifier) == []
    assert group_version(api, gid) == 1


def test_adding_a_present_member_again_makes_no_version(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api, [pid])
    response = add_member(api, gid, ident(identifier))
    assert response.status == 200, response
    assert out_value(response, "groupVersion") == "1"
    assert group_version(api, gid) == 1
    assert read_group(api, gid)["quantity"] == 1


def test_adding_an_inactive_member_reactivates_it(api):
    identifier = new_identifier()
    pid = create_patient(api, identifier)
    gid = create_group(api, [pid])
    inactivated = remove_member(
        api, gid, ident(identifier), {"name": "mode", "valueCode": "inactivate"}
    )
    assert inactivated.status == 200, inactivated
    assert read_group(api, gid)["quantity"] == 0
    response = add_member(api, gid, ident(identifier))
    assert response.status == 200, response
    assert out_value(response, "groupVersion") == "3"
    assert roster(api, gid) == {pid: False}
    assert read_group(api, gid)["quantity"] == 1


def test_add_member_on_unknown_group_is_404(api):
    identifier = new_identifier()
    create_patient(api, identifier)
    response = add_member(api, "no-such-group", ident(identifier))
    assert_error(response, 404, "not-found", "MSG_NO_EXIST")


def test_add_member_on_deleted_group_is_410(api):
    identifier = new_identifier()
    create_patient(api, identifier)
    gid = create_group(api)
    assert api.delete(f"/Group/{gid}").status == 204
    response = add_member(api, gid, ident(identifier))
    assert_error(response, 410, "deleted", "MSG_DELETED")


def test_events_ship_to_clickhouse_after_commit(live_api):
    from groups.models import MemberOutbox
    from groups.repository import MemberEventRepository

    identifier = new_identifier()
    pid = create_patient(live_api, identifier)
    gid = create_group(live_api)
    response = add_member(live_api, gid, ident(identifier))
    assert response.status == 200, response
    row = StoredResource.objects.get(key=f"Group/{gid}")
    key = f"{gid}/{row.incarnation}"
    outbox = MemberOutbox.objects.get(roster_key=key)
    assert (outbox.version, outbox.event_count, outbox.source) == (2, 1, "$add-member")
    assert outbox.shipped_at is not None
    events = MemberEventRepository().events(key)
    assert [(e["version"], e["seq"], e["event_type"], e["member_ref"]) for e in events] == [
        (2, 0, "added", pid)
    ]


def test_add_member_while_clickhouse_is_down_ships_later(live_api, clickhouse_down):
    """As with PATCH: the write commits with its events in the outbox and ships later."""
    from django.core.management import call_command

    from groups.models import MemberOutbox

    identifier = new_identifier()
    pid, other = create_patient(live_api, identifier), create_patient(live_api)
    gid = create_group(live_api, [other])
    with clickhouse_down():
        response = add_member(live_api, gid, ident(identifier))
        assert response.status == 200, response
        assert out_value(response, "groupVersion") == "2"
    [pending] = MemberOutbox.objects.filter(group_id=gid, version=2)
    assert pending.shipped_at is None
    # Reads merge the pending batch: the client reads its own write.
    assert roster(live_api, gid) == {pid: False, other: False}
    assert read_group(live_api, gid)["quantity"] == 2
    call_command("ship_member_events", min_age=0, verbosity=0)
    pending.refresh_from_db()
    assert pending.shipped_at is not None
    assert members_roster(live_api, gid) == {pid: False, other: False}
    assert read_group(live_api, gid)["quantity"] == 2

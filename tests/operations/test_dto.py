"""Resources sent to operations are data-transfer objects: literal references are not trusted.

The server matches, creates and links resources itself. A Patient DTO (``$add-member``) is
stored without the elements that hold literal references (generalPractitioner,
managingOrganization, contact organisations, reference-valued extensions …); a Group DTO
(``$create-roster``) loses its managingEntity reference and its members. Client ids and
meta are ignored as well.
"""

from __future__ import annotations

import uuid

from tests.operations.conftest import (
    add_member,
    assert_error,
    create_group,
    group_body,
    ident,
    new_identifier,
    out_value,
    parameters,
    read_group,
    roster,
)


def stored(api, reference: str) -> dict:
    """The current content of ``Type/id`` (200 required)."""
    response = api.get(f"/{reference}")
    assert response.status == 200, response
    return response.body


def without_meta(body: dict) -> dict:
    """A served resource without id and meta (what the client controls)."""
    return {k: v for k, v in body.items() if k not in ("id", "meta")}


def add_dto(api, gid: str, dto: dict):
    """``$add-member`` with a Patient DTO (200 required); the Patient's reference."""
    response = add_member(api, gid, {"name": "patient", "resource": dto})
    assert response.status == 200, response
    return out_value(response, "member")["reference"]


def test_patient_dto_references_are_dropped(api):
    identifier = new_identifier()
    gid = create_group(api)
    dto = {
        "resourceType": "Patient",
        "identifier": [identifier],
        "name": [{"family": "Chalmers"}],
        "generalPractitioner": [
            {"reference": "Practitioner/planted"},
            {"reference": "http://elsewhere.example/fhir/Organization/1"},
        ],
        "managingOrganization": {"reference": "Organization/planted", "display": "Planted"},
        "contact": [
            {"name": {"family": "Next of kin"}, "organization": {"reference": "Organization/x"}}
        ],
    }
    pid = add_dto(api, gid, dto)
    assert without_meta(stored(api, pid)) == {
        "resourceType": "Patient",
        "identifier": [identifier],
        "name": [{"family": "Chalmers"}],
        "contact": [{"name": {"family": "Next of kin"}}],
    }
    assert roster(api, gid) == {pid: False}


def test_reference_valued_extension_is_dropped_whole(api):
    identifier = new_identifier()
    gid = create_group(api)
    kept = {"url": "http://example.org/fhir/kept", "valueString": "stays"}
    dto = {
        "resourceType": "Patient",
        "identifier": [identifier],
        "extension": [
            {"url": "http://example.org/fhir/link", "valueReference": {"reference": "Patient/x"}},
            kept,
            {
                "url": "http://example.org/fhir/complex",
                "extension": [
                    {"url": "who", "valueReference": {"reference": "Practitioner/y"}},
                ],
            },
        ],
    }
    pid = add_dto(api, gid, dto)
    # Neither an extension without a value (ext-1) nor one with an empty sub-extension list.
    assert stored(api, pid)["extension"] == [kept]


def test_patient_dto_id_and_meta_are_ignored(api):
    identifier = new_identifier()
    gid = create_group(api)
    planted = f"planted-{uuid.uuid4()}"
    dto = {
        "resourceType": "Patient",
        "id": planted,
        "meta": {"versionId": "17", "lastUpdated": "2001-01-01T00:00:00Z"},
        "identifier": [identifier],
    }
    pid = add_dto(api, gid, dto)
    assert pid != f"Patient/{planted}"
    uuid.UUID(pid.split("/")[1])
    body = stored(api, pid)
    assert body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"] != "2001-01-01T00:00:00Z"
    assert api.get(f"/Patient/{planted}").status == 404


def test_dto_references_do_not_steer_matching(api):
    """A DTO that names an existing Patient by reference alone is not linked to it."""
    identifier = new_identifier()
    gid = create_group(api)
    first = add_dto(api, gid, {"resourceType": "Patient", "identifier": [identifier]})
    other = new_identifier()
    dto = {
        "resourceType": "Patient",
        "identifier": [other],
        "link": [{"other": {"reference": first}, "type": "replaced-by"}],
    }
    response = add_member(api, gid, {"name": "patient", "resource": dto})
    # Patient.link.other is required: without its (untrusted) reference the DTO is invalid.
    assert_error(response, 400, "invalid", "MSG_INVALID_RESOURCE")
    assert roster(api, gid) == {first: False}


def test_group_dto_managing_entity_is_dropped(api):
    identifier = new_identifier()
    dto = group_body(
        name="Diabetes cohort",
        managingEntity={"reference": "Organization/planted", "display": "Planted"},
        member=[{"entity": {"reference": "Patient/planted"}}],
    )
    response = api.post(
        "/Group/$create-roster",
        parameters({"name": "group", "resource": dto}, ident(identifier)),
    )
    assert response.status == 200, response
    gid = out_value(response, "group")["reference"].split("/")[1]
    group = read_group(api, gid)
    assert "managingEntity" not in group
    assert group["name"] == "Diabetes cohort"
    assert list(roster(api, gid)) != ["Patient/planted"]
    assert len(roster(api, gid)) == 1
    found = api.get("/Group?managing-entity=Organization/planted")
    assert found.status == 200, found
    assert found.body["total"] == 0


def test_group_dto_characteristic_reference_makes_the_dto_invalid(api):
    """value[x] is required: a characteristic whose value is a reference cannot be kept."""
    dto = group_body(
        characteristic=[
            {
                "code": {"text": "clinic"},
                "valueReference": {"reference": "Organization/1"},
                "exclude": False,
            }
        ]
    )
    response = api.post("/Group/$create-roster", parameters({"name": "group", "resource": dto}))
    assert_error(response, 400, "invalid", "MSG_INVALID_RESOURCE")

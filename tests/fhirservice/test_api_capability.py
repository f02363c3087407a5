"""``GET [base]/metadata``: the CapabilityStatement, and that it lists exactly what works.

Beyond its shape (kind instance, FHIR 4.0.1, the R4 resource types), every interaction and
search parameter it declares is tried against the API, and what it leaves out is refused.
"""

from __future__ import annotations

from urllib.parse import urlencode

import pytest
from django.test import override_settings

from fhirservice.fhir.resource_types import R4_RESOURCE_TYPES
from fhirservice.search.extract import search_params
from tests.fhirservice.test_api_errors import assert_outcome
from tests.support import patient

# Groups are stored here: their rosters need the ClickHouse tables.

SERVER = "http://testserver/4_0_0"
TYPE_INTERACTIONS = {
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
}
SAMPLE_VALUES = {
    "token": "urn:sys|x",
    "string": "x",
    "uri": "urn:x",
    "date": "ge2020-01-01",
    "reference": "Patient/x",
    "number": "ge1",
    "quantity": "ge1|urn:units|x",
}


def sample_value(resource_type: str, name: str, kind: str) -> str:
    """A well-formed value of a parameter (composites: one per component, joined by $)."""
    if kind != "composite":
        return SAMPLE_VALUES[kind]
    components = search_params(resource_type)[name].components
    return "$".join(SAMPLE_VALUES[c.type] for c in components)


@pytest.fixture
def statement(api) -> dict:
    response = api.get("/metadata")
    assert response.status == 200
    return response.body


def by_type(statement: dict) -> dict[str, dict]:
    return {r["type"]: r for r in statement["rest"][0]["resource"]}


def test_capability_statement_shape(statement):
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["kind"] == "instance"
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["status"] == "active"
    assert "application/fhir+json" in statement["format"]
    assert statement["patchFormat"] == ["application/json-patch+json"]
    assert statement["implementation"]["url"] == SERVER
    rest = statement["rest"]
    assert len(rest) == 1 and rest[0]["mode"] == "server"
    assert {i["code"] for i in rest[0]["interaction"]} == {
        "transaction",
        "batch",
        "search-system",
        "history-system",
    }
    # A search without _type takes the common parameters of Resource.
    assert [p["name"] for p in rest[0]["searchParam"]] == [
        "_id",
        "_lastUpdated",
        "_profile",
        "_security",
        "_source",
        "_tag",
    ]
    assert rest[0]["searchParam"][-1] == {
        "name": "_tag",
        "definition": "http://hl7.org/fhir/SearchParameter/Resource-tag",
        "type": "token",
    }


def test_capability_statement_lists_the_r4_resource_types(statement):
    resources = by_type(statement)
    assert set(resources) == R4_RESOURCE_TYPES
    assert len(resources) == 146
    assert "MedicinalProduct" in resources and "Citation" not in resources
    # AuditEvent is the read-only audit trail (fhirservice.access.audit): search only.
    assert [i["code"] for i in resources.pop("AuditEvent")["interaction"]] == ["search-type"]
    for resource in resources.values():
        assert {i["code"] for i in resource["interaction"]} == TYPE_INTERACTIONS
        assert resource["versioning"] == "versioned-update"
        assert resource["readHistory"] is True
        assert resource["conditionalCreate"] is True
        assert resource["updateCreate"] is True
        names = {p["name"] for p in resource["searchParam"]}
        assert {"_id", "_lastUpdated"} <= names


def test_capability_statement_names_the_patient_and_group_parameters(statement):
    resources = by_type(statement)
    patient_params = {p["name"]: p["type"] for p in resources["Patient"]["searchParam"]}
    assert {
        "_id": "token",
        "_lastUpdated": "date",
        "identifier": "token",
        "name": "string",
        "family": "string",
        "given": "string",
        "birthdate": "date",
        "gender": "token",
        "address-city": "string",
        "general-practitioner": "reference",
        "_tag": "token",
        "_profile": "uri",
    }.items() <= patient_params.items()
    assert len(patient_params) == 29
    for param in resources["Observation"]["searchParam"]:
        assert param["definition"].startswith("http://hl7.org/fhir/SearchParameter/"), param
    group_params = {p["name"]: p["type"] for p in resources["Group"]["searchParam"]}
    assert {
        "identifier": "token",
        "name": "string",
        "type": "token",
        "actual": "token",
        "code": "token",
        "managing-entity": "reference",
    }.items() <= group_params.items()
    assert resources["Observation"]["searchParam"][0]["definition"] == (
        "http://hl7.org/fhir/SearchParameter/Resource-id"
    )


def test_update_create_follows_its_setting(api):
    with override_settings(FHIR_SERVICE={"UPDATE_CREATE": False}):
        resources = by_type(api.get("/metadata").body)
        assert {r.get("updateCreate") for r in resources.values()} == {False, None}
    resources = by_type(api.get("/metadata").body)
    assert {r.get("updateCreate") for r in resources.values()} == {True, None}


def test_every_declared_search_parameter_passes_strict_handling(api, statement):
    strict = {"Prefer": "handling=strict"}
    for resource_type, resource in by_type(statement).items():
        for param in resource["searchParam"]:
            value = sample_value(resource_type, param["name"], param["type"])
            query = urlencode({param["name"]: value, "_count": "0"})
            response = api.get(f"/{resource_type}?{query}", headers=strict)
            assert response.status == 200, (resource_type, param["name"], response)
            assert response.body["total"] == 0


def test_every_declared_type_level_interaction_answers(api, statement):
    for resource_type in by_type(statement):
        search = api.get(f"/{resource_type}?_count=0")
        history = api.get(f"/{resource_type}/_history?_count=0")
        assert (search.status, history.status) == (200, 200), resource_type
    assert api.get("/_history?_count=0").status == 200


def test_every_declared_instance_interaction_works(api, statement):
    interactions = {i["code"] for i in by_type(statement)["Patient"]["interaction"]}
    assert interactions == TYPE_INTERACTIONS
    rid = api.post("/Patient", patient()).body["id"]  # create
    path = f"/Patient/{rid}"
    assert api.get(path).status == 200  # read
    assert api.put(path, patient(family="B", id=rid)).status == 200  # update
    ops = [{"op": "add", "path": "/gender", "value": "male"}]
    assert api.patch(path, ops).status == 200  # patch
    assert api.get(f"{path}/_history/1").status == 200  # vread
    assert api.get(f"{path}/_history").body["total"] == 3  # history-instance
    assert api.delete(path).status == 204  # delete
    for code in ("transaction", "batch"):
        empty = api.post("", {"resourceType": "Bundle", "type": code})
        assert empty.body["type"] == f"{code}-response"


def test_what_is_not_declared_is_refused(api, statement):
    assert_outcome(api.put("", {"resourceType": "Bundle"}), 405, "MSG_METHOD_NOT_ALLOWED")
    resources = by_type(statement)
    declared = {p["name"] for p in resources["Patient"]["searchParam"]}
    assert not {"shoe-size", "_text", "_content", "_filter", "_query"} & declared
    response = api.get("/Patient?shoe-size=x", headers={"Prefer": "handling=strict"})
    assert_outcome(response, 400, "MSG_PARAM_UNKNOWN")
    response = api.get("/Patient?_text=x", headers={"Prefer": "handling=strict"})
    assert_outcome(response, 400, "MSG_PARAM_NOT_SUPPORTED")

"""Bad input through the HTTP API: every error is an OperationOutcome and writes nothing.

Covers malformed JSON (400), wrong content type (415), bodies over MAX_BODY_BYTES (413),
resourceType / id mismatches (400), invalid R4 content (400), unknown routes (404), wrong
methods (405), an Accept of neither JSON nor XML (406) and unexpected exceptions (500
without internals).
``row_counts`` and ``assert_outcome`` are shared by the other API test modules.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from django.apps import apps
from django.test import override_settings

from fhirservice.errors import DETAIL_SYSTEM
from fhirservice.rest.base import MSG_BODY_TOO_LARGE, MSG_FHIRPATH_PATCH
from fhirservice.store.services import MSG_ID_MISMATCH, MSG_TYPE_MISMATCH
from tests.support import FhirResponse, patient


def row_counts() -> dict[str, int]:
    """Rows per model of the metadata store, to prove that a request wrote nothing."""
    return {
        model.__name__: model.objects.count()
        for model in apps.get_app_config("fhirservice").get_models()
    }


def assert_outcome(response: FhirResponse, status: int, detail_code: str) -> dict[str, Any]:
    """The response is an error OperationOutcome with this status and first detail code."""
    assert response.status == status, response
    body = response.body
    assert body["resourceType"] == "OperationOutcome", response
    issue = body["issue"][0]
    assert issue["severity"] in ("error", "fatal"), response
    assert issue["details"]["coding"][0] == {"system": DETAIL_SYSTEM, "code": detail_code}, response
    assert issue["diagnostics"]
    return issue


@pytest.fixture
def stored(api) -> dict[str, Any]:
    """One stored Patient, and the row counts right after storing it."""
    body = api.post("/Patient", patient()).body
    return {"body": body, "path": f"/Patient/{body['id']}", "counts": row_counts()}


def unchanged(api, stored) -> None:
    assert row_counts() == stored["counts"]
    assert api.get(stored["path"]).body == stored["body"]


# --- malformed JSON ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [b'{"resourceType": "Patient",', b"not json", b"{'a': 1}", b"\xff\xfe", b" "]
)
def test_malformed_json_is_400(api, stored, raw):
    path = stored["path"]
    for method, url, content_type in (
        ("POST", "/Patient", "application/fhir+json"),
        ("PUT", path, "application/fhir+json"),
        ("PATCH", path, "application/json-patch+json"),
        ("POST", "", "application/fhir+json"),
    ):
        response = FhirResponse(
            api.client.generic(method, f"/4_0_0{url}", data=raw, content_type=content_type)
        )
        issue = assert_outcome(response, 400, "MSG_JSON_PARSE")
        assert issue["code"] == "invalid"
        assert issue["diagnostics"].startswith("The body is not valid JSON: ")
    unchanged(api, stored)


def test_an_empty_body_is_400(api, stored):
    for method, url in (("POST", "/Patient"), ("PUT", stored["path"]), ("POST", "")):
        response = FhirResponse(
            api.client.generic(method, f"/4_0_0{url}", CONTENT_TYPE="application/fhir+json")
        )
        assert_outcome(response, 400, "MSG_JSON_PARSE")
    unchanged(api, stored)


@pytest.mark.parametrize("body", [[patient()], "Patient", 42, {"name": [{"family": "X"}]}])
def test_json_that_is_not_a_resource_is_400(api, stored, body):
    assert_outcome(api.post("/Patient", body), 400, "MSG_RESOURCE_TYPE_MISSING")
    put = api.put(stored["path"], body)
    assert_outcome(put, 400, "MSG_RESOURCE_TYPE_MISSING")
    unchanged(api, stored)


# --- content type ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "application/turtle",
        "application/octet-stream",
        "text/plain",
        "application/x-www-form-urlencoded",
    ],
)
def test_a_resource_in_a_wrong_content_type_is_415(api, stored, content_type):
    for method, url in (("POST", "/Patient"), ("PUT", stored["path"]), ("POST", "")):
        response = api.request(method, url, stored["body"], content_type=content_type)
        issue = assert_outcome(response, 415, "MSG_UNSUPPORTED_MEDIA_TYPE")
        assert issue["code"] == "not-supported"
    unchanged(api, stored)


@pytest.mark.parametrize(
    "content_type", ["application/fhir+json", "application/json", "application/json+fhir"]
)
def test_every_fhir_json_spelling_is_accepted(api, content_type):
    response = api.post("/Patient", patient(), content_type=f"{content_type}; charset=utf-8")
    assert response.status == 201


def test_a_body_without_content_type_is_415(api, stored):
    response = FhirResponse(
        api.client.generic(
            "POST", "/4_0_0/Patient", data=b'{"resourceType": "Patient"}', content_type=""
        )
    )
    issue = assert_outcome(response, 415, "MSG_UNSUPPORTED_MEDIA_TYPE")
    assert issue["diagnostics"] == (
        "Content-Type 'none' is not accepted here; send application/fhir+json or "
        "application/fhir+xml or application/json or application/json+fhir or application/xml "
        "or application/xml+fhir or text/xml"
    )
    unchanged(api, stored)


def test_patch_in_a_resource_content_type_is_415(api, stored):
    ops = [{"op": "add", "path": "/gender", "value": "male"}]
    response = api.patch(stored["path"], ops, content_type="application/fhir+json")
    issue = assert_outcome(response, 415, "MSG_UNSUPPORTED_MEDIA_TYPE")
    assert issue["diagnostics"] == MSG_FHIRPATH_PATCH
    response = api.patch(stored["path"], ops, content_type="text/plain")
    assert_outcome(response, 415, "MSG_UNSUPPORTED_MEDIA_TYPE")
    unchanged(api, stored)


def test_a_resource_sent_as_json_patch_is_415(api, stored):
    response = api.put(stored["path"], stored["body"], content_type="application/json-patch+json")
    assert_outcome(response, 415, "MSG_UNSUPPORTED_MEDIA_TYPE")
    unchanged(api, stored)


# --- body size ---------------------------------------------------------------------------


def test_a_body_over_max_body_bytes_is_413(api, stored):
    rid = stored["body"]["id"]
    small = patient(id=rid)
    big = patient(id=rid, family="X" * 400)
    ops = [{"op": "add", "path": "/gender", "value": "male"}]
    big_ops = [{"op": "add", "path": "/name/0/given/-", "value": "Y" * 400}]
    with override_settings(FHIR_SERVICE={"MAX_BODY_BYTES": 300}):
        for method, url, body, content_type in (
            ("POST", "/Patient", big, "application/fhir+json"),
            ("PUT", stored["path"], big, "application/fhir+json"),
            ("PATCH", stored["path"], big_ops, "application/json-patch+json"),
            (
                "POST",
                "",
                {"resourceType": "Bundle", "type": "batch", "note": "X" * 400},
                "application/fhir+json",
            ),
        ):
            response = api.request(method, url, body, content_type=content_type)
            issue = assert_outcome(response, 413, "MSG_BODY_TOO_LARGE")
            assert issue["code"] == "too-costly"
            assert issue["diagnostics"] == MSG_BODY_TOO_LARGE.format(
                size=len(orjson.dumps(body)), limit=300
            )
        unchanged(api, stored)
        # Bodies within the limit still work.
        assert api.put(stored["path"], small).status == 200
        assert api.patch(stored["path"], ops).status == 200


# --- identity and content ----------------------------------------------------------------


def test_resource_type_mismatch_is_400(api, stored):
    observation = {"resourceType": "Observation", "id": stored["body"]["id"]}
    for response in (api.post("/Patient", observation), api.put(stored["path"], observation)):
        issue = assert_outcome(response, 400, "MSG_RESOURCE_TYPE_MISMATCH")
        assert issue["diagnostics"] == MSG_TYPE_MISMATCH.format(
            found="Observation", expected="Patient"
        )
        assert issue["expression"] == ["resourceType"]
    unchanged(api, stored)


def test_id_mismatch_and_missing_id_on_update_are_400(api, stored):
    issue = assert_outcome(
        api.put(stored["path"], patient(id="someone-else")), 400, "MSG_RESOURCE_ID_MISMATCH"
    )
    assert issue["diagnostics"] == MSG_ID_MISMATCH.format(
        found="someone-else", expected=stored["body"]["id"]
    )
    assert issue["expression"] == ["id"]
    assert_outcome(api.put(stored["path"], patient()), 400, "MSG_RESOURCE_ID_MISSING")
    unchanged(api, stored)


INVALID_PATIENTS = [
    pytest.param({"gender": 5}, id="wrong-json-type"),
    pytest.param({"shoeSize": 42}, id="unknown-element"),
    pytest.param({"birthDate": "25.12.1974"}, id="bad-date"),
    pytest.param({"name": {"family": "Chalmers"}}, id="object-for-array"),
    pytest.param({"active": "true"}, id="string-for-boolean"),
    pytest.param({"gender": None}, id="null"),
    pytest.param({"identifier": []}, id="empty-array"),
    pytest.param({"gender": ""}, id="empty-string"),
    pytest.param({"multipleBirthInteger": 1.5}, id="decimal-for-integer"),
    pytest.param({"deceasedBoolean": True, "deceasedDateTime": "2020"}, id="two-choices"),
    pytest.param({"contact": [{"gender": "male", "bogus": 1}]}, id="nested-unknown"),
    pytest.param({"link": [{"type": "seealso"}]}, id="missing-required"),
]


@pytest.mark.parametrize("change", INVALID_PATIENTS)
def test_invalid_r4_content_is_400_and_writes_nothing(api, stored, change):
    for response in (
        api.post("/Patient", {**patient(), **change}),
        api.put(stored["path"], {**stored["body"], **change}),
    ):
        issue = assert_outcome(response, 400, "MSG_INVALID_RESOURCE")
        assert issue["code"] in ("invalid", "structure", "required", "value")
    unchanged(api, stored)


def test_observation_without_its_required_elements_is_400(api):
    before = row_counts()
    response = api.post("/Observation", {"resourceType": "Observation"})
    assert_outcome(response, 400, "MSG_INVALID_RESOURCE")
    assert row_counts() == before
    ok = api.post(
        "/Observation",
        {"resourceType": "Observation", "status": "final", "code": {"text": "weight"}},
    )
    assert ok.status == 201


def test_r4_only_types_are_served_and_r4b_only_types_are_unknown(api):
    created = api.post(
        "/MedicinalProduct",
        {"resourceType": "MedicinalProduct", "name": [{"productName": "Equilidem"}]},
    )
    assert created.status == 201
    before = row_counts()
    for rtype in ("Citation", "SubscriptionStatus", "NoSuchThing"):
        issue = assert_outcome(
            api.post(f"/{rtype}", {"resourceType": rtype}), 404, "MSG_UNKNOWN_TYPE"
        )
        assert issue["diagnostics"] == f"Unknown resource type: {rtype}"
        assert_outcome(api.get(f"/{rtype}/x"), 404, "MSG_UNKNOWN_TYPE")
        assert_outcome(api.get(f"/{rtype}"), 404, "MSG_UNKNOWN_TYPE")
    assert row_counts() == before


# --- routes, methods, formats ------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/patient", "/Patient/x/y", "/Patient/x/_history/1/z", "/Patient/x/_history/1/", "/a/b/c/d"],
)
def test_unknown_routes_are_404(api, path):
    before = row_counts()
    for method in ("GET", "POST", "PUT", "DELETE"):
        response = api.request(method, path)
        issue = assert_outcome(response, 404, "MSG_UNKNOWN_ROUTE")
        assert issue["diagnostics"] == f"No FHIR endpoint at /4_0_0{path}"
    assert row_counts() == before


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/Patient/{id}"),
        ("POST", "/Patient/{id}/_history"),
        ("DELETE", "/Patient/{id}/_history/1"),
        ("PUT", "/Patient/{id}/_history/1"),
        ("POST", "/metadata"),
        ("DELETE", "/metadata"),
        ("POST", "/_history"),
        ("PUT", ""),
        ("OPTIONS", "/Patient"),
        ("OPTIONS", "/Patient/{id}"),
        ("TRACE", "/Patient"),
    ],
)
def test_wrong_methods_are_405(api, stored, method, path):
    url = path.format(id=stored["body"]["id"])
    response = api.request(method, url, stored["body"] if method in ("POST", "PUT") else None)
    issue = assert_outcome(response, 405, "MSG_METHOD_NOT_ALLOWED")
    assert issue["code"] == "not-supported"
    assert method not in response.headers.get("Allow", "")
    unchanged(api, stored)


@pytest.mark.parametrize(
    "accept", ["text/turtle", "application/pdf", "application/fhir+xml;q=0, text/turtle"]
)
def test_unsupported_accept_is_406(api, stored, accept):
    headers = {"Accept": accept}
    for path in (
        stored["path"],
        "/Patient",
        "/metadata",
        "/_history",
        f"{stored['path']}/_history/1",
    ):
        issue = assert_outcome(api.get(path, headers=headers), 406, "MSG_NOT_ACCEPTABLE")
        assert issue["code"] == "not-supported"
    # Writes are refused before anything is stored.
    assert_outcome(api.post("/Patient", patient(), headers=headers), 406, "MSG_NOT_ACCEPTABLE")
    changed = patient(family="Changed", id=stored["body"]["id"])
    assert_outcome(api.put(stored["path"], changed, headers=headers), 406, "MSG_NOT_ACCEPTABLE")
    assert_outcome(api.delete(stored["path"], headers=headers), 406, "MSG_NOT_ACCEPTABLE")
    unchanged(api, stored)


@pytest.mark.parametrize("fmt", ["html", "text/html", "turtle"])
def test_format_parameter_other_than_json_or_xml_is_406(api, stored, fmt):
    response = api.get(f"{stored['path']}?{urlencode({'_format': fmt})}")
    assert_outcome(response, 406, "MSG_NOT_ACCEPTABLE")


@pytest.mark.parametrize(
    "accept",
    [
        "application/fhir+json",
        "application/json",
        "*/*",
        "application/fhir+xml;q=0.4, application/fhir+json;q=0.5",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    ],
)
def test_json_accept_headers_are_served(api, stored, accept):
    response = api.get(stored["path"], headers={"Accept": accept})
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/fhir+json; charset=utf-8"


@pytest.mark.parametrize("fmt", ["json", "application/fhir+json", "application/json"])
def test_format_parameter_json_is_served(api, stored, fmt):
    assert api.get(f"{stored['path']}?{urlencode({'_format': fmt})}").body == stored["body"]


def test_an_unexpected_exception_is_a_bare_500_outcome(api, stored, monkeypatch):
    def broken(**kwargs):
        raise RuntimeError("secret internals")

    monkeypatch.setattr("fhirservice.rest.views.resource_read", broken)
    response = api.get(stored["path"])
    issue = assert_outcome(response, 500, "MSG_EXCEPTION")
    assert issue["code"] == "exception"
    assert issue["diagnostics"] == "The server could not complete the request"
    assert b"secret" not in response.content

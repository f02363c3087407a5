"""Batch and transaction Bundles posted to the FHIR base.

Every entry kind (POST, PUT, PATCH as Binary or as a JSON Patch array, DELETE, GET read and
search), ``urn:uuid`` references rewritten to server ids, conditional references and
conditional creates, and the all-or-nothing rule: a failing transaction entry leaves nothing
written. A batch runs its entries independently.
"""

from __future__ import annotations

import base64
import uuid

import orjson
import pytest

from fhirservice.bundles import MSG_ENTRY_FAILED
from tests.fhirservice.test_api_errors import assert_outcome, row_counts
from tests.support import bundle, patient

# Groups are stored here: their rosters need the ClickHouse tables.

SERVER = "http://testserver/4_0_0"


def post(resource: dict, full_url: str | None = None, **request) -> dict:
    entry = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def put(resource: dict, **request) -> dict:
    url = f"{resource['resourceType']}/{resource['id']}"
    return {"resource": resource, "request": {"method": "PUT", "url": url, **request}}


def patch_binary(url: str, ops: list, **request) -> dict:
    binary = {
        "resourceType": "Binary",
        "contentType": "application/json-patch+json",
        "data": base64.b64encode(orjson.dumps(ops)).decode(),
    }
    return {"resource": binary, "request": {"method": "PATCH", "url": url, **request}}


def patch_json(url: str, ops: list) -> dict:
    return {"resource": ops, "request": {"method": "PATCH", "url": url}}


def request(method: str, url: str) -> dict:
    return {"request": {"method": method, "url": url}}


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def statuses(response) -> list[str]:
    return [e["response"]["status"] for e in response.body["entry"]]


@pytest.fixture
def two(api) -> list[str]:
    """Two stored Patients (identifiers urn:mrn|1 and urn:mrn|2): their ids."""
    return [
        api.post("/Patient", patient(identifier=[{"system": "urn:mrn", "value": str(n)}])).body[
            "id"
        ]
        for n in (1, 2)
    ]


# --- batch -------------------------------------------------------------------------------


def test_batch_runs_every_kind_of_entry(api, two):
    first, second = two
    ops = [{"op": "add", "path": "/gender", "value": "female"}]
    response = api.post(
        "",
        bundle(
            "batch",
            post(patient(family="Created")),
            put(patient(family="Put", id="batch-put")),
            patch_binary(f"Patient/{first}", ops),
            patch_json(f"Patient/{second}", [{"op": "add", "path": "/active", "value": True}]),
            request("GET", f"Patient/{first}"),
            request("GET", "Patient?identifier=urn:mrn|2"),
            request("DELETE", f"Patient/{second}"),
        ),
    )
    assert response.status == 200
    body = response.body
    assert body["type"] == "batch-response"
    assert statuses(response) == [
        "201 Created",
        "201 Created",
        "200 OK",
        "200 OK",
        "200 OK",
        "200 OK",
        "204 No Content",
    ]
    created, put_entry, patched, json_patched, read, searched, _ = body["entry"]
    rid = created["resource"]["id"]
    assert created["response"]["location"] == f"{SERVER}/Patient/{rid}/_history/1"
    assert created["response"]["etag"] == 'W/"1"'
    assert put_entry["resource"]["id"] == "batch-put"
    assert patched["resource"]["gender"] == "female"
    assert patched["response"]["etag"] == 'W/"2"'
    assert json_patched["resource"]["active"] is True
    # Entries run in order: the GET sees the PATCH before it.
    assert read["resource"] == patched["resource"]
    assert searched["resource"]["type"] == "searchset"
    assert [e["resource"]["id"] for e in searched["resource"]["entry"]] == [second]
    assert api.get(f"/Patient/{rid}").body["name"][0]["family"] == "Created"
    assert api.get("/Patient/batch-put").status == 200
    assert api.get(f"/Patient/{first}").body["gender"] == "female"
    assert api.get(f"/Patient/{second}").status == 410


def test_a_failing_batch_entry_does_not_stop_the_others(api, two):
    response = api.post(
        "",
        bundle(
            "batch",
            post(patient(family="Kept")),
            post(patient(gender=5)),
            request("GET", "Patient/nobody"),
            put(patient(id=two[0], family="Stale"), ifMatch='W/"7"'),
            request("DELETE", f"Patient/{two[1]}"),
        ),
    )
    assert response.status == 200
    assert statuses(response) == [
        "201 Created",
        "400 Bad Request",
        "404 Not Found",
        "412 Precondition Failed",
        "204 No Content",
    ]
    outcomes = [e["response"].get("outcome") for e in response.body["entry"]]
    details = [o["issue"][0]["details"]["coding"][0]["code"] if o else None for o in outcomes]
    assert details == [
        None,
        "MSG_INVALID_RESOURCE",
        "MSG_NO_EXIST",
        "MSG_VERSION_MISMATCH",
        None,
    ]
    rid = response.body["entry"][0]["resource"]["id"]
    assert api.get(f"/Patient/{rid}").status == 200
    assert api.get(f"/Patient/{two[0]}").etag == 'W/"1"'
    assert api.get(f"/Patient/{two[1]}").status == 410


def test_batch_does_not_rewrite_urn_uuid_references(api):
    """Batch entries are independent: only a transaction resolves references between them."""
    full_url = urn()
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": full_url},
    }
    response = api.post("", bundle("batch", post(patient(), full_url), post(observation)))
    assert statuses(response) == ["201 Created", "201 Created"]
    assert response.body["entry"][1]["resource"]["subject"] == {"reference": full_url}


# --- transaction -------------------------------------------------------------------------


def test_transaction_rewrites_urn_uuid_references(api):
    organization, person = urn(), urn()
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "weight"},
        "subject": {"reference": person},
        "performer": [{"reference": organization}],
    }
    group = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "managingEntity": {"reference": organization},
    }
    response = api.post(
        "",
        bundle(
            "transaction",
            post(observation),
            post(patient(managingOrganization={"reference": organization}), person),
            post({"resourceType": "Organization", "name": "Clinic"}, organization),
            post(group),
        ),
    )
    assert response.status == 200, response
    body = response.body
    assert body["type"] == "transaction-response"
    assert statuses(response) == ["201 Created"] * 4
    stored_obs, stored_patient, stored_org, stored_group = (e["resource"] for e in body["entry"])
    org_ref = f"Organization/{stored_org['id']}"
    patient_ref = f"Patient/{stored_patient['id']}"
    assert stored_obs["subject"] == {"reference": patient_ref}
    assert stored_obs["performer"] == [{"reference": org_ref}]
    assert stored_patient["managingOrganization"] == {"reference": org_ref}
    for entry in body["entry"]:
        resource = entry["resource"]
        path = f"/{resource['resourceType']}/{resource['id']}"
        assert entry["response"]["location"] == f"{SERVER}{path}/_history/1"
        assert api.get(path).body == resource
    found = api.get(f"/Group?managing-entity={org_ref}").body
    assert [e["resource"]["id"] for e in found["entry"]] == [stored_group["id"]]


def test_transaction_runs_every_kind_of_entry(api, two):
    first, second = two
    ops = [{"op": "replace", "path": "/identifier/0/value", "value": "9"}]
    response = api.post(
        "",
        bundle(
            "transaction",
            request("GET", "Patient?identifier=urn:mrn|3"),
            patch_binary(f"Patient/{first}", ops, ifMatch='W/"1"'),
            put(patient(id="tx-put", family="Put")),
            request("DELETE", f"Patient/{second}"),
            post(patient(identifier=[{"system": "urn:mrn", "value": "3"}])),
            request("GET", f"Patient/{first}"),
        ),
    )
    assert response.status == 200, response
    assert statuses(response) == [
        "200 OK",
        "200 OK",
        "201 Created",
        "204 No Content",
        "201 Created",
        "200 OK",
    ]
    entries = response.body["entry"]
    # GETs run after the writes, whatever their place in the Bundle.
    search = entries[0]["resource"]
    assert [e["resource"]["id"] for e in search["entry"]] == [entries[4]["resource"]["id"]]
    assert entries[5]["resource"]["identifier"][0]["value"] == "9"
    assert api.get(f"/Patient/{second}").status == 410
    assert api.get("/Patient/tx-put").body["name"][0]["family"] == "Put"


def test_transaction_resolves_conditional_references(api, two):
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": "Patient?identifier=urn:mrn|2"},
    }
    response = api.post("", bundle("transaction", post(observation)))
    assert response.status == 200, response
    assert response.body["entry"][0]["resource"]["subject"] == {"reference": f"Patient/{two[1]}"}


@pytest.mark.parametrize(
    "reference",
    ["Patient?identifier=urn:mrn|404", "Patient?identifier=urn:mrn|", "Patient?bogus=1"],
)
def test_transaction_with_an_unresolvable_conditional_reference_writes_nothing(api, two, reference):
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": reference},
    }
    before = row_counts()
    response = api.post("", bundle("transaction", post(patient()), post(observation)))
    if "bogus" in reference:
        assert_outcome(response, 400, "MSG_PARAM_UNKNOWN")
    else:
        assert_outcome(response, 412, "MSG_CONDITIONAL_REFERENCE")
    assert row_counts() == before


def test_transaction_conditional_create_reuses_the_match(api, two):
    person = urn()
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "x"},
        "subject": {"reference": person},
    }
    response = api.post(
        "",
        bundle(
            "transaction",
            post(
                patient(identifier=[{"system": "urn:mrn", "value": "1"}]),
                person,
                ifNoneExist="identifier=urn:mrn|1",
            ),
            post(observation),
        ),
    )
    assert response.status == 200, response
    assert statuses(response) == ["200 OK", "201 Created"]
    assert response.body["entry"][0]["resource"]["id"] == two[0]
    assert response.body["entry"][1]["resource"]["subject"] == {"reference": f"Patient/{two[0]}"}
    assert api.get(f"/Patient/{two[0]}").etag == 'W/"1"'


def test_transaction_conditional_create_with_many_matches_writes_nothing(api, two):
    before = row_counts()
    entry = post(patient(), ifNoneExist="identifier=urn:mrn|")
    response = api.post("", bundle("transaction", post(patient()), entry))
    assert_outcome(response, 412, "MSG_CONDITIONAL_MULTIPLE")
    assert row_counts() == before


FAILING_ENTRIES = [
    pytest.param(lambda ids: post(patient(gender=5)), 400, "invalid", id="invalid-resource"),
    pytest.param(
        lambda ids: put(patient(id=ids[0], family="Stale"), ifMatch='W/"3"'),
        412,
        "conflict",
        id="stale-if-match",
    ),
    pytest.param(lambda ids: request("DELETE", "Patient/nobody"), 404, "not-found", id="delete"),
    pytest.param(
        lambda ids: patch_binary(
            f"Patient/{ids[0]}", [{"op": "test", "path": "/gender", "value": "female"}]
        ),
        422,
        "processing",
        id="failing-test-op",
    ),
    pytest.param(lambda ids: request("GET", "Patient/nobody"), 404, "not-found", id="get"),
    pytest.param(
        lambda ids: {"resource": patient(id="a"), "request": {"method": "PUT", "url": "Patient/b"}},
        400,
        "invalid",
        id="id-mismatch",
    ),
]


@pytest.mark.parametrize(("make", "status", "code"), FAILING_ENTRIES)
def test_a_failing_transaction_entry_leaves_nothing_written(api, two, make, status, code):
    first, second = two
    failing = make(two)
    entries = [
        post(patient(family="New")),
        put(patient(id="tx-new", family="New")),
        patch_json(f"Patient/{first}", [{"op": "add", "path": "/gender", "value": "male"}]),
        request("DELETE", f"Patient/{second}"),
        failing,
    ]
    before = row_counts()
    response = api.post("", bundle("transaction", *entries))
    issue = assert_outcome(response, status, "MSG_TRANSACTION_FAILED")
    assert issue["code"] == code
    method, url = failing["request"]["method"], failing["request"]["url"]
    assert issue["diagnostics"].startswith(
        MSG_ENTRY_FAILED.format(index=4, method=method, url=url, diagnostics="")
    )
    assert issue["expression"] == ["Bundle.entry[4]"]
    assert row_counts() == before
    assert api.get(f"/Patient/{first}").etag == 'W/"1"'
    assert api.get(f"/Patient/{second}").status == 200
    assert api.get("/Patient/tx-new").status == 404


def test_the_same_entries_without_the_failing_one_commit(api, two):
    """The control for the test above: the other entries are fine on their own."""
    first, second = two
    response = api.post(
        "",
        bundle(
            "transaction",
            post(patient(family="New")),
            put(patient(id="tx-new", family="New")),
            patch_json(f"Patient/{first}", [{"op": "add", "path": "/gender", "value": "male"}]),
            request("DELETE", f"Patient/{second}"),
        ),
    )
    assert response.status == 200
    assert api.get("/Patient/tx-new").status == 200
    assert api.get(f"/Patient/{first}").etag == 'W/"2"'


# --- malformed Bundles -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"resourceType": "Bundle", "type": "collection", "entry": []},
        {"resourceType": "Bundle", "type": "searchset"},
        {"resourceType": "Bundle"},
        {"resourceType": "Patient"},
        [{"resourceType": "Bundle", "type": "batch"}],
        {"resourceType": "Bundle", "type": "batch", "entry": {"request": {}}},
    ],
)
def test_a_body_that_is_not_a_batch_or_transaction_is_400(api, body):
    assert_outcome(api.post("", body), 400, "MSG_BUNDLE_TYPE")


@pytest.mark.parametrize("kind", ["batch", "transaction"])
@pytest.mark.parametrize(
    "entry",
    [
        {"resource": patient()},
        {"resource": patient(), "request": {"method": "POST"}},
        {"resource": patient(), "request": {"method": "FETCH", "url": "Patient"}},
        {"resource": patient(), "request": "POST Patient"},
        "not an entry",
    ],
)
def test_an_entry_without_a_usable_request_is_400(api, kind, entry):
    before = row_counts()
    response = api.post("", bundle(kind, post(patient()), entry))
    issue = assert_outcome(response, 400, "MSG_BAD_FORMAT")
    assert issue["expression"] == ["Bundle.entry[1].request"]
    assert row_counts() == before


def test_an_empty_transaction_answers_an_empty_response(api):
    response = api.post("", {"resourceType": "Bundle", "type": "transaction"})
    assert response.status == 200
    assert response.body["type"] == "transaction-response"
    assert "entry" not in response.body

"""Create, read, vread, update and delete through the HTTP API, with their error cases.

Also ``Prefer: return=…`` on every write, update-as-create behind its setting, and the
versioning invariant: versionId is numeric, starts at 1 and rises by exactly 1 per write.
"""

from __future__ import annotations

import uuid
from email.utils import parsedate_to_datetime

import pytest
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from fhirservice.errors import (
    MSG_DELETED,
    MSG_NOT_FOUND,
    MSG_VERSION_MISMATCH,
    MSG_VERSION_NOT_FOUND,
    ServiceUnavailable,
)
from fhirservice.models import ResourceVersion
from fhirservice.rest.base import MSG_WRITTEN_WITHOUT_BODY
from fhirservice.store.services import MSG_CONDITIONAL_MULTIPLE
from tests.fhirservice.test_api_errors import assert_outcome, row_counts
from tests.support import patient

SERVER = "http://testserver/4_0_0"


def create(api, body=None, **kwargs):
    response = api.post("/Patient", body or patient(), **kwargs)
    assert response.status == 201, response
    return response


def history_versions(api, path):
    bundle = api.get(f"{path}/_history?_count=1000").body
    return sorted(int(e["response"]["etag"][3:-1]) for e in bundle.get("entry", []))


# --- create ------------------------------------------------------------------------------


def test_create_answers_201_with_location_etag_and_last_modified(api):
    response = create(api)
    body = response.body
    rid = body["id"]
    assert str(uuid.UUID(rid)) == rid
    assert response.headers["Location"] == f"{SERVER}/Patient/{rid}/_history/1"
    assert response.etag == 'W/"1"'
    assert body["meta"]["versionId"] == "1"
    last_modified = parsedate_to_datetime(response.headers["Last-Modified"])
    last_updated = body["meta"]["lastUpdated"]
    assert last_modified.strftime("%Y-%m-%dT%H:%M:%S") == last_updated[:19]
    assert body["name"] == [{"family": "Chalmers", "given": ["Peter"]}]


def test_create_assigns_fresh_ids_and_owns_version_meta(api):
    sent = patient(
        id="client-chosen",
        meta={
            "versionId": "9",
            "lastUpdated": "2001-01-01T00:00:00Z",
            "profile": ["http://example.org/StructureDefinition/p"],
        },
    )
    first = create(api, sent).body
    second = create(api, sent).body
    assert first["id"] != "client-chosen"
    assert first["id"] != second["id"]
    assert first["meta"]["versionId"] == "1"
    assert first["meta"]["lastUpdated"] != "2001-01-01T00:00:00Z"
    assert first["meta"]["profile"] == ["http://example.org/StructureDefinition/p"]
    assert api.get(f"/Patient/{first['id']}").body == first
    assert api.get("/Patient/client-chosen").status == 404


def test_conditional_create_without_match_creates(api):
    response = create(
        api,
        patient(identifier=[{"system": "urn:sys", "value": "42"}]),
        headers={"If-None-Exist": "identifier=urn:sys|42"},
    )
    assert response.etag == 'W/"1"'


def test_conditional_create_with_one_match_returns_it_and_writes_nothing(api):
    existing = create(api, patient(identifier=[{"system": "urn:sys", "value": "42"}])).body
    before = row_counts()
    response = api.post(
        "/Patient",
        patient(family="Other", identifier=[{"system": "urn:sys", "value": "42"}]),
        headers={"If-None-Exist": "identifier=urn:sys|42"},
    )
    assert response.status == 200
    assert response.body == existing
    assert response.etag == 'W/"1"'
    assert "Location" not in response.headers
    assert row_counts() == before


def test_conditional_create_with_many_matches_is_412(api):
    for _ in range(2):
        create(api, patient(identifier=[{"system": "urn:sys", "value": "42"}]))
    before = row_counts()
    response = api.post(
        "/Patient",
        patient(identifier=[{"system": "urn:sys", "value": "42"}]),
        headers={"If-None-Exist": "identifier=urn:sys|42"},
    )
    assert_outcome(response, 412, "MSG_CONDITIONAL_MULTIPLE")
    assert response.body["issue"][0]["diagnostics"] == MSG_CONDITIONAL_MULTIPLE.format(
        count="several"
    )
    assert row_counts() == before


@pytest.mark.parametrize(
    ("condition", "detail"),
    [("shoe-size=42", "MSG_PARAM_UNKNOWN"), ("_count=1", "MSG_PARAM_INVALID")],
)
def test_conditional_create_with_a_bad_condition_is_400(api, condition, detail):
    before = row_counts()
    response = api.post("/Patient", patient(), headers={"If-None-Exist": condition})
    assert_outcome(response, 400, detail)
    assert row_counts() == before


# --- read and vread ----------------------------------------------------------------------


def test_read_returns_the_current_version_with_headers(api):
    created = create(api).body
    response = api.get(f"/Patient/{created['id']}")
    assert response.status == 200
    assert response.body == created
    assert response.etag == 'W/"1"'
    assert "Last-Modified" in response.headers


def test_read_with_if_none_match_of_the_current_version_is_304(api):
    rid = create(api).body["id"]
    response = api.get(f"/Patient/{rid}", headers={"If-None-Match": 'W/"1"'})
    assert response.status == 304
    assert response.content == b""
    api.put(f"/Patient/{rid}", patient(family="Changed", id=rid))
    assert api.get(f"/Patient/{rid}", headers={"If-None-Match": 'W/"1"'}).status == 200


def test_read_of_an_unknown_id_is_404(api):
    response = api.get("/Patient/nobody")
    assert_outcome(response, 404, "MSG_NO_EXIST")
    assert response.body["issue"][0]["diagnostics"] == MSG_NOT_FOUND.format(
        type="Patient", id="nobody"
    )


@pytest.mark.parametrize("bad_id", ["a" * 65, "bad_id", "with%20space"])
def test_read_of_a_malformed_id_is_400(api, bad_id):
    assert_outcome(api.get(f"/Patient/{bad_id}"), 400, "MSG_ID_INVALID")


def test_vread_serves_every_version(api):
    rid = create(api).body["id"]
    api.put(f"/Patient/{rid}", patient(family="Second", id=rid))
    first = api.get(f"/Patient/{rid}/_history/1")
    second = api.get(f"/Patient/{rid}/_history/2")
    assert first.status == second.status == 200
    assert first.etag == 'W/"1"'
    assert second.etag == 'W/"2"'
    assert first.body["name"][0]["family"] == "Chalmers"
    assert first.body["meta"]["versionId"] == "1"
    assert second.body["name"][0]["family"] == "Second"
    assert second.body == api.get(f"/Patient/{rid}").body


@pytest.mark.parametrize("version", ["3", "0", "abc", "-1"])
def test_vread_of_an_unknown_version_is_404(api, version):
    rid = create(api).body["id"]
    api.put(f"/Patient/{rid}", patient(family="Second", id=rid))
    response = api.get(f"/Patient/{rid}/_history/{version}")
    assert_outcome(response, 404, "MSG_NO_EXIST")
    assert response.body["issue"][0]["diagnostics"] == MSG_VERSION_NOT_FOUND.format(
        type="Patient", id=rid, version=version
    )


def test_vread_of_an_unknown_resource_is_404(api):
    response = api.get("/Patient/nobody/_history/1")
    assert_outcome(response, 404, "MSG_NO_EXIST")
    assert response.body["issue"][0]["diagnostics"] == MSG_NOT_FOUND.format(
        type="Patient", id="nobody"
    )


# --- update ------------------------------------------------------------------------------


def test_update_makes_the_next_version(api):
    rid = create(api).body["id"]
    response = api.put(f"/Patient/{rid}", patient(family="Jones", id=rid))
    assert response.status == 200
    assert response.etag == 'W/"2"'
    assert response.body["meta"]["versionId"] == "2"
    assert response.body["name"][0]["family"] == "Jones"
    assert response.headers["Content-Location"] == f"{SERVER}/Patient/{rid}/_history/2"
    assert api.get(f"/Patient/{rid}").body == response.body


def test_update_drops_elements_left_out(api):
    rid = create(api, patient(gender="male")).body["id"]
    body = api.put(f"/Patient/{rid}", {"resourceType": "Patient", "id": rid}).body
    assert "gender" not in body and "name" not in body


@pytest.mark.parametrize("if_match", ['W/"1"', '"1"', "1"])
def test_update_with_a_matching_if_match_succeeds(api, if_match):
    rid = create(api).body["id"]
    response = api.put(
        f"/Patient/{rid}", patient(family="Jones", id=rid), headers={"If-Match": if_match}
    )
    assert response.status == 200
    assert response.etag == 'W/"2"'


def test_update_with_a_stale_if_match_is_412_and_changes_nothing(api):
    rid = create(api).body["id"]
    current = api.put(f"/Patient/{rid}", patient(family="Second", id=rid)).body
    before = row_counts()
    response = api.put(
        f"/Patient/{rid}", patient(family="Lost", id=rid), headers={"If-Match": 'W/"1"'}
    )
    assert_outcome(response, 412, "MSG_VERSION_MISMATCH")
    assert response.body["issue"][0]["diagnostics"] == MSG_VERSION_MISMATCH.format(
        expected=1, current=2
    )
    assert row_counts() == before
    assert api.get(f"/Patient/{rid}").body == current


def test_update_with_if_match_of_an_unknown_resource_is_412(api):
    before = row_counts()
    response = api.put("/Patient/fresh", patient(id="fresh"), headers={"If-Match": 'W/"1"'})
    assert_outcome(response, 412, "MSG_VERSION_MISMATCH")
    assert row_counts() == before


@pytest.mark.parametrize("if_match", ['W/"one"', "*", 'W/"1", W/"2"'])
def test_update_with_a_malformed_if_match_is_400(api, if_match):
    rid = create(api).body["id"]
    before = row_counts()
    response = api.put(f"/Patient/{rid}", patient(id=rid), headers={"If-Match": if_match})
    assert_outcome(response, 400, "MSG_BAD_IF_MATCH")
    assert row_counts() == before


def test_update_with_identical_content_makes_no_version(api):
    created = create(api, patient(gender="female")).body
    rid = created["id"]
    before = row_counts()
    # Same content, keys reordered, and server meta that differs: still no change.
    resent = {
        "gender": "female",
        "meta": {"versionId": "17", "lastUpdated": "2001-01-01T00:00:00Z"},
        **patient(id=rid),
    }
    response = api.put(f"/Patient/{rid}", resent)
    assert response.status == 200
    assert response.etag == 'W/"1"'
    assert response.body == created
    assert row_counts() == before
    assert history_versions(api, f"/Patient/{rid}") == [1]


def test_update_with_new_meta_profile_is_a_change(api):
    created = create(api).body
    rid = created["id"]
    changed = {**created, "meta": {"profile": ["http://example.org/StructureDefinition/p"]}}
    response = api.put(f"/Patient/{rid}", changed)
    assert response.etag == 'W/"2"'
    assert response.body["meta"]["profile"] == ["http://example.org/StructureDefinition/p"]


def test_update_as_create_makes_version_1_with_the_client_id(api):
    response = api.put("/Patient/client-id-1", patient(id="client-id-1"))
    assert response.status == 201
    assert response.etag == 'W/"1"'
    assert response.headers["Location"] == f"{SERVER}/Patient/client-id-1/_history/1"
    assert response.body["id"] == "client-id-1"
    assert api.get("/Patient/client-id-1").body == response.body


def test_update_as_create_off_is_405_and_writes_nothing(api):
    with override_settings(FHIR_SERVICE={"UPDATE_CREATE": False}):
        before = row_counts()
        response = api.put("/Patient/client-id-1", patient(id="client-id-1"))
        assert_outcome(response, 405, "MSG_METHOD_NOT_ALLOWED")
        assert row_counts() == before
        rid = create(api).body["id"]
        assert api.put(f"/Patient/{rid}", patient(family="Ok", id=rid)).status == 200
    assert api.get("/Patient/client-id-1").status == 404


# --- delete ------------------------------------------------------------------------------


def test_delete_makes_a_version_and_reads_become_410(api):
    rid = create(api).body["id"]
    response = api.delete(f"/Patient/{rid}")
    assert response.status == 204
    assert response.content == b""
    assert response.etag == 'W/"2"'
    gone = api.get(f"/Patient/{rid}")
    assert_outcome(gone, 410, "MSG_DELETED")
    assert gone.body["issue"][0]["diagnostics"] == MSG_DELETED.format(
        type="Patient", id=rid, version=2
    )
    assert gone.etag == 'W/"2"'
    assert_outcome(api.get(f"/Patient/{rid}/_history/2"), 410, "MSG_DELETED")
    assert api.get(f"/Patient/{rid}/_history/1").status == 200
    assert history_versions(api, f"/Patient/{rid}") == [1, 2]


def test_deleting_again_is_harmless(api):
    rid = create(api).body["id"]
    api.delete(f"/Patient/{rid}")
    before = row_counts()
    again = api.delete(f"/Patient/{rid}")
    assert again.status == 204
    assert row_counts() == before
    assert_outcome(api.get(f"/Patient/{rid}"), 410, "MSG_DELETED")


def test_a_delete_reads_the_current_row_once(api):
    """The write's locked read of the row is the only one: a read of its own before the
    write's transaction was one more statement per delete (row 8's Patient CRUD)."""
    rid = create(api).body["id"]
    with CaptureQueriesContext(connection) as captured:
        assert api.delete(f"/Patient/{rid}").status == 204
    reads = [
        query["sql"]
        for query in captured.captured_queries
        if query["sql"].lstrip().upper().startswith("SELECT")
        and "fhirservice_storedresource" in query["sql"]
    ]
    assert len(reads) == 1, reads


def test_delete_of_an_unknown_resource_is_404(api):
    before = row_counts()
    assert_outcome(api.delete("/Patient/nobody"), 404, "MSG_NO_EXIST")
    assert row_counts() == before


def test_writes_to_a_deleted_resource(api):
    rid = create(api).body["id"]
    api.delete(f"/Patient/{rid}")
    before = row_counts()
    assert_outcome(
        api.put(f"/Patient/{rid}", patient(id=rid), headers={"If-Match": 'W/"2"'}),
        412,
        "MSG_VERSION_MISMATCH",
    )
    assert_outcome(
        api.patch(f"/Patient/{rid}", [{"op": "add", "path": "/gender", "value": "male"}]),
        410,
        "MSG_DELETED",
    )
    assert row_counts() == before
    # Update as create brings it back as the next version.
    recreated = api.put(f"/Patient/{rid}", patient(family="Back", id=rid))
    assert recreated.status == 201
    assert recreated.etag == 'W/"3"'
    assert api.get(f"/Patient/{rid}").body["name"][0]["family"] == "Back"
    assert history_versions(api, f"/Patient/{rid}") == [1, 2, 3]


def test_version_ids_start_at_1_and_rise_by_1_per_write(api):
    rid = create(api).body["id"]
    path = f"/Patient/{rid}"
    api.put(path, patient(family="Two", id=rid))
    api.put(path, patient(family="Two", id=rid))  # identical: no version
    api.patch(path, [{"op": "add", "path": "/gender", "value": "other"}])
    api.patch(path, [{"op": "test", "path": "/gender", "value": "other"}])  # no change
    api.delete(path)
    api.delete(path)  # already deleted: no version
    api.put(path, patient(family="Six", id=rid))
    assert api.get(path).etag == 'W/"5"'
    assert history_versions(api, path) == [1, 2, 3, 4, 5]
    stored = ResourceVersion.objects.filter(resource_type="Patient", resource_id=rid)
    assert sorted(stored.values_list("version_id", flat=True)) == [1, 2, 3, 4, 5]
    for version in (1, 2, 3, 5):
        assert api.get(f"{path}/_history/{version}").body["meta"]["versionId"] == str(version)


# --- Prefer: return ----------------------------------------------------------------------


def test_prefer_return_minimal_sends_headers_only(api):
    created = api.post("/Patient", patient(), headers={"Prefer": "return=minimal"})
    assert created.status == 201
    assert created.content == b""
    assert created.etag == 'W/"1"'
    location = created.headers["Location"]
    rid = location.split("/Patient/")[1].split("/")[0]
    updated = api.put(
        f"/Patient/{rid}", patient(family="B", id=rid), headers={"Prefer": "return=minimal"}
    )
    assert (updated.status, updated.content, updated.etag) == (200, b"", 'W/"2"')
    patched = api.patch(
        f"/Patient/{rid}",
        [{"op": "add", "path": "/gender", "value": "male"}],
        headers={"Prefer": "return=minimal"},
    )
    assert (patched.status, patched.content, patched.etag) == (200, b"", 'W/"3"')
    assert api.get(f"/Patient/{rid}").body["gender"] == "male"


def test_prefer_return_representation_sends_the_resource(api):
    created = api.post("/Patient", patient(), headers={"Prefer": "return=representation"})
    assert created.status == 201
    assert created.body["resourceType"] == "Patient"
    assert created.body == api.get(f"/Patient/{created.body['id']}").body


def test_prefer_return_operation_outcome(api):
    created = api.post("/Patient", patient(), headers={"Prefer": "return=OperationOutcome"})
    assert created.status == 201
    assert created.etag == 'W/"1"'
    rid = created.headers["Location"].split("/Patient/")[1].split("/")[0]
    issue = created.body["issue"][0]
    assert created.body["resourceType"] == "OperationOutcome"
    assert (issue["severity"], issue["code"]) == ("information", "informational")
    assert issue["diagnostics"] == f"Created: Patient/{rid} version 1"

    prefer = {"Prefer": "return=OperationOutcome"}
    updated = api.put(f"/Patient/{rid}", patient(family="B", id=rid), headers=prefer)
    assert updated.body["issue"][0]["diagnostics"] == f"Updated: Patient/{rid} version 2"
    same = api.put(f"/Patient/{rid}", patient(family="B", id=rid), headers=prefer)
    assert same.body["issue"][0]["diagnostics"] == (
        f"No change: the content is identical: Patient/{rid} version 2"
    )
    deleted = api.delete(f"/Patient/{rid}", headers=prefer)
    assert deleted.status == 200
    assert deleted.body["issue"][0]["diagnostics"] == f"Deleted Patient/{rid}"
    again = api.delete(f"/Patient/{rid}", headers=prefer)
    assert again.body["issue"][0]["diagnostics"] == "Already deleted"


def test_a_committed_write_is_acknowledged_when_its_body_cannot_be_rendered(api, monkeypatch):
    """E.g. a Group whose roster store is down: the write happened, so no 503."""

    def unavailable(row, **kwargs):
        raise ServiceUnavailable("the member store is down")

    monkeypatch.setattr("fhirservice.rest.base.render_resource", unavailable)
    created = api.post("/Patient", patient())
    assert created.status == 201
    assert created.etag == 'W/"1"'
    rid = created.headers["Location"].split("/Patient/")[1].split("/")[0]
    issue = created.body["issue"][0]
    assert (issue["severity"], issue["code"]) == ("warning", "transient")
    assert issue["diagnostics"] == MSG_WRITTEN_WITHOUT_BODY.format(
        key=f"Patient/{rid}", version=1, reason="the member store is down"
    )
    updated = api.put(f"/Patient/{rid}", patient(family="B", id=rid))
    assert (updated.status, updated.etag) == (200, 'W/"2"')
    monkeypatch.undo()
    assert api.get(f"/Patient/{rid}").body["name"][0]["family"] == "B"

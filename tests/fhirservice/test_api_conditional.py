"""Conditional update, patch and delete (``[type]?[search]``) and their serializable match.

FHIR R4 http.html#cond-update, #cond-delete, #patch: the search finds the target inside the
caller's organization boundary; none, one and several matches each have their answer (several:
412, and nothing changes). Group rosters keep their write semantics through the same store
services. Two writers with the same criteria racing from real threads make one resource.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson
import pytest
from django.test import override_settings

from fhirservice.capability import CONDITIONAL_PATCH
from fhirservice.errors import MSG_NOT_FOUND, MSG_VERSION_MISMATCH
from fhirservice.models import StoredResource
from fhirservice.search.query import MSG_UNKNOWN_PARAM
from fhirservice.store.services import (
    MSG_CONDITION_ID_MISMATCH,
    MSG_CONDITION_ID_TAKEN,
    MSG_CONDITION_MISSING,
    MSG_CONDITION_NO_MATCH,
    MSG_CONDITIONAL_DELETE_LIMIT,
    MSG_CONDITIONAL_MULTIPLE,
)
from tests.access.conftest import make_client
from tests.fhirservice.test_api_errors import assert_outcome, row_counts
from tests.fhirservice.test_settings import run_django
from tests.groups.conftest import group, member, outbox_events, read, refs_of
from tests.support import FhirClient, bundle, patient, run_threads

SYSTEM = "urn:cond"


def ident(value: str) -> dict[str, str]:
    return {"system": SYSTEM, "value": value}


def condition(value: str) -> str:
    return f"identifier={SYSTEM}|{value}"


def new_value() -> str:
    return f"v-{uuid.uuid4()}"


def create(api: FhirClient, value: str, **extra: Any) -> dict[str, Any]:
    response = api.post("/Patient", patient(identifier=[ident(value)], **extra))
    assert response.status == 201, response
    return response.body


def matching(value: str) -> list[str]:
    """Ids of current (not deleted) Patients with the identifier, read from the store."""
    return sorted(
        row.resource_id
        for row in StoredResource.objects.filter(resource_type="Patient", deleted=False)
        if f'"{value}"' in row.body
    )


# --- conditional update ------------------------------------------------------------------


def test_conditional_update_without_match_creates_under_a_new_id(api):
    value = new_value()
    response = api.put(f"/Patient?{condition(value)}", patient(identifier=[ident(value)]))
    assert response.status == 201, response
    rid = response.body["id"]
    assert str(uuid.UUID(rid)) == rid
    assert response.headers["Location"].endswith(f"/Patient/{rid}/_history/1")
    assert matching(value) == [rid]


def test_conditional_update_without_match_creates_under_the_body_id(api):
    value = new_value()
    body = patient(id="cond-chosen", identifier=[ident(value)])
    response = api.put(f"/Patient?{condition(value)}", body)
    assert (response.status, response.body["id"]) == (201, "cond-chosen")


def test_conditional_update_with_one_match_updates_it(api):
    value = new_value()
    rid = create(api, value)["id"]
    response = api.put(
        f"/Patient?{condition(value)}", patient(family="Updated", identifier=[ident(value)])
    )
    assert response.status == 200, response
    assert (response.body["id"], response.etag) == (rid, 'W/"2"')
    assert response.body["name"][0]["family"] == "Updated"
    # The same body again changes nothing.
    again = api.put(
        f"/Patient?{condition(value)}", patient(family="Updated", identifier=[ident(value)])
    )
    assert (again.status, again.etag) == (200, 'W/"2"')


def test_conditional_update_with_one_match_and_its_own_id_in_the_body_updates_it(api):
    value = new_value()
    rid = create(api, value)["id"]
    response = api.put(f"/Patient?{condition(value)}", patient(id=rid, identifier=[ident(value)]))
    assert (response.status, response.body["id"]) == (200, rid)


def test_conditional_update_with_one_match_and_another_id_in_the_body_is_400(api):
    value = new_value()
    rid = create(api, value)["id"]
    before = row_counts()
    response = api.put(
        f"/Patient?{condition(value)}", patient(id="someone-else", identifier=[ident(value)])
    )
    issue = assert_outcome(response, 400, "MSG_RESOURCE_ID_MISMATCH")
    assert issue["diagnostics"] == MSG_CONDITION_ID_MISMATCH.format(
        found="someone-else", matched=rid
    )
    assert row_counts() == before


def test_conditional_update_without_match_and_the_id_of_a_non_matching_resource_is_400(api):
    other = create(api, new_value())["id"]
    before = row_counts()
    response = api.put(f"/Patient?{condition(new_value())}", patient(id=other))
    issue = assert_outcome(response, 400, "MSG_RESOURCE_ID_MISMATCH")
    assert issue["diagnostics"] == MSG_CONDITION_ID_TAKEN.format(found=other, type="Patient")
    assert row_counts() == before


def test_conditional_update_with_several_matches_is_412_and_changes_nothing(api):
    value = new_value()
    create(api, value)
    create(api, value)
    before = row_counts()
    response = api.put(f"/Patient?{condition(value)}", patient(identifier=[ident(value)]))
    issue = assert_outcome(response, 412, "MSG_CONDITIONAL_MULTIPLE")
    assert issue["diagnostics"] == MSG_CONDITIONAL_MULTIPLE.format(count="several")
    assert row_counts() == before


def test_conditional_update_honours_if_match(api):
    value = new_value()
    create(api, value)
    path = f"/Patient?{condition(value)}"
    stale = api.put(
        path, patient(family="Stale", identifier=[ident(value)]), headers={"If-Match": 'W/"7"'}
    )
    issue = assert_outcome(stale, 412, "MSG_VERSION_MISMATCH")
    assert issue["diagnostics"] == MSG_VERSION_MISMATCH.format(expected=7, current=1)
    fresh = api.put(
        path, patient(family="Fresh", identifier=[ident(value)]), headers={"If-Match": 'W/"1"'}
    )
    assert (fresh.status, fresh.etag) == (200, 'W/"2"')


@override_settings(FHIR_SERVICE={"UPDATE_CREATE": False})
def test_conditional_update_creates_without_a_body_id_even_when_update_create_is_off(api):
    value = new_value()
    created = api.put(f"/Patient?{condition(value)}", patient(identifier=[ident(value)]))
    assert created.status == 201, created
    before = row_counts()
    refused = api.put(f"/Patient?{condition(new_value())}", patient(id="client-id"))
    assert refused.status == 405, refused
    assert row_counts() == before


@pytest.mark.parametrize(
    ("query", "status", "detail", "diagnostics"),
    [
        ("", 400, "MSG_CONDITION_MISSING", MSG_CONDITION_MISSING.format(interaction="update")),
        ("_count=1", 400, "MSG_PARAM_INVALID", None),
        (
            "shoe-size=42",
            400,
            "MSG_PARAM_UNKNOWN",
            MSG_UNKNOWN_PARAM.format(name="shoe-size", type="Patient"),
        ),
        ("birthdate=yesterday", 400, "MSG_PARAM_INVALID", None),
    ],
)
def test_conditional_update_with_a_bad_condition_is_400(api, query, status, detail, diagnostics):
    create(api, new_value())
    before = row_counts()
    response = api.put(f"/Patient?{query}", patient())
    issue = assert_outcome(response, status, detail)
    if diagnostics is not None:
        assert issue["diagnostics"] == diagnostics
    assert row_counts() == before


def test_conditional_update_with_an_invalid_body_changes_nothing(api):
    value = new_value()
    create(api, value)
    before = row_counts()
    response = api.put(f"/Patient?{condition(value)}", {"resourceType": "Observation"})
    assert_outcome(response, 400, "MSG_RESOURCE_TYPE_MISMATCH")
    response = api.put(f"/Patient?{condition(value)}", patient(gender=7))
    assert response.status in (400, 422), response
    assert row_counts() == before


# --- conditional patch -------------------------------------------------------------------


def replace_family(name: str) -> list[dict[str, Any]]:
    return [{"op": "replace", "path": "/name/0/family", "value": name}]


def test_conditional_patch_with_one_match_patches_it(api):
    value = new_value()
    rid = create(api, value)["id"]
    response = api.patch(f"/Patient?{condition(value)}", replace_family("Patched"))
    assert response.status == 200, response
    assert (response.body["id"], response.etag) == (rid, 'W/"2"')
    assert response.body["name"][0]["family"] == "Patched"


def test_conditional_patch_without_match_is_404(api):
    value = new_value()
    before = row_counts()
    response = api.patch(f"/Patient?{condition(value)}", replace_family("Nobody"))
    issue = assert_outcome(response, 404, "MSG_CONDITION_NO_MATCH")
    assert issue["diagnostics"] == MSG_CONDITION_NO_MATCH.format(
        type="Patient", query=condition(value)
    )
    assert row_counts() == before


def test_conditional_patch_with_several_matches_is_412_and_changes_nothing(api):
    value = new_value()
    create(api, value)
    create(api, value)
    before = row_counts()
    response = api.patch(f"/Patient?{condition(value)}", replace_family("Both"))
    assert_outcome(response, 412, "MSG_CONDITIONAL_MULTIPLE")
    assert row_counts() == before


def test_conditional_patch_honours_if_match_and_empty_conditions(api):
    value = new_value()
    create(api, value)
    before = row_counts()
    stale = api.patch(
        f"/Patient?{condition(value)}", replace_family("Stale"), headers={"If-Match": 'W/"3"'}
    )
    assert_outcome(stale, 412, "MSG_VERSION_MISMATCH")
    missing = api.patch("/Patient", replace_family("Everyone"))
    issue = assert_outcome(missing, 400, "MSG_CONDITION_MISSING")
    assert issue["diagnostics"] == MSG_CONDITION_MISSING.format(interaction="patch")
    assert row_counts() == before


# --- conditional delete ------------------------------------------------------------------


def test_conditional_delete_with_one_match_deletes_it(api):
    value = new_value()
    rid = create(api, value)["id"]
    response = api.delete(f"/Patient?{condition(value)}")
    assert response.status == 204, response
    assert response.etag == 'W/"2"'
    assert api.get(f"/Patient/{rid}").status == 410
    assert matching(value) == []


def test_conditional_delete_without_match_is_204_and_changes_nothing(api):
    create(api, new_value())
    before = row_counts()
    response = api.delete(f"/Patient?{condition(new_value())}")
    assert (response.status, response.body) == (204, None)
    outcome = api.delete(
        f"/Patient?{condition(new_value())}", headers={"Prefer": "return=OperationOutcome"}
    )
    assert outcome.status == 200
    assert outcome.body["issue"][0]["diagnostics"] == "Deleted 0 matching resource(s): none"
    assert row_counts() == before


def test_conditional_delete_in_multiple_mode_deletes_every_match(api):
    value = new_value()
    ids = sorted(create(api, value)["id"] for _ in range(3))
    kept = create(api, new_value())["id"]
    response = api.delete(
        f"/Patient?{condition(value)}", headers={"Prefer": "return=OperationOutcome"}
    )
    assert response.status == 200, response
    keys = ", ".join(f"Patient/{rid}" for rid in ids)
    assert response.body["issue"][0]["diagnostics"] == (f"Deleted 3 matching resource(s): {keys}")
    assert matching(value) == []
    assert api.get(f"/Patient/{kept}").status == 200


@override_settings(FHIR_SERVICE={"CONDITIONAL_DELETE_MAX": 2})
def test_conditional_delete_over_the_bound_is_412_and_deletes_nothing(api):
    value = new_value()
    ids = sorted(create(api, value)["id"] for _ in range(3))
    before = row_counts()
    response = api.delete(f"/Patient?{condition(value)}")
    issue = assert_outcome(response, 412, "MSG_CONDITIONAL_DELETE_LIMIT")
    assert issue["diagnostics"] == MSG_CONDITIONAL_DELETE_LIMIT.format(limit=2)
    assert row_counts() == before
    assert matching(value) == ids


@override_settings(FHIR_SERVICE={"CONDITIONAL_DELETE": "single"})
def test_conditional_delete_in_single_mode_with_several_matches_is_412(api):
    value = new_value()
    create(api, value)
    create(api, value)
    before = row_counts()
    response = api.delete(f"/Patient?{condition(value)}")
    assert_outcome(response, 412, "MSG_CONDITIONAL_MULTIPLE")
    assert row_counts() == before
    one = new_value()
    rid = create(api, one)["id"]
    assert api.delete(f"/Patient?{condition(one)}").status == 204
    assert api.get(f"/Patient/{rid}").status == 410


@pytest.mark.parametrize(
    ("query", "detail"),
    [
        ("", "MSG_CONDITION_MISSING"),
        ("_count=5", "MSG_PARAM_INVALID"),
        ("x=1", "MSG_PARAM_UNKNOWN"),
    ],
)
def test_conditional_delete_with_a_bad_condition_is_400_and_deletes_nothing(api, query, detail):
    create(api, new_value())
    before = row_counts()
    assert_outcome(api.delete(f"/Patient?{query}"), 400, detail)
    assert row_counts() == before


@pytest.mark.parametrize("mode", ["single", "multiple"])
def test_capability_statement_declares_the_conditional_interactions(api, mode):
    with override_settings(FHIR_SERVICE={"CONDITIONAL_DELETE": mode}):
        statement = api.get("/metadata").body
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    for resource_type in ("Patient", "Group", "Observation"):
        entry = resources[resource_type]
        assert entry["conditionalCreate"] is True
        assert entry["conditionalUpdate"] is True
        assert entry["conditionalDelete"] == mode
        assert CONDITIONAL_PATCH in entry["extension"]
        assert CONDITIONAL_PATCH["url"].endswith("rest.resource.conditionalPatch")


def test_the_delete_mode_and_bound_come_from_the_environment(tmp_path):
    code = "from fhirservice.conf import fhir_settings as s\n"
    code += "print(s.CONDITIONAL_DELETE, s.CONDITIONAL_DELETE_MAX)"
    done = run_django(
        tmp_path, code, FHIR_CONDITIONAL_DELETE="single", FHIR_CONDITIONAL_DELETE_MAX="7"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["single", "7"]
    bad = run_django(tmp_path, code, FHIR_CONDITIONAL_DELETE="all")
    assert bad.returncode != 0
    assert "CONDITIONAL_DELETE" in bad.stderr


# --- Bundles -----------------------------------------------------------------------------


def test_transaction_runs_conditional_update_patch_and_delete(api):
    updated, patched, deleted, fresh = new_value(), new_value(), new_value(), new_value()
    uid = create(api, updated)["id"]
    pid = create(api, patched)["id"]
    did = create(api, deleted)["id"]
    ops = orjson.dumps([{"op": "add", "path": "/active", "value": True}])
    response = api.post(
        "",
        bundle(
            "transaction",
            {
                "resource": patient(family="Bundled", identifier=[ident(updated)]),
                "request": {"method": "PUT", "url": f"Patient?{condition(updated)}"},
            },
            {
                "resource": patient(identifier=[ident(fresh)]),
                "request": {"method": "PUT", "url": f"Patient?{condition(fresh)}"},
            },
            {
                "resource": {
                    "resourceType": "Binary",
                    "contentType": "application/json-patch+json",
                    "data": base64.b64encode(ops).decode(),
                },
                "request": {"method": "PATCH", "url": f"Patient?{condition(patched)}"},
            },
            {"request": {"method": "DELETE", "url": f"Patient?{condition(deleted)}"}},
        ),
    )
    assert response.status == 200, response
    statuses = [e["response"]["status"] for e in response.body["entry"]]
    assert statuses == ["200 OK", "201 Created", "200 OK", "204 No Content"]
    assert api.get(f"/Patient/{uid}").body["name"][0]["family"] == "Bundled"
    assert api.get(f"/Patient/{pid}").body["active"] is True
    assert api.get(f"/Patient/{did}").status == 410
    assert len(matching(fresh)) == 1


@pytest.mark.parametrize("existing", [False, True])
def test_transaction_references_to_a_conditional_update_point_at_its_target(api, existing):
    value = new_value()
    matched = create(api, value)["id"] if existing else None
    response = api.post(
        "",
        bundle(
            "transaction",
            {
                "fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001",
                "resource": patient(family="Target", identifier=[ident(value)]),
                "request": {"method": "PUT", "url": f"Patient?{condition(value)}"},
            },
            {
                "resource": group(["urn:uuid:00000000-0000-4000-8000-000000000001"]),
                "request": {"method": "POST", "url": "Group"},
            },
        ),
    )
    assert response.status == 200, response
    put_status, post_status = (e["response"]["status"] for e in response.body["entry"])
    assert (put_status, post_status) == ("200 OK" if existing else "201 Created", "201 Created")
    target = matching(value)
    assert len(target) == 1 and (matched is None or target == [matched])
    gid = response.body["entry"][1]["response"]["location"].split("/")[-3]
    assert refs_of(read(api, gid)) == [f"Patient/{target[0]}"]


def test_transaction_with_an_ambiguous_conditional_update_writes_nothing(api):
    value = new_value()
    create(api, value)
    create(api, value)
    before = row_counts()
    response = api.post(
        "",
        bundle(
            "transaction",
            {
                "resource": patient(identifier=[ident(new_value())]),
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": patient(identifier=[ident(value)]),
                "request": {"method": "PUT", "url": f"Patient?{condition(value)}"},
            },
        ),
    )
    assert_outcome(response, 412, "MSG_TRANSACTION_FAILED")
    assert row_counts() == before


# --- Groups: the roster keeps its write semantics ---------------------------------------------


def test_conditional_update_of_a_group_replaces_its_roster(api):
    value = new_value()
    created = api.post("/Group", group(["Patient/a", "Patient/b"], identifier=[ident(value)]))
    gid = created.body["id"]
    response = api.put(
        f"/Group?{condition(value)}", group(["Patient/b", "Patient/c"], identifier=[ident(value)])
    )
    assert response.status == 200, response
    assert response.body["id"] == gid
    assert refs_of(response.body) == ["Patient/b", "Patient/c"]
    assert response.body["quantity"] == 2
    assert read(api, gid) == response.body
    assert outbox_events(gid) == [
        (1, 0, "added", "Patient/a"),
        (1, 1, "added", "Patient/b"),
        (2, 0, "removed", "Patient/a"),
        (2, 1, "added", "Patient/c"),
    ]


def test_conditional_patch_of_a_group_adds_members_as_events(api):
    value = new_value()
    gid = api.post("/Group", group(["Patient/a"], identifier=[ident(value)])).body["id"]
    ops = [{"op": "add", "path": "/member/-", "value": member("Patient/z")}]
    response = api.patch(f"/Group?{condition(value)}", ops)
    assert response.status == 200, response
    assert refs_of(read(api, gid)) == ["Patient/a", "Patient/z"]
    assert outbox_events(gid)[-1] == (2, 0, "added", "Patient/z")


def test_conditional_delete_of_groups_deletes_them(api):
    value = new_value()
    gids = [
        api.post("/Group", group(["Patient/a"], identifier=[ident(value)])).body["id"]
        for _ in range(2)
    ]
    assert api.delete(f"/Group?{condition(value)}").status == 204
    assert [api.get(f"/Group/{gid}").status for gid in gids] == [410, 410]


# --- access control ------------------------------------------------------------------------


@pytest.fixture
def auth_on(settings: Any) -> None:
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": True}


def test_conditional_writes_never_see_another_organizations_resources(db, auth_on):
    org_a, org_b = make_client(organization="org-a"), make_client(organization="org-b")
    value = new_value()
    theirs = create(org_a, value)["id"]
    # org-b's delete matches nothing: org-a's Patient stays.
    assert org_b.delete(f"/Patient?{condition(value)}").status == 204
    assert org_a.get(f"/Patient/{theirs}").status == 200
    # org-b's patch finds nothing; its update creates a Patient of its own.
    assert_outcome(
        org_b.patch(f"/Patient?{condition(value)}", replace_family("X")),
        404,
        "MSG_CONDITION_NO_MATCH",
    )
    own = org_b.put(f"/Patient?{condition(value)}", patient(identifier=[ident(value)]))
    assert own.status == 201 and own.body["id"] != theirs
    # Naming org-a's id in the body does not reach it either.
    taken = org_b.put(f"/Patient?{condition(new_value())}", patient(id=theirs))
    assert_outcome(taken, 404, "MSG_NO_EXIST")
    assert taken.body["issue"][0]["diagnostics"] == MSG_NOT_FOUND.format(type="Patient", id=theirs)
    # Each organization now deletes exactly its own.
    assert org_a.delete(f"/Patient?{condition(value)}").status == 204
    assert org_a.get(f"/Patient/{theirs}").status == 410
    assert org_b.get(f"/Patient/{own.body['id']}").status == 200


@pytest.mark.parametrize(
    ("method", "scopes", "allowed"),
    [
        ("PUT", "system/Patient.u", False),
        ("PUT", "system/Patient.us", True),
        ("PATCH", "system/Patient.u", False),
        ("PATCH", "system/Patient.us", True),
        ("DELETE", "system/Patient.d", False),
        ("DELETE", "system/Patient.ds", True),
    ],
)
def test_conditional_writes_need_the_plain_permission_and_search(
    db, auth_on, method, scopes, allowed
):
    value = new_value()
    create(make_client(organization="org-a"), value)
    api = make_client(organization="org-a", scopes=scopes)
    before = row_counts()
    path = f"/Patient?{condition(value)}"
    if method == "PUT":
        response = api.put(path, patient(identifier=[ident(value)], active=True))
    elif method == "PATCH":
        response = api.patch(path, replace_family("Scoped"))
    else:
        response = api.delete(path)
    if allowed:
        assert response.status in (200, 204), response
    else:
        assert response.status == 403, response
        assert row_counts() == before


def test_conditional_update_that_creates_also_needs_c(db, auth_on):
    api = make_client(organization="org-a", scopes="system/Patient.us")
    before = row_counts()
    value = new_value()
    response = api.put(f"/Patient?{condition(value)}", patient(identifier=[ident(value)]))
    assert response.status == 403, response
    assert row_counts() == before
    allowed = make_client(organization="org-a", scopes="system/Patient.cus")
    assert allowed.put(f"/Patient?{condition(value)}", patient()).status == 201


def test_a_transaction_conditional_update_needs_u_and_s(db, auth_on):
    value = new_value()
    entry = {
        "fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000002",
        "resource": patient(identifier=[ident(value)]),
        "request": {"method": "PUT", "url": f"Patient?{condition(value)}"},
    }
    before = row_counts()
    refused = make_client(scopes="system/Patient.cu").post("", bundle("transaction", entry))
    assert refused.status == 403, refused
    assert "conditional update" in refused.body["issue"][0]["diagnostics"]
    assert row_counts() == before
    done = make_client(scopes="system/Patient.cus").post("", bundle("transaction", entry))
    assert done.status == 200, done
    assert len(matching(value)) == 1


# --- concurrency: the match and the write are one serializable transaction ----------------


THREADS = 8


@pytest.mark.parametrize("interaction", ["conditional-update", "if-none-exist"])
def test_concurrent_conditional_creates_with_the_same_criteria_make_one_resource(
    live_api, interaction
):
    value = new_value()

    def work(index: int) -> int:
        client = FhirClient()
        body = patient(identifier=[ident(value)])
        if interaction == "conditional-update":
            return client.put(f"/Patient?{condition(value)}", body).status
        return client.post("/Patient", body, headers={"If-None-Exist": condition(value)}).status

    statuses = run_threads(work, THREADS)
    assert sorted(statuses) == [200] * (THREADS - 1) + [201]
    assert len(matching(value)) == 1


@pytest.mark.parametrize("interaction", ["conditional-update", "if-none-exist"])
def test_concurrent_transactions_with_the_same_conditional_create_make_one_resource(
    live_api, interaction
):
    # A transaction Bundle runs serializable and is retried as a whole after a lost race,
    # as the single conditional interactions are (at READ COMMITTED each saw no match).
    value = new_value()

    def work(index: int) -> str:
        body = patient(identifier=[ident(value)])
        if interaction == "conditional-update":
            request = {"method": "PUT", "url": f"Patient?{condition(value)}"}
        else:
            request = {"method": "POST", "url": "Patient", "ifNoneExist": condition(value)}
        entry = {"resource": body, "request": request}
        response = FhirClient().post("", bundle("transaction", entry))
        assert response.status == 200, response
        return response.body["entry"][0]["response"]["status"]

    statuses = run_threads(work, THREADS)
    assert sorted(s.split()[0] for s in statuses) == ["200"] * (THREADS - 1) + ["201"]
    assert len(matching(value)) == 1

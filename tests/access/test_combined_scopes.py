"""Interactions that need two permissions: update-as-create (``u`` and ``c``) and conditional
create (``c`` and ``s``: it searches), directly and as Bundle entries.

With only one of the two the answer is 403 and nothing is stored (a conditional create is
refused before its search runs, so it does not tell whether a match exists); with both, or
with the two in separate scopes, it succeeds.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from fhirservice.models import ResourceVersion, StoredResource
from tests.access.conftest import TokenClient, create_patient, make_client, new_identifier
from tests.access.test_interactions import snapshot
from tests.support import bundle


def put_new(api: TokenClient, resource_id: str | None = None) -> Any:
    resource_id = resource_id or f"p-{uuid.uuid4()}"
    return api.put(f"/Patient/{resource_id}", {"resourceType": "Patient", "id": resource_id})


def conditional_create(api: TokenClient, identifier: dict[str, str]) -> Any:
    condition = f"identifier={identifier['system']}|{identifier['value']}"
    body = {"resourceType": "Patient", "identifier": [identifier]}
    return api.post("/Patient", body, headers={"If-None-Exist": condition})


def transaction(*entries: dict[str, Any], kind: str = "transaction") -> dict[str, Any]:
    return bundle(kind, *entries)


def put_entry(resource_id: str) -> dict[str, Any]:
    return {
        "resource": {"resourceType": "Patient", "id": resource_id},
        "request": {"method": "PUT", "url": f"Patient/{resource_id}"},
    }


def conditional_entry(identifier: dict[str, str]) -> dict[str, Any]:
    return {
        "resource": {"resourceType": "Patient", "identifier": [identifier]},
        "request": {
            "method": "POST",
            "url": "Patient",
            "ifNoneExist": f"identifier={identifier['system']}|{identifier['value']}",
        },
    }


def assert_denied(response: Any, scope: str) -> None:
    assert response.status == 403, response
    assert response.detail_codes() == ["MSG_INSUFFICIENT_SCOPE"]
    assert response.headers["WWW-Authenticate"] == (
        f'Bearer realm="fhir", error="insufficient_scope", scope="{scope}"'
    )


# --- update-as-create ---------------------------------------------------------------------


@pytest.mark.parametrize("scopes", ["system/Patient.u", "system/Patient.rus", "system/*.rud"])
def test_update_as_create_with_u_alone_is_403(scopes: str, db: None) -> None:
    before = snapshot()
    response = put_new(make_client(scopes=scopes))
    assert_denied(response, "system/Patient.cu")
    assert "update-as-create" in response.body["issue"][0]["diagnostics"]
    assert snapshot() == before


def test_update_as_create_with_c_alone_is_403(db: None) -> None:
    before = snapshot()
    assert_denied(put_new(make_client(scopes="system/Patient.c")), "system/Patient.u")
    assert snapshot() == before


@pytest.mark.parametrize(
    "scopes", ["system/Patient.cu", "system/Patient.c system/Patient.u", "system/*.cud"]
)
def test_update_as_create_with_c_and_u_creates(scopes: str, db: None) -> None:
    api = make_client(scopes=scopes)
    resource_id = f"p-{uuid.uuid4()}"
    assert put_new(api, resource_id).status == 201
    assert StoredResource.objects.get(key=f"Patient/{resource_id}").organization == "org-a"


def test_an_update_of_an_existing_id_needs_only_u(db: None) -> None:
    pid = create_patient(make_client())
    updater = make_client(scopes="system/Patient.u")
    response = updater.put(
        f"/Patient/{pid}", {"resourceType": "Patient", "id": pid, "active": True}
    )
    assert response.status == 200, response


def test_re_creating_a_deleted_id_is_a_create(db: None) -> None:
    owner = make_client()
    pid = create_patient(owner)
    assert owner.delete(f"/Patient/{pid}").status == 204
    assert_denied(put_new(make_client(scopes="system/Patient.u"), pid), "system/Patient.cu")
    assert put_new(make_client(scopes="system/Patient.cu"), pid).status == 201


def test_a_transaction_put_of_a_new_id_needs_c_and_u(db: None) -> None:
    resource_id = f"p-{uuid.uuid4()}"
    before = snapshot()
    denied = make_client(scopes="system/Patient.u").post("", transaction(put_entry(resource_id)))
    assert denied.status == 403, denied
    assert snapshot() == before
    done = make_client(scopes="system/Patient.cu").post("", transaction(put_entry(resource_id)))
    assert done.status == 200, done
    assert done.body["entry"][0]["response"]["status"].startswith("201")


# --- conditional create -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scopes", "existing"),
    [("system/Patient.c", False), ("system/Patient.c", True), ("system/Patient.cud", True)],
)
def test_conditional_create_with_c_alone_is_403(scopes: str, existing: bool, db: None) -> None:
    identifier = new_identifier()
    if existing:
        create_patient(make_client(), identifier)
    before = snapshot()
    response = conditional_create(make_client(scopes=scopes), identifier)
    # Refused before the search: the same answer whether a match exists or not.
    assert_denied(response, "system/Patient.cs")
    assert "conditional create" in response.body["issue"][0]["diagnostics"]
    assert snapshot() == before


def test_conditional_create_with_s_alone_is_403(db: None) -> None:
    before = snapshot()
    response = conditional_create(make_client(scopes="system/Patient.rs"), new_identifier())
    assert_denied(response, "system/Patient.cs")
    assert snapshot() == before


@pytest.mark.parametrize("scopes", ["system/Patient.cs", "system/Patient.c system/Patient.s"])
def test_conditional_create_with_c_and_s_succeeds(scopes: str, db: None) -> None:
    api = make_client(scopes=scopes)
    identifier = new_identifier()
    created = conditional_create(api, identifier)
    assert created.status == 201, created
    again = conditional_create(api, identifier)
    assert (again.status, again.body["id"]) == (200, created.body["id"])


def test_a_plain_create_still_needs_only_c(db: None) -> None:
    response = make_client(scopes="system/Patient.c").post("/Patient", {"resourceType": "Patient"})
    assert response.status == 201, response


def test_a_transaction_conditional_create_needs_c_and_s(db: None) -> None:
    identifier = new_identifier()
    create_patient(make_client(), identifier)
    before = snapshot()
    denied = make_client(scopes="system/Patient.c").post(
        "", transaction(conditional_entry(identifier))
    )
    assert_denied(denied, "system/Patient.cs")
    assert snapshot() == before
    fresh = new_identifier()
    done = make_client(scopes="system/Patient.cs").post("", transaction(conditional_entry(fresh)))
    assert done.status == 200, done
    assert done.body["entry"][0]["response"]["status"].startswith("201")
    versions = ResourceVersion.objects.count()
    matched = make_client(scopes="system/Patient.cs").post(
        "", transaction(conditional_entry(fresh))
    )
    assert matched.body["entry"][0]["response"]["status"].startswith("200")
    assert ResourceVersion.objects.count() == versions


def test_a_batch_conditional_create_needs_c_and_s(db: None) -> None:
    identifier = new_identifier()
    body = transaction(conditional_entry(identifier), kind="batch")
    denied = make_client(scopes="system/Patient.c").post("", body)
    assert denied.status == 200, denied
    entry = denied.body["entry"][0]["response"]
    assert entry["status"].startswith("403")
    assert entry["outcome"]["issue"][0]["code"] == "forbidden"
    done = make_client(scopes="system/Patient.cs").post("", body)
    assert done.body["entry"][0]["response"]["status"].startswith("201")

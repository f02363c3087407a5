"""Every interaction and operation, called by five callers.

Callers: no token (401), an expired token (401), a token whose scopes miss the interaction
(403), a token of another organization (404 or no results: ids never leak), and the owner
(success). The data belongs to org-a; writes that fail leave it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from fhirservice.models import ResourceVersion, StoredResource
from tests.access.conftest import (
    TokenClient,
    create_group,
    create_patient,
    make_client,
    new_identifier,
    parameters,
)
from tests.support import FhirResponse, bundle


@dataclass
class World:
    """org-a's data: Patients p (member of g) and q, Groups g and g2; org-b's Group h."""

    p: str
    p_identifier: dict[str, str]
    q: str
    q_identifier: dict[str, str]
    g: str
    g2: str
    h: str


@pytest.fixture
def world(org_a: TokenClient, org_b: TokenClient) -> World:
    """The shared set-up of every case."""
    p_identifier, q_identifier = new_identifier(), new_identifier()
    p = create_patient(org_a, p_identifier)
    q = create_patient(org_a, q_identifier)
    assert (
        org_a.patch(f"/Patient/{p}", [{"op": "add", "path": "/gender", "value": "other"}]).status
        == 200
    )
    g = create_group(org_a, [f"Patient/{p}"])
    g2 = create_group(org_a, [])
    h = create_group(org_b, [])
    return World(p, p_identifier, q, q_identifier, g, g2, h)


def ident(identifier: dict[str, str]) -> dict[str, Any]:
    return {"name": "identifier", "valueIdentifier": identifier}


def reference(name: str, ref: str) -> dict[str, Any]:
    return {"name": name, "valueReference": {"reference": ref}}


Call = Callable[[TokenClient, World], FhirResponse]

CASES: dict[str, Call] = {
    "read": lambda c, w: c.get(f"/Patient/{w.p}"),
    "vread": lambda c, w: c.get(f"/Patient/{w.p}/_history/1"),
    "history-instance": lambda c, w: c.get(f"/Patient/{w.p}/_history"),
    "history-type": lambda c, w: c.get("/Patient/_history?_count=1000"),
    "history-system": lambda c, w: c.get("/_history?_count=1000"),
    "search": lambda c, w: c.get(
        f"/Patient?identifier={w.p_identifier['system']}|{w.p_identifier['value']}"
    ),
    "search-system": lambda c, w: c.get(
        f"?_type=Patient,Group&identifier={w.p_identifier['system']}|{w.p_identifier['value']}"
    ),
    "search-all-types": lambda c, w: c.get(f"?_id={w.p}"),
    "create": lambda c, w: c.post("/Patient", {"resourceType": "Patient", "active": True}),
    "update": lambda c, w: c.put(
        f"/Patient/{w.p}", {"resourceType": "Patient", "id": w.p, "active": False}
    ),
    "patch": lambda c, w: c.patch(
        f"/Patient/{w.p}", [{"op": "add", "path": "/active", "value": True}]
    ),
    "delete": lambda c, w: c.delete(f"/Patient/{w.p}"),
    "group-read": lambda c, w: c.get(f"/Group/{w.g}"),
    "group-member-search": lambda c, w: c.get(f"/Group?member=Patient/{w.p}"),
    "members": lambda c, w: c.get(f"/Group/{w.g}/$members"),
    "add-member": lambda c, w: c.post(
        f"/Group/{w.g}/$add-member", parameters(ident(w.q_identifier))
    ),
    "remove-member": lambda c, w: c.post(
        f"/Group/{w.g}/$remove-member", parameters(reference("member", f"Patient/{w.p}"))
    ),
    "transfer-member": lambda c, w: c.post(
        "/Group/$transfer-member",
        parameters(
            reference("source", f"Group/{w.g}"),
            reference("target", f"Group/{w.g2}"),
            reference("member", f"Patient/{w.p}"),
        ),
    ),
    "create-roster": lambda c, w: c.post(
        "/Group/$create-roster",
        parameters(
            {
                "name": "group",
                "resource": {"resourceType": "Group", "type": "person", "actual": True},
            },
            ident(w.p_identifier),
        ),
    ),
    "group-memberships": lambda c, w: c.get(f"/Patient/{w.p}/$group-memberships"),
    "transaction": lambda c, w: c.post(
        "",
        bundle(
            "transaction",
            {
                "resource": {"resourceType": "Patient", "id": w.p, "active": False},
                "request": {"method": "PUT", "url": f"Patient/{w.p}"},
            },
        ),
    ),
    "batch": lambda c, w: c.post(
        "", bundle("batch", {"request": {"method": "GET", "url": f"Patient/{w.p}"}})
    ),
}

# Interactions whose answer to another organization is "nothing found", not 404.
SEARCHES = {
    "history-type",
    "history-system",
    "search",
    "search-system",
    "search-all-types",
    "group-member-search",
}
TOTALS = ("search", "search-system", "search-all-types", "group-member-search")


def snapshot() -> tuple[list[tuple[str, int]], int]:
    """The metadata store's state: current rows and the number of versions."""
    rows = list(StoredResource.objects.order_by("key").values_list("key", "version_id"))
    return rows, ResourceVersion.objects.count()


def mentions(response: FhirResponse, resource_id: str) -> bool:
    """Whether the answer names the id (in a Bundle: in its entries, not its links)."""
    if response.body and response.body.get("resourceType") == "Bundle":
        return resource_id in orjson.dumps(response.body.get("entry", [])).decode()
    return resource_id.encode() in response.content


def assert_outcome(response: FhirResponse, status: int, code: str, detail: str) -> None:
    assert response.status == status, response
    assert response.body["resourceType"] == "OperationOutcome"
    assert response.issue_codes()[0] == code
    assert detail in response.detail_codes()


@pytest.mark.parametrize("case", sorted(CASES))
def test_without_a_token_the_answer_is_401(case: str, world: World, no_token: TokenClient) -> None:
    before = snapshot()
    response = CASES[case](no_token, world)
    assert_outcome(response, 401, "login", "MSG_AUTH_REQUIRED")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="fhir"'
    assert snapshot() == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_expired_token_is_401_invalid_token(case: str, world: World) -> None:
    expired = make_client(organization="org-a", expired=True)
    before = snapshot()
    response = CASES[case](expired, world)
    assert_outcome(response, 401, "login", "MSG_TOKEN_INVALID")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="fhir", error="invalid_token"'
    assert snapshot() == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_token_lacking_the_scope_is_403(case: str, world: World) -> None:
    lacking = make_client(organization="org-a", scopes="system/Observation.c")
    before = snapshot()
    response = CASES[case](lacking, world)
    if case == "batch":
        assert response.status == 200, response
        entry = response.body["entry"][0]["response"]
        assert entry["status"].startswith("403")
        assert entry["outcome"]["issue"][0]["code"] == "forbidden"
    else:
        assert_outcome(
            response,
            403,
            "forbidden",
            "MSG_TRANSACTION_FAILED" if case == "transaction" else "MSG_INSUFFICIENT_SCOPE",
        )
        if case != "transaction":
            challenge = response.headers["WWW-Authenticate"]
            assert challenge.startswith('Bearer realm="fhir", error="insufficient_scope", scope="')
    assert snapshot() == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_another_organization_finds_nothing(case: str, world: World, org_b: TokenClient) -> None:
    before = snapshot()
    response = CASES[case](org_b, world)
    if case in SEARCHES:
        assert response.status == 200, response
        assert not mentions(response, world.p)
        if case in TOTALS:
            assert response.body["total"] == 0
        return
    if case == "create":
        assert response.status == 201, response
        return
    if case == "create-roster":
        # The identifier of org-a's Patient matches nothing org-b can see: a new Patient.
        assert response.status == 200, response
        created = [p for p in response.body["parameter"] if p["name"] == "created"]
        assert created[0]["valueInteger"] == 1
        assert not mentions(response, world.p)
        return
    if case == "batch":
        assert response.status == 200, response
        assert response.body["entry"][0]["response"]["status"].startswith("404")
        return
    assert response.status == 404, response
    assert response.issue_codes()[0] == "not-found"
    assert not mentions(response, world.g2)
    assert snapshot() == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_owner_succeeds(case: str, world: World, org_a: TokenClient) -> None:
    response = CASES[case](org_a, world)
    assert response.status in (200, 201, 204), response
    if case in (*TOTALS, "group-memberships"):
        assert response.body["total"] == 1
        assert mentions(response, world.p if case.startswith("search") else world.g)
    if case in ("history-type", "history-system", "history-instance", "read", "vread"):
        assert mentions(response, world.p)
    if case == "members":
        assert mentions(response, f"Patient/{world.p}")
    if case == "create-roster":
        created = [p for p in response.body["parameter"] if p["name"] == "created"]
        assert created[0]["valueInteger"] == 0
    if case == "batch":
        assert response.body["entry"][0]["response"]["status"].startswith("200")

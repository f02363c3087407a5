"""Fixtures and helpers of the Operation API tests, on whichever backend pair this run uses.

ClickHouse keeps its data between tests (only the metadata store is rolled back or flushed),
so every test works on Groups and Patient identifiers it creates itself: Group ids are
server-assigned UUIDs and identifier values carry a fresh UUID (``new_identifier``).

Helpers are plain functions imported by the test modules, so that a failing assertion points
at the test that made it.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from fhirservice.clickhouse import get_clickhouse
from fhirservice.models import ResourceVersion, SearchToken, StoredResource
from groups.models import MemberOutbox
from tests.support import FhirClient, FhirResponse

SYSTEM = "urn:test:mrn"


@pytest.fixture(params=["pending", "shipped"])
def any_api(request: pytest.FixtureRequest) -> FhirClient:
    """A FHIR client twice: member events left pending in the outbox (``api``: the test's
    transaction is rolled back, so on-commit shipping never runs) and events committed and
    shipped to ClickHouse (``live_api``). Operations must answer the same either way."""
    return request.getfixturevalue("api" if request.param == "pending" else "live_api")


@pytest.fixture
def clickhouse_down() -> Any:
    """A context manager under which the member store cannot be reached (connections to a
    loopback port where nothing listens are refused). ``override_settings`` of
    ``CLICKHOUSE_URL`` resets the process-wide client on entry and exit, so the real store
    is reopened afterwards."""
    import socket

    from django.test import override_settings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"clickhouse://default@127.0.0.1:{port}/fhir_test?connect_timeout=1"
    return lambda: override_settings(CLICKHOUSE_URL=url)


# --- request bodies ------------------------------------------------------------------------


def new_identifier(system: str = SYSTEM) -> dict[str, str]:
    """An Identifier no other test uses (ClickHouse is not rolled back between tests)."""
    return {"system": system, "value": f"id-{uuid.uuid4()}"}


def parameters(*items: dict[str, Any]) -> dict[str, Any]:
    """A Parameters resource from parameter items."""
    return {"resourceType": "Parameters", "parameter": list(items)}


def param(name: str, **value: Any) -> dict[str, Any]:
    """One parameter item: ``param("identifier", valueIdentifier={...})``."""
    return {"name": name, **value}


def ident(identifier: dict[str, str], name: str = "identifier") -> dict[str, Any]:
    """An Identifier parameter."""
    return {"name": name, "valueIdentifier": identifier}


def ref(reference: str, name: str) -> dict[str, Any]:
    """A Reference parameter."""
    return {"name": name, "valueReference": {"reference": reference}}


def text(name: str, value: str) -> dict[str, Any]:
    """A string (or code) parameter."""
    return {"name": name, "valueString": value}


def group_body(**extra: Any) -> dict[str, Any]:
    """A Group body without members."""
    return {"resourceType": "Group", "type": "person", "actual": True, **extra}


# --- requests ------------------------------------------------------------------------------


def create_patient(api: FhirClient, *identifiers: dict[str, str], **extra: Any) -> str:
    """POST a Patient with these identifiers (a fresh one when none); its ``Patient/id``."""
    body = {
        "resourceType": "Patient",
        "identifier": list(identifiers) or [new_identifier()],
        **extra,
    }
    response = api.post("/Patient", body)
    assert response.status == 201, response
    return f"Patient/{response.body['id']}"


def create_group(api: FhirClient, members: list[str] | None = None, **extra: Any) -> str:
    """POST a Group (with these member references) and return its id."""
    body = group_body(**extra)
    if members:
        body["member"] = [{"entity": {"reference": m}} for m in members]
    response = api.post("/Group", body)
    assert response.status == 201, response
    return response.body["id"]


def group_version(api: FhirClient, gid: str) -> int:
    """The Group's current versionId as served."""
    response = api.get(f"/Group/{gid}")
    assert response.status == 200, response
    return int(response.body["meta"]["versionId"])


def read_group(api: FhirClient, gid: str) -> dict[str, Any]:
    """GET the Group (200 required)."""
    response = api.get(f"/Group/{gid}")
    assert response.status == 200, response
    return response.body


def roster(api: FhirClient, gid: str) -> dict[str, bool]:
    """{member reference: inactive} of the Group as served by GET."""
    return {
        m["entity"]["reference"]: m.get("inactive", False)
        for m in read_group(api, gid).get("member", [])
    }


def members_roster(api: FhirClient, gid: str) -> dict[str, bool]:
    """{member reference: inactive} of the Group as served by ``$members`` (all pages)."""
    out: dict[str, bool] = {}
    path = f"/Group/{gid}/$members?_count=1000"
    while path:
        response = api.get(path)
        assert response.status == 200, response
        path = ""
        for p in response.body["parameter"]:
            if p["name"] == "member":
                parts = {part["name"]: part for part in p["part"]}
                out[parts["entity"]["valueReference"]["reference"]] = parts["inactive"][
                    "valueBoolean"
                ]
            elif p["name"] == "next":
                path = p["valueUri"].split("/4_0_0", 1)[1]
    return out


def out_value(response: FhirResponse, name: str) -> Any:
    """The value of an output parameter of a successful operation."""
    values = [
        v
        for p in response.body["parameter"]
        if p["name"] == name
        for k, v in p.items()
        if k.startswith("value")
    ]
    assert len(values) == 1, response
    return values[0]


def add_member(api: FhirClient, gid: str, *items: dict[str, Any]) -> FhirResponse:
    """POST ``Group/{gid}/$add-member``."""
    return api.post(f"/Group/{gid}/$add-member", parameters(*items))


def remove_member(api: FhirClient, gid: str, *items: dict[str, Any]) -> FhirResponse:
    """POST ``Group/{gid}/$remove-member``."""
    return api.post(f"/Group/{gid}/$remove-member", parameters(*items))


def transfer(api: FhirClient, source: str, target: str, *items: dict[str, Any]) -> FhirResponse:
    """POST ``Group/$transfer-member`` from Group ``source`` to Group ``target``."""
    return api.post(
        "/Group/$transfer-member",
        parameters(ref(f"Group/{source}", "source"), ref(f"Group/{target}", "target"), *items),
    )


def assert_error(response: FhirResponse, status: int, issue: str, detail: str) -> None:
    """The response is an OperationOutcome with exactly this status, issue and detail code."""
    assert response.status == status, response
    assert response.body["resourceType"] == "OperationOutcome", response
    assert response.issue_codes() == [issue], response
    assert response.detail_codes() == [detail], response


def diagnostics(response: FhirResponse) -> str:
    """The diagnostics of the first issue."""
    return response.body["issue"][0]["diagnostics"]


def assert_version_conflict(response: FhirResponse, key: str, client: str, server: int) -> None:
    """409 conflict MSG_VERSION_AWARE_CONFLICT naming the client's and the server's version."""
    assert_error(response, 409, "conflict", "MSG_VERSION_AWARE_CONFLICT")
    assert diagnostics(response) == (
        f"{key}: the client named version {client}, but the server's current version is {server}"
    )


# --- stored state --------------------------------------------------------------------------


def store_counts() -> dict[str, int]:
    """Rows of every table a write can touch, in both stores (ClickHouse: raw event rows)."""
    events = get_clickhouse().execute("SELECT count() FROM Group_4_0_0_MemberEvents")
    return {
        "StoredResource": StoredResource.objects.count(),
        "ResourceVersion": ResourceVersion.objects.count(),
        "SearchToken": SearchToken.objects.count(),
        "MemberOutbox": MemberOutbox.objects.count(),
        "clickhouse events": int(events[0][0]),
    }

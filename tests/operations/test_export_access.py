"""``$export`` with access control on: who may kick off, poll, download, and what they see."""

from __future__ import annotations

from typing import Any

import pytest

from operations.export.models import ExportJob
from tests.access.conftest import TokenClient, make_client
from tests.access.test_backend_services import KeyPair, claims, register, request_token, token_of
from tests.operations.test_export import (
    ASYNC,
    create,
    exported,
    group,
    kick_off,
    manifest,
    observation,
    raw,
    run_jobs,
)
from tests.support import patient


@pytest.fixture(autouse=True)
def auth_on(settings: Any) -> None:
    """Access control on, as in production."""
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": True}


@pytest.fixture
def clients(transactional_db: None) -> dict[str, TokenClient]:
    """Two clients of org-a, one of org-b, a caller without a token, and one whose token
    expired."""
    return {
        "a": make_client(organization="org-a"),
        "a2": make_client(organization="org-a"),
        "b": make_client(organization="org-b"),
        "none": TokenClient(None),
        "expired": make_client(organization="org-a", expired=True),
    }


def bearer(client: TokenClient) -> dict[str, str]:
    """The Authorization header of a client."""
    return {"Authorization": f"Bearer {client.token}"} if client.token else {}


@pytest.fixture
def data(clients: dict[str, TokenClient]) -> dict[str, Any]:
    """A Patient with an Observation in each organization, and org-a's Group of its own."""
    out: dict[str, Any] = {}
    for name in ("a", "b"):
        client = clients[name]
        patient_key = create(client, patient(family=f"Org{name}"))
        observation_key = create(client, observation(patient_key))
        out[name] = {"patient": patient_key, "observation": observation_key}
    out["group"] = group(clients["a"], [out["a"]["patient"]])
    return out


@pytest.mark.parametrize("caller", ["none", "expired"])
def test_kick_off_needs_a_valid_token(clients, data, caller):
    response = clients[caller].get("/$export", headers=ASYNC)
    assert response.status == 401, response
    assert not ExportJob.objects.exists()


def test_status_and_files_answer_only_the_client_that_asked(clients, data):
    owner = clients["a"]
    status = kick_off(owner, f"/Group/{data['group']}/$export")
    run_jobs()
    body = manifest(owner, status, **bearer(owner))
    assert body["requiresAccessToken"] is True
    url = body["output"][0]["url"]
    for other in ("a2", "b"):  # another client, of the same or another organization
        assert raw(owner, "GET", status, **bearer(clients[other])).status_code == 404
        assert raw(owner, "GET", url, **bearer(clients[other])).status_code == 404
        assert raw(owner, "DELETE", status, **bearer(clients[other])).status_code == 404
    for caller in ("none", "expired"):
        assert raw(owner, "GET", url, **bearer(clients[caller])).status_code == 401
    assert raw(owner, "GET", url, **bearer(owner)).status_code == 200


@pytest.mark.parametrize("level", ["/$export", "/Patient/$export", "/Group/{group}/$export"])
def test_an_export_holds_nothing_of_another_organization(clients, data, settings, level):
    # One row per chunk: pages holding only the other organization's rows are passed over
    # (the boundary is applied to each page read, not in its query).
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "EXPORT_CHUNK": 1}
    client = clients["b"]
    both = group(client, [data["a"]["patient"], data["b"]["patient"]])
    status = kick_off(client, level.format(group=both))
    run_jobs()
    files = exported(client, manifest(client, status, **bearer(client)), **bearer(client))
    everything = {key for keys in files.values() for key in keys}
    mine = {data["b"]["patient"], data["b"]["observation"]}
    assert everything == (mine | {f"Group/{both}"} if level == "/$export" else mine)


def test_another_organizations_group_is_not_found(clients, data):
    response = clients["b"].get(f"/Group/{data['group']}/$export", headers=ASYNC)
    assert response.status == 404, response


def test_only_types_the_scopes_allow_are_exported(clients, data):
    reader = make_client(organization="org-a", scopes="system/Patient.rs")
    status = kick_off(reader, "/Patient/$export")
    run_jobs()
    files = exported(reader, manifest(reader, status, **bearer(reader)), **bearer(reader))
    assert files == {"Patient": [data["a"]["patient"]]}
    response = reader.get("/Patient/$export?_type=Observation", headers=ASYNC)
    assert response.status == 403, response


def test_a_backend_services_client_exports_its_group(clients, data, tmp_path):
    key = KeyPair("ES384")
    client_id = register(tmp_path, key, scopes="system/*.rs", org="org-a")
    token = token_of(request_token(key.sign(claims(client_id))))
    backend = TokenClient(token, client_id=client_id, organization="org-a")
    status = kick_off(backend, f"/Group/{data['group']}/$export")
    run_jobs()
    body = manifest(backend, status, **bearer(backend))
    files = exported(backend, body, **bearer(backend))
    assert files == {
        "Observation": [data["a"]["observation"]],
        "Patient": [data["a"]["patient"]],
    }
    # the org-a client with a secret, same organization, is another client: no download
    assert raw(backend, "GET", body["output"][0]["url"], **bearer(clients["a"])).status_code == 404

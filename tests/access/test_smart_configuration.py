"""SMART App Launch discovery: ``.well-known/smart-configuration``, below the base and at
the site root."""

from __future__ import annotations

import pytest
from django.test import Client

from fhirservice.access.scopes import parse_scope
from tests.access.test_tokens import create_client, token_request
from tests.support import BASE

PATHS = [f"{BASE}/.well-known/smart-configuration", "/.well-known/smart-configuration"]


def discover(path: str = PATHS[0], **headers: str) -> dict:
    response = Client().get(path, **headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "application/json"
    return response.json()


@pytest.mark.parametrize("auth", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_it_is_public_json_with_auth_on_and_off(settings, path: str, auth: bool, db: None) -> None:
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": auth}
    document = discover(path)
    assert document["token_endpoint"] == "http://testserver/oauth/token/"
    assert document["revocation_endpoint"] == "http://testserver/oauth/revoke_token/"
    assert document["grant_types_supported"] == ["client_credentials"]
    assert document["token_endpoint_auth_methods_supported"] == [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    ]
    assert document["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert document["capabilities"] == [
        "client-confidential-symmetric",
        "client-confidential-asymmetric",
        "permission-v2",
        "permission-v1",
    ]
    assert {"system/*.*", "system/*.rs", "system/*.cruds", "system/*.read"} <= set(
        document["scopes_supported"]
    )
    assert "system/AuditEvent.rs" in document["scopes_supported"]
    assert "system/Group.$add-member" in document["scopes_supported"]


def test_a_bad_token_does_not_matter(db: None) -> None:
    assert discover(HTTP_AUTHORIZATION="Bearer garbage")["token_endpoint"]


def test_only_get(db: None) -> None:
    assert Client().post(PATHS[0]).status_code == 405
    assert Client().post(PATHS[1]).status_code == 405


def test_the_capability_statement_names_the_same_token_endpoint(settings, db: None) -> None:
    settings.ALLOWED_HOSTS = [*settings.ALLOWED_HOSTS, "fhir.example"]
    statement = Client().get(f"{BASE}/metadata", HTTP_HOST="fhir.example:8443").json()
    uris = statement["rest"][0]["security"]["extension"][0]["extension"]
    token = next(uri["valueUri"] for uri in uris if uri["url"] == "token")
    document = discover(HTTP_HOST="fhir.example:8443")
    assert token == document["token_endpoint"] == "http://fhir.example:8443/oauth/token/"


def test_every_listed_scope_is_accepted_by_the_token_endpoint(db: None) -> None:
    scopes = discover()["scopes_supported"]
    assert all(parse_scope(scope) is not None for scope in scopes)
    client_id, secret, _ = create_client(
        "--name", "all", "--organization", "o", "--scopes", " ".join(scopes)
    )
    for scope in scopes:
        response = token_request(client_id, secret, scope=scope)
        assert response.status_code == 200, (scope, response.content)
        assert response.json()["scope"] == scope


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_both_advertised_authentication_methods_work(method: str, db: None) -> None:
    client_id, secret, _ = create_client("--name", "c", "--organization", "o")
    if method == "client_secret_basic":
        response = token_request(client_id, secret)
    else:
        response = Client().post(
            "/oauth/token/",
            {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
        )
    assert response.status_code == 200, response.content
    assert response.json()["token_type"] == "Bearer"

"""The token endpoint, the create_fhir_client command, and how tokens are checked."""

from __future__ import annotations

import base64
import io
import re

import orjson
import pytest
from django.core.management import CommandError, call_command
from django.test import Client

from fhirservice.access.models import ClientProfile
from tests.access.conftest import TokenClient, make_client


def create_client(*args: str) -> tuple[str, str, str]:
    out = io.StringIO()
    call_command("create_fhir_client", *args, stdout=out)
    text = out.getvalue()
    client_id = re.search(r"client_id:\s+(\S+)", text).group(1)
    secret = re.search(r"client_secret:\s+(\S+)", text).group(1)
    return client_id, secret, text


def token_request(client_id: str, secret: str, **data: str):
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return Client().post(
        "/oauth/token/",
        {"grant_type": "client_credentials", **data},
        HTTP_AUTHORIZATION=f"Basic {basic}",
    )


def test_command_creates_a_client_and_the_endpoint_issues_its_token(db: None) -> None:
    client_id, secret, text = create_client(
        "--name", "clinic-a", "--organization", "org-a", "--scopes", "system/Patient.rs"
    )
    assert "curl -s -X POST http://127.0.0.1:8000/oauth/token/" in text
    profile = ClientProfile.objects.get(application__client_id=client_id)
    assert (profile.organization, profile.allowed_scopes) == ("org-a", "system/Patient.rs")
    assert profile.application.client_secret != secret  # only the hash is stored
    response = token_request(client_id, secret)
    assert response.status_code == 200, response.content
    token = orjson.loads(response.content)
    assert token["token_type"] == "Bearer"
    assert token["scope"] == "system/Patient.rs"
    api = TokenClient(token["access_token"])
    assert api.get("/Patient").status == 200
    assert api.post("/Patient", {"resourceType": "Patient"}).status == 403


def test_a_token_may_ask_for_less_than_the_allowance(db: None) -> None:
    client_id, secret, _ = create_client(
        "--name", "c", "--organization", "o", "--scopes", "system/*.*"
    )
    response = token_request(client_id, secret, scope="system/Patient.r")
    assert response.status_code == 200
    api = TokenClient(orjson.loads(response.content)["access_token"])
    assert api.get("/Patient").status == 403  # no s
    assert api.get("/Patient/nope").status == 404  # r: unknown id


def test_a_token_may_not_ask_for_more_than_the_allowance(db: None) -> None:
    client_id, secret, _ = create_client(
        "--name", "c", "--organization", "o", "--scopes", "system/Patient.r"
    )
    for scope in ("system/Patient.rs", "system/*.r", "user/Patient.r", "system/AuditEvent.s"):
        response = token_request(client_id, secret, scope=scope)
        assert response.status_code == 400, scope
        assert orjson.loads(response.content)["error"] == "invalid_scope"


def test_a_wrong_secret_gets_no_token(db: None) -> None:
    client_id, _, _ = create_client("--name", "c", "--organization", "o")
    response = token_request(client_id, "wrong")
    assert response.status_code == 401


def test_the_command_refuses_bad_input(db: None) -> None:
    with pytest.raises(CommandError, match="Not supported SMART system scopes: user/\\*\\.\\*"):
        create_client("--name", "x", "--organization", "o", "--scopes", "user/*.*")
    with pytest.raises(CommandError, match="--organization must match"):
        create_client("--name", "x", "--organization", "bad org")
    create_client("--name", "twice", "--organization", "o")
    with pytest.raises(CommandError, match="exists already"):
        create_client("--name", "twice", "--organization", "o")


def test_the_command_dry_run_creates_nothing(db: None) -> None:
    out = io.StringIO()
    call_command(
        "create_fhir_client", "--name", "d", "--organization", "o", "--dry-run", stdout=out
    )
    assert "nothing was created" in out.getvalue()
    assert not ClientProfile.objects.exists()


def test_unknown_and_malformed_tokens_are_401(db: None) -> None:
    for header in ("Bearer nonsense", "Bearer ", "bearer nonsense"):
        response = TokenClient(None).get("/Patient", headers={"Authorization": header})
        assert response.status == 401, header
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="fhir", error="invalid_token"'
        assert response.detail_codes() == ["MSG_TOKEN_INVALID"]
    basic = TokenClient(None).get("/Patient", headers={"Authorization": "Basic eDp5"})
    assert basic.status == 401 and basic.detail_codes() == ["MSG_AUTH_REQUIRED"]


def test_a_revoked_token_is_401(db: None) -> None:
    api = make_client()
    assert api.get("/Patient").status == 200
    from oauth2_provider.models import get_access_token_model

    get_access_token_model().objects.get(token=api.token).revoke()
    assert api.get("/Patient").status == 401


def test_a_token_of_an_application_without_profile_is_401(db: None) -> None:
    api = make_client()
    ClientProfile.objects.all().delete()
    assert api.get("/Patient").status == 401


def test_a_narrowed_allowance_narrows_tokens_already_issued(db: None) -> None:
    api = make_client(scopes="system/*.*")
    ClientProfile.objects.update(allowed_scopes="system/Patient.rs")
    assert api.get("/Patient").status == 200
    assert api.get("/Group").status == 403


def test_metadata_and_built_in_operation_definitions_are_public(db: None) -> None:
    anonymous = TokenClient(None)
    assert anonymous.get("/metadata").status == 200
    from fhirservice.plugins import OPERATIONS

    for op_id in OPERATIONS:
        assert anonymous.get(f"/OperationDefinition/{op_id}").status == 200, op_id
    assert anonymous.get("/OperationDefinition/stored-one").status == 401
    assert TokenClient("garbage").get("/metadata").status == 200


def test_unknown_routes_need_a_token_first(db: None) -> None:
    assert TokenClient(None).get("/Patient/x/y/z/w").status == 401
    assert make_client().get("/Patient/x/y/z/w").status == 404


def test_v1_aliases(db: None) -> None:
    reader = make_client(scopes="system/Patient.read")
    assert reader.get("/Patient").status == 200
    assert reader.post("/Patient", {"resourceType": "Patient"}).status == 403
    writer = make_client(scopes="system/Patient.write")
    created = writer.post("/Patient", {"resourceType": "Patient"})
    assert created.status == 201
    assert writer.get(f"/Patient/{created.body['id']}").status == 403
    assert writer.delete(f"/Patient/{created.body['id']}").status == 204


def test_a_staff_session_is_an_unrestricted_caller(admin_client, db: None) -> None:
    org_a = make_client(organization="org-a")
    pid = org_a.post("/Patient", {"resourceType": "Patient"}).body["id"]
    response = admin_client.get(f"/4_0_0/Patient/{pid}")
    assert response.status_code == 200
    from fhirservice.models import ResourceVersion

    csrf_free = admin_client.put(
        f"/4_0_0/Patient/{pid}",
        orjson.dumps({"resourceType": "Patient", "id": pid, "active": True}),
        content_type="application/fhir+json",
    )
    assert csrf_free.status_code == 200  # the test client does not enforce CSRF
    version = ResourceVersion.objects.get(key=f"Patient/{pid}/_history/2")
    assert version.actor == "staff:admin"
    assert version.organization == "org-a"  # the id keeps its organization


def test_a_staff_session_writes_only_with_the_csrf_token(django_user_model, db: None) -> None:
    # A browser session runs the session middleware on FHIR paths too (only FHIR requests
    # without the session cookie skip it), and its writes are CSRF-checked.
    staff = django_user_model.objects.create_superuser("boss", "boss@example.org", "pw-pw-pw")
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff)
    body = orjson.dumps({"resourceType": "Patient", "id": "by-staff", "active": True})
    path = "/4_0_0/Patient/by-staff"
    refused = browser.put(path, body, content_type="application/fhir+json")
    assert refused.status_code == 403
    assert orjson.loads(refused.content)["resourceType"] == "OperationOutcome"
    token = browser.get("/admin/password_change/").cookies["csrftoken"].value
    created = browser.put(path, body, content_type="application/fhir+json", HTTP_X_CSRFTOKEN=token)
    assert created.status_code == 201, created.content


def test_a_staff_session_creates_with_post_and_the_csrf_token(django_user_model, db: None) -> None:
    # The CSRF check looks for a form field in a POST's body: with a FHIR body it must not
    # parse it (DRF has no parser for it: that answered 415), and must not consume it.
    staff = django_user_model.objects.create_superuser("boss", "boss@example.org", "pw-pw-pw")
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff)
    body = orjson.dumps({"resourceType": "Patient", "active": True})
    refused = browser.post("/4_0_0/Patient", body, content_type="application/fhir+json")
    assert refused.status_code == 403
    assert "CSRF" in orjson.loads(refused.content)["issue"][0]["diagnostics"]
    token = browser.get("/admin/password_change/").cookies["csrftoken"].value
    created = browser.post(
        "/4_0_0/Patient", body, content_type="application/fhir+json", HTTP_X_CSRFTOKEN=token
    )
    assert created.status_code == 201, created.content
    stored = browser.get(created["Location"], HTTP_ACCEPT="application/fhir+json")
    assert orjson.loads(stored.content)["active"] is True
    # A form body (POST _search) is read by Django's check and still by the search after it.
    found = browser.post(
        "/4_0_0/Patient/_search",
        "active=true",
        content_type="application/x-www-form-urlencoded",
        HTTP_X_CSRFTOKEN=token,
    )
    assert found.status_code == 200, found.content
    assert orjson.loads(found.content)["total"] == 1


def test_the_capability_statement_says_where_tokens_come_from(db: None) -> None:
    statement = TokenClient(None).get("/metadata").body
    security = statement["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    uris = security["extension"][0]["extension"]
    assert uris == [{"url": "token", "valueUri": "http://testserver/oauth/token/"}]
    audit = next(r for r in statement["rest"][0]["resource"] if r["type"] == "AuditEvent")
    assert audit["interaction"] == [{"code": "search-type"}]

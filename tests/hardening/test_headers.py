"""Security headers on every answer, no stack traces even under DEBUG, CSRF on the admin."""

from __future__ import annotations

import orjson
import pytest
from django.test import Client

from fhirservice.middleware import RequestIdMiddleware
from fhirservice.rest.views import MetadataView
from tests.support import BASE, FhirResponse, patient

EVERY_ANSWER = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
FHIR_ANSWER = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; sandbox",
}


def assert_headers(response, expected: dict[str, str]) -> None:
    for name, value in expected.items():
        assert response.headers.get(name) == value, (name, response.headers)


def test_fhir_answers_carry_the_headers(api):
    created = api.post("/Patient", patient())
    path = f"/Patient/{created.body['id']}"
    answers = [
        created,
        api.get(path),
        api.get("/Patient?name=Chalmers"),
        api.get("/metadata"),
        api.get(f"{path}/_history"),
        api.get("/Nope/1"),
        api.get("/unknown/route/here"),
        api.request("POST", "/Patient", raw=b"not json"),
        api.delete(path),
        api.get(path, headers={"If-None-Match": 'W/"1"'}),
    ]
    for response in answers:
        assert_headers(response, {**EVERY_ANSWER, **FHIR_ANSWER})


@pytest.mark.django_db
def test_admin_answers_carry_the_headers_but_not_the_api_policy():
    response = Client().get("/admin/login/")
    assert response.status_code == 200
    assert_headers(response, EVERY_ANSWER)
    assert "Content-Security-Policy" not in response.headers


@pytest.mark.django_db
def test_hsts_on_tls_when_configured(settings):
    client = Client()
    assert "Strict-Transport-Security" not in client.get(f"{BASE}/metadata", secure=True).headers
    settings.SECURE_HSTS_SECONDS = 31_536_000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    client = Client()  # middleware reads its settings when the handler is built
    response = client.get(f"{BASE}/metadata", secure=True)
    assert response.headers["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"
    assert "Strict-Transport-Security" not in client.get(f"{BASE}/metadata").headers


# --- no stack traces -----------------------------------------------------------------------

SECRET = "internal detail that must not leak"


def _crash(*args, **kwargs):
    raise RuntimeError(SECRET)


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [False, True])
def test_crash_in_a_view_is_a_bare_500(settings, monkeypatch, debug):
    settings.DEBUG = debug
    monkeypatch.setattr(MetadataView, "get", _crash)
    raw = Client(raise_request_exception=False).get(f"{BASE}/metadata")
    response = FhirResponse(raw)
    assert response.status == 500
    assert response.body["issue"][0]["code"] == "exception"
    assert SECRET not in raw.content.decode()
    assert "Traceback" not in raw.content.decode()
    assert_headers(response, {**EVERY_ANSWER, **FHIR_ANSWER})


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [False, True])
def test_crash_outside_drf_is_a_bare_500(settings, monkeypatch, debug):
    settings.DEBUG = debug
    monkeypatch.setattr(RequestIdMiddleware, "__call__", _crash)
    raw = Client(raise_request_exception=False).get(f"{BASE}/Patient/1")
    response = FhirResponse(raw)
    assert response.status == 500
    assert response.body["issue"][0]["code"] == "exception"
    detail = response.body["issue"][0]["details"]["coding"][0]["code"]
    assert detail == ("MSG_HTTP_500" if debug else "MSG_EXCEPTION")
    assert SECRET not in raw.content.decode()
    assert "Traceback" not in raw.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [False, True])
def test_django_error_pages_under_the_base_are_outcomes(settings, debug):
    settings.DEBUG = debug
    raw = Client().get(f"{BASE}/metadata", headers={"Host": "evil.example"})
    response = FhirResponse(raw)
    assert response.status == 400
    assert response.body["resourceType"] == "OperationOutcome"
    assert "evil.example" not in raw.content.decode()
    raw = Client().get(f"{BASE}/no/such/route")
    assert FhirResponse(raw).status == 404


@pytest.mark.django_db
def test_no_trace_in_any_error_body(api):
    answers = [
        api.request("POST", "/Patient", raw=b'{"resourceType": "Patient", "x": ' + b"[" * 5000),
        api.request("PATCH", "/Patient/1", raw=b"[", content_type="application/json-patch+json"),
        api.get("/Patient?_count=" + "9" * 5000),
        api.get("/Patient/_history?_since=never"),
    ]
    for response in answers:
        text = orjson.dumps(response.body).decode()
        assert 400 <= response.status < 500, response
        assert "Traceback" not in text and 'File "' not in text


# --- CSRF on the admin, sessions for the browser only --------------------------------------


@pytest.mark.django_db
def test_fhir_requests_without_a_session_cookie_skip_the_session_middleware(api, django_user_model):
    # FHIR answers keep every header (above); the request met no session, user or messages.
    answer = Client().get(f"{BASE}/metadata")
    assert answer.status_code == 200
    assert_headers(answer, {**EVERY_ANSWER, **FHIR_ANSWER})
    for attribute in ("session", "user", "_messages", "csrf_processing_done"):
        assert not hasattr(answer.wsgi_request, attribute), attribute
    # The admin, and a FHIR request of a browser session, still run the whole chain.
    assert hasattr(Client().get("/admin/login/").wsgi_request, "session")
    staff = django_user_model.objects.create_superuser("boss", "boss@example.org", "pw-pw-pw")
    browser = Client()
    browser.force_login(staff)
    from_browser = browser.get(f"{BASE}/metadata").wsgi_request
    assert from_browser.user == staff
    assert not hasattr(from_browser, "_messages")  # the FHIR base shows no messages


@pytest.mark.django_db
def test_admin_login_needs_the_csrf_token(django_user_model):
    django_user_model.objects.create_superuser("boss", "boss@example.org", "a-long-password")
    client = Client(enforce_csrf_checks=True)
    credentials = {"username": "boss", "password": "a-long-password", "next": "/admin/"}
    refused = client.post("/admin/login/", credentials)
    assert refused.status_code == 403
    assert "_auth_user_id" not in client.session
    page = client.get("/admin/login/")
    token = page.cookies["csrftoken"].value
    accepted = client.post("/admin/login/", {**credentials, "csrfmiddlewaretoken": token})
    assert accepted.status_code == 302
    assert client.session["_auth_user_id"]


@pytest.mark.django_db
def test_admin_changes_need_the_csrf_token(django_user_model):
    user = django_user_model.objects.create_superuser("boss", "boss@example.org", "pw-pw-pw-pw")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    response = client.post(f"/admin/auth/user/{user.pk}/delete/", {"post": "yes"}, follow=False)
    assert response.status_code == 403
    assert django_user_model.objects.filter(pk=user.pk).exists()

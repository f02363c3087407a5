"""Fixtures of the access-control tests: access control on, clients of two organizations.

The rest of the suite runs with ``FHIR_AUTH`` off (tests/conftest.py); every test here turns
it on. Clients are real django-oauth-toolkit Applications with a ClientProfile, and tokens
are real AccessToken rows (the token endpoint itself is tested in test_tokens.py).
"""

from __future__ import annotations

import secrets
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from oauth2_provider.models import get_access_token_model, get_application_model

from fhirservice.access.models import ClientProfile
from tests.support import FhirClient, FhirResponse

SYSTEM = "urn:test:access"


@pytest.fixture(autouse=True)
def auth_on(settings: Any) -> None:
    """Access control on, as in production."""
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": True}


class TokenClient(FhirClient):
    """A FhirClient that sends ``Authorization: Bearer <token>`` (when it has a token)."""

    def __init__(self, token: str | None, *, client_id: str = "", organization: str = "") -> None:
        super().__init__()
        self.token = token
        self.client_id = client_id
        self.organization = organization

    @property
    def actor(self) -> str:
        """What versions and member events record for this client."""
        return f"client:{self.client_id}"

    def request(self, method: str, path: str, body: Any = None, **kwargs: Any) -> FhirResponse:
        """Send with the bearer token."""
        headers = dict(kwargs.pop("headers", None) or {})
        if self.token is not None:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        return super().request(method, path, body, headers=headers, **kwargs)


def make_client(
    *,
    organization: str = "org-a",
    scopes: str = "system/*.*",
    token_scopes: str | None = None,
    all_organizations: bool = False,
    expired: bool = False,
) -> TokenClient:
    """A registered FHIR client with a fresh token (``token_scopes`` defaults to its allowance)."""
    application_model = get_application_model()
    application = application_model.objects.create(
        name=f"test-{uuid.uuid4()}",
        client_type=application_model.CLIENT_CONFIDENTIAL,
        authorization_grant_type=application_model.GRANT_CLIENT_CREDENTIALS,
    )
    ClientProfile.objects.create(
        application=application,
        organization="" if all_organizations else organization,
        all_organizations=all_organizations,
        allowed_scopes=scopes,
    )
    token = secrets.token_urlsafe(24)
    moment = timezone.now() + (timedelta(seconds=-5) if expired else timedelta(hours=1))
    get_access_token_model().objects.create(
        application=application,
        token=token,
        expires=moment,
        scope=token_scopes if token_scopes is not None else scopes,
    )
    return TokenClient(
        token,
        client_id=application.client_id,
        organization="" if all_organizations else organization,
    )


@pytest.fixture
def org_a(db: None) -> TokenClient:
    """A client of organization org-a with every scope."""
    return make_client(organization="org-a")


@pytest.fixture
def org_b(db: None) -> TokenClient:
    """A client of organization org-b with every scope."""
    return make_client(organization="org-b")


@pytest.fixture
def no_token(db: None) -> TokenClient:
    """A caller without credentials."""
    return TokenClient(None)


def new_identifier() -> dict[str, str]:
    """An identifier no other test uses."""
    return {"system": SYSTEM, "value": f"id-{uuid.uuid4()}"}


def parameters(*items: dict[str, Any]) -> dict[str, Any]:
    """A Parameters resource."""
    return {"resourceType": "Parameters", "parameter": list(items)}


def create_patient(api: FhirClient, identifier: dict[str, str] | None = None) -> str:
    """POST a Patient; its id."""
    body = {"resourceType": "Patient", "identifier": [identifier or new_identifier()]}
    response = api.post("/Patient", body)
    assert response.status == 201, response
    return response.body["id"]


def create_group(api: FhirClient, members: list[str]) -> str:
    """POST a Group with these member references; its id."""
    body = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": ref}} for ref in members],
    }
    response = api.post("/Group", body)
    assert response.status == 201, response
    return response.body["id"]

"""SMART App Launch discovery: ``[base]/.well-known/smart-configuration`` (and at the root).

A public JSON document (no token needed, with ``FHIR_AUTH`` on or off) that tells a backend
service where to get a token and how: the token and revocation endpoints, the
client-credentials grant, client authentication with a shared secret (HTTP Basic or form
body, both accepted by django-oauth-toolkit) or with a signed assertion (``private_key_jwt``,
RS384 or ES384: SMART Backend Services, ``fhirservice.access.assertions``), the system scope
forms we accept, and the SMART capabilities. The CapabilityStatement's ``oauth-uris``
extension names the same token URL (:func:`token_url`).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from fhirservice.access.jwks import ALGORITHMS
from fhirservice.plugins import operation_definitions

# Paths of django-oauth-toolkit's views (routed in fhirservice.urls), below the site root.
TOKEN_PATH = "oauth/token/"  # noqa: S105 (a path, not a secret)
REVOKE_PATH = "oauth/revoke_token/"
# Permission forms a client may ask for on ``*`` (any type but AuditEvent) or any named type.
SCOPE_FORMS = ("cruds", "rs", "cud", "r", "s", "*", "read", "write")
AUTH_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]
CAPABILITIES = [
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "permission-v2",
    "permission-v1",
]


def token_url(root: str) -> str:
    """The absolute URL of the token endpoint, from the absolute URL of the site root."""
    return f"{root.rstrip('/')}/{TOKEN_PATH}"


def scopes_supported() -> list[str]:
    """The system scope forms we accept, for ``scopes_supported``.

    The wildcard forms stand for every type (``system/Patient.rs`` works as well as
    ``system/*.rs``); the audit trail and each ``$operation`` have scopes of their own.
    """
    scopes = [f"system/*.{form}" for form in SCOPE_FORMS]
    scopes.append("system/AuditEvent.rs")
    for definition in operation_definitions():
        scope = f"system/{definition.resource or '*'}.${definition.code}"
        if scope not in scopes:
            scopes.append(scope)
    return scopes


def smart_configuration_document(root: str) -> dict[str, Any]:
    """The discovery document of a server whose site root is at ``root``."""
    return {
        "token_endpoint": token_url(root),
        "revocation_endpoint": f"{root.rstrip('/')}/{REVOKE_PATH}",
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": list(AUTH_METHODS),
        "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "scopes_supported": scopes_supported(),
        "capabilities": list(CAPABILITIES),
    }


@require_GET
def smart_configuration(request: HttpRequest) -> JsonResponse:
    """``GET .well-known/smart-configuration``: public, JSON."""
    return JsonResponse(smart_configuration_document(request.build_absolute_uri("/")))

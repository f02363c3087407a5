"""django-oauth-toolkit policies of the token endpoint (``/oauth/token/``).

Only the client-credentials grant is served. A token request may ask for any SMART system
scopes that the client's allowance covers (``system/Group.r`` when the allowance says
``system/Group.rs``); without a ``scope`` parameter the token gets the whole allowance.
"""

from __future__ import annotations

from typing import Any

from oauth2_provider.oauth2_validators import OAuth2Validator
from oauth2_provider.scopes import BaseScopes

from fhirservice.access.scopes import ScopeSet, parse_scope


def _allowance(application: Any) -> list[str]:
    profile = getattr(application, "fhir_profile", None) if application is not None else None
    if profile is None:
        return []
    return profile.allowed_scopes.split()


class ClientScopes(BaseScopes):
    """Scopes come from each client's profile, not from a global list."""

    def get_all_scopes(self) -> dict[str, str]:
        """Scope names with descriptions, for the library's views (patterns, not a list)."""
        return {
            "system/Type.cruds": "SMART v2 system scope: c r u d s on a type, or * for all",
            "system/Type.$operation": "One $operation on a type",
        }

    def get_available_scopes(
        self, application: Any = None, request: Any = None, *args: Any, **kwargs: Any
    ) -> list[str]:
        """The client's allowance."""
        return _allowance(application)

    def get_default_scopes(
        self, application: Any = None, request: Any = None, *args: Any, **kwargs: Any
    ) -> list[str]:
        """A token request without ``scope`` gets the whole allowance."""
        return _allowance(application)


class FhirOAuth2Validator(OAuth2Validator):
    """Requested scopes must be valid system scopes that the client's allowance covers."""

    def validate_scopes(
        self,
        client_id: str,
        scopes: list[str],
        client: Any,
        request: Any,
        *args: Any,
        **kwargs: Any,
    ) -> bool:
        """True when every requested scope parses and falls within the allowance."""
        if any(parse_scope(scope) is None for scope in scopes):
            return False
        allowance = ScopeSet.parse(" ".join(_allowance(client)))
        return bool(allowance.scopes) and allowance.covers(ScopeSet.parse(" ".join(scopes)))

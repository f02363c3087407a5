"""django-oauth-toolkit policies of the token endpoint (``/oauth/token/``).

Only the client-credentials grant is served. A token request may ask for any SMART system
scopes that the client's allowance covers (``system/Group.r`` when the allowance says
``system/Group.rs``); without a ``scope`` parameter the token gets the whole allowance.

Secret guessing is throttled (:class:`TokenFailureThrottle`): after
``TOKEN_FAILURES_PER_MINUTE`` failed client authentications within a minute for one client
id, or from one remote address, the token and revocation endpoints answer 429
``{"error": "slow_down"}`` with ``Retry-After`` to that client id or address until the
oldest failure is a minute old.
"""

from __future__ import annotations

import base64
import hashlib
import math
from typing import Any
from urllib.parse import unquote_plus

import orjson
from django.http import HttpRequest, HttpResponse, JsonResponse
from oauth2_provider import views as oauth2_views
from oauth2_provider.oauth2_validators import OAuth2Validator
from oauth2_provider.scopes import BaseScopes
from rest_framework.throttling import SimpleRateThrottle

from fhirservice.access.scopes import ScopeSet, parse_scope
from fhirservice.conf import fhir_settings

MSG_SLOW_DOWN = "Too many failed client authentications; retry after {wait} seconds"


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


def _client_id(request: HttpRequest) -> str:
    """The client id a token request authenticates as (HTTP Basic, else the form body)."""
    scheme, _, credentials = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return ""
        return unquote_plus(decoded.split(":", 1)[0])
    client_id = request.POST.get("client_id", "")
    return client_id if isinstance(client_id, str) else ""


class TokenFailureThrottle(SimpleRateThrottle):
    """Failed client authentications at the token endpoints, per client id and per address.

    Only failures count (a client that knows its secret is never slowed down by its own
    successes); once either bucket holds ``TOKEN_FAILURES_PER_MINUTE`` failures of the last
    minute, every request of that client id or address is refused, right secret or not.
    Counts live in Django's default cache, like :class:`~fhirservice.rest.limits.
    ClientRateThrottle`'s: per process with the local-memory cache, shared with
    Redis/Memcached. ``TOKEN_FAILURES_PER_MINUTE`` 0 switches it off.
    """

    scope = "oauth-failures"

    def get_rate(self) -> str | None:
        """The rate from the service settings (None: off)."""
        limit = fhir_settings.TOKEN_FAILURES_PER_MINUTE
        return f"{limit}/min" if limit else None

    def _keys(self, request: HttpRequest) -> list[str]:
        idents = [f"addr:{self.get_ident(request)}"]
        client_id = _client_id(request)
        if client_id:
            # Hashed: a client id is any string, cache keys are not.
            idents.append("client:" + hashlib.sha256(client_id.encode()).hexdigest()[:32])
        return [self.cache_format % {"scope": self.scope, "ident": ident} for ident in idents]

    def _recent(self, key: str, moment: float) -> list[float]:
        return [t for t in self.cache.get(key, []) if t > moment - self.duration]

    def wait_for(self, request: HttpRequest) -> int | None:
        """Seconds until ``request``'s client id and address may try again; None: now."""
        if self.rate is None:
            return None
        moment = self.timer()
        waits = []
        for key in self._keys(request):
            history = self._recent(key, moment)
            if len(history) >= self.num_requests:
                waits.append(self.duration - (moment - history[-1]))
        return max(1, math.ceil(max(waits))) if waits else None

    def record_failure(self, request: HttpRequest) -> None:
        """Count one failed client authentication of ``request``."""
        if self.rate is None:
            return
        moment = self.timer()
        for key in self._keys(request):
            self.cache.set(key, [moment, *self._recent(key, moment)], self.duration)


def _client_authentication_failed(response: HttpResponse) -> bool:
    if response.status_code == 401:
        return True
    try:
        body = orjson.loads(response.content)
    except (orjson.JSONDecodeError, ValueError):
        return False
    return isinstance(body, dict) and body.get("error") == "invalid_client"


def slow_down(wait: int) -> JsonResponse:
    """The 429 of a throttled token request: an OAuth error body with Retry-After."""
    response = JsonResponse(
        {"error": "slow_down", "error_description": MSG_SLOW_DOWN.format(wait=wait)}, status=429
    )
    response["Retry-After"] = str(wait)
    response["Cache-Control"] = "no-store"
    return response


class FailureThrottledMixin:
    """Refuse a throttled client id or address first; count the failures of the rest."""

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        """The endpoint's answer, or 429 ``slow_down``."""
        throttle = TokenFailureThrottle()
        wait = throttle.wait_for(request)
        if wait is not None:
            return slow_down(wait)
        response = super().post(request, *args, **kwargs)  # type: ignore[misc]
        if _client_authentication_failed(response):
            throttle.record_failure(request)
        return response


class TokenView(FailureThrottledMixin, oauth2_views.TokenView):
    """``/oauth/token/`` with failed client authentications throttled."""


class RevokeTokenView(FailureThrottledMixin, oauth2_views.RevokeTokenView):
    """``/oauth/revoke_token/`` (it authenticates clients too) with failures throttled."""

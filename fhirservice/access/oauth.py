"""django-oauth-toolkit policies of the token endpoint (``/oauth/token/``).

Only the client-credentials grant is served. A token request may ask for any SMART system
scopes that the client's allowance covers (``system/Group.r`` when the allowance says
``system/Group.rs``); without a ``scope`` parameter the token gets the whole allowance.

Clients authenticate with their secret (``client_secret_basic``, ``client_secret_post``) or,
when registered with a key set, with a signed assertion (``private_key_jwt``, SMART Backend
Services; checked by ``fhirservice.access.assertions``). A key-set client's secret is never
accepted, and a request using two methods at once is refused (``invalid_request``).

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

import jwt
import orjson
from django.http import HttpRequest, HttpResponse, JsonResponse
from oauth2_provider import views as oauth2_views
from oauth2_provider.oauth2_validators import OAuth2Validator
from oauth2_provider.scopes import BaseScopes
from oauthlib.oauth2.rfc6749 import errors as oauth_errors
from rest_framework.throttling import SimpleRateThrottle

from fhirservice.access.assertions import (
    JWT_BEARER,
    MAX_ASSERTION_CHARS,
    MSG_ASSERTION_TYPE,
    AssertionRefused,
    assertion_client,
    reset_audience,
    set_audience,
)
from fhirservice.access.scopes import ScopeSet, parse_scope
from fhirservice.access.smart import token_url
from fhirservice.conf import fhir_settings

MSG_SLOW_DOWN = "Too many failed client authentications; retry after {wait} seconds"
MSG_TWO_METHODS = "Use one client authentication method: a client assertion or a secret"
MSG_ASSERTION_MISSING = "client_assertion_type was sent without a client_assertion"
MSG_ASSERTION_REQUIRED = (
    "This client is registered with a key set: authenticate with a signed client assertion "
    "(private_key_jwt)"
)


def _allowance(application: Any) -> list[str]:
    profile = getattr(application, "fhir_profile", None) if application is not None else None
    if profile is None:
        return []
    return profile.allowed_scopes.split()


def _sends_assertion(request: Any) -> bool:
    """Whether an oauthlib request tries ``private_key_jwt`` (either parameter is there)."""
    return any(
        getattr(request, name, None) is not None
        for name in ("client_assertion_type", "client_assertion")
    )


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

    def authenticate_client(self, request: Any, *args: Any, **kwargs: Any) -> bool:
        """A signed client assertion when one is sent, else the secret (Basic or body).

        A refused assertion raises ``invalid_client`` with the reason as its description;
        the secret of a client registered with a key set is refused the same way.
        """
        assertion_type = getattr(request, "client_assertion_type", None)
        assertion = getattr(request, "client_assertion", None)
        if not _sends_assertion(request):
            if not super().authenticate_client(request, *args, **kwargs):
                return False
            profile = getattr(request.client, "fhir_profile", None)
            if profile is not None and profile.uses_keys:
                raise oauth_errors.InvalidClientError(
                    description=MSG_ASSERTION_REQUIRED, request=request
                )
            return True
        if self._extract_basic_auth(request) or getattr(request, "client_secret", None):
            raise oauth_errors.InvalidRequestError(description=MSG_TWO_METHODS, request=request)
        if not assertion:
            raise oauth_errors.InvalidRequestError(
                description=MSG_ASSERTION_MISSING, request=request
            )
        if assertion_type != JWT_BEARER:
            raise oauth_errors.InvalidClientError(description=MSG_ASSERTION_TYPE, request=request)
        try:
            request.client = assertion_client(
                assertion, client_id=getattr(request, "client_id", None)
            )
        except AssertionRefused as exc:
            raise oauth_errors.InvalidClientError(description=str(exc), request=request) from exc
        return True


def _client_id(request: HttpRequest) -> str:
    """The client id a token request authenticates as (HTTP Basic, else the form body, else
    the unverified issuer of a client assertion)."""
    scheme, _, credentials = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            return ""
        return unquote_plus(decoded.split(":", 1)[0])
    client_id = request.POST.get("client_id", "")
    if client_id:
        return client_id if isinstance(client_id, str) else ""
    assertion = request.POST.get("client_assertion", "")
    if len(assertion) > MAX_ASSERTION_CHARS:
        return ""
    try:
        issuer = jwt.decode(assertion, options={"verify_signature": False}).get("iss")
    except (jwt.PyJWTError, AttributeError):
        return ""
    return issuer if isinstance(issuer, str) else ""


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
    """Refuse a throttled client id or address first; count the failures of the rest.

    Client assertions are checked against this request's token endpoint URL (their
    audience), which only the Django request knows.
    """

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        """The endpoint's answer, or 429 ``slow_down``."""
        throttle = TokenFailureThrottle()
        wait = throttle.wait_for(request)
        if wait is not None:
            return slow_down(wait)
        audience = set_audience(token_url(request.build_absolute_uri("/")))
        try:
            response = super().post(request, *args, **kwargs)  # type: ignore[misc]
        finally:
            reset_audience(audience)
        if _client_authentication_failed(response):
            throttle.record_failure(request)
        return response


class TokenView(FailureThrottledMixin, oauth2_views.TokenView):
    """``/oauth/token/`` with failed client authentications throttled."""


class RevokeTokenView(FailureThrottledMixin, oauth2_views.RevokeTokenView):
    """``/oauth/revoke_token/`` (it authenticates clients too) with failures throttled."""

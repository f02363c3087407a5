"""SMART Backend Services client authentication: checking a signed client assertion.

A backend client registered with a JWK Set (``fhirservice.access.jwks``) asks for a token
with ``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`` and a
``client_assertion`` JWT it signed with its private key (``private_key_jwt``, RFC 7523 §2.2,
SMART App Launch 2.x *client-confidential-asymmetric*). :func:`assertion_client` accepts
the assertion only when, in this order:

1. it is a JWS of at most :data:`MAX_ASSERTION_CHARS` characters, signed with RS384 or
   ES384 (``none`` and HMAC algorithms are refused before any key is looked at, so a public
   key can never be used as an HMAC secret) and naming its key with ``kid``;
2. ``iss`` and ``sub`` are both the client id of a registered client with a key set (and
   equal to the ``client_id`` form parameter when one is sent);
3. a key of that set with the same ``kid`` and the algorithm's key type verifies the
   signature (a ``jku`` header, when present, must be the registered JWKS URL; a client
   registered with an inline key set may send none);
4. ``aud`` is the token endpoint's absolute URL, the one ``.well-known/smart-configuration``
   advertises; ``exp`` has not passed and is at most :data:`MAX_LIFETIME_SECONDS` ahead
   (``iat`` and ``nbf``, when present, are not in the future), each with
   :data:`CLOCK_SKEW_SECONDS` of tolerance;
5. its ``jti`` was never accepted for this client before: accepted ids are rows of
   :class:`~fhirservice.access.models.AssertionJti` until the assertion expires, so a replay
   is refused by every worker process; expired rows are purged as new ones are written.

Anything else raises :class:`AssertionRefused`, which the token endpoint answers with
``invalid_client`` (RFC 7521 §4.2.1: an invalid client assertion is a failed client
authentication) and the message as ``error_description``.
"""

from __future__ import annotations

import contextvars
import hashlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from django.db import IntegrityError, transaction
from django.utils import timezone
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from oauth2_provider.models import get_application_model

from fhirservice.access.jwks import (
    ALGORITHMS,
    JwksError,
    jwks_of_url,
    parse_jwks,
    verification_keys,
)
from fhirservice.access.models import AssertionJti

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_CHARS = 16 * 1024
MAX_LIFETIME_SECONDS = 5 * 60
CLOCK_SKEW_SECONDS = 30
MAX_JTI_CHARS = 255
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "jti"]

MSG_ASSERTION_TYPE = f"client_assertion_type must be {JWT_BEARER}"
MSG_ASSERTION_MALFORMED = "The client assertion is not a signed JWT"
MSG_ASSERTION_TOO_LONG = f"The client assertion is longer than {MAX_ASSERTION_CHARS} characters"
MSG_ALGORITHM = "The client assertion must be signed with RS384 or ES384, not {alg!r}"
MSG_KID_MISSING = "The client assertion's header must name its key ('kid')"
MSG_ISS_SUB = "The client assertion's 'iss' and 'sub' must both be the client id"
MSG_CLIENT_ID_MISMATCH = "client_id differs from the client assertion's 'iss'"
MSG_UNKNOWN_CLIENT = "No client is registered with the client id {client_id!r}"
MSG_NO_KEY_SET = "The client has no registered key set: it authenticates with its secret"
MSG_JKU = "The client assertion's 'jku' is not the client's registered JWKS URL"
MSG_NO_KEY = "The client's key set has no {alg} key with kid {kid!r}"
MSG_SIGNATURE = "The client assertion's signature does not verify with the key {kid!r}"
MSG_AUDIENCE = "The client assertion's 'aud' must be the token endpoint URL {url!r}"
MSG_EXPIRED = "The client assertion has expired"
MSG_NOT_YET_VALID = "The client assertion is not valid yet ('iat' or 'nbf' in the future)"
MSG_CLAIM_MISSING = "The client assertion lacks the claim {claim!r}"
MSG_CLAIM_INVALID = "The client assertion has an invalid claim: {reason}"
MSG_EXP_TOO_FAR = (
    f"The client assertion's 'exp' is more than {MAX_LIFETIME_SECONDS} seconds in the future"
)
MSG_JTI = f"The client assertion's 'jti' must be a string of 1 to {MAX_JTI_CHARS} characters"
MSG_REPLAY = "The client assertion's 'jti' was used before: sign a new assertion per request"
MSG_NO_AUDIENCE = "The token endpoint URL is not known for this request"

# The absolute URL of the token endpoint of the request being served: the audience an
# assertion must name. Set by the token and revocation views (fhirservice.access.oauth),
# which see the Django request; oauthlib's request only has the path.
_audience: contextvars.ContextVar[str] = contextvars.ContextVar("assertion_audience", default="")


class AssertionRefused(Exception):
    """A client assertion that authenticates no client; the message says why."""


def set_audience(url: str) -> contextvars.Token[str]:
    """Make ``url`` the audience assertions must name, for the request being served."""
    return _audience.set(url)


def reset_audience(token: contextvars.Token[str]) -> None:
    """Restore the audience that was set before :func:`set_audience`."""
    _audience.reset(token)


def _claims_unverified(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise AssertionRefused(MSG_ASSERTION_MALFORMED) from exc
    return header, claims


def _profile(client_id: str) -> Any:
    try:
        application = (
            get_application_model()
            .objects.select_related("fhir_profile")
            .filter(client_id=client_id)
            .first()
        )
    except ValueError:  # a NUL byte, which PostgreSQL refuses to compare
        application = None
    profile = getattr(application, "fhir_profile", None) if application is not None else None
    if profile is None:
        raise AssertionRefused(MSG_UNKNOWN_CLIENT.format(client_id=client_id))
    if not profile.uses_keys:
        raise AssertionRefused(MSG_NO_KEY_SET)
    return profile


def _keys(profile: Any, header: dict[str, Any], alg: str) -> list[jwt.PyJWK]:
    kid = header["kid"]
    # A jku names where the key set is: only the registered URL may be named, and a client
    # registered with an inline set has none.
    if "jku" in header and header["jku"] != profile.jwks_url:
        raise AssertionRefused(MSG_JKU)
    try:
        if profile.jwks:
            return verification_keys(parse_jwks(profile.jwks), kid=kid, alg=alg)
        keys = verification_keys(jwks_of_url(profile.jwks_url), kid=kid, alg=alg)
        if not keys:  # perhaps a rotated key: look again, if the cached set is not fresh
            keys = verification_keys(jwks_of_url(profile.jwks_url, refresh=True), kid=kid, alg=alg)
    except JwksError as exc:
        raise AssertionRefused(str(exc)) from exc
    return keys


def _verify(assertion: str, keys: list[jwt.PyJWK], *, alg: str, kid: str, client_id: str) -> dict:
    audience = _audience.get()
    if not audience:
        raise AssertionRefused(MSG_NO_AUDIENCE)
    for index, key in enumerate(keys):
        try:
            return jwt.decode(
                assertion,
                key,
                algorithms=[alg],
                audience=audience,
                issuer=client_id,
                subject=client_id,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": REQUIRED_CLAIMS},
            )
        except jwt.InvalidSignatureError as exc:
            if index == len(keys) - 1:
                raise AssertionRefused(MSG_SIGNATURE.format(kid=kid)) from exc
        except jwt.InvalidAudienceError as exc:
            raise AssertionRefused(MSG_AUDIENCE.format(url=audience)) from exc
        except jwt.ExpiredSignatureError as exc:
            raise AssertionRefused(MSG_EXPIRED) from exc
        except jwt.ImmatureSignatureError as exc:
            raise AssertionRefused(MSG_NOT_YET_VALID) from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AssertionRefused(MSG_CLAIM_MISSING.format(claim=exc.claim)) from exc
        except (jwt.InvalidIssuerError, InvalidSubjectError) as exc:
            raise AssertionRefused(MSG_ISS_SUB) from exc
        except InvalidJTIError as exc:
            raise AssertionRefused(MSG_JTI) from exc
        except jwt.PyJWTError as exc:
            raise AssertionRefused(MSG_CLAIM_INVALID.format(reason=exc)) from exc
    raise AssertionRefused(MSG_NO_KEY.format(alg=alg, kid=kid))


def _record_jti(client_id: str, jti: str, exp: int) -> None:
    """Remember ``jti`` until the assertion expires; AssertionRefused when it is remembered."""
    now = timezone.now()
    key = hashlib.sha256(f"{client_id}\x00{jti}".encode()).hexdigest()
    # Expired ids are forgotten first, so a jti may come back once its assertion is dead.
    AssertionJti.objects.filter(expires__lte=now).delete()
    expires = datetime.fromtimestamp(exp, tz=UTC) + timedelta(seconds=CLOCK_SKEW_SECONDS)
    try:
        with transaction.atomic():
            AssertionJti.objects.create(key=key, client_id=client_id, expires=expires)
    except IntegrityError as exc:
        raise AssertionRefused(MSG_REPLAY) from exc


def assertion_client(assertion: str, *, client_id: str | None = None) -> Any:
    """The OAuth2 Application a client assertion authenticates; AssertionRefused otherwise.

    ``client_id`` is the token request's ``client_id`` parameter (optional, but when sent it
    must be the assertion's issuer). The audience is the one :func:`set_audience` set.
    """
    if len(assertion) > MAX_ASSERTION_CHARS:
        raise AssertionRefused(MSG_ASSERTION_TOO_LONG)
    header, claims = _claims_unverified(assertion)
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise AssertionRefused(MSG_ALGORITHM.format(alg=alg))
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AssertionRefused(MSG_KID_MISSING)
    issuer = claims.get("iss")
    if not isinstance(issuer, str) or not issuer or claims.get("sub") != issuer:
        raise AssertionRefused(MSG_ISS_SUB)
    if client_id and client_id != issuer:
        raise AssertionRefused(MSG_CLIENT_ID_MISMATCH)
    profile = _profile(issuer)
    verified = _verify(assertion, _keys(profile, header, alg), alg=alg, kid=kid, client_id=issuer)
    exp = verified["exp"]
    if exp > time.time() + MAX_LIFETIME_SECONDS + CLOCK_SKEW_SECONDS:
        raise AssertionRefused(MSG_EXP_TOO_FAR)
    jti = verified["jti"]
    if not isinstance(jti, str) or not 1 <= len(jti) <= MAX_JTI_CHARS:
        raise AssertionRefused(MSG_JTI)
    _record_jti(issuer, jti, int(exp))
    return profile.application

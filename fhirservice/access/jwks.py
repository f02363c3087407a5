"""The public keys of SMART Backend Services clients: JWK Sets, inline or behind a JWKS URL.

A client that authenticates with ``private_key_jwt`` is registered with a JWK Set (RFC 7517)
of public keys: inline (``ClientProfile.jwks``) or at a URL (``ClientProfile.jwks_url``).

- :func:`parse_jwks` checks a set at registration and whenever one is fetched: a JSON object
  whose ``keys`` hold at least one RSA or EC (P-384) public key, none with private members.
- :func:`jwks_of_url` fetches a set over https (http only on a loopback host, and only when
  ``JWKS_ALLOW_HTTP_LOOPBACK`` is on), with ``JWKS_FETCH_TIMEOUT``, at most
  :data:`MAX_JWKS_BYTES`, no redirects (a redirect could leave https), and keeps it in
  Django's default cache for ``JWKS_CACHE_SECONDS``. A ``kid`` not in the cached set
  refetches it (key rotation), at most once per :data:`REFETCH_SECONDS` per URL.
- :func:`verification_keys` picks the keys that may verify an assertion: same ``kid``, key
  type of the algorithm, and no ``alg``/``use``/``key_ops`` member that says otherwise.
- :func:`jwk_of_pem` turns a PEM public key (what ``openssl pkey -pubout`` writes) into a
  JWK whose ``kid`` is its RFC 7638 thumbprint, for registering a key without JOSE tools.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from django.core.cache import cache
from jwt import PyJWK
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from jwt.exceptions import PyJWKError

from fhirservice.conf import fhir_settings

log = logging.getLogger(__name__)

# The signing algorithms SMART Backend Services requires servers to support, with the key
# type (and curve) each one needs. Nothing else is accepted: no "none", no HMAC.
ALGORITHMS = {"RS384": ("RSA", None), "ES384": ("EC", "P-384")}
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MAX_JWKS_BYTES = 64 * 1024
REFETCH_SECONDS = 30
LOOPBACK_NAMES = frozenset({"localhost"})
MAX_URL_CHARS = 500  # ClientProfile.jwks_url
MIN_RSA_BITS = 2048
# The members of each key type that its RFC 7638 thumbprint hashes, in lexical order.
THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y")}

MSG_JWKS_NOT_JSON = "The JWK Set is not a JSON object with a 'keys' array"
MSG_JWKS_PRIVATE = (
    "The JWK Set holds private key material (member {member!r}): register public keys only"
)
MSG_JWKS_BAD_KEY = "Key {index} of the JWK Set is not a valid {kty} public key: {reason}"
MSG_JWKS_NO_USABLE_KEY = (
    "The JWK Set has no key usable for RS384 or ES384 (an RSA key, or an EC key on P-384, "
    "each with a 'kid')"
)
MSG_JWKS_URL_SCHEME = (
    f"A JWKS URL must be an https:// URL of at most {MAX_URL_CHARS} characters (http:// only "
    "on a loopback host when FHIR_JWKS_ALLOW_HTTP_LOOPBACK is on): {url!r}"
)
MSG_JWKS_FETCH = "The client's JWKS URL could not be fetched: {reason}"
MSG_JWKS_TOO_LARGE = f"The JWK Set is larger than {MAX_JWKS_BYTES} bytes"
MSG_PEM_NOT_PUBLIC_KEY = "Not a PEM public key (openssl pkey -pubout writes one): {reason}"
MSG_PEM_KEY_TYPE = (
    f"Only RSA keys of at least {MIN_RSA_BITS} bits (RS384) and EC keys on P-384 (ES384) "
    "can sign client assertions"
)


class JwksError(ValueError):
    """A JWK Set or JWKS URL that cannot be used; the message says why."""


def _is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_jwks_url(url: str) -> str:
    """``url`` if it may be fetched under the current settings; JwksError otherwise."""
    parts = urlsplit(url)
    if not parts.hostname or len(url) > MAX_URL_CHARS:
        raise JwksError(MSG_JWKS_URL_SCHEME.format(url=url))
    if parts.scheme == "https":
        return url
    if (
        parts.scheme == "http"
        and fhir_settings.JWKS_ALLOW_HTTP_LOOPBACK
        and _is_loopback(parts.hostname)
    ):
        return url
    raise JwksError(MSG_JWKS_URL_SCHEME.format(url=url))


def _usable(key: dict[str, Any], alg: str) -> bool:
    kty, crv = ALGORITHMS[alg]
    if key.get("kty") != kty or (crv is not None and key.get("crv") != crv):
        return False
    if "alg" in key and key["alg"] != alg:
        return False
    if "use" in key and key["use"] != "sig":
        return False
    ops = key.get("key_ops")
    return ops is None or (isinstance(ops, list) and "verify" in ops)


def parse_jwks(raw: str | bytes) -> list[dict[str, Any]]:
    """The keys of a JWK Set document, checked; JwksError says what is wrong with it.

    Keys of other types or curves may stay in the set (a client may publish keys for other
    servers); the set must hold at least one key with a ``kid`` usable for RS384 or ES384.
    """
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise JwksError(MSG_JWKS_NOT_JSON) from exc
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list) or not all(isinstance(key, dict) for key in keys):
        raise JwksError(MSG_JWKS_NOT_JSON)
    usable = 0
    for index, key in enumerate(keys):
        private = sorted(PRIVATE_MEMBERS & set(key))
        if private:
            raise JwksError(MSG_JWKS_PRIVATE.format(member=private[0]))
        for alg in ALGORITHMS:
            if not _usable(key, alg):
                continue
            try:
                PyJWK(key, algorithm=alg)
            except (PyJWKError, ValueError, TypeError, KeyError) as exc:
                raise JwksError(
                    MSG_JWKS_BAD_KEY.format(index=index, kty=key.get("kty"), reason=exc)
                ) from exc
            if isinstance(key.get("kid"), str) and key["kid"]:
                usable += 1
    if not usable:
        raise JwksError(MSG_JWKS_NO_USABLE_KEY)
    return keys


def verification_keys(keys: list[dict[str, Any]], *, kid: str, alg: str) -> list[PyJWK]:
    """The keys of a set that may verify a signature made with ``alg`` by key ``kid``."""
    found = []
    for key in keys:
        if key.get("kid") == kid and _usable(key, alg):
            try:
                found.append(PyJWK(key, algorithm=alg))
            except (PyJWKError, ValueError, TypeError, KeyError):
                continue  # parse_jwks refused such keys; a changed set may still hold one
    return found


def thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding."""
    members = {name: jwk[name] for name in THUMBPRINT_MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(orjson.dumps(members, option=orjson.OPT_SORT_KEYS)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def jwk_of_pem(pem: bytes) -> dict[str, Any]:
    """The public JWK of a PEM public key, with ``alg``, ``use`` and its thumbprint as kid."""
    try:
        public = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise JwksError(MSG_PEM_NOT_PUBLIC_KEY.format(reason=exc)) from exc
    if isinstance(public, rsa.RSAPublicKey) and public.key_size >= MIN_RSA_BITS:
        jwk, alg = RSAAlgorithm.to_jwk(public, as_dict=True), "RS384"
    elif isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP384R1):
        jwk, alg = ECAlgorithm.to_jwk(public, as_dict=True), "ES384"
    else:
        raise JwksError(MSG_PEM_KEY_TYPE)
    public_members = {name: jwk[name] for name in THUMBPRINT_MEMBERS[jwk["kty"]]}
    return {**public_members, "kid": thumbprint(public_members), "alg": alg, "use": "sig"}


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect answers as an error: the target could be http:// or another host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirects)


def _download(url: str) -> bytes:
    check_jwks_url(url)  # https (or loopback http when allowed): never file: or the like
    request = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
    try:
        with _opener.open(request, timeout=fhir_settings.JWKS_FETCH_TIMEOUT) as response:
            if response.status != 200:
                raise JwksError(MSG_JWKS_FETCH.format(reason=f"HTTP {response.status}"))
            body = response.read(MAX_JWKS_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise JwksError(MSG_JWKS_FETCH.format(reason=f"HTTP {exc.code}")) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise JwksError(MSG_JWKS_FETCH.format(reason=exc)) from exc
    if len(body) > MAX_JWKS_BYTES:
        raise JwksError(MSG_JWKS_TOO_LARGE)
    return body


def _cache_key(url: str) -> str:
    return "fhir-jwks:" + hashlib.sha256(url.encode("utf-8")).hexdigest()


def jwks_of_url(url: str, *, refresh: bool = False) -> list[dict[str, Any]]:
    """The keys at ``url``: from the cache, else fetched (and cached); JwksError when neither.

    ``refresh`` asks for a fresh copy (a ``kid`` was not in the cached one); it is fetched
    unless the cached copy is younger than :data:`REFETCH_SECONDS`, and a failed refetch
    keeps answering with the cached copy.
    """
    key = _cache_key(url)
    cached = cache.get(key)
    if cached is not None and (not refresh or time.time() - cached[0] < REFETCH_SECONDS):
        return cached[1]
    try:
        keys = parse_jwks(_download(url))
    except JwksError:
        if cached is not None:
            log.warning("JWKS refetch of %s failed; keeping the cached set", url, exc_info=True)
            return cached[1]
        raise
    if fhir_settings.JWKS_CACHE_SECONDS:
        cache.set(key, (time.time(), keys), fhir_settings.JWKS_CACHE_SECONDS)
    return keys

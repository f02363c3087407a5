"""SMART Backend Services: clients with a key set get tokens with signed client assertions
(``private_key_jwt``, RS384 and ES384); every malformed, forged, stale or replayed assertion
is refused with ``invalid_client`` and no token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone
from jwcrypto.jwk import JWK
from oauth2_provider.models import get_access_token_model

from fhirservice.access import assertions, jwks, oauth
from fhirservice.access.assertions import JWT_BEARER
from fhirservice.access.jwks import (
    MSG_JWKS_NO_USABLE_KEY,
    MSG_JWKS_PRIVATE,
    MSG_JWKS_URL_SCHEME,
    JwksError,
    jwks_of_url,
)
from fhirservice.access.models import MSG_BOTH_KEY_SOURCES, AssertionJti, ClientProfile
from fhirservice.models import ResourceVersion
from tests.access.conftest import TokenClient, create_patient, make_client
from tests.access.test_tokens import create_client, token_request
from tests.operations.test_export import (
    create,
    exported,
    kick_off,
    manifest,
    observation,
    raw,
    run_jobs,
)
from tests.operations.test_export import group as export_group
from tests.support import patient

TOKEN_URL = "http://testserver/oauth/token/"


class KeyPair:
    """A private key and its public JWK (with a kid), for one algorithm."""

    def __init__(self, alg: str, kid: str | None = None) -> None:
        self.alg = alg
        self.kid = kid or f"{alg.lower()}-{uuid.uuid4().hex[:8]}"
        if alg == "RS384":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            public = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ec.generate_private_key(ec.SECP384R1())
            public = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk = {**public, "kid": self.kid, "alg": alg, "use": "sig"}

    @property
    def public_pem(self) -> bytes:
        """The public key in PEM (what a key-confusion attack uses as an HMAC secret)."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        """A JWT of ``claims`` signed with this key, header kid (unless overridden)."""
        return jwt.encode(
            claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **header}
        )


@pytest.fixture(scope="module")
def rsa_key() -> KeyPair:
    return KeyPair("RS384")


@pytest.fixture(scope="module")
def ec_key() -> KeyPair:
    return KeyPair("ES384")


@pytest.fixture(scope="module")
def other_rsa_key() -> KeyPair:
    return KeyPair("RS384")


@pytest.fixture(params=["RS384", "ES384"])
def key(request: pytest.FixtureRequest, rsa_key: KeyPair, ec_key: KeyPair) -> KeyPair:
    """Each supported algorithm in turn."""
    return rsa_key if request.param == "RS384" else ec_key


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    """No cached key sets or throttle counts from other tests."""
    cache.clear()
    yield
    cache.clear()


def jwks_document(*keys: KeyPair) -> str:
    return json.dumps({"keys": [k.jwk for k in keys]})


def register(tmp_path: Path, *keys: KeyPair, scopes: str = "system/*.*", org: str = "org-a"):
    """A key-set client registered with the command (--jwks-file); its client id."""
    path = tmp_path / f"jwks-{uuid.uuid4().hex}.json"
    path.write_text(jwks_document(*keys))
    out = io.StringIO()
    call_command(
        "create_fhir_client",
        "--name",
        f"backend-{uuid.uuid4().hex[:8]}",
        "--organization",
        org,
        "--scopes",
        scopes,
        "--jwks-file",
        str(path),
        stdout=out,
    )
    return re.search(r"client_id:\s+(\S+)", out.getvalue()).group(1)


def claims(client_id: str, **changes: Any) -> dict[str, Any]:
    """Good claims of an assertion of ``client_id``; ``changes`` override (None: drop)."""
    now = int(time.time())
    good = {
        "iss": client_id,
        "sub": client_id,
        "aud": TOKEN_URL,
        "exp": now + 240,
        "jti": uuid.uuid4().hex,
    }
    good.update(changes)
    return {k: v for k, v in good.items() if v is not None}


def request_token(assertion: str, *, meta: dict[str, str] | None = None, **data: str) -> Any:
    """POST a token request authenticated by ``assertion`` (``meta``: WSGI environ extras)."""
    return Client().post(
        "/oauth/token/",
        {
            "grant_type": "client_credentials",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
            **data,
        },
        **(meta or {}),
    )


def token_of(response: Any) -> str:
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["token_type"] == "Bearer"
    return body["access_token"]


def assert_refused(response: Any, message: str, *, error: str = "invalid_client") -> None:
    assert response.status_code == (401 if error == "invalid_client" else 400), response.content
    body = response.json()
    assert body["error"] == error
    assert body["error_description"] == message
    assert "access_token" not in body


def tokens_of(client_id: str) -> int:
    return get_access_token_model().objects.filter(application__client_id=client_id).count()


def forged(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A JWT built by hand: HS256 with ``secret``, or unsigned (alg none) without one."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    signing_input = f"{part(header)}.{part(payload)}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


# -- Good assertions --------------------------------------------------------------------------


def test_a_good_assertion_gets_a_token_that_works_on_the_api(
    key: KeyPair, tmp_path: Path, db: None
) -> None:
    client_id = register(tmp_path, key)
    response = request_token(key.sign(claims(client_id)))
    body = response.json()
    assert body["scope"] == "system/*.*"
    api = TokenClient(token_of(response), client_id=client_id, organization="org-a")
    pid = create_patient(api)
    read = api.get(f"/Patient/{pid}")
    assert read.status == 200
    security = read.body["meta"]["security"]
    assert {"system": "https://fhirservice.example/organization", "code": "org-a"} in security
    assert ResourceVersion.objects.get(key=f"Patient/{pid}/_history/1").actor == api.actor
    # The other organization's secret client does not see it.
    assert make_client(organization="org-b").get(f"/Patient/{pid}").status == 404


def test_a_set_with_both_key_types_serves_both(
    rsa_key: KeyPair, ec_key: KeyPair, tmp_path: Path, db: None
) -> None:
    client_id = register(tmp_path, rsa_key, ec_key)
    assert token_of(request_token(rsa_key.sign(claims(client_id))))
    assert token_of(request_token(ec_key.sign(claims(client_id))))


def test_client_id_in_the_form_and_aud_as_a_list_are_accepted(
    key: KeyPair, tmp_path: Path, db: None
) -> None:
    client_id = register(tmp_path, key)
    assertion = key.sign(claims(client_id, aud=[TOKEN_URL, "https://other.example/"]))
    assert token_of(request_token(assertion, client_id=client_id))


def test_the_granted_scopes_restrict_the_api_as_for_secret_clients(
    key: KeyPair, tmp_path: Path, db: None
) -> None:
    client_id = register(tmp_path, key, scopes="system/Patient.rs")
    response = request_token(key.sign(claims(client_id)))
    assert response.json()["scope"] == "system/Patient.rs"
    api = TokenClient(token_of(response))
    assert api.get("/Patient").status == 200
    assert api.post("/Patient", {"resourceType": "Patient"}).status == 403
    assert api.get("/Group").status == 403
    # Less than the allowance may be asked for; more may not.
    narrow = TokenClient(
        token_of(request_token(key.sign(claims(client_id)), scope="system/Patient.r"))
    )
    assert narrow.get("/Patient").status == 403  # no s
    assert narrow.get("/Patient/unknown").status == 404
    for scope in ("system/*.rs", "system/Group.rs", "system/Patient.cruds", "user/Patient.rs"):
        refused = request_token(key.sign(claims(client_id)), scope=scope)
        assert refused.status_code == 400, scope
        assert refused.json()["error"] == "invalid_scope"
    assert tokens_of(client_id) == 2


def test_v1_scopes(key: KeyPair, tmp_path: Path, db: None) -> None:
    client_id = register(tmp_path, key, scopes="system/*.read")
    api = TokenClient(token_of(request_token(key.sign(claims(client_id)))))
    assert api.get("/Patient").status == 200
    assert api.get("/Group").status == 200
    assert api.post("/Patient", {"resourceType": "Patient"}).status == 403
    assert api.get("/AuditEvent").status == 403


# -- Refused assertions -----------------------------------------------------------------------


def test_a_bad_signature(key: KeyPair, tmp_path: Path, db: None) -> None:
    client_id = register(tmp_path, key)
    head, payload, signature = key.sign(claims(client_id)).split(".")
    tampered = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered["exp"] -= 1
    body = base64.urlsafe_b64encode(json.dumps(tampered).encode()).rstrip(b"=").decode()
    response = request_token(f"{head}.{body}.{signature}")
    assert_refused(response, assertions.MSG_SIGNATURE.format(kid=key.kid))
    assert tokens_of(client_id) == 0


def test_another_key_with_the_registered_kid(
    rsa_key: KeyPair, other_rsa_key: KeyPair, tmp_path: Path, db: None
) -> None:
    client_id = register(tmp_path, rsa_key)
    assertion = jwt.encode(
        claims(client_id), other_rsa_key.private, algorithm="RS384", headers={"kid": rsa_key.kid}
    )
    assert_refused(request_token(assertion), assertions.MSG_SIGNATURE.format(kid=rsa_key.kid))
    assert tokens_of(client_id) == 0


def test_an_unknown_kid_and_a_kid_of_the_other_key_type(
    rsa_key: KeyPair, ec_key: KeyPair, tmp_path: Path, db: None
) -> None:
    client_id = register(tmp_path, rsa_key, ec_key)
    unknown = rsa_key.sign(claims(client_id), kid="nope")
    assert_refused(request_token(unknown), assertions.MSG_NO_KEY.format(alg="RS384", kid="nope"))
    # Signed with the RSA key, naming the EC key: no RS384 key has that kid.
    crossed = rsa_key.sign(claims(client_id), kid=ec_key.kid)
    assert_refused(
        request_token(crossed), assertions.MSG_NO_KEY.format(alg="RS384", kid=ec_key.kid)
    )
    no_kid = jwt.encode(claims(client_id), rsa_key.private, algorithm="RS384")
    assert_refused(request_token(no_kid), assertions.MSG_KID_MISSING)
    # A jku: this client registered its keys inline, so it names no URL.
    with_jku = rsa_key.sign(claims(client_id), jku="https://keys.example/jwks.json")
    assert_refused(request_token(with_jku), assertions.MSG_JKU)
    assert tokens_of(client_id) == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"aud": "http://testserver/4_0_0"}, "audience"),
        ({"aud": "https://testserver/oauth/token/"}, "audience"),
        ({"aud": None}, assertions.MSG_CLAIM_MISSING.format(claim="aud")),
        ({"exp": "past"}, assertions.MSG_EXPIRED),
        ({"exp": "far"}, assertions.MSG_EXP_TOO_FAR),
        ({"exp": None}, assertions.MSG_CLAIM_MISSING.format(claim="exp")),
        ({"iat": "future"}, assertions.MSG_NOT_YET_VALID),
        ({"sub": "someone-else"}, assertions.MSG_ISS_SUB),
        ({"sub": None}, assertions.MSG_ISS_SUB),
        ({"jti": None}, assertions.MSG_CLAIM_MISSING.format(claim="jti")),
        ({"jti": ""}, assertions.MSG_JTI),
        ({"jti": 42}, assertions.MSG_JTI),
        ({"jti": "x" * 256}, assertions.MSG_JTI),
    ],
    ids=lambda v: str(v)[:30],
)
def test_bad_claims(key: KeyPair, tmp_path: Path, changes: dict, message: str, db: None) -> None:
    client_id = register(tmp_path, key)
    now = int(time.time())
    times = {"past": now - 60, "far": now + 400, "future": now + 120}
    values = {k: times.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
    if message == "audience":
        message = assertions.MSG_AUDIENCE.format(url=TOKEN_URL)
    assert_refused(request_token(key.sign(claims(client_id, **values))), message)
    assert tokens_of(client_id) == 0
    assert not AssertionJti.objects.exists()


def test_a_replayed_jti_is_refused_until_it_expires(key: KeyPair, tmp_path: Path, db: None) -> None:
    client_id = register(tmp_path, key)
    assertion = key.sign(claims(client_id, jti="once"))
    assert token_of(request_token(assertion))
    assert_refused(request_token(assertion), assertions.MSG_REPLAY)
    # A new assertion with the same jti too, while the first has not expired.
    assert_refused(request_token(key.sign(claims(client_id, jti="once"))), assertions.MSG_REPLAY)
    assert tokens_of(client_id) == 1
    # Another client may use the same jti.
    other = register(tmp_path, key)
    assert token_of(request_token(key.sign(claims(other, jti="once"))))
    # Once the remembered assertion has expired, its row is purged and the jti is free again.
    AssertionJti.objects.filter(client_id=client_id).update(
        expires=timezone.now() - timedelta(seconds=1)
    )
    assert token_of(request_token(key.sign(claims(client_id, jti="once"))))
    assert AssertionJti.objects.filter(client_id=client_id).count() == 1


def test_expired_jtis_are_purged(key: KeyPair, tmp_path: Path, db: None) -> None:
    client_id = register(tmp_path, key)
    AssertionJti.objects.create(
        key="0" * 64, client_id="gone", expires=timezone.now() - timedelta(minutes=1)
    )
    assert token_of(request_token(key.sign(claims(client_id))))
    assert list(AssertionJti.objects.values_list("client_id", flat=True)) == [client_id]


def test_an_unknown_client(key: KeyPair, db: None) -> None:
    response = request_token(key.sign(claims("nobody")))
    assert_refused(response, assertions.MSG_UNKNOWN_CLIENT.format(client_id="nobody"))


def test_a_secret_client_cannot_use_an_assertion(key: KeyPair, db: None) -> None:
    client_id, _, _ = create_client("--name", "s", "--organization", "o")
    assert_refused(request_token(key.sign(claims(client_id))), assertions.MSG_NO_KEY_SET)


def test_a_key_client_cannot_use_its_secret(key: KeyPair, tmp_path: Path, db: None) -> None:
    client_id = register(tmp_path, key)
    application = ClientProfile.objects.get(application__client_id=client_id).application
    application.client_secret = "known"  # hashed on save
    application.save()
    assert_refused(token_request(client_id, "known"), oauth.MSG_ASSERTION_REQUIRED)
    assert tokens_of(client_id) == 0


@pytest.mark.parametrize("alg", ["none", "HS256"])
def test_alg_none_and_hmac_with_the_public_key_are_refused(
    alg: str, key: KeyPair, tmp_path: Path, db: None
) -> None:
    client_id = register(tmp_path, key)
    header = {"alg": alg, "typ": "JWT", "kid": key.kid}
    assertion = forged(header, claims(client_id), None if alg == "none" else key.public_pem)
    assert_refused(request_token(assertion), assertions.MSG_ALGORITHM.format(alg=alg))
    assert tokens_of(client_id) == 0


def test_other_asymmetric_algorithms_are_refused(tmp_path: Path, db: None) -> None:
    pair = KeyPair("RS384")
    client_id = register(tmp_path, pair)
    assertion = jwt.encode(claims(client_id), pair.private, "RS256", headers={"kid": pair.kid})
    assert_refused(request_token(assertion), assertions.MSG_ALGORITHM.format(alg="RS256"))


def test_malformed_requests(key: KeyPair, tmp_path: Path, db: None) -> None:
    client_id = register(tmp_path, key)
    assert_refused(request_token("not.a.jwt"), assertions.MSG_ASSERTION_MALFORMED)
    assert_refused(request_token("x" * 20_000), assertions.MSG_ASSERTION_TOO_LONG)
    wrong_type = Client().post(
        "/oauth/token/",
        {
            "grant_type": "client_credentials",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
            "client_assertion": key.sign(claims(client_id)),
        },
    )
    assert_refused(wrong_type, assertions.MSG_ASSERTION_TYPE)
    missing = Client().post(
        "/oauth/token/",
        {"grant_type": "client_credentials", "client_assertion_type": JWT_BEARER},
    )
    assert_refused(missing, oauth.MSG_ASSERTION_MISSING, error="invalid_request")
    both = request_token(key.sign(claims(client_id)), client_secret="whatever")
    assert_refused(both, oauth.MSG_TWO_METHODS, error="invalid_request")
    mismatch = request_token(key.sign(claims(client_id)), client_id="someone-else")
    assert_refused(mismatch, assertions.MSG_CLIENT_ID_MISMATCH)
    assert tokens_of(client_id) == 0
    assert not AssertionJti.objects.exists()


def test_failed_assertions_count_towards_the_throttle(
    key: KeyPair, tmp_path: Path, settings: Any, db: None
) -> None:
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "TOKEN_FAILURES_PER_MINUTE": 3}
    client_id = register(tmp_path, key)
    for n in range(3):
        wrong = key.sign(claims(client_id, aud="wrong"))
        assert request_token(wrong, meta={"REMOTE_ADDR": f"10.9.0.{n}"}).status_code == 401
    # The client id (the assertion's issuer) is locked out, from any address.
    good = key.sign(claims(client_id))
    assert request_token(good, meta={"REMOTE_ADDR": "10.9.1.1"}).status_code == 429
    assert tokens_of(client_id) == 0


# -- Registration -----------------------------------------------------------------------------


def test_the_command_prints_what_an_assertion_must_say(
    key: KeyPair, tmp_path: Path, db: None
) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(jwks_document(key))
    out = io.StringIO()
    call_command(
        "create_fhir_client",
        "--name",
        "backend",
        "--organization",
        "org-a",
        "--jwks-file",
        str(path),
        "--base-url",
        "https://fhir.example",
        stdout=out,
    )
    text = out.getvalue()
    client_id = re.search(r"client_id:\s+(\S+)", text).group(1)
    assert "client_secret" not in text
    assert f"iss=sub={client_id}, aud=https://fhir.example/oauth/token/" in text
    profile = ClientProfile.objects.get(application__client_id=client_id)
    assert profile.authentication == "private_key_jwt"
    assert json.loads(profile.jwks) == {"keys": [key.jwk]}


def test_the_command_refuses_bad_key_sets(key: KeyPair, tmp_path: Path, db: None) -> None:
    def create(*args: str) -> None:
        call_command(
            "create_fhir_client", "--name", "x", "--organization", "o", *args, stdout=io.StringIO()
        )

    private = tmp_path / "private.json"
    private.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        **json.loads(
                            jwt.algorithms.RSAAlgorithm.to_jwk(
                                rsa.generate_private_key(public_exponent=65537, key_size=2048)
                            )
                        ),
                        "kid": "k",
                    }
                ]
            }
        )
    )
    with pytest.raises(CommandError, match=re.escape(MSG_JWKS_PRIVATE.format(member="d"))):
        create("--jwks-file", str(private))
    p256 = tmp_path / "p256.json"
    p256.write_text(
        json.dumps(
            {
                "keys": [
                    {
                        **jwt.algorithms.ECAlgorithm.to_jwk(
                            ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True
                        ),
                        "kid": "k",
                    }
                ]
            }
        )
    )
    with pytest.raises(CommandError, match=re.escape(MSG_JWKS_NO_USABLE_KEY)):
        create("--jwks-file", str(p256))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("[1, 2]")
    with pytest.raises(CommandError, match="not a JSON object"):
        create("--jwks-file", str(garbage))
    with pytest.raises(CommandError, match="cannot be read"):
        create("--jwks-file", str(tmp_path / "missing.json"))
    with pytest.raises(CommandError, match=re.escape("must be an https:// URL")):
        create("--jwks-url", "http://keys.example/jwks.json")
    with pytest.raises(CommandError, match="must be an https:// URL"):
        create("--jwks-url", "http://127.0.0.1:9/jwks.json")  # loopback, setting off
    with pytest.raises(CommandError, match="not allowed with argument"):
        create("--jwks-file", "a", "--jwks-url", "https://keys.example/")
    assert not ClientProfile.objects.exists()


def test_the_profile_checks_its_key_set_on_save_in_the_admin(key: KeyPair, db: None) -> None:
    profile = make_client()  # a secret client
    row = ClientProfile.objects.get(application__client_id=profile.client_id)
    row.jwks, row.jwks_url = jwks_document(key), "https://keys.example/jwks.json"
    with pytest.raises(ValidationError, match=MSG_BOTH_KEY_SOURCES):
        row.full_clean()
    row.jwks_url = ""
    row.full_clean()
    row.jwks = '{"keys": []}'
    with pytest.raises(ValidationError, match=re.escape(MSG_JWKS_NO_USABLE_KEY)):
        row.full_clean()


def test_the_admin_edits_key_sets(admin_client: Any, key: KeyPair, db: None) -> None:
    secret_client = make_client()
    row = ClientProfile.objects.get(application__client_id=secret_client.client_id)
    listing = admin_client.get("/admin/fhir_access/clientprofile/")
    assert listing.status_code == 200 and b"client_secret" in listing.content
    url = f"/admin/fhir_access/clientprofile/{row.pk}/change/"
    form = {
        "application": row.application_id,
        "organization": row.organization,
        "allowed_scopes": row.allowed_scopes,
        "jwks": jwks_document(key),
        "jwks_url": "",
    }
    refused = admin_client.post(url, {**form, "jwks_url": "https://keys.example/jwks.json"})
    assert refused.status_code == 200 and MSG_BOTH_KEY_SOURCES.encode() in refused.content
    assert admin_client.post(url, form).status_code == 302
    row.refresh_from_db()
    assert row.authentication == "private_key_jwt"
    assert token_of(request_token(key.sign(claims(secret_client.client_id))))


# -- JWKS URL ---------------------------------------------------------------------------------


class KeyServer:
    """A tiny HTTP server on 127.0.0.1 publishing a JWK Set, counting its fetches."""

    def __init__(self) -> None:
        self.document = b'{"keys": []}'
        self.status = 200
        self.location = ""
        self.hits = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server hook's name)
                owner.hits += 1
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                if owner.location:
                    self.send_header("Location", owner.location)
                self.send_header("Content-Length", str(len(owner.document)))
                self.end_headers()
                self.wfile.write(owner.document)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def publish(self, *keys: KeyPair) -> None:
        self.document = jwks_document(*keys).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def key_server(settings: Any) -> Iterator[KeyServer]:
    """A JWKS URL on loopback, with http:// allowed there."""
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "JWKS_ALLOW_HTTP_LOOPBACK": True}
    server = KeyServer()
    yield server
    server.close()


def register_url(url: str, scopes: str = "system/*.*") -> str:
    out = io.StringIO()
    call_command(
        "create_fhir_client",
        "--name",
        f"url-{uuid.uuid4().hex[:8]}",
        "--organization",
        "org-a",
        "--scopes",
        scopes,
        "--jwks-url",
        url,
        stdout=out,
    )
    return re.search(r"client_id:\s+(\S+)", out.getvalue()).group(1)


def test_a_jwks_url_is_fetched_and_cached(key: KeyPair, key_server: KeyServer, db: None) -> None:
    key_server.publish(key)
    client_id = register_url(key_server.url)
    assert key_server.hits == 0  # registration does not fetch
    api = TokenClient(token_of(request_token(key.sign(claims(client_id)))))
    assert api.get("/Patient").status == 200
    assert token_of(request_token(key.sign(claims(client_id))))
    assert key_server.hits == 1
    with_jku = key.sign(claims(client_id), jku=key_server.url)
    assert token_of(request_token(with_jku))
    other_jku = key.sign(claims(client_id), jku="https://evil.example/jwks.json")
    assert_refused(request_token(other_jku), assertions.MSG_JKU)


def test_a_rotated_key_is_found_by_refetching(
    rsa_key: KeyPair, ec_key: KeyPair, key_server: KeyServer, monkeypatch: Any, db: None
) -> None:
    key_server.publish(rsa_key)
    client_id = register_url(key_server.url)
    assert token_of(request_token(rsa_key.sign(claims(client_id))))
    key_server.publish(ec_key)
    # Within REFETCH_SECONDS of the last fetch an unknown kid does not refetch.
    assert_refused(
        request_token(ec_key.sign(claims(client_id))),
        assertions.MSG_NO_KEY.format(alg="ES384", kid=ec_key.kid),
    )
    assert key_server.hits == 1
    monkeypatch.setattr(jwks, "REFETCH_SECONDS", 0)  # as if the last fetch were old enough
    assert token_of(request_token(ec_key.sign(claims(client_id))))
    assert key_server.hits == 2


def test_an_unreachable_or_bad_jwks_url_authenticates_nobody(
    key: KeyPair, key_server: KeyServer, db: None
) -> None:
    client_id = register_url(key_server.url)
    key_server.status = 404
    response = request_token(key.sign(claims(client_id)))
    assert response.status_code == 401
    assert response.json()["error_description"] == jwks.MSG_JWKS_FETCH.format(reason="HTTP 404")
    key_server.status = 200
    key_server.document = b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x"}]}'
    response = request_token(key.sign(claims(client_id)))
    assert response.json()["error_description"] == MSG_JWKS_PRIVATE.format(member="k")
    key_server.document = b"x" * (jwks.MAX_JWKS_BYTES + 1)
    response = request_token(key.sign(claims(client_id)))
    assert response.json()["error_description"] == jwks.MSG_JWKS_TOO_LARGE
    assert tokens_of(client_id) == 0
    with pytest.raises(JwksError, match="could not be fetched"):
        jwks_of_url("http://127.0.0.1:9/jwks.json")  # nothing listens on the discard port


def test_http_is_refused_when_not_allowed_and_off_loopback(
    key: KeyPair, key_server: KeyServer, settings: Any, db: None
) -> None:
    key_server.publish(key)
    client_id = register_url(key_server.url)
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "JWKS_ALLOW_HTTP_LOOPBACK": False}
    response = request_token(key.sign(claims(client_id)))
    assert response.json()["error_description"] == MSG_JWKS_URL_SCHEME.format(url=key_server.url)
    assert key_server.hits == 0
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "JWKS_ALLOW_HTTP_LOOPBACK": True}
    with pytest.raises(JwksError):
        jwks_of_url("http://keys.example/jwks.json")  # not loopback


def test_a_redirect_is_not_followed(key: KeyPair, key_server: KeyServer, db: None) -> None:
    key_server.status = 302
    key_server.location = key_server.url + "?moved"
    with pytest.raises(JwksError, match="HTTP 302"):
        jwks_of_url(key_server.url)


# -- PEM public keys ---------------------------------------------------------------------------


def pem_file(tmp_path: Path, public_key: Any) -> Path:
    path = tmp_path / f"{uuid.uuid4().hex}.pub"
    path.write_bytes(
        public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def test_pem_public_keys_register_with_their_thumbprint_as_kid(
    rsa_key: KeyPair, ec_key: KeyPair, tmp_path: Path, db: None
) -> None:
    out = io.StringIO()
    call_command(
        "create_fhir_client",
        "--name",
        "pem",
        "--organization",
        "org-a",
        "--public-key",
        str(pem_file(tmp_path, rsa_key.private.public_key())),
        "--public-key",
        str(pem_file(tmp_path, ec_key.private.public_key())),
        stdout=out,
    )
    text = out.getvalue()
    client_id = re.search(r"client_id:\s+(\S+)", text).group(1)
    for pair in (rsa_key, ec_key):
        # RFC 7638 thumbprint, as another JOSE library computes it.
        kid = JWK.from_pem(pair.public_pem).thumbprint()
        assert f"kid={kid}" in text
        assert token_of(request_token(pair.sign(claims(client_id), kid=kid)))


def test_pem_keys_that_cannot_sign_assertions_are_refused(tmp_path: Path, db: None) -> None:
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    cases = [
        (pem_file(tmp_path, small_rsa), re.escape(jwks.MSG_PEM_KEY_TYPE)),
        (pem_file(tmp_path, p256), re.escape(jwks.MSG_PEM_KEY_TYPE)),
        (garbage, "Not a PEM public key"),
        (tmp_path / "missing.pem", "--public-key cannot be read"),
    ]
    for path, message in cases:
        with pytest.raises(CommandError, match=message):
            call_command(
                "create_fhir_client",
                "--name",
                "pem",
                "--organization",
                "o",
                "--public-key",
                str(path),
                stdout=io.StringIO(),
            )
    assert not ClientProfile.objects.exists()


def test_a_key_client_revokes_its_token_with_an_assertion(
    key: KeyPair, tmp_path: Path, db: None
) -> None:
    client_id = register(tmp_path, key)
    api = TokenClient(token_of(request_token(key.sign(claims(client_id)))))
    assert api.get("/Patient").status == 200
    revoked = Client().post(
        "/oauth/revoke_token/",
        {
            "token": api.token,
            "client_assertion_type": JWT_BEARER,
            "client_assertion": key.sign(claims(client_id)),
        },
    )
    assert revoked.status_code == 200, revoked.content
    assert api.get("/Patient").status == 401


# -- With $export (issue 14: a client authenticated with a signed JWT exports a Group) -------


def test_a_key_client_exports_a_group_and_downloads_with_another_of_its_tokens(
    rsa_key: KeyPair, ec_key: KeyPair, tmp_path: Path, transactional_db: None
) -> None:
    client_id = register(tmp_path, rsa_key, ec_key, scopes="system/*.rs system/*.c")
    writer = TokenClient(token_of(request_token(rsa_key.sign(claims(client_id)))))
    patient_key = create(writer, patient(family="Signed"))
    observation_key = create(writer, observation(patient_key))
    group_id = export_group(writer, [patient_key])
    status = kick_off(writer, f"/Group/{group_id}/$export")
    run_jobs()
    # A second token of the same client (another assertion, the other key) downloads.
    downloader = TokenClient(token_of(request_token(ec_key.sign(claims(client_id)))))
    auth = {"Authorization": f"Bearer {downloader.token}"}
    body = manifest(downloader, status, **auth)
    assert body["requiresAccessToken"] is True
    assert exported(downloader, body, **auth) == {
        "Patient": [patient_key],
        "Observation": [observation_key],
    }
    # Another organization's key client gets nothing of it.
    stranger_id = register(tmp_path, rsa_key, org="org-b")
    stranger = TokenClient(token_of(request_token(rsa_key.sign(claims(stranger_id)))))
    other = {"Authorization": f"Bearer {stranger.token}"}
    assert raw(stranger, "GET", status, **other).status_code == 404
    assert raw(stranger, "GET", body["output"][0]["url"], **other).status_code == 404


def test_an_assertion_without_its_type_is_refused(key: KeyPair, tmp_path: Path, db: None) -> None:
    client_id = register(tmp_path, key)
    response = Client().post(
        "/oauth/token/",
        {"grant_type": "client_credentials", "client_assertion": key.sign(claims(client_id))},
    )
    assert_refused(response, assertions.MSG_ASSERTION_TYPE)
    assert tokens_of(client_id) == 0

"""Failed client authentications at the token endpoints are throttled per client id and per
remote address (``TOKEN_FAILURES_PER_MINUTE``): 429 ``slow_down`` with Retry-After."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from django.test import Client, override_settings

from fhirservice.access.oauth import TokenFailureThrottle
from fhirservice.conf import DEFAULTS, fhir_settings
from tests.access.test_tokens import create_client

LIMIT = 3


@pytest.fixture
def limit(settings: Any) -> Iterator[None]:
    """At most LIMIT failures a minute; counts start (and end) empty."""
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "TOKEN_FAILURES_PER_MINUTE": LIMIT}
    cache.clear()
    yield
    cache.clear()


def basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def token(client_id: str, secret: str, addr: str = "10.0.0.1", *, body_auth: bool = False):
    data = {"grant_type": "client_credentials"}
    headers = {"REMOTE_ADDR": addr}
    if body_auth:
        data.update(client_id=client_id, client_secret=secret)
    else:
        headers["HTTP_AUTHORIZATION"] = basic(client_id, secret)
    return Client().post("/oauth/token/", data, **headers)


def new_client(name: str) -> tuple[str, str]:
    client_id, secret, _ = create_client("--name", name, "--organization", "o")
    return client_id, secret


def assert_slow_down(response: Any) -> None:
    assert response.status_code == 429, response.content
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"] == "slow_down"
    assert "retry after" in response.json()["error_description"]
    assert 1 <= int(response["Retry-After"]) <= 60
    assert response["Cache-Control"] == "no-store"


def test_the_default_is_20_a_minute() -> None:
    assert DEFAULTS["TOKEN_FAILURES_PER_MINUTE"] == 20


def test_over_the_limit_a_client_id_is_refused_even_with_its_secret(limit: None, db: None) -> None:
    client_id, secret = new_client("guessed")
    assert [token(client_id, f"guess-{n}").status_code for n in range(LIMIT)] == [401] * LIMIT
    assert_slow_down(token(client_id, secret))
    # From another address too: the client id has its own bucket.
    assert_slow_down(token(client_id, secret, addr="10.0.0.2"))
    # Another client from another address is not affected.
    other_id, other_secret = new_client("other")
    assert token(other_id, other_secret, addr="10.0.0.3").status_code == 200


def test_over_the_limit_an_address_is_refused_for_every_client(limit: None, db: None) -> None:
    for n in range(LIMIT):  # unknown client ids: counted per address
        assert token(f"unknown-{n}", "x").status_code == 401
    client_id, secret = new_client("innocent")
    assert_slow_down(token(client_id, secret))
    assert token(client_id, secret, addr="10.0.0.9").status_code == 200


def test_successes_do_not_count(limit: None, db: None) -> None:
    client_id, secret = new_client("busy")
    assert [token(client_id, secret).status_code for _ in range(LIMIT + 3)] == [200] * (LIMIT + 3)
    assert token(client_id, "wrong").status_code == 401


def test_form_body_authentication_failures_count(limit: None, db: None) -> None:
    client_id, secret = new_client("form")
    for n in range(LIMIT):
        assert token(client_id, f"g{n}", addr=f"10.1.0.{n}", body_auth=True).status_code == 401
    assert_slow_down(token(client_id, secret, addr="10.1.1.1", body_auth=True))


def test_revocation_failures_count_and_are_refused(limit: None, db: None) -> None:
    client_id, secret = new_client("revoker")

    def revoke(secret_: str) -> Any:
        return Client().post(
            "/oauth/revoke_token/",
            {"token": "whatever"},
            HTTP_AUTHORIZATION=basic(client_id, secret_),
            REMOTE_ADDR="10.2.0.1",
        )

    assert revoke(secret).status_code == 200
    assert [revoke(f"g{n}").status_code for n in range(LIMIT)] == [401] * LIMIT
    assert_slow_down(revoke(secret))
    assert_slow_down(token(client_id, secret, addr="10.2.0.2"))


def test_the_window_slides(limit: None, db: None, monkeypatch: pytest.MonkeyPatch) -> None:
    client_id, secret = new_client("patient-guesser")
    for n in range(LIMIT):
        token(client_id, f"g{n}")
    assert_slow_down(token(client_id, secret))
    now = TokenFailureThrottle.timer()
    monkeypatch.setattr(TokenFailureThrottle, "timer", staticmethod(lambda: now + 61))
    assert token(client_id, secret).status_code == 200


def test_zero_switches_it_off(settings: Any, db: None) -> None:
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "TOKEN_FAILURES_PER_MINUTE": 0}
    cache.clear()
    client_id, secret = new_client("unlimited")
    assert all(token(client_id, f"g{n}").status_code == 401 for n in range(25))
    assert token(client_id, secret).status_code == 200


def test_a_malformed_basic_header_counts_per_address(limit: None, db: None) -> None:
    for _ in range(LIMIT):
        response = Client().post(
            "/oauth/token/",
            {"grant_type": "client_credentials"},
            HTTP_AUTHORIZATION="Basic !!!not-base64",
            REMOTE_ADDR="10.3.0.1",
        )
        assert response.status_code == 401
    assert_slow_down(token("any", "thing", addr="10.3.0.1"))


@pytest.mark.parametrize("value", [-1, "20", 2.5, True, None])
def test_a_bad_value_is_improperly_configured(value: Any) -> None:
    with override_settings(FHIR_SERVICE={"TOKEN_FAILURES_PER_MINUTE": value}):
        with pytest.raises(ImproperlyConfigured, match="TOKEN_FAILURES_PER_MINUTE"):
            fhir_settings.TOKEN_FAILURES_PER_MINUTE  # noqa: B018


def test_the_environment_sets_it() -> None:
    env = {k: v for k, v in os.environ.items() if k != "FHIR_TOKEN_FAILURES_PER_MINUTE"}
    env["FHIR_TOKEN_FAILURES_PER_MINUTE"] = "7"
    code = (
        "from fhirservice.conf import fhir_settings; print(fhir_settings.TOKEN_FAILURES_PER_MINUTE)"
    )
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip().splitlines()[-1] == "7"

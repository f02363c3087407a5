"""The per-client throttle: off by default, 429 OperationOutcome with Retry-After when over."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import Client

from fhirservice.conf import fhir_settings
from fhirservice.rest.limits import ClientRateThrottle, TooManyRequests
from tests.support import BASE, FhirResponse


def get(client: Client, path: str = "/metadata", addr: str = "10.0.0.1") -> FhirResponse:
    return FhirResponse(client.get(BASE + path, REMOTE_ADDR=addr))


@pytest.mark.django_db
def test_off_by_default():
    assert fhir_settings.THROTTLE_RATE is None
    client = Client()
    assert all(get(client).status == 200 for _ in range(30))


@pytest.mark.django_db
def test_over_the_rate_is_429_with_retry_after(limits):
    limits(THROTTLE_RATE="3/min")
    client = Client()
    assert [get(client).status for _ in range(3)] == [200, 200, 200]
    response = get(client, "/Patient")
    assert response.status == 429
    issue = response.body["issue"][0]
    assert issue["code"] == "throttled"
    assert issue["details"]["coding"][0]["code"] == "MSG_THROTTLED"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    # Another address has its own budget.
    assert get(client, addr="10.0.0.2").status == 200


@dataclass
class Access:
    client_id: str
    organization: str = "org"
    scopes: frozenset[str] = frozenset()
    actor: str = ""


class FakeRequest:
    def __init__(self, access: Access | None, addr: str) -> None:
        if access is not None:
            self.access = access
        self.META = {"REMOTE_ADDR": addr}
        self.headers: dict[str, str] = {}


def test_bucket_is_the_oauth_client_when_known(settings):
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "THROTTLE_RATE": "2/s"}
    throttle = ClientRateThrottle()
    same_client = {
        throttle.get_cache_key(FakeRequest(Access("sys-a"), addr), None)
        for addr in ("10.0.0.1", "10.0.0.2")
    }
    assert len(same_client) == 1
    other = throttle.get_cache_key(FakeRequest(Access("sys-b"), "10.0.0.1"), None)
    anonymous = throttle.get_cache_key(FakeRequest(None, "10.0.0.1"), None)
    assert len({*same_client, other, anonymous}) == 3


def test_one_client_over_its_rate(settings):
    from django.core.cache import cache

    cache.clear()
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "THROTTLE_RATE": "2/hour"}
    request = FakeRequest(Access("sys-a"), "10.0.0.1")
    assert ClientRateThrottle().allow_request(request, None)
    assert ClientRateThrottle().allow_request(request, None)
    with pytest.raises(TooManyRequests) as info:
        ClientRateThrottle().allow_request(request, None)
    assert info.value.status == 429
    assert int(info.value.headers["Retry-After"]) > 3000
    assert ClientRateThrottle().allow_request(FakeRequest(Access("sys-b"), "10.0.0.1"), None)


@pytest.mark.parametrize("rate", ["600", "0/min", "10/week", "ten/min", 600, ""])
def test_bad_rates_are_refused(settings, rate):
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "THROTTLE_RATE": rate}
    with pytest.raises(ImproperlyConfigured):
        fhir_settings.THROTTLE_RATE  # noqa: B018

"""The FHIR requests of ``--in-process`` runs, through ``django.test.Client`` (in-process WSGI).

Every request goes through the full stack (middleware, access control, DRF view, services,
both stores); only the HTTP server and the network are left out. With access control on (the
production default, ``FHIR_AUTH``) the benchmark registers an OAuth2 client of its own
organization, takes a token at the token endpoint and sends it as a bearer token, so the
numbers include token checks, scopes and the data boundary. A response with an unexpected status
raises ``BenchError`` with the start of its body, so a broken build never yields a number.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import orjson
from django.conf import settings
from django.test import Client, override_settings

from bench.http_api import FHIR_JSON, PATCH_JSON, BenchError
from fhirservice.access.clients import fhir_client_create
from fhirservice.conf import fhir_settings

BASE = "/4_0_0"
MINIMAL = {"Prefer": "return=minimal"}
BENCH_ORGANIZATION = "bench"
BENCH_SCOPES = "system/Group.cruds system/Patient.cruds"


def check(response: Any, *expected: int) -> Any:
    """Return ``response`` if its status is one of ``expected``, else raise BenchError."""
    if response.status_code not in expected:
        content = b"".join(response.streaming_content) if response.streaming else response.content
        raise BenchError(
            f"{response.request['REQUEST_METHOD']} {response.request['PATH_INFO']}: "
            f"HTTP {response.status_code}: {content[:500]!r}"
        )
    return response


@contextmanager
def roster_storage(mode: str):
    """Run the block with ``GROUP_ROSTER_STORAGE`` set to ``mode`` (clickhouse or inline)."""
    values = {**(getattr(settings, "FHIR_SERVICE", {}) or {}), "GROUP_ROSTER_STORAGE": mode}
    with override_settings(FHIR_SERVICE=values):
        yield


def access_control() -> str:
    """How the benchmark's requests authenticate, for the report's header."""
    if not fhir_settings.AUTH:
        return "off (FHIR_AUTH=off): no token checks measured"
    return (
        f"on: bearer token of a client of organization {BENCH_ORGANIZATION!r} "
        f"({BENCH_SCOPES}), checked on every request"
    )


def access_credentials() -> tuple[str, str] | None:
    """With access control on, a new OAuth2 client of the bench's organization: its id and
    secret (registered in the metadata store); None with access control off."""
    if not fhir_settings.AUTH:
        return None
    return fhir_client_create(
        name=f"bench-{secrets.token_hex(4)}",
        organization=BENCH_ORGANIZATION,
        all_organizations=False,
        scopes=BENCH_SCOPES.split(),
    )


class Api:
    """The requests of the benchmark rows."""

    def __init__(self) -> None:
        self.client = Client()
        self._credentials: tuple[str, str] | None = None
        self._token_renew_at = 0.0

    @property
    def access_control(self) -> str:
        """How the requests authenticate, for the report's header."""
        return access_control()

    def _authorize(self) -> None:
        """With access control on: a client of the bench's own, and a fresh token."""
        if not fhir_settings.AUTH or time.monotonic() < self._token_renew_at:
            return
        if self._credentials is None:
            self._credentials = access_credentials()
        basic = base64.b64encode(":".join(self._credentials).encode()).decode()
        response = check(
            self.client.post(
                "/oauth/token/",
                {"grant_type": "client_credentials"},
                HTTP_AUTHORIZATION=f"Basic {basic}",
            ),
            200,
        )
        token = orjson.loads(response.content)
        self.client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {token['access_token']}"
        # Renew at half the lifetime: a full run can outlast one token.
        self._token_renew_at = time.monotonic() + token["expires_in"] / 2

    def _send(self, method: str, path: str, data: bytes = b"", **kwargs: Any) -> Any:
        self._authorize()
        return self.client.generic(method, BASE + path, data=data, **kwargs)

    def create_group(self, body: bytes) -> str:
        """POST a Group (``Prefer: return=minimal``); its id."""
        response = check(
            self._send("POST", "/Group", body, content_type=FHIR_JSON, headers=MINIMAL), 201
        )
        return response.headers["Location"].split("/Group/")[1].split("/")[0]

    def create_patient(self, body: bytes) -> str:
        """POST a Patient (``Prefer: return=minimal``); its id."""
        response = check(
            self._send("POST", "/Patient", body, content_type=FHIR_JSON, headers=MINIMAL), 201
        )
        return response.headers["Location"].split("/Patient/")[1].split("/")[0]

    def read_patient(self, patient_id: str) -> None:
        """GET a Patient."""
        response = check(self._send("GET", f"/Patient/{patient_id}"), 200)
        if response.streaming:
            b"".join(response.streaming_content)

    def patch(self, group_id: str, ops: bytes) -> None:
        """PATCH a Group with JSON Patch (``Prefer: return=minimal``)."""
        check(
            self._send(
                "PATCH", f"/Group/{group_id}", ops, content_type=PATCH_JSON, headers=MINIMAL
            ),
            200,
        )

    def read_streamed(self, group_id: str, on_chunk: Callable[[], None] | None = None) -> int:
        """GET the whole Group, consuming the streamed body chunk by chunk without keeping it.

        Returns the number of members received (each member is one chunk of the stream;
        members are counted by their ``"entity"`` key). ``on_chunk`` is called every 10,000
        chunks (memory sampling).
        """
        response = check(self._send("GET", f"/Group/{group_id}"), 200)
        if not response.streaming:
            return response.content.count(b'"entity"')
        members = 0
        for index, chunk in enumerate(response.streaming_content):
            members += chunk.count(b'"entity"')
            if on_chunk is not None and index % 10_000 == 0:
                on_chunk()
        return members

    def quantity(self, group_id: str) -> int:
        """GET Group/{id}?_elements=quantity; the quantity."""
        response = check(self._send("GET", f"/Group/{group_id}?_elements=quantity"), 200)
        content = b"".join(response.streaming_content) if response.streaming else response.content
        return orjson.loads(content)["quantity"]

    def members_page(self, group_id: str, *, after: str = "", count: int = 1000) -> int:
        """GET Group/{id}/$members with a cursor after reference ``after``; members on it."""
        query = f"_count={count}"
        if after:
            cursor = base64.urlsafe_b64encode(after.encode()).decode().rstrip("=")
            query += f"&_cursor={cursor}"
        response = check(self._send("GET", f"/Group/{group_id}/$members?{query}"), 200)
        body = orjson.loads(response.content)
        return sum(1 for p in body["parameter"] if p["name"] == "member")

    def search_member(self, reference: str) -> int:
        """GET Group?member=<reference>; the Bundle's total."""
        response = check(self._send("GET", f"/Group?member={reference}"), 200)
        content = b"".join(response.streaming_content) if response.streaming else response.content
        return orjson.loads(content)["total"]

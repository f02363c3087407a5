"""Test helpers: an HTTP client for the FHIR API that checks every body it receives.

Every FHIR JSON body the API returns is parsed with fhirclient's strict R4 models
(``tests.fhir_check``), an implementation we did not write, so a malformed response fails the
test that provoked it. ``run_threads`` runs real threads against the committed database;
``pg_trace`` and ``round_trips`` watch what a block sends to PostgreSQL.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
from django.db import connection, connections
from django.test import Client

from groups.outbox import background
from tests.fhir_check import assert_strict_r4

# The server's message that ends each round trip, in libpq's trace.
READY_FOR_QUERY = "\tReadyForQuery\t"
BASE = "/4_0_0"
FHIR_JSON = "application/fhir+json"
PATCH_JSON = "application/json-patch+json"

# For a test that touches no store and costs seconds (the official examples through a
# converter or checker): the embedded pass runs it, the servers pass would only repeat it.
# For a test of the service's processes (a served gunicorn, its start and stop) rather than of
# the member store: its server runs on the embedded defaults in every pass (tests/served.py),
# so the cluster pass would only repeat what the embedded pass ran.
not_in_cluster_pass = pytest.mark.skipif(
    os.environ.get("FHIR_TEST_PASS") == "cluster",
    reason="a served-process test on the embedded defaults: the embedded pass runs it",
)
backend_independent = pytest.mark.skipif(
    os.environ.get("FHIR_TEST_PASS") == "servers",
    reason="backend-independent: the embedded pass runs it",
)


class FhirResponse:
    """A response with its decoded, strictly checked FHIR body."""

    def __init__(self, response: Any) -> None:
        self.raw = response
        self.status = response.status_code
        content = b"".join(response.streaming_content) if response.streaming else response.content
        self.content = content
        self.headers = response.headers
        self.body: Any = orjson.loads(content) if content else None
        if self.body is not None:
            assert response.headers["Content-Type"].startswith(FHIR_JSON), response.headers
            assert_strict_r4(self.body)

    def __repr__(self) -> str:
        return f"<FhirResponse {self.status} {self.content[:300]!r}>"

    @property
    def etag(self) -> str | None:
        """The ETag header."""
        return self.headers.get("ETag")

    def issue_codes(self) -> list[str]:
        """The issue codes of an OperationOutcome body."""
        return [i["code"] for i in self.body["issue"]]

    def detail_codes(self) -> list[str]:
        """The detail codes (MSG_*) of an OperationOutcome body."""
        return [
            c["code"] for i in self.body["issue"] for c in i.get("details", {}).get("coding", [])
        ]


class FhirClient:
    """Thin wrapper around Django's test client speaking FHIR JSON.

    After each write it waits for the process's background shipping of member events
    (``groups.outbox.background``), so a test sees ClickHouse as it is once shipping caught up;
    ``FhirClient(wait_for_shipping=False)`` observes the moment of the answer instead.
    """

    def __init__(self, *, wait_for_shipping: bool = True) -> None:
        self.client = Client()
        self.wait_for_shipping = wait_for_shipping

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = FHIR_JSON,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> FhirResponse:
        """Send a request to ``BASE + path``; ``raw`` sends bytes as they are."""
        data = raw if raw is not None else (orjson.dumps(body) if body is not None else b"")
        response = self.client.generic(
            method,
            BASE + path,
            data=data,
            content_type=content_type if data else None,
            headers=headers or {},
        )
        if self.wait_for_shipping and method != "GET":
            assert background.flush(), "background shipping did not finish within 30 s"
        return FhirResponse(response)

    def get(self, path: str, **kwargs: Any) -> FhirResponse:
        """GET."""
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> FhirResponse:
        """POST a resource."""
        return self.request("POST", path, body, **kwargs)

    def put(self, path: str, body: Any = None, **kwargs: Any) -> FhirResponse:
        """PUT a resource."""
        return self.request("PUT", path, body, **kwargs)

    def patch(self, path: str, ops: Any = None, **kwargs: Any) -> FhirResponse:
        """PATCH with a JSON Patch document."""
        kwargs.setdefault("content_type", PATCH_JSON)
        return self.request("PATCH", path, ops, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> FhirResponse:
        """DELETE."""
        return self.request("DELETE", path, **kwargs)


def patient(family: str = "Chalmers", given: str = "Peter", **extra: Any) -> dict[str, Any]:
    """A small valid Patient."""
    return {"resourceType": "Patient", "name": [{"family": family, "given": [given]}], **extra}


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    """A Bundle of ``kind`` (``transaction``, ``batch``, ...) holding ``entries``."""
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def run_threads(work: Callable[[int], Any], count: int, *, timeout: float = 300) -> list[Any]:
    """Run ``work(index)`` in ``count`` threads released together; their results, in order.

    Each thread closes its database connections when it ends. The first exception of any
    thread is raised here; a thread still running after ``timeout`` seconds fails the test.
    """
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count
    errors: list[BaseException] = []

    def main(index: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[index] = work(index)
        except BaseException as exc:  # noqa: BLE001 - reported in the calling thread
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=main, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


@contextmanager
def pg_trace() -> Iterator[list[str]]:
    """libpq's trace of the block's messages to and from PostgreSQL, on the default
    connection (its lines are in the list after the block)."""
    from psycopg.pq import Trace

    connection.ensure_connection()
    pgconn = connection.connection.pgconn
    lines: list[str] = []
    with tempfile.TemporaryFile() as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield lines
        finally:
            pgconn.untrace()
        trace.seek(0)
        lines.extend(trace.read().decode("utf-8", "replace").splitlines())


@contextmanager
def round_trips() -> Iterator[list[int]]:
    """The block's round trips to PostgreSQL, from libpq's trace (each ends with the server's
    ReadyForQuery): the count is in the list after the block."""
    count: list[int] = []
    with pg_trace() as lines:
        yield count
    count.append(sum(READY_FOR_QUERY in line for line in lines))

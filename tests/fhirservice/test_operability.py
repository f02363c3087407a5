"""Operability: health and readiness probes, Prometheus metrics, the request log line, and
the answer to a bad Host header. The same endpoints over a live gunicorn: tests/test_served.py.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.utils.module_loading import import_string

from fhirservice.rest.errors import MSG_BAD_HOST
from groups.models import MemberOutbox
from tests.support import FhirClient, patient

INSTANCE_ROUTE = "/4_0_0/{resource_type}/{resource_id}"
REQUEST_LINE_FIELDS = {
    "time",
    "request_id",
    "client",
    "actor",
    "method",
    "path",
    "route",
    "status",
    "duration_ms",
    "bytes",
}


@pytest.fixture
def request_lines() -> Iterator[list[dict[str, Any]]]:
    """The request log lines written while the test runs, decoded."""
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            assert record.levelno == logging.INFO
            lines.append(orjson.loads(record.getMessage()))

    logger = logging.getLogger("fhirservice.requests")
    handler = Collect()
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def group_of(*refs: str) -> dict[str, Any]:
    """A Group with these members."""
    members = [{"entity": {"reference": ref}} for ref in refs]
    return {"resourceType": "Group", "type": "person", "actual": True, "member": members}


def scrape(client: Client) -> dict[str, float]:
    """``/metrics`` as {sample with labels: value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    samples = {}
    for line in response.content.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


# --- health and readiness ------------------------------------------------------------------


def test_liveness_touches_no_store(db, clickhouse_unreachable):
    with clickhouse_unreachable:
        response = Client().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readiness_checks_both_stores_and_shows_the_backlog(db):
    api = FhirClient()
    # The test's transaction is rolled back, so the batch is never shipped: it stays pending.
    assert api.post("/Group", group_of("Patient/a", "Patient/b")).status == 201
    assert MemberOutbox.objects.filter(shipped_at__isnull=True).count() == 1
    response = Client().get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["checks"] == {"metadata_store": {"status": "ok"}, "clickhouse": {"status": "ok"}}
    assert body["member_backlog"]["batches"] == 1
    assert body["member_backlog"]["events"] == 2
    assert body["member_backlog"]["oldest_age_seconds"] >= 0


def test_readiness_is_degraded_but_200_when_only_clickhouse_is_down(db, clickhouse_unreachable):
    with clickhouse_unreachable:
        response = Client().get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded"
    assert body["checks"]["metadata_store"] == {"status": "ok"}
    assert body["checks"]["clickhouse"] == {"status": "down", "error": "ClickHouseUnavailable"}
    assert body["member_backlog"]["batches"] == 0


def test_probes_need_no_credentials_with_access_control_on(db, settings):
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": True}
    client = Client()
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.post("/readyz").status_code == 405


# --- metrics -------------------------------------------------------------------------------


def test_metrics_count_latency_writes_and_errors_by_route(db):
    api = FhirClient()
    client = Client()
    before = scrape(client)
    pid = api.post("/Patient", patient()).body["id"]
    assert api.get(f"/Patient/{pid}").status == 200
    assert api.get("/Patient/nope").status == 404
    assert api.put(f"/Patient/{pid}", {"resourceType": "Patient", "id": "other"}).status == 400
    after = scrape(client)

    def grew(sample: str) -> float:
        return after.get(sample, 0) - before.get(sample, 0)

    instance = f'view="{INSTANCE_ROUTE}"'
    latency = "django_http_requests_latency_seconds_by_view_method_count"
    assert grew(f'{latency}{{method="GET",{instance}}}') == 2
    responses = "django_http_responses_total_by_status_view_method_total"
    assert grew(f'{responses}{{method="GET",status="404",{instance}}}') == 1
    assert grew(f'{responses}{{method="PUT",status="400",{instance}}}') == 1
    assert grew('fhir_writes_total{method="POST",route="/4_0_0/{resource_type}"}') == 1
    assert grew(f'fhir_writes_total{{method="PUT",route="{INSTANCE_ROUTE}"}}') == 0
    # Ids never become labels.
    assert not [name for name in after if pid in name]


def test_metrics_show_the_shipping_backlog(db):
    api = FhirClient()
    client = Client()
    assert scrape(client)["fhir_member_backlog_batches"] == 0
    # Rolled back at the end of the test, so never shipped: two pending batches.
    gid = api.post("/Group", group_of("Patient/a")).body["id"]
    add = [{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/b"}}}]
    assert api.patch(f"/Group/{gid}", add).status == 200
    samples = scrape(client)
    assert samples["fhir_member_backlog_batches"] == 2
    assert samples["fhir_member_backlog_events"] == 2
    assert samples["fhir_member_backlog_oldest_age_seconds"] >= 0


def test_shipped_batches_leave_the_backlog(live_api):
    gid = live_api.post("/Group", group_of("Patient/a")).body["id"]
    assert gid
    samples = scrape(Client())
    assert samples["fhir_member_backlog_batches"] == 0
    assert samples["fhir_member_backlog_oldest_age_seconds"] == 0


# --- the request log -----------------------------------------------------------------------


def test_every_request_logs_one_json_line_with_its_request_id(db, request_lines):
    api = FhirClient()
    created = api.post("/Patient", patient(), headers={"X-Request-ID": "client-chosen.1"}).raw
    assert created["X-Request-ID"] == "client-chosen.1"
    api.get("/Patient?family=Chalmers&birthdate=ge1970")
    assert len(request_lines) == 2
    first, second = request_lines
    assert set(first) == REQUEST_LINE_FIELDS
    assert first["request_id"] == "client-chosen.1"
    assert (first["method"], first["path"], first["status"]) == ("POST", "/4_0_0/Patient", 201)
    assert first["route"] == "/4_0_0/{resource_type}"
    assert first["bytes"] == len(created.content)
    assert first["duration_ms"] > 0
    assert first["client"] == "127.0.0.1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    # A generated id; the query string (patient data) is never logged.
    assert re.fullmatch(r"[0-9a-f]{32}", second["request_id"])
    assert second["path"] == "/4_0_0/Patient"
    assert "Chalmers" not in orjson.dumps(request_lines).decode()


def test_a_streamed_roster_is_logged_once_sent_with_its_bytes(db, request_lines):
    api = FhirClient()
    gid = api.post("/Group", group_of(*[f"Patient/p{i}" for i in range(50)])).body["id"]
    request_lines.clear()
    response = api.get(f"/Group/{gid}")
    assert response.raw.streaming
    [line] = request_lines
    assert line["bytes"] == len(response.content)
    assert line["route"] == INSTANCE_ROUTE


def test_refused_requests_are_logged_too(db, request_lines):
    response = FhirClient().get("/Patient?" + "&".join(f"p{i}=1" for i in range(500)))
    assert response.status == 400
    [line] = request_lines
    assert line["status"] == 400
    assert line["request_id"] == response.headers["X-Request-ID"]


def test_the_log_line_names_the_client_with_access_control_on(db, settings, request_lines):
    from tests.access.conftest import make_client

    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": True}
    caller = make_client()
    assert caller.get("/Patient").status == 200
    assert request_lines[-1]["actor"] == caller.actor


HELD_SECONDS = 2


class HeldStream:
    """A stream whose writes wait until the test releases it (a reader that stalls)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.text = ""

    def write(self, text: str) -> None:
        self.released.wait(timeout=HELD_SECONDS)
        self.text += text

    def flush(self) -> None:
        pass


def test_the_request_log_is_written_off_the_request_thread():
    # The request log's configured handler class, on a stream that holds every write: logging
    # a line must not wait for it, and closing the handler writes every queued line.
    handler_class = import_string(django_settings.LOGGING["handlers"]["requests"]["class"])
    stream = HeldStream()
    handler = handler_class(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("tests.request-log-off-thread")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        started = time.monotonic()
        for number in range(3):
            logger.warning("line %d", number)
        assert time.monotonic() - started < HELD_SECONDS
        assert stream.text == ""
        stream.released.set()
        handler.close()
        assert stream.text == "line 0\nline 1\nline 2\n"
    finally:
        logger.removeHandler(handler)
        stream.released.set()
        handler.close()


# --- a bad Host header ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/4_0_0/metadata", "/admin/", "/", "/healthz"])
def test_a_bad_host_gets_an_operation_outcome_and_no_traceback(db, path, caplog):
    with caplog.at_level(logging.WARNING, logger="django.security.DisallowedHost"):
        response = Client().get(path, HTTP_HOST="evil.example")
    assert response.status_code == 400
    assert response["Content-Type"].startswith("application/fhir+json")
    [issue] = response.json()["issue"]
    assert issue["diagnostics"] == MSG_BAD_HOST
    assert issue["details"]["coding"][0]["code"] == "MSG_BAD_HOST"
    [record] = [r for r in caplog.records if r.name == "django.security.DisallowedHost"]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert "evil.example" in record.getMessage()

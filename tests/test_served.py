"""The service as ``make run`` serves it (gunicorn through scripts/serve.sh, embedded
defaults): the README's tour runs against it top to bottom, and its probes, metrics and
request log work over real HTTP. The server is a subprocess on a free port (tests/served.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.served import ROOT, Served, free_port, serve

TOUR = ROOT / "scripts" / "tour.sh"
TOUR_START, TOUR_END = "# --- tour ---\n", "# --- end of tour ---\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the module; its log is kept among the pass's artefacts."""
    directory = tmp_path_factory.mktemp("served")
    try:
        with serve(directory) as server:
            yield server
    finally:
        artifacts = os.environ.get("FHIR_TEST_ARTIFACTS")
        if artifacts and (directory / "server.log").exists():
            Path(artifacts).mkdir(parents=True, exist_ok=True)
            shutil.copy(directory / "server.log", Path(artifacts) / "served-server.log")


def fetch(url: str, *, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET ``url``: status and body, error statuses included."""
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def log_lines(server: Served) -> list[dict]:
    """The server's request log lines (the JSON ones)."""
    return [json.loads(line) for line in server.log().splitlines() if line.startswith('{"time":')]


def test_the_tour_runs_top_to_bottom_twice(served):
    for _ in range(2):  # a second run on the same server holds too
        tour = subprocess.run(
            ["bash", str(TOUR), served.base], capture_output=True, text=True, timeout=300
        )
        assert tour.returncode == 0, tour.stdout + tour.stderr
        assert tour.stdout.rstrip().endswith("tour: every step answered as expected")


def test_the_tour_fails_loudly_on_an_unexpected_status():
    dead = f"http://127.0.0.1:{free_port()}/4_0_0"
    tour = subprocess.run(["bash", str(TOUR), dead], capture_output=True, text=True, timeout=60)
    assert tour.returncode == 1
    assert "tour: FAILED: POST /Patient" in tour.stderr


def test_the_readme_quotes_the_tour():
    script = TOUR.read_text()
    tour = script[script.index(TOUR_START) + len(TOUR_START) : script.index(TOUR_END)]
    assert tour.strip() in (ROOT / "README.md").read_text()


def test_probes_and_metrics_over_http(served):
    status, body = fetch(f"{served.root}/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, body = fetch(f"{served.root}/readyz")
    assert status == 200
    assert json.loads(body)["status"] == "ok"
    status, body = fetch(f"{served.root}/metrics")
    assert status == 200
    assert b"fhir_member_backlog_batches " in body
    assert b'django_http_requests_latency_seconds_by_view_method_count{method="GET"' in body


def lines_of(server: Served, request_id: str, wait: float = 10) -> list[dict]:
    """The request log lines of ``request_id`` (written by a thread of their own: waits up to
    ``wait`` seconds for the first)."""
    deadline = time.monotonic() + wait
    while True:
        found = [line for line in log_lines(server) if line["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_each_request_logs_one_json_line_on_stderr(served):
    status, _ = fetch(f"{served.base}/metadata", headers={"X-Request-ID": "served-check-1"})
    assert status == 200
    [line] = lines_of(served, "served-check-1")
    assert line["route"] == "/4_0_0/metadata"
    assert (line["method"], line["status"]) == ("GET", 200)
    assert line["bytes"] > 0


def test_a_graceful_stop_keeps_every_request_line(tmp_path):
    # The lines are queued for a writer thread: stopping the server (SIGTERM, as an
    # orchestrator does) writes all of them before the worker exits.
    with serve(tmp_path) as server:
        for number in range(100):
            status, _ = fetch(f"{server.root}/healthz", headers={"X-Request-ID": f"stop-{number}"})
            assert status == 200
        assert server.stop() == 0
        ids = {line["request_id"] for line in log_lines(server)}
    assert {f"stop-{number}" for number in range(100)} <= ids


def test_a_bad_host_is_a_400_outcome_and_leaves_no_traceback(served):
    status, body = fetch(f"{served.base}/metadata", headers={"Host": "evil.example"})
    assert status == 400
    assert json.loads(body)["resourceType"] == "OperationOutcome"
    status, _ = fetch(f"{served.root}/admin/", headers={"Host": "evil.example"})
    assert status == 400
    assert "Traceback" not in served.log()
    assert "Invalid HTTP_HOST header: 'evil.example'" in served.log()


def test_readiness_answers_503_when_the_metadata_store_is_down(tmp_path):
    dead_store = f"postgres://postgres@127.0.0.1:{free_port()}/fhirservice?connect_timeout=2"
    with serve(tmp_path, migrate=False, DATABASE_URL=dead_store) as server:
        status, body = fetch(f"{server.root}/readyz")
        assert status == 503
        answer = json.loads(body)
        assert answer["status"] == "down"
        assert answer["checks"]["metadata_store"]["status"] == "down"
        assert fetch(f"{server.root}/healthz")[0] == 200


def test_several_workers_on_chdb_are_refused_before_serving(tmp_path):
    # chdb opens a data path from one process only: a second worker would fail on its first
    # roster request, so serve.sh says why and exits before gunicorn starts.
    env = {
        **os.environ,
        "WEB_CONCURRENCY": "2",
        "CLICKHOUSE_URL": f"chdb:///{tmp_path}/chdb",
        "PORT": str(free_port()),
    }
    answer = subprocess.run(
        ["bash", str(ROOT / "scripts" / "serve.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode == 64
    assert "set WEB_CONCURRENCY=1 or point CLICKHOUSE_URL at a ClickHouse server" in answer.stderr
    assert not (tmp_path / "chdb").exists()

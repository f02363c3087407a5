"""``$export`` as ``make run`` serves it: the server process's own worker thread runs the job,
with nothing else started (the embedded default works alone), and a separate worker command
refuses the embedded store the server holds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from operations.export.management.commands.run_export_worker import MSG_CHDB_BUSY
from tests.served import ROOT, serve
from tests.support import not_in_cluster_pass

ASYNC = {"Accept": "application/fhir+json", "Prefer": "respond-async"}


def call(url: str, *, method: str = "GET", body: dict | None = None, headers: dict | None = None):
    """One request: status, headers and body (error statuses included)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})  # noqa: S310
    if data is not None:
        request.add_header("Content-Type", "application/fhir+json")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


@not_in_cluster_pass
def test_the_served_process_runs_an_export_alone(tmp_path: Path) -> None:
    with serve(tmp_path) as server:
        patient = {"resourceType": "Patient", "name": [{"family": "Served"}]}
        status, _, body = call(f"{server.base}/Patient", method="POST", body=patient)
        assert status == 201, body
        status, headers, body = call(f"{server.base}/Patient/$export", headers=ASYNC)
        assert status == 202, body
        location = headers["Content-Location"]
        assert location.startswith(f"{server.base}/$export-poll-status?_jobId=")
        deadline = time.monotonic() + 60
        while (answer := call(location))[0] == 202 and time.monotonic() < deadline:
            time.sleep(float(answer[1]["Retry-After"]) / 4)
        status, _, body = answer
        assert status == 200, body
        manifest = json.loads(body)
        assert [(e["type"], e["count"]) for e in manifest["output"]] == [("Patient", 1)]
        status, _, ndjson = call(manifest["output"][0]["url"])
        assert status == 200
        assert json.loads(ndjson.splitlines()[0])["name"] == [{"family": "Served"}]
        # A separate worker cannot open the chdb path the server holds: it says so and
        # exits, instead of claiming jobs whose rosters it could not read.
        worker = subprocess.run(
            [sys.executable, "manage.py", "run_export_worker", "--once"],
            cwd=ROOT,
            env=server.environment,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert worker.returncode != 0, worker.stdout
        chdb = f"chdb:///{server.environment['FHIR_VAR_DIR']}/chdb"
        assert MSG_CHDB_BUSY.format(url=chdb) in worker.stderr, worker.stderr

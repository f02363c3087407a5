"""A server process told to stop ships the member events it queued before it exits, within
``MEMBER_SHUTDOWN_WAIT``; what it cannot ship in time is marked for the relays and logged.

The first test stops a real served gunicorn (tests/served.py) with SIGTERM right after a burst
of member writes. The second runs the drain in-process against a ClickHouse that accepts
connections and never answers (a hung server): the round in flight cannot finish in time.
"""

from __future__ import annotations

import json
import logging
import socket
import sqlite3
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.test import override_settings

from groups.models import MemberOutbox
from groups.outbox import background
from tests.served import serve
from tests.support import FhirClient, not_in_cluster_pass, run_threads

WRITERS = 8
WRITES_EACH = 20
GROUPS = 4


def http(method: str, url: str, body: Any, content_type: str = "application/fhir+json") -> Any:
    """One request to the served process; its answer (headers and status)."""
    request = urllib.request.Request(  # noqa: S310 - a loopback URL of the test's own server
        url,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": content_type, "Prefer": "return=minimal"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:  # noqa: S310
        return answer


def group(*refs: str) -> dict[str, Any]:
    """A Group with these members."""
    members = [{"entity": {"reference": ref}} for ref in refs]
    return {"resourceType": "Group", "type": "person", "actual": True, "member": members}


@not_in_cluster_pass
def test_a_stopped_server_ships_what_it_queued_before_it_exits(tmp_path: Path) -> None:
    with serve(tmp_path, LOG_LEVEL="INFO") as server:
        ids = [
            http("POST", f"{server.base}/Group", group()).headers["Location"].split("/")[-3]
            for _ in range(GROUPS)
        ]

        def write(writer: int) -> None:
            for n in range(WRITES_EACH):
                member = {"entity": {"reference": f"Patient/w{writer}-{n}"}}
                http(
                    "PATCH",
                    f"{server.base}/Group/{ids[(writer + n) % GROUPS]}",
                    [{"op": "add", "path": "/member/-", "value": member}],
                    "application/json-patch+json",
                )

        run_threads(write, WRITERS)
        assert server.stop() == 0  # at once: the shipper's queue is not empty (~30 batches)
        log = server.log()
    outbox = sqlite3.connect(tmp_path / "var" / "fhirservice.sqlite3")
    try:
        pending, total = outbox.execute(
            "SELECT count(*) FILTER (WHERE shipped_at IS NULL), count(*) FROM groups_memberoutbox"
        ).fetchone()
    finally:
        outbox.close()
    assert (pending, total) == (0, WRITERS * WRITES_EACH)
    assert "Stopping: every member event batch this process queued is shipped" in log


@contextmanager
def hung_clickhouse() -> Iterator[str]:
    """A ClickHouse URL whose server accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        yield f"clickhouse://default@127.0.0.1:{port}/fhir_test?send_receive_timeout=5"


def test_a_stopping_process_leaves_what_it_could_not_ship_to_the_relays_and_says_so(
    live_api: FhirClient, caplog: Any
) -> None:
    created = live_api.post("/Group", group("Patient/a"))
    gid = created.body["id"]
    writer = FhirClient(wait_for_shipping=False)
    with hung_clickhouse() as url, override_settings(CLICKHOUSE_URL=url):
        add = [{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/b"}}}]
        answer = writer.patch(f"/Group/{gid}", add, headers={"Prefer": "return=minimal"})
        assert answer.status == 200
        with (
            override_settings(FHIR_SERVICE={"MEMBER_SHUTDOWN_WAIT": 0.5}),
            caplog.at_level(logging.INFO, logger="groups.outbox.background"),
        ):
            background.shutdown_drain()
        [left] = MemberOutbox.objects.filter(shipped_at__isnull=True)
        # Marked while the hung round still waits: the relays take it at their next round.
        assert left.last_error == background.MSG_LEFT_AT_EXIT
        assert background.flush(), "the hung round did not end"
    [record] = [r for r in caplog.records if r.name == "groups.outbox.background"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "Stopping: 1 member event batches this process queued are not shipped after 0.5 s; "
        "the outbox holds 1 pending batches (1 events"
    )

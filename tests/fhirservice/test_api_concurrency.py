"""Concurrent writers on one resource, through the HTTP API from real threads.

Each thread has its own Django test client and database connection (closed when the thread
ends); the ``live_api`` fixture commits for real, so the threads see each other's writes and
the database's own locking decides who wins. Invariants: exactly one writer wins per
version, versionIds stay contiguous from 1, and no acknowledged update is lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from fhirservice.models import ResourceVersion
from tests.support import FhirClient, patient, run_threads

THREADS = 20


def run_clients(work: Callable[[int, FhirClient], Any]) -> list[Any]:
    """Run ``work(index, client)`` in THREADS threads started together; their results."""
    return run_threads(lambda index: work(index, FhirClient()), THREADS)


def stored_versions(resource_id: str) -> list[int]:
    rows = ResourceVersion.objects.filter(resource_type="Patient", resource_id=resource_id)
    return sorted(rows.values_list("version_id", flat=True))


def identifier(index: int) -> dict[str, str]:
    return {"system": "urn:writer", "value": f"w{index}"}


def test_same_if_match_from_20_threads_lets_exactly_one_win(live_api):
    rid = live_api.post("/Patient", patient()).body["id"]

    def work(index: int, client: FhirClient) -> tuple[int, str | None]:
        body = patient(id=rid, identifier=[identifier(index)])
        response = client.put(f"/Patient/{rid}", body, headers={"If-Match": 'W/"1"'})
        codes = response.detail_codes() if response.status >= 400 else []
        return response.status, codes[0] if codes else None

    results = run_clients(work)
    assert Counter(results) == {(200, None): 1, (412, "MSG_VERSION_MISMATCH"): THREADS - 1}
    winner = next(i for i, (status, _) in enumerate(results) if status == 200)
    current = live_api.get(f"/Patient/{rid}")
    assert current.etag == 'W/"2"'
    assert current.body["identifier"] == [identifier(winner)]
    assert stored_versions(rid) == [1, 2]


def test_20_read_modify_write_loops_with_if_match_lose_no_update(live_api):
    rid = live_api.post("/Patient", patient()).body["id"]
    path = f"/Patient/{rid}"

    def work(index: int, client: FhirClient) -> list[tuple[int, int]]:
        attempts = []
        while True:
            current = client.get(path)
            version = int(current.body["meta"]["versionId"])
            body = dict(current.body)
            body["identifier"] = [*body.get("identifier", []), identifier(index)]
            response = client.put(path, body, headers={"If-Match": f'W/"{version}"'})
            attempts.append((version, response.status))
            if response.status == 200:
                assert response.etag == f'W/"{version + 1}"'
                return attempts
            assert response.status == 412, response
            assert response.detail_codes() == ["MSG_VERSION_MISMATCH"]
            assert len(attempts) < 500, "no progress"

    results = run_clients(work)
    wins = [version for attempts in results for version, status in attempts if status == 200]
    # Exactly one writer won each version 1..20.
    assert sorted(wins) == list(range(1, THREADS + 1))
    final = live_api.get(path)
    assert final.etag == f'W/"{THREADS + 1}"'
    values = sorted(i["value"] for i in final.body["identifier"])
    assert values == sorted(f"w{i}" for i in range(THREADS))
    assert stored_versions(rid) == list(range(1, THREADS + 2))
    history = live_api.get(f"{path}/_history?_count=100").body
    assert [e["response"]["etag"] for e in history["entry"]] == [
        f'W/"{v}"' for v in range(THREADS + 1, 0, -1)
    ]


def test_20_patches_without_if_match_all_apply(live_api):
    rid = live_api.post("/Patient", patient(identifier=[identifier(-1)])).body["id"]
    path = f"/Patient/{rid}"

    def work(index: int, client: FhirClient) -> str:
        ops = [{"op": "add", "path": "/identifier/-", "value": identifier(index)}]
        response = client.patch(path, ops)
        assert response.status == 200, response
        return response.etag

    etags = run_clients(work)
    assert sorted(etags) == sorted(f'W/"{v}"' for v in range(2, THREADS + 2))
    final = live_api.get(path).body
    assert final["meta"]["versionId"] == str(THREADS + 1)
    values = sorted(i["value"] for i in final["identifier"])
    assert values == sorted(f"w{i}" for i in range(-1, THREADS))
    assert stored_versions(rid) == list(range(1, THREADS + 2))
    # Every version holds exactly one more identifier than the one before.
    for version in range(1, THREADS + 2):
        body = live_api.get(f"{path}/_history/{version}").body
        assert len(body["identifier"]) == version


def test_20_puts_creating_one_id_make_one_create_and_contiguous_versions(live_api):
    path = "/Patient/raced"

    def work(index: int, client: FhirClient) -> int:
        response = client.put(path, patient(id="raced", identifier=[identifier(index)]))
        assert response.status in (200, 201), response
        return response.status

    statuses = run_clients(work)
    assert Counter(statuses) == {201: 1, 200: THREADS - 1}
    assert stored_versions("raced") == list(range(1, THREADS + 1))
    assert live_api.get(path).etag == f'W/"{THREADS}"'

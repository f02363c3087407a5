"""Concurrent member PATCHes on one Group, through real committed transactions.

Without ``If-Match`` every PATCH must land as its own version (the store retries lost
compare-and-set races against the newer version), and the final roster must equal applying
the patches one after another in version order. With ``If-Match`` exactly one writer wins
each version; the others get 412.
"""

from __future__ import annotations

from typing import Any

from groups.models import MemberOutbox
from groups.repository import MemberEventRepository
from tests.fhirservice.test_api_errors import assert_outcome
from tests.groups.conftest import (
    add,
    clickhouse_roster,
    create_group,
    current_key,
    history_versions,
    patch,
    read,
    refs_of,
    remove_ref,
)
from tests.support import FhirClient, run_threads

THREADS = 16
WRITES = 50
ROUNDS = 4


def ops_for(t: int, i: int) -> list[dict[str, Any]]:
    """Thread t's i-th patch: a member of its own (always a change, so always a version),
    sometimes a removal, and writes to shared members whose final state depends on order."""
    own = f"Patient/t{t:02d}-{i:02d}"
    ops = [add(own)]
    if i % 3 == 2:
        ops.append(remove_ref(f"Patient/t{t:02d}-{i - 1:02d}"))
    ops.append(add(f"Patient/s{i % 4}", period={"start": f"{2000 + t}-01-01"}))
    if i % 5 == 4:
        ops.append(remove_ref(f"Patient/s{(i + 1) % 4}"))
    if i % 7 == 6:
        ops.append(add(f"Patient/s{(i + 2) % 4}", inactive=True))
    return ops


def replay(initial: list[str], patches: list[tuple[int, list[dict[str, Any]]]]) -> list[dict]:
    """The roster after applying ``patches`` one by one in version order."""
    roster: dict[str, dict] = {ref: {"entity": {"reference": ref}} for ref in initial}
    for _, ops in sorted(patches, key=lambda p: p[0]):
        for op in ops:
            ref = op["value"]["entity"]["reference"]
            if op["op"] == "remove":
                roster.pop(ref, None)
            else:
                roster[ref] = op["value"]
    return [roster[ref] for ref in sorted(roster)]


def test_concurrent_patches_equal_their_serial_application(live_api):
    initial = ["Patient/s0", "Patient/s1"]
    gid = create_group(live_api, initial)

    def writer(t: int) -> list[tuple[int, list[dict[str, Any]]]]:
        client = FhirClient()
        done = []
        for i in range(WRITES):
            ops = ops_for(t, i)
            # Only the ETag matters here: no need to stream the roster back 800 times.
            response = client.patch(f"/Group/{gid}", ops, headers={"Prefer": "return=minimal"})
            assert response.status == 200, response
            done.append((int(response.etag[3:-1]), ops))
        return done

    patches = [p for per_thread in run_threads(writer, THREADS) for p in per_thread]
    versions = sorted(version for version, _ in patches)
    assert versions == list(range(2, THREADS * WRITES + 2))
    assert history_versions(gid) == list(range(1, THREADS * WRITES + 2))
    expected = replay(initial, patches)
    body = read(live_api, gid)
    assert body["member"] == expected
    active = sum(1 for m in expected if not m.get("inactive"))
    assert body["quantity"] == active
    assert int(body["meta"]["versionId"]) == THREADS * WRITES + 1
    # Everything was shipped after its commit, and ClickHouse alone agrees.
    assert not MemberOutbox.objects.filter(group_id=gid, shipped_at__isnull=True).exists()
    key = current_key(gid)
    assert clickhouse_roster(key) == refs_of(body)
    assert MemberEventRepository().count_active(key) == active


def test_with_if_match_one_writer_wins_each_version(live_api):
    gid = create_group(live_api, ["Patient/base"])
    winners = []
    for round_ in range(ROUNDS):
        version = int(read(live_api, gid)["meta"]["versionId"])

        def writer(t: int, round_: int = round_, version: int = version) -> tuple[int, Any]:
            response = patch(
                FhirClient(), gid, [add(f"Patient/r{round_}-t{t:02d}")], version=version
            )
            if response.status != 200:
                assert_outcome(response, 412, "MSG_VERSION_MISMATCH")
            return response.status, response

        results = run_threads(writer, THREADS)
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] + [412] * (THREADS - 1)
        t, (_, response) = next((t, r) for t, r in enumerate(results) if r[0] == 200)
        assert response.etag == f'W/"{version + 1}"'
        winners.append(f"Patient/r{round_}-t{t:02d}")
    body = read(live_api, gid)
    assert refs_of(body) == sorted(["Patient/base", *winners])
    assert body["quantity"] == ROUNDS + 1
    assert history_versions(gid) == list(range(1, ROUNDS + 2))

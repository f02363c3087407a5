"""What a member write costs the server beyond its events: work it must leave out.

Issue 16 asks for 500 member writes/s on two cores, ~1.5-2 ms of worker CPU each; these
tests pin the shortcuts that keep a roster write cheap, each with the case where the
shortcut must not apply. Timings live in ``bench/`` (``bench.member_writes``), not here.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection, connections
from django.test.utils import CaptureQueriesContext

from fhirservice.models import SearchToken
from fhirservice.store import services
from fhirservice.store.handlers import WriteContext
from groups.outbox import background
from operations.transactions import Region, RegionRace, run_region
from tests.groups.conftest import add, create_group, patched


@pytest.fixture
def extractions(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The resource keys whose search values the store extracts, call by call."""
    calls: list[str] = []
    extract = services.extract_rows

    def counting(resource_key: str, body: dict[str, Any], **kwargs: Any) -> Any:
        calls.append(resource_key)
        return extract(resource_key, body, **kwargs)

    monkeypatch.setattr(services, "extract_rows", counting)
    return calls


def tokens_of(gid: str) -> list[tuple[str, str]]:
    """(parameter, value) of a Group's stored search values."""
    rows = SearchToken.objects.filter(resource_key=f"Group/{gid}")
    return sorted(rows.values_list("param", "value"))


def test_a_member_patch_keeps_the_search_values_without_extracting_them(api, extractions):
    gid = create_group(api, ["Patient/a"], name="Cohort one")
    before = tokens_of(gid)
    extractions.clear()
    body = patched(api, gid, [add("Patient/b")])
    assert body["quantity"] == 2
    # Only quantity changed, which no Group search parameter reads: nothing to extract.
    assert extractions == []
    assert tokens_of(gid) == before
    response = api.get("/Group?name=Cohort")
    assert [entry["resource"]["id"] for entry in response.body["entry"]] == [gid]


def test_a_patch_that_changes_a_searchable_element_rewrites_the_search_values(api, extractions):
    gid = create_group(api, ["Patient/a"], name="Cohort one")
    extractions.clear()
    patched(api, gid, [add("Patient/b"), {"op": "replace", "path": "/name", "value": "Renamed"}])
    assert extractions  # the name changed: the values are extracted again
    assert api.get("/Group?name=Cohort").body.get("entry", []) == []
    response = api.get("/Group?name=Renamed")
    assert [entry["resource"]["id"] for entry in response.body["entry"]] == [gid]


def test_add_member_keeps_the_search_values_without_extracting_them(api, extractions):
    gid = create_group(api, [], name="Cohort two")
    identifier = {"system": "urn:test:write-cost", "value": "mrn-1"}
    created = api.post("/Patient", {"resourceType": "Patient", "identifier": [identifier]})
    assert created.status == 201, created
    before = tokens_of(gid)
    extractions.clear()
    response = api.post(
        f"/Group/{gid}/$add-member",
        {
            "resourceType": "Parameters",
            "parameter": [{"name": "identifier", "valueIdentifier": identifier}],
        },
    )
    assert response.status == 200, response
    assert extractions == []
    assert tokens_of(gid) == before


def test_a_region_does_not_read_again_what_it_wrote(api):
    gid = create_group(api, ["Patient/a"])
    context = WriteContext()

    def region(tx: Region) -> None:
        row = tx.read("Group", gid)
        tx.wrote(row.key, row.version_id + 1)  # as if it had written the next version
        with CaptureQueriesContext(connection) as captured:
            tx.verify()
        assert captured.captured_queries == []

    run_region(region, context=context)


def test_a_region_still_fails_when_a_version_it_only_read_moved_on(api):
    read_only = create_group(api, ["Patient/a"])
    written = create_group(api, ["Patient/a"])
    tx = Region(WriteContext())
    tx.read("Group", read_only)
    row = tx.read("Group", written)
    tx.wrote(row.key, row.version_id)
    patched(api, read_only, [add("Patient/b")])  # another writer moves it on
    with pytest.raises(RegionRace):
        tx.verify()


@pytest.mark.django_db(transaction=True)
def test_the_shipper_keeps_its_connection_while_work_is_queued_and_closes_it_when_idle():
    connection.ensure_connection()
    background._release_connections(keep=True)
    assert connection.connection is not None  # the next round reuses it
    background._release_connections(keep=False)
    assert all(c.connection is None for c in connections.all(initialized_only=True))


def test_add_member_locks_the_group_at_its_first_read(api):
    if not connection.features.has_select_for_update:
        pytest.skip("row locks are PostgreSQL's; SQLite regions hold the write lock")
    gid = create_group(api, [])
    identifier = {"system": "urn:test:write-cost", "value": "mrn-2"}
    created = api.post("/Patient", {"resourceType": "Patient", "identifier": [identifier]})
    assert created.status == 201, created
    with CaptureQueriesContext(connection) as captured:
        response = api.post(
            f"/Group/{gid}/$add-member",
            {
                "resourceType": "Parameters",
                "parameter": [{"name": "identifier", "valueIdentifier": identifier}],
            },
        )
    assert response.status == 200, response
    # Reads of one row by key (the Patient's visibility check reads by ``IN``); the key
    # itself may be a bound parameter, not in the text.
    row_reads = [
        query["sql"]
        for query in captured.captured_queries
        if query["sql"].startswith("SELECT")
        and 'FROM "fhirservice_storedresource"' in query["sql"]
        and '"fhirservice_storedresource"."key" = ' in query["sql"]
    ]
    # The region's first read of the Group already holds it: a concurrent PATCH waits.
    assert row_reads and row_reads[0].rstrip().endswith("FOR UPDATE"), row_reads

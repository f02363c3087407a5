"""What a member write costs the server beyond its events: work it must leave out.

Issue 16 asks for 500 member writes/s on two cores, ~1.5-2 ms of worker CPU each; these
tests pin the shortcuts that keep a roster write cheap, each with the case where the
shortcut must not apply. Timings live in ``bench/`` (``bench.member_writes``), not here.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.db import connection, connections
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fhirservice.models import ResourceVersion, SearchToken, StoredResource
from fhirservice.store import services
from fhirservice.store.handlers import WriteContext
from groups.models import MemberOutbox
from groups.outbox import background
from operations.transactions import Region, RegionRace, run_region
from tests.groups.conftest import add, create_group, patch, patched

WRITES = ("INSERT", "UPDATE", "DELETE", "WITH")


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


def test_a_member_patch_stores_its_rows_in_one_statement_on_postgresql(api):
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's data-modifying WITH")
    gid = create_group(api, ["Patient/a"])
    with CaptureQueriesContext(connection) as captured:
        patched(api, gid, [add("Patient/b")])
    writes = [q["sql"] for q in captured.captured_queries if q["sql"].startswith(WRITES)]
    # The outbox row and the history row ride in the current row's UPDATE: one statement
    # after the locking read, not three.
    assert len(writes) == 1, writes
    assert writes[0].startswith("WITH")
    for part in ('INTO "groups_memberoutbox"', 'INTO "fhirservice_resourceversion"'):
        assert part in writes[0]
    assert ' UPDATE "fhirservice_storedresource" SET ' in writes[0]
    stored = StoredResource.objects.get(key=f"Group/{gid}")
    assert stored.version_id == 2
    assert ResourceVersion.objects.filter(key=f"Group/{gid}/_history/2").exists()
    assert MemberOutbox.objects.filter(group_id=gid, version=2).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_member_patch_whose_outbox_row_fails_leaves_nothing(live_api):
    gid = create_group(live_api, ["Patient/a"])
    # A stray outbox row under the key the next version's row gets: the write's statement
    # fails (its history row and UPDATE with it, on PostgreSQL), and is retried until 409.
    roster = MemberOutbox.objects.get(group_id=gid, version=1).roster_key
    MemberOutbox.objects.create(
        key=f"{roster}/2/0",
        roster_key=roster,
        group_id=gid,
        version=2,
        event_count=0,
        events="[]",
        recorded_at=timezone.now(),
        shipped_at=timezone.now(),
    )
    retries = {**settings.FHIR_SERVICE, "WRITE_RETRIES": 1}
    with override_settings(FHIR_SERVICE=retries):
        response = patch(live_api, gid, [add("Patient/b")])
    assert response.status == 409, response
    assert StoredResource.objects.get(key=f"Group/{gid}").version_id == 1
    assert not ResourceVersion.objects.filter(key=f"Group/{gid}/_history/2").exists()
    assert MemberOutbox.objects.filter(group_id=gid, version=2).count() == 1
    # The connection works on: the next write goes through once the key is free.
    MemberOutbox.objects.filter(key=f"{roster}/2/0").delete()
    assert patched(live_api, gid, [add("Patient/b")])["quantity"] == 2


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's pattern indexes")
def test_the_outbox_key_has_no_pattern_index(db):
    """Every member write inserts an outbox row and shipping updates it (not HOT: shipped_at
    is indexed); Django's ``LIKE`` index of the key, which no query reads, took an entry
    each time (groups migration 0004)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = %s AND indexname LIKE %s",
            [MemberOutbox._meta.db_table, "%\\_like"],
        )
        assert cursor.fetchall() == []

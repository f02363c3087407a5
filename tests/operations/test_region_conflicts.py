"""Serializable operations on different Groups do not conflict on PostgreSQL (issue 16).

PostgreSQL's serializable isolation records an index read as a lock on the index page, and
every Group's key sits on the few pages of the primary key that hold all Groups. An update
that writes a new index entry (not HOT) then conflicts with every concurrent region that
read that page: two ``$add-member`` on different Groups each read the page and wrote into
it, and one of them failed and ran again. No index of the current rows holds
``last_updated`` any more (``StoredResource.updated_minute``), so a Group update within the
minute of its previous version is HOT and writes no index entry.

That holds where PostgreSQL reads the current rows and the tokens through their indexes:
past a few pages (~150 resources). A table that ``ANALYZE`` saw at a few pages is read
whole (a sequential scan), and a serializable whole-table read locks the whole table; then
any two regions conflict and one runs again (ADR 0011). The test database is emptied
between tests and autovacuum analyzes it at moments of its own, so the no-conflict test
first fills the tables past that size, and the last test pins what happens below it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from django.db import connection

from operations import group_add_member
from tests.operations.conftest import (
    add_member,
    create_group,
    create_patient,
    group_version,
    ident,
)
from tests.operations.conftest import new_identifier as fresh_identifier
from tests.support import FhirClient, bundle, run_threads

# A test's writes stay within one minute when it starts at most this far into one.
LATEST_START_SECOND = 40
# Patients that take the current rows (~18 per page) and the tokens past the size that
# PostgreSQL reads whole once analyzed: ~100 was at the edge, 200 clear of it.
FILLER_PATIENTS = 300
STATEMENT_STATS = (
    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables "
    "WHERE relname = 'fhirservice_storedresource'"
)


@pytest.fixture(autouse=True)
def _postgresql() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's HOT updates and serializable snapshot isolation")


def _same_minute() -> None:
    """Wait for the next minute when this one is nearly over: an update that moves a row to
    another minute changes an indexed column, and is not HOT by design."""
    second = datetime.now(UTC).second
    if second > LATEST_START_SECOND:
        time.sleep(60.5 - second)


def _fill_tables(api: FhirClient) -> None:
    """Give the current rows and the tokens the size at which PostgreSQL reads them through
    their indexes, whenever autovacuum last analyzed them (one transaction Bundle)."""
    entries = (
        {
            "resource": {"resourceType": "Patient", "identifier": [fresh_identifier()]},
            "request": {"method": "POST", "url": "Patient"},
        }
        for _ in range(FILLER_PATIENTS)
    )
    response = api.post("", bundle("transaction", *entries))
    assert response.status == 200, response


def _analyze() -> None:
    """Have PostgreSQL's statistics describe the current rows and the tokens as they are."""
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE fhirservice_storedresource, fhirservice_searchtoken")


def _updates() -> tuple[int, int]:
    """(updates, HOT updates) of the current rows in this transaction so far."""
    with connection.cursor() as cursor:
        cursor.execute(STATEMENT_STATS)
        return cursor.fetchone()


def test_a_group_update_is_hot(api: FhirClient) -> None:
    _same_minute()
    gid = create_group(api, [create_patient(api)])
    updates, hot = _updates()
    response = api.patch(
        f"/Group/{gid}",
        [{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/x"}}}],
    )
    assert response.status == 200, response
    identifier = fresh_identifier()
    create_patient(api, identifier)
    assert add_member(api, gid, ident(identifier)).status == 200
    after, hot_after = _updates()
    assert (after - updates, hot_after - hot) == (2, 2)


def _concurrent_adds(api: FhirClient, monkeypatch) -> Counter[int]:
    """Two ``$add-member`` on two Groups whose first attempts both read before either
    writes, on statistics that describe the tables as they are; how often each one ran (by
    the index of its identifier)."""
    _same_minute()
    identifiers = [fresh_identifier() for _ in range(4)]
    for identifier in identifiers:
        create_patient(api, identifier)
    groups = [create_group(api), create_group(api)]
    # A first add on each Group builds its roster digest, so the adds below know their
    # Patient is no member without reading the outbox (a read of its own index pages).
    for gid, identifier in zip(groups, identifiers[:2], strict=True):
        assert add_member(api, gid, ident(identifier)).status == 200
    _analyze()

    attempts: Counter[int] = Counter()
    both_read = threading.Barrier(2, timeout=30)
    lookup = group_add_member.patient_by_identifier

    def patient_by_identifier(identifier: dict[str, str]) -> str:
        # Each region has read its Group and looks its Patient up; the first attempts of
        # both wait here for each other, so both have read before either writes.
        index = identifiers.index(identifier)
        attempts[index] += 1
        found = lookup(identifier)
        if attempts[index] == 1:
            both_read.wait()
        return found

    monkeypatch.setattr(group_add_member, "patient_by_identifier", patient_by_identifier)

    def add(index: int) -> int:
        client = FhirClient()
        return add_member(client, groups[index], ident(identifiers[2 + index])).status

    assert run_threads(add, 2, timeout=120) == [200, 200]
    assert [group_version(api, gid) for gid in groups] == [3, 3]
    return attempts


def test_add_members_on_different_groups_run_once(live_api: FhirClient, monkeypatch) -> None:
    _fill_tables(live_api)
    assert dict(_concurrent_adds(live_api, monkeypatch)) == {2: 1, 3: 1}


def test_add_members_on_tables_read_whole_both_land(live_api: FhirClient, monkeypatch) -> None:
    # A few rows, analyzed: the regions' reads lock whole tables, so the two conflict and
    # one of them runs again; both land.
    assert sorted(_concurrent_adds(live_api, monkeypatch).values()) == [1, 2]

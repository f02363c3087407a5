"""Serializable operations on different Groups do not conflict on PostgreSQL (issue 16).

PostgreSQL's serializable isolation records an index read as a lock on the index page, and
every Group's key sits on the few pages of the primary key that hold all Groups. An update
that writes a new index entry (not HOT) then conflicts with every concurrent region that
read that page: two ``$add-member`` on different Groups each read the page and wrote into
it, and one of them failed and ran again. No index of the current rows holds
``last_updated`` any more (``StoredResource.updated_minute``), so a Group update within the
minute of its previous version is HOT and writes no index entry.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime

import pytest
from django.db import connection

from operations import group_add_member
from tests.operations.conftest import add_member, create_group, create_patient, ident
from tests.operations.conftest import new_identifier as fresh_identifier
from tests.support import FhirClient, run_threads

# A test's writes stay within one minute when it starts at most this far into one.
LATEST_START_SECOND = 40
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


def test_add_members_on_different_groups_run_once(live_api: FhirClient, monkeypatch) -> None:
    _same_minute()
    identifiers = [fresh_identifier() for _ in range(4)]
    for identifier in identifiers:
        create_patient(live_api, identifier)
    groups = [create_group(live_api), create_group(live_api)]
    # A first add on each Group builds its roster digest, so the adds below know their
    # Patient is no member without reading the outbox (a read of its own index pages).
    for gid, identifier in zip(groups, identifiers[:2], strict=True):
        assert add_member(live_api, gid, ident(identifier)).status == 200

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
    assert dict(attempts) == {2: 1, 3: 1}

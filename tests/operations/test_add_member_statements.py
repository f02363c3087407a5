"""The statements ``$add-member`` sends, pinned, and the guarantees that fewer of them keep.

A served ``$add-member`` by identifier (access control on, as ``bench.member_writes`` runs
it) sends its bearer token's lookup, the Group's row read locked, the Patient's lookup (its
identifier's tokens with the organization of each one's row) and the Group's new version;
on PostgreSQL the transaction begins serializable in one round trip (``BEGIN ISOLATION
LEVEL SERIALIZABLE``). It sent seven more on PostgreSQL: ``SET TRANSACTION``, ``SAVEPOINT``
and ``RELEASE SAVEPOINT`` around the Group's write, a second locked read of the Group, and
a second query for the Patient (the organizations of its rows). Transaction control (BEGIN,
COMMIT) is left out of the statement counts: SQLite's ``BEGIN IMMEDIATE`` is a statement,
PostgreSQL's BEGIN is psycopg's; the round trips on PostgreSQL are counted from libpq's
trace.

The region still runs serializable, checks the version its client named, rolls back whole
when anything in it fails (no savepoint to stop at) and runs again after a lost race.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from fhirservice import db
from fhirservice.errors import Conflict, PreconditionFailed
from fhirservice.models import StoredResource
from fhirservice.store import services
from fhirservice.store.handlers import WriteContext
from fhirservice.store.selectors import resource_read
from groups.services import group_members_change
from groups.session import RosterDelta
from operations import group_add_member
from tests.access.conftest import TokenClient, make_client
from tests.operations.conftest import (
    add_member,
    assert_error,
    assert_version_conflict,
    group_body,
    ident,
    new_identifier,
    out_value,
    param,
    roster,
    store_counts,
    text,
)
from tests.support import READY_FOR_QUERY, FhirClient, pg_trace, run_threads

TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK")
TABLE_RE = re.compile(r'\b(?:FROM|JOIN|INTO|UPDATE)\s+"?(\w+)')
TOKEN_LOOKUP = "oauth2_provider_accesstoken oauth2_provider_application fhir_access_clientprofile"
GROUP_READ = "SELECT fhirservice_storedresource"
# The tables in the order the statement names them: the organization's subquery first.
PATIENT_LOOKUP = "SELECT fhirservice_storedresource fhirservice_searchtoken"
WRITERS = 8


def statements(captured: CaptureQueriesContext) -> list[str]:
    """Each statement as its verb and the tables it names in order, ``FOR UPDATE`` kept (a
    WITH statement's verb is its main statement's: the UPDATE of a new version)."""
    found = []
    for query in captured.captured_queries:
        sql = query["sql"].strip()
        if sql.upper().startswith(TRANSACTION_CONTROL):
            continue
        verb = "UPDATE" if sql.upper().startswith("WITH") else sql.split()[0].upper()
        tables = list(dict.fromkeys(TABLE_RE.findall(sql)))
        lock = ["FOR UPDATE"] if sql.upper().endswith("FOR UPDATE") else []
        found.append(" ".join([verb, *tables, *lock]))
    return found


def isolation() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW transaction_isolation")
        return cursor.fetchone()[0]


def postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's isolation levels and round trips")


@pytest.fixture
def client(transactional_db: Any, settings: Any) -> TokenClient:
    """A client of one organization with a bearer token; writes commit, as served."""
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": True}
    return make_client(organization="bench", scopes="system/*.*")


def patient(client: Any, identifier: dict[str, str]) -> str:
    response = client.post("/Patient", {"resourceType": "Patient", "identifier": [identifier]})
    assert response.status == 201, response
    return f"Patient/{response.body['id']}"


def group(client: Any) -> str:
    response = client.post("/Group", group_body())
    assert response.status == 201, response
    return response.body["id"]


def warmed_group(client: TokenClient) -> tuple[str, dict[str, str]]:
    """A Group that had one $add-member (first-use work stays out of the counts) and the
    identifier of a Patient that is no member yet."""
    first, second = new_identifier(), new_identifier()
    patient(client, first)
    patient(client, second)
    gid = group(client)
    assert add_member(client, gid, ident(first)).status == 200
    return gid, second


def test_add_member_reads_the_group_once_and_the_patient_in_one_statement(
    client: TokenClient,
) -> None:
    gid, identifier = warmed_group(client)
    with CaptureQueriesContext(connection) as captured:
        response = add_member(client, gid, ident(identifier))
    assert response.status == 200, response
    sent = statements(captured)
    assert not [s for s in sent if s.startswith(("SET", "SAVEPOINT", "RELEASE"))], sent
    if connection.vendor == "postgresql":
        # The new version's UPDATE carries its history and outbox rows (store.rows).
        assert sent == [
            f"SELECT {TOKEN_LOOKUP}",
            f"{GROUP_READ} FOR UPDATE",
            PATIENT_LOOKUP,
            "UPDATE groups_memberoutbox fhirservice_resourceversion fhirservice_storedresource",
        ]
    else:
        assert sent[:3] == [f"SELECT {TOKEN_LOOKUP}", GROUP_READ, PATIENT_LOOKUP]
        assert GROUP_READ not in sent[3:] and PATIENT_LOOKUP not in sent[3:], sent


def test_add_member_is_six_round_trips_on_postgresql(client: TokenClient) -> None:
    postgresql_only()
    gid, identifier = warmed_group(client)
    with pg_trace() as trace:
        response = add_member(client, gid, ident(identifier))
    assert response.status == 200, response
    # The token, BEGIN, the Group, the Patient, the UPDATE, COMMIT.
    assert sum(READY_FOR_QUERY in line for line in trace) == 6
    begins = [line for line in trace if "\tQuery\t" in line and '"BEGIN' in line]
    assert len(begins) == 1 and '"BEGIN ISOLATION LEVEL SERIALIZABLE"' in begins[0], begins
    assert not [line for line in trace if "SET TRANSACTION" in line or "SAVEPOINT" in line]


def test_a_region_runs_serializable_and_the_next_transaction_does_not(
    client: TokenClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    postgresql_only()
    gid, identifier = warmed_group(client)
    seen: list[str] = []
    lookup = group_add_member.patient_by_identifier

    def spying(value: dict[str, str]) -> str:
        seen.append(isolation())
        return lookup(value)

    monkeypatch.setattr(group_add_member, "patient_by_identifier", spying)
    assert add_member(client, gid, ident(identifier)).status == 200
    with transaction.atomic():
        seen.append(isolation())
    assert seen == ["serializable", "read committed"]


def test_on_commit_work_does_not_inherit_serializable(transactional_db: Any) -> None:
    """The connection's level is back before the on-commit callbacks (the outbox's shipping)
    run, so a transaction they open is not serializable either."""
    postgresql_only()
    seen: list[str] = []

    def after_commit() -> None:
        with transaction.atomic():
            seen.append(isolation())

    with transaction.atomic():
        db.serializable()
        transaction.on_commit(after_commit)
        seen.append(isolation())
    with pytest.raises(RuntimeError), transaction.atomic():
        db.serializable()
        seen.append(isolation())
        raise RuntimeError
    with transaction.atomic():
        seen.append(isolation())
    assert seen == ["serializable", "read committed", "serializable", "read committed"]


def test_concurrent_add_members_on_one_group_each_make_one_version(live_api: FhirClient) -> None:
    identifiers = [new_identifier() for _ in range(WRITERS)]
    patients = [patient(live_api, identifier) for identifier in identifiers]
    gid = group(live_api)

    def add(index: int) -> tuple[int, str]:
        response = add_member(FhirClient(), gid, ident(identifiers[index]))
        assert response.status == 200, response
        return response.status, out_value(response, "groupVersion")

    results = run_threads(add, WRITERS, timeout=120)
    assert sorted(int(version) for _, version in results) == list(range(2, WRITERS + 2))
    assert roster(live_api, gid) == dict.fromkeys(patients, False)
    history = live_api.get(f"/Group/{gid}/_history?_count=100")
    assert history.body["total"] == WRITERS + 1


def test_stale_group_version_is_409_and_changes_nothing(live_api: FhirClient) -> None:
    identifier = new_identifier()
    patient(live_api, identifier)
    gid = group(live_api)
    before = store_counts()
    response = add_member(live_api, gid, ident(identifier), text("groupVersion", "7"))
    assert_version_conflict(response, f"Group/{gid}", "7", 1)
    assert store_counts() == before


def test_unknown_identifier_is_an_outcome_and_changes_nothing(live_api: FhirClient) -> None:
    gid = group(live_api)
    before = store_counts()
    response = add_member(live_api, gid, ident(new_identifier()))
    assert_error(response, 404, "not-found", "MSG_PATIENT_NOT_FOUND")
    assert store_counts() == before
    assert live_api.get(f"/Group/{gid}").body["meta"]["versionId"] == "1"


def test_an_error_after_the_writes_rolls_the_whole_region_back(
    live_api: FhirClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Patient the DTO creates and the Group's version are written in blocks without a
    savepoint; an error after them still leaves nothing of the region stored."""
    gid = group(live_api)
    before = store_counts()

    def write_then_fail(**kwargs: Any) -> Any:
        group_members_change(**kwargs)
        raise Conflict("after the writes", detail_code="MSG_CONCURRENT_WRITE")

    monkeypatch.setattr(group_add_member, "group_members_change", write_then_fail)
    dto = {"resourceType": "Patient", "identifier": [new_identifier()]}
    response = add_member(live_api, gid, param("patient", resource=dto))
    assert response.status == 409, response
    assert store_counts() == before
    assert live_api.get(f"/Group/{gid}").body["meta"]["versionId"] == "1"


def test_a_lost_compare_and_set_runs_the_region_again(
    live_api: FhirClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A race lost by a write inside the region (no savepoint around it) rolls the region
    back, and its next attempt succeeds: one new version, the member added once."""
    identifier = new_identifier()
    pid = patient(live_api, identifier)
    gid = group(live_api)
    real = services.update_row
    lost: list[str] = []

    def lose_once(*args: Any, **kwargs: Any) -> int:
        if not lost:
            lost.append(args[1])
            return 0
        return real(*args, **kwargs)

    monkeypatch.setattr(services, "update_row", lose_once)
    response = add_member(live_api, gid, ident(identifier))
    assert response.status == 200, response
    assert lost == [f"Group/{gid}"]
    assert out_value(response, "groupVersion") == "2"
    assert roster(live_api, gid) == {pid: False}
    assert live_api.get(f"/Group/{gid}/_history").body["total"] == 2


def test_a_locked_row_keeps_the_version_check(live_api: FhirClient) -> None:
    """The write that takes the region's locked read still answers 412 to a version that
    is not that row's, and takes such a row only inside the caller's transaction."""
    gid = group(live_api)
    context = WriteContext()
    with transaction.atomic():
        row = resource_read(resource_type="Group", resource_id=gid, lock=True)
        with pytest.raises(PreconditionFailed):
            group_members_change(
                group_id=gid, delta=RosterDelta(), context=context, if_match=2, locked=row
            )
    with pytest.raises(ValueError, match=f"Group/{gid}"):
        group_members_change(group_id=gid, delta=RosterDelta(), context=context, locked=row)
    assert StoredResource.objects.get(key=f"Group/{gid}").version_id == 1


def test_an_unrestricted_callers_patient_lookup_reads_no_current_row(
    live_api: FhirClient,
) -> None:
    # As visible_keys, which reads no row for a caller without a boundary: the join read the
    # current rows' key index for nothing (in a serializable region, predicate locks too).
    from fhirservice import access
    from operations.patients import patient_keys

    identifier = new_identifier()
    created = live_api.post("/Patient", {"resourceType": "Patient", "identifier": [identifier]})
    assert created.status == 201, created
    with access.acting_as(access.Access()), CaptureQueriesContext(connection) as captured:
        keys = patient_keys(identifier)
    assert keys == [f"Patient/{created.body['id']}"]
    assert [q["sql"] for q in captured.captured_queries if "storedresource" in q["sql"]] == []
    with (
        access.acting_as(access.Access(organization="elsewhere")),
        CaptureQueriesContext(connection) as restricted,
    ):
        assert patient_keys(identifier) == keys  # created without organization: shared
    assert any("storedresource" in q["sql"] for q in restricted.captured_queries)

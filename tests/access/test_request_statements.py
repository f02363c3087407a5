"""The metadata-store statements of a plain Patient create and read, pinned.

Issue 17 budgets a plain create at 4 ms and a read at 1.5 ms as served; each statement costs
its compilation in the ORM and a round trip, so one more on these paths is a regression this
test shows (the timings themselves live in ``bench/``, row 7). Access control is on, as the
benchmark and production run: the bearer token's lookup is one of the statements.

Transaction control (BEGIN, COMMIT) is left out of the count: SQLite's ``BEGIN IMMEDIATE``
is a statement, PostgreSQL's implicit BEGIN is not. On PostgreSQL the round trips themselves
are counted too, from libpq's trace of the connection (each ends with the server's
ReadyForQuery): transaction control and the network wait are what a statement count misses.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from oauth2_provider.models import get_access_token_model

from fhirservice.models import ResourceVersion, SearchToken, StoredResource
from fhirservice.store import services
from tests.access.conftest import TokenClient, make_client
from tests.support import round_trips

TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK")
TABLE_RE = re.compile(r'\b(?:FROM|JOIN|INTO)\s+"?(\w+)')
PATIENT = {
    "resourceType": "Patient",
    "identifier": [{"system": "urn:test:statements", "value": "mrn-1"}],
    "active": True,
    "name": [{"family": "Family", "given": ["Given", "G1"]}],
    "telecom": [{"system": "phone", "value": "+1-555-0001"}],
    "gender": "female",
    "birthDate": "1971-02-11",
    "address": [{"line": ["1 Main St"], "city": "Springfield", "country": "US"}],
}


def statements(captured: CaptureQueriesContext) -> list[str]:
    """Each data statement as its verb and the tables it names in order, e.g. ``INSERT
    fhirservice_storedresource`` (a WITH statement's verb is its main statement's)."""
    found = []
    for query in captured.captured_queries:
        sql = query["sql"].strip()
        if sql.upper().startswith(TRANSACTION_CONTROL):
            continue
        verb = "INSERT" if sql.upper().startswith("WITH") else sql.split()[0].upper()
        tables = list(dict.fromkeys(TABLE_RE.findall(sql)))
        found.append(" ".join([verb, *tables]))
    return found


TOKEN_LOOKUP = "oauth2_provider_accesstoken oauth2_provider_application fhir_access_clientprofile"


@pytest.fixture
def client(transactional_db: Any) -> TokenClient:
    """A client with Patient scopes; writes commit, as served (no test transaction around)."""
    return make_client(organization="bench", scopes="system/Patient.cruds")


def test_a_plain_create_is_a_token_lookup_and_one_insert(client: TokenClient) -> None:
    client.post("/Patient", PATIENT)  # warm: first-use work stays out of the count
    with CaptureQueriesContext(connection) as captured:
        response = client.post("/Patient", PATIENT, headers={"Prefer": "return=minimal"})
    assert response.status == 201, response
    # No read of the "current row": a server-assigned UUID has none.
    tables = [
        "fhirservice_storedresource",
        "fhirservice_resourceversion",
        "fhirservice_searchtoken",
    ]
    if connection.vendor == "postgresql":
        # One statement (WITH ... INSERT), the whole transaction (store.rows.insert_all).
        assert statements(captured) == [f"SELECT {TOKEN_LOOKUP}", f"INSERT {' '.join(tables)}"]
    else:
        # all the search rows in the last INSERT
        assert statements(captured) == [f"SELECT {TOKEN_LOOKUP}"] + [f"INSERT {t}" for t in tables]


def test_a_plain_create_is_two_round_trips_on_postgresql(client: TokenClient) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's round trips")
    client.post("/Patient", PATIENT)
    with round_trips() as count:
        response = client.post("/Patient", PATIENT, headers={"Prefer": "return=minimal"})
    assert response.status == 201, response
    # The token's lookup and the insert; no BEGIN, no COMMIT.
    assert count == [2]
    resource_id = response.headers["Location"].split("/Patient/")[1].split("/")[0]
    created = StoredResource.objects.get(key=f"Patient/{resource_id}")
    assert created.version_id == 1
    assert ResourceVersion.objects.filter(key__startswith=f"{created.key}/_history/").count() == 1
    assert SearchToken.objects.filter(resource_key=created.key).exists()


def test_a_plain_create_runs_a_prepared_statement_on_postgresql(client: TokenClient) -> None:
    """The create's one statement is prepared per connection, as the lookups are: its text
    is the same for every create with as many search rows."""
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's prepared statements")
    for _ in range(2):
        response = client.post("/Patient", PATIENT, headers={"Prefer": "return=minimal"})
        assert response.status == 201, response
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    inserts = [sql for sql in prepared if sql.startswith("WITH")]
    assert len(inserts) == 1
    assert "fhirservice_searchtoken" in inserts[0]


def test_a_create_whose_insert_fails_leaves_nothing_and_the_connection_works(
    client: TokenClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stray history row under the id the create will get: its INSERT of version 1 fails
    # after the current row's and before the search rows' (one statement on PostgreSQL).
    taken = uuid.UUID("00000000-0000-4000-8000-000000000017")
    key = f"Patient/{taken}"
    ResourceVersion.objects.create(
        key=f"{key}/_history/1",
        resource_type="Patient",
        resource_id=str(taken),
        version_id=1,
        incarnation=1,
        last_updated=timezone.now(),
        method="POST",
        body="{}",
    )
    monkeypatch.setattr(services.uuid, "uuid4", lambda: taken)
    retries = {**settings.FHIR_SERVICE, "WRITE_RETRIES": 1}
    with override_settings(FHIR_SERVICE=retries), CaptureQueriesContext(connection) as captured:
        response = client.post("/Patient", PATIENT)
    assert response.status == 409, response
    if connection.vendor == "postgresql":
        assert statements(captured)[-1].startswith("INSERT fhirservice_storedresource fhir")
    assert not StoredResource.objects.filter(key=key).exists()
    assert not SearchToken.objects.filter(resource_key=key).exists()
    assert ResourceVersion.objects.filter(key__startswith=f"{key}/").count() == 1
    monkeypatch.undo()
    # The connection is back in Django's hands: transactions commit and roll back as before.
    assert not connection.in_atomic_block
    assert connection.get_autocommit()
    response = client.post("/Patient", PATIENT)
    assert response.status == 201, response
    with pytest.raises(RuntimeError), transaction.atomic():
        StoredResource.objects.filter(key=f"Patient/{response.body['id']}").delete()
        raise RuntimeError("roll back")
    assert client.get(f"/Patient/{response.body['id']}").status == 200


def test_a_plain_create_on_sqlite_inserts_without_statement_journals(client: TokenClient) -> None:
    """``INSERT OR ROLLBACK``: a failure rolls the whole transaction back, so SQLite keeps
    no journal of the statement alone (the search rows' spilled to a temporary file)."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite's statement journals")
    client.post("/Patient", PATIENT)
    with CaptureQueriesContext(connection) as captured:
        response = client.post("/Patient", PATIENT, headers={"Prefer": "return=minimal"})
    assert response.status == 201, response
    inserts = [q["sql"] for q in captured.captured_queries if q["sql"].startswith("INSERT")]
    assert len(inserts) == 3
    assert all(sql.startswith("INSERT OR ROLLBACK INTO") for sql in inserts)


def test_a_create_whose_search_rows_fail_leaves_nothing_and_the_connection_works(
    client: TokenClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stray search row under the key of the create's first one: the last INSERT fails,
    # after the current row's and the history row's (on SQLite, rolling all of it back).
    taken = uuid.UUID("00000000-0000-4000-8000-000000000018")
    key = f"Patient/{taken}"
    SearchToken.objects.create(
        key=f"{key}#0", resource_key="Patient/stray", resource_type="Patient", param="stray"
    )
    monkeypatch.setattr(services.uuid, "uuid4", lambda: taken)
    retries = {**settings.FHIR_SERVICE, "WRITE_RETRIES": 1}
    with override_settings(FHIR_SERVICE=retries):
        response = client.post("/Patient", PATIENT)
    assert response.status == 409, response
    assert not StoredResource.objects.filter(key=key).exists()
    assert not ResourceVersion.objects.filter(key__startswith=f"{key}/").exists()
    assert not SearchToken.objects.filter(resource_key=key).exists()
    monkeypatch.undo()
    assert not connection.in_atomic_block
    assert connection.get_autocommit()
    response = client.post("/Patient", PATIENT)
    assert response.status == 201, response
    assert client.get(f"/Patient/{response.body['id']}").status == 200


def test_a_read_is_one_statement_with_the_token_lookup(client: TokenClient) -> None:
    created = client.post("/Patient", PATIENT)
    assert created.status == 201, created
    path = f"/Patient/{created.body['id']}"
    client.get(path)
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path)
    assert response.status == 200, response
    assert response.body == created.body
    # The current row is read in the token's statement (access.authentication).
    assert statements(captured) == [f"SELECT {TOKEN_LOOKUP} fhirservice_storedresource"]


def test_a_read_is_one_round_trip_on_postgresql(client: TokenClient) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("PostgreSQL's round trips")
    created = client.post("/Patient", PATIENT)
    path = f"/Patient/{created.body['id']}"
    client.get(path)
    with round_trips() as count:
        response = client.get(path)
    assert response.status == 200, response
    assert count == [1]


def test_a_row_read_with_the_token_reaches_only_a_good_token_inside_its_boundary(
    client: TokenClient,
) -> None:
    created = client.post("/Patient", PATIENT)
    path = f"/Patient/{created.body['id']}"
    elsewhere = make_client(organization="elsewhere", scopes="system/Patient.r")
    assert elsewhere.get(path).status == 404
    expired = make_client(organization="bench", scopes="system/Patient.r", expired=True)
    answer = expired.get(path)
    assert answer.status == 401 and b"Family" not in answer.content
    get_access_token_model().objects.get(token=client.token).revoke()
    answer = client.get(path)
    assert answer.status == 401 and b"Family" not in answer.content

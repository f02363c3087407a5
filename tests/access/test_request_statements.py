"""The metadata-store statements of a plain Patient create and read, pinned.

Issue 17 budgets a plain create at 4 ms and a read at 1.5 ms as served; each statement costs
its compilation in the ORM and a round trip, so one more on these paths is a regression this
test shows (the timings themselves live in ``bench/``, row 7). Access control is on, as the
benchmark and production run: the bearer token's lookup is one of the statements.

Transaction control (BEGIN, COMMIT) is left out of the count: SQLite's ``BEGIN IMMEDIATE``
is a statement, PostgreSQL's implicit BEGIN is not.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.access.conftest import TokenClient, make_client

TRANSACTION_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK")
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
    """Each data statement as its verb and table, e.g. ``INSERT fhirservice_storedresource``."""
    found = []
    for query in captured.captured_queries:
        sql = query["sql"].strip()
        if sql.upper().startswith(TRANSACTION_CONTROL):
            continue
        words = sql.replace('"', "").split()
        verb = words[0].upper()
        table = words[words.index("FROM") + 1] if verb in ("SELECT", "DELETE") else words[2]
        found.append(f"{verb} {table}")
    return found


@pytest.fixture
def client(transactional_db: Any) -> TokenClient:
    """A client with Patient scopes; writes commit, as served (no test transaction around)."""
    return make_client(organization="bench", scopes="system/Patient.cruds")


def test_a_plain_create_is_a_token_lookup_and_three_inserts(client: TokenClient) -> None:
    client.post("/Patient", PATIENT)  # warm: first-use work stays out of the count
    with CaptureQueriesContext(connection) as captured:
        response = client.post("/Patient", PATIENT, headers={"Prefer": "return=minimal"})
    assert response.status == 201, response
    # No read of the "current row": a server-assigned UUID has none.
    assert statements(captured) == [
        "SELECT oauth2_provider_accesstoken",
        "INSERT fhirservice_storedresource",
        "INSERT fhirservice_resourceversion",
        "INSERT fhirservice_searchtoken",  # all the search rows in one statement
    ]


def test_a_read_is_a_token_lookup_and_one_select(client: TokenClient) -> None:
    created = client.post("/Patient", PATIENT)
    assert created.status == 201, created
    path = f"/Patient/{created.body['id']}"
    client.get(path)
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path)
    assert response.status == 200, response
    assert statements(captured) == [
        "SELECT oauth2_provider_accesstoken",
        "SELECT fhirservice_storedresource",
    ]

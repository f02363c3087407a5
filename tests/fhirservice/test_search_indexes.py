"""The search index's own indexes (migration 0007, issue 17): the date and number indexes hold
only the rows of their kind and the searches that bound those columns still read them; on
PostgreSQL no ``LIKE`` index doubles a key or organization column no query matches by a
pattern. Fewer entries per row is fewer pages a write dirties (bench/README.md, row 7)."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.support import patient

PARTIAL = {
    "tok_type_param_span_low": "span",
    "tok_type_param_high": "high",
    "tok_type_param_number": "number",
}
TABLES = ("fhirservice_searchtoken", "fhirservice_storedresource", "fhirservice_resourceversion")


def index_sql(name: str) -> str:
    """The statement that defines index ``name``, as the database reports it."""
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [name])
        else:
            cursor.execute("SELECT sql FROM sqlite_master WHERE name = %s", [name])
        return cursor.fetchone()[0]


def plans(queries: list[dict]) -> str:
    """The plans of the captured statements that read the search index, as one text."""
    text = []
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SET LOCAL enable_seqscan = off")  # tiny tables: scans win
        for query in queries:
            if "fhirservice_searchtoken" not in query["sql"]:
                continue
            prefix = "EXPLAIN" if connection.vendor == "postgresql" else "EXPLAIN QUERY PLAN"
            cursor.execute(f"{prefix} {query['sql']}")
            text.extend(str(row) for row in cursor.fetchall())
    return "\n".join(text)


@pytest.mark.skipif(
    connection.vendor not in ("sqlite", "postgresql"), reason="SQL index definitions"
)
@pytest.mark.parametrize(("name", "column"), sorted(PARTIAL.items()))
def test_the_date_and_number_indexes_hold_only_rows_of_their_kind(db, name, column):
    assert f"{column} IS NOT NULL" in index_sql(name).replace('"', "")


@pytest.mark.skipif(connection.vendor not in ("sqlite", "postgresql"), reason="SQL query plans")
@pytest.mark.parametrize(
    ("query", "index"),
    [
        ("Observation?value-quantity=ge5", "tok_type_param_number"),
        ("Observation?date=ge2024-03-03&date=lt2024-03-10", "tok_type_param_span_low"),
        ("Observation?date=ge2024-03-03&date=lt2024-03-10&_sort=-date", "tok_type_param_span_low"),
    ],
)
def test_searches_that_bound_the_column_read_its_partial_index(api, query, index):
    observation = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"text": "weight"},
        "effectiveDateTime": "2024-03-05T12:00:00Z",
        "valueQuantity": {"value": 72.5, "unit": "kg"},
    }
    made = api.post("/Observation", observation).body["id"]
    api.post("/Patient", patient("Chalmers"))
    with CaptureQueriesContext(connection) as captured:
        answer = api.get(f"/{query}")
    assert [e["resource"]["id"] for e in answer.body["entry"]] == [made]
    assert index in plans(captured.captured_queries)


@pytest.mark.skipif(connection.vendor != "postgresql", reason="PostgreSQL's pattern indexes")
def test_no_pattern_index_doubles_a_key_or_organization_column(db):
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = ANY(%s) AND indexname LIKE %s",
            [list(TABLES), "%\\_like"],
        )
        assert cursor.fetchall() == []

"""Date search plans (fhirservice.search.dates): width classes and sole values at extraction,
repeated date parameters AND'd per resource whether it has one value or several, date ranges
paged in ``_id`` order from the index, and the migration that classifies rows stored before.

The semantics of each prefix and its boundaries are tested in test_search_types.py; here the
plans that make a range a short index read must keep the same answers.
"""

from __future__ import annotations

import importlib
from urllib.parse import urlencode

import pytest
from django.apps import apps
from django.db import connection
from django.test.utils import CaptureQueriesContext

from fhirservice.models import SearchToken
from fhirservice.search.dates import SEVERAL
from fhirservice.search.extract import extract_tokens
from fhirservice.search.query import parse_search, run_search

SERVER = "http://testserver/4_0_0"


def spans(body: dict, param: str) -> list[int | None]:
    body = {"id": "x", **body}
    return [t.span for t in extract_tokens(f"{body['resourceType']}/x", body) if t.param == param]


def encounter(*periods: tuple[str, str]) -> dict:
    """An Encounter with one location per period (``location-period`` has several values)."""
    return {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "location": [
            {"location": {"reference": "Location/l1"}, "period": {"start": start, "end": end}}
            for start, end in periods
        ],
    }


def test_a_sole_date_value_records_its_width_class():
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "x"}}
    assert spans({**observation, "effectiveDateTime": "2024-01-15T10:30:00Z"}, "date") == [0]
    assert spans({**observation, "effectiveDateTime": "2024-01-15"}, "date") == [0]
    assert spans({**observation, "effectiveDateTime": "2024-02"}, "date") == [1]
    assert spans({**observation, "effectiveDateTime": "2024"}, "date") == [2]
    assert spans({**observation, "effectivePeriod": {"start": "2023-06-01"}}, "date") == [3]
    ten_years = {"start": "2015", "end": "2024"}
    assert spans({**observation, "effectivePeriod": ten_years}, "date") == [3]


def test_several_values_of_a_date_parameter_are_marked_as_such():
    body = encounter(("2024-01-01", "2024-01-02"), ("2024-06-01", "2024-06-02"))
    assert spans(body, "location-period") == [SEVERAL, SEVERAL]
    hours = ("2024-01-01T08:00:00Z", "2024-01-01T20:00:00Z")
    assert spans(encounter(hours), "location-period") == [0]
    assert spans(encounter(("2024-01-01", "2024-01-02")), "location-period") == [1]  # 2 days


def found(api, resource_type: str, *params: tuple[str, str]) -> set[str]:
    response = api.get(f"/{resource_type}?{urlencode(params)}")
    assert response.status == 200, response
    return {e["resource"]["id"] for e in response.body.get("entry", [])}


@pytest.mark.parametrize(
    ("params", "several", "sole"),
    [
        # ge holds on the June value only, lt on the January value only: both AND'd
        # conditions hold for the resource with both values, on no single row.
        ([("location-period", "ge2024-05-01"), ("location-period", "lt2024-02-01")], 1, 0),
        ([("location-period", "ge2024-03-01"), ("location-period", "lt2024-04-01")], 1, 1),
        ([("location-period", "ge2024-01-01"), ("location-period", "le2024-06-30")], 1, 1),
        ([("location-period", "ge2024-07-01"), ("location-period", "lt2024-01-01")], 0, 0),
        (
            [("location-period", "gt2024-03-31,lt2024-01-01"), ("location-period", "ap2024-03")],
            0,
            0,
        ),
        ([("location-period", "ap2024-03,ap2024-06-01")], 1, 1),
        ([("location-period", "sa2024-02-01"), ("location-period", "eb2024-05-01")], 1, 1),
        ([("location-period", "sa2024-03-05"), ("location-period", "eb2024-03-08")], 1, 0),
        ([("location-period", "ne2024-03"), ("location-period", "ne2024-06")], 1, 0),
        ([("location-period", "eq2024-03"), ("location-period", "ge2024-03-05")], 0, 1),
    ],
)
def test_repeated_date_parameters_hold_per_resource_on_any_of_its_values(
    api, params, several, sole
):
    made = {
        "several": api.post(
            "/Encounter", encounter(("2024-01-10", "2024-01-12"), ("2024-06-01", "2024-06-03"))
        ).body["id"],
        "sole": api.post("/Encounter", encounter(("2024-03-05", "2024-03-07"))).body["id"],
    }
    expected = {made[name] for name, hit in (("several", several), ("sole", sole)) if hit}
    assert found(api, "Encounter", *params) == expected


def page_through(api, url: str) -> tuple[list[str], int]:
    ids, total = [], None
    while url:
        bundle = api.get(url).body
        total = bundle["total"] if total is None else total
        ids.extend(e["resource"]["id"] for e in bundle.get("entry", []))
        nxt = [link["url"] for link in bundle["link"] if link["relation"] == "next"]
        url = nxt[0].replace(SERVER, "") if nxt else None
    return ids, total


def test_a_date_range_pages_in_id_order_through_every_match(api):
    ids = {}
    for day in range(1, 15):
        body = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "paged"},
            "effectiveDateTime": f"2024-03-{day:02d}T12:00:00Z",
        }
        ids[day] = api.post("/Observation", body).body["id"]
    inside = sorted(ids[day] for day in range(3, 10))
    query = "date=ge2024-03-03&date=lt2024-03-10&code:text=paged&_count=2"
    assert page_through(api, f"/Observation?{query}") == (inside, 7)
    assert page_through(api, f"/Observation?{query}&_sort=-_id") == (inside[::-1], 7)
    only_dates = "date=ge2024-03-03&date=lt2024-03-10&_count=3"
    assert page_through(api, f"/Observation?{only_dates}") == (inside, 7)


def test_a_date_search_alone_reads_its_index_ranges_as_one_union(api):
    """On PostgreSQL its page and total come from the UNION of the index ranges (each read on
    its own, no bitmap of heap pages): the same matches, counted once each, in both
    orders and across pages, where ranges overlap (ne) and a resource matches on two rows."""
    made = {
        "two values": api.post(
            "/Encounter", encounter(("2024-01-10", "2024-01-12"), ("2024-06-01", "2024-06-03"))
        ).body["id"],
        "march": api.post("/Encounter", encounter(("2024-03-05", "2024-03-07"))).body["id"],
        "a day": api.post(
            "/Encounter", encounter(("2024-04-02T08:00:00Z", "2024-04-02T09:00:00Z"))
        ).body["id"],
    }
    started = encounter(("2023-12-01", "2023-12-02"))
    del started["location"][0]["period"]["end"]  # still going: wider than any class
    made["open"] = api.post("/Encounter", started).body["id"]
    query = "location-period=ne2024-03-06&_count=1"
    expected = sorted(made.values())
    assert page_through(api, f"/Encounter?{query}") == (expected, 4)
    assert page_through(api, f"/Encounter?{query}&_sort=-_id") == (expected[::-1], 4)
    expected = sorted(made[name] for name in ("march", "open"))
    assert page_through(api, "/Encounter?location-period=ap2024-03-06") == (expected, 2)
    spec = parse_search("Encounter", [("location-period", "ne2024-03-06")], strict=True)
    with CaptureQueriesContext(connection) as queries:
        assert len(run_search(spec).rows) == 4
    reads = [q["sql"] for q in queries.captured_queries if "span" in q["sql"]]
    union = connection.vendor == "postgresql"  # SQLite reads the OR from the index already
    assert len(reads) == 2 and all((" UNION " in sql) == union for sql in reads)


def test_the_migration_classifies_date_rows_stored_before_the_column(api, monkeypatch):
    api.post("/Encounter", encounter(("2024-01-10", "2024-01-12"), ("2024-06-01", "2024-06-03")))
    api.post("/Encounter", encounter(("2024-03-05", "2024-03-07")))
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "m"}}
    api.post("/Observation", {**observation, "effectivePeriod": {"start": "2023-06-01"}})
    api.post("/Observation", {**observation, "effectiveDateTime": "2024-02"})
    api.post("/Observation", {**observation, "effectiveDateTime": "2024-02-03T04:05:06Z"})
    written = dict(SearchToken.objects.filter(low__isnull=False).values_list("key", "span"))
    assert set(written.values()) >= {0, 1, 3, SEVERAL}
    SearchToken.objects.update(span=None)
    migration = importlib.import_module("fhirservice.migrations.0005_search_date_span")
    monkeypatch.setattr(migration, "BATCH", 3)  # batches that cut a resource's rows apart
    migration.classify(apps, None)
    assert dict(SearchToken.objects.filter(low__isnull=False).values_list("key", "span")) == written


def test_a_total_nobody_asked_for_is_counted_only_up_to_the_bound(api, settings):
    """Without ``_total`` a search counts at most SEARCH_TOTAL_BOUND matches: the total when
    there are no more, none when there are; asking for it counts them all. The date search
    alone (the UNION of index ranges on PostgreSQL), an intersection of index rows, a search
    on StoredResource and a system search each go their own way to the count."""
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "SEARCH_TOTAL_BOUND": 3}
    for day in range(1, 6):
        body = encounter((f"2024-03-{day:02d}", f"2024-03-{day:02d}"))
        api.post("/Encounter", {**body, "status": "finished" if day % 2 else "planned"})

    def total(url: str) -> int | None:
        bundle = api.get(url).body
        return bundle.get("total")

    dates = "/Encounter?location-period=ge2024-03-01"
    assert total(dates) is None  # 5 matches, more than 3
    assert len(api.get(dates).body["entry"]) == 5  # the page is whole all the same
    assert total(f"{dates}&_total=accurate") == 5
    assert total(f"{dates}&_total=estimate") == 5
    assert total(f"{dates}&_summary=count") == 5
    assert total(f"{dates}&_count=0") == 5
    assert total(f"{dates}&_total=none") is None
    assert total("/Encounter?location-period=ge2024-03-03") == 3  # exactly the bound
    assert total("/Encounter?location-period=ge2024-03-01&status=finished") == 3
    assert total("/Encounter?location-period=ge2024-03-01&status=planned") == 2
    assert total("/Encounter?_lastUpdated=gt2000") is None  # no index rows: StoredResource
    assert total("/Encounter?_lastUpdated=gt2000&_total=accurate") == 5
    assert total("/?_type=Encounter") is None  # system search
    assert total("/?_type=Encounter&_total=accurate") == 5
    assert total("/?_type=Encounter&status=planned") == 2

"""Search benchmark (issue 13): first pages of token, reference and date searches over HTTP,
``_total=accurate``, and the cost of index extraction per Observation write.

    # the environment picks the backends, as for ``python -m bench`` (bench/README.md)
    .venv/bin/python -m bench.search --patients 10000 [--repeat 30] [--no-build]

Data: ``--patients`` N Patients and 10·N Observations (subject one of the Patients, one of
ten LOINC codes, ``effectiveDateTime`` spread over 2024, ``valueQuantity``), written with
batch inserts straight into the metadata store (StoredResource, ResourceVersion and the
SearchToken rows ``extract_rows`` gives, 1,000 resources per batch), so building 10^6
resources takes minutes, not the hours of 10^6 POSTs. ``--no-build`` reuses what a previous
run stored (the count is checked). The tables are then analysed (PostgreSQL: ``VACUUM
ANALYZE``), as autovacuum would after such a load.

Then ``scripts/serve.sh`` serves the stores (``FHIR_AUTH=off``) and each search is sent
``--repeat`` times over one keep-alive connection after two warm-ups (median and p90 of
the client's wall time):

- token: ``Observation?code=http://loinc.org|<code>&_count=50`` (a tenth of all match);
- reference: ``Observation?subject=Patient/<random>&_count=50`` (10 match);
- date range: ``Observation?date=ge2024-03-01&date=lt2024-03-08&_count=50``;
- chained: ``Observation?subject:Patient.name=Family<n>&_count=50`` (a thousandth of the
  Patients have each family name);
- ``_include``: the token search with ``_include=Observation:subject`` (its budget is what
  it adds to the token search: 20 ms);
- total: ``Observation?code=…&_total=accurate&_count=0`` (a tenth of the Observations, so
  10^5 of 10^6 resources);
- extraction: ``extract_rows`` of one Observation as above, in this process (p50 of
  1,000), and a ``POST /Observation`` (``return=minimal``) over HTTP for context.

At 10^6 resources use ``--patients 90910``. Seeding writes the rows with COPY (PostgreSQL)
or one ``executemany`` per batch (SQLite) and builds the search index's secondary indexes
after the load (``fhirservice.search.reindex_indexes``, as ``reindex_search`` rebuilding:
dropped first, built again from the migrations' definitions); it prints how long it took.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from bench import env
from bench.http_api import HttpApi
from bench.seed import store_rows
from bench.server import Server

LOINC = "http://loinc.org"
CODES = [f"{8000 + n}-{n}" for n in range(10)]
BATCH = 1000
FAMILIES = 1000  # family names: each a thousandth of the Patients (of 10^5 and more)
FHIR_JSON = "application/fhir+json"
BUDGET_PAGE_MS = 50.0
BUDGET_TOTAL_MS = 300.0
BUDGET_INCLUDE_MS = 20.0
BUDGET_EXTRACT_MS = 3.0


def observation(patient_id: str, n: int) -> dict:
    """The typical Observation of the benchmark (subject, code, date, value)."""
    # spread over 2024 whatever the size (7919 is prime to the minutes of a year)
    when = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(minutes=(n * 7919) % 525_600)
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": CODES[n % 10]}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "valueQuantity": {
            "value": 60 + n % 40,
            "unit": "beats/minute",
            "system": "http://unitsofmeasure.org",
            "code": "/min",
        },
    }


def patient(n: int) -> dict:
    """A small Patient."""
    return {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:bench", "value": f"p{n}"}],
        "name": [{"family": f"Family{n % FAMILIES}", "given": [f"Given{n}"]}],
        "gender": "female" if n % 2 else "male",
        "birthDate": f"{1940 + n % 60}-0{1 + n % 9}-1{n % 10}",
    }


# Every column: the models' defaults are Django's, not the database's.
RESOURCE_COLUMNS = (
    "key",
    "resource_type",
    "resource_id",
    "version_id",
    "last_updated",
    "body",
    "incarnation",
    "deleted",
    "organization",
)
VERSION_COLUMNS = (*RESOURCE_COLUMNS, "method", "request_id", "actor")
# The current rows also keep the minute of last_updated (StoredResource.updated_minute).
CURRENT_COLUMNS = (*RESOURCE_COLUMNS, "updated_minute")


def _store(bodies: list[dict], extract_times: list[float]) -> None:
    """Store resources as a create leaves them: current row, history row, index rows."""
    from django.db import connection, transaction

    from fhirservice.models import ResourceVersion, SearchToken, StoredResource
    from fhirservice.search.extract import COLUMNS, extract_rows

    now = datetime.now(UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    adapt = connection.ops.adapt_datetimefield_value
    moment = now if connection.vendor == "postgresql" else adapt(now)
    minute = now.replace(second=0, microsecond=0)
    minute = minute if connection.vendor == "postgresql" else adapt(minute)
    dates = [COLUMNS.index("low"), COLUMNS.index("high")]
    rows, tokens = [], []
    for body in bodies:
        key = f"{body['resourceType']}/{body['id']}"
        body["meta"] = {"versionId": "1", "lastUpdated": stamp}
        started = time.perf_counter()
        extracted = extract_rows(key, body)
        extract_times.append(time.perf_counter() - started)
        if connection.vendor == "sqlite":
            extracted = [
                tuple(adapt(v) if i in dates and v is not None else v for i, v in enumerate(row))
                for row in extracted
            ]
        tokens.extend(extracted)
        text = orjson.dumps(body).decode()
        rows.append((key, body["resourceType"], body["id"], 1, moment, text, 1, False, ""))
    with transaction.atomic():
        store_rows(StoredResource, CURRENT_COLUMNS, [(*row, minute) for row in rows])
        history = [(f"{r[0]}/_history/1", *r[1:], "POST", "", "") for r in rows]
        store_rows(ResourceVersion, VERSION_COLUMNS, history)
        store_rows(SearchToken, COLUMNS, tokens)


def build(patients: int) -> tuple[list[str], float]:
    """Store the data set; the patient ids and the extraction p50 (ms) while storing it."""
    from django.db import connection

    from fhirservice.search import reindex_indexes

    ids: list[str] = []
    extract_times: list[float] = []

    def built(seconds: float) -> None:
        print(f"  indexes built in {seconds:.0f} s", file=sys.stderr)

    started = time.perf_counter()
    # One sorted build per index after the load, instead of 10^7 random insertions.
    with reindex_indexes.built_after(connection, built):
        for first in range(0, patients, BATCH):
            batch = []
            for n in range(first, min(first + BATCH, patients)):
                body = patient(n)
                body["id"] = str(uuid.uuid4())
                ids.append(body["id"])
                batch.append(body)
            _store(batch, [])
            end = min(first + BATCH, patients) * 10
            for base in range(first * 10, end, BATCH):
                obs = []
                for n in range(base, min(base + BATCH, end)):
                    body = observation(ids[n // 10], n)
                    body["id"] = str(uuid.uuid4())
                    obs.append(body)
                _store(obs, extract_times)
            done = min(first + BATCH, patients)
            elapsed = time.perf_counter() - started
            print(f"  stored {done * 11:,} resources in {elapsed:.0f} s", file=sys.stderr)
    print(f"  seeded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return ids, statistics.median(extract_times) * 1000


def stored_patients(patients: int) -> list[str]:
    """The Patient ids a previous run stored (checked against the expected count)."""
    from fhirservice.models import StoredResource

    ids = list(
        StoredResource.objects.filter(resource_type="Patient").values_list("resource_id", flat=True)
    )
    observations = StoredResource.objects.filter(resource_type="Observation").count()
    if len(ids) != patients or observations < patients * 10:  # timed POSTs add some
        sys.exit(f"stored: {len(ids)} Patients, {observations} Observations; rebuild")
    return ids


def analyze() -> None:
    """Planner statistics (and PostgreSQL's visibility map) for the bulk-loaded tables, as
    autovacuum would give them after a load; without them the planner guesses from empty
    tables and index-only scans fall back to the heap."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE" if connection.vendor == "postgresql" else "ANALYZE")


def extraction_p50(repeat: int = 1000) -> float:
    """Median ms of ``extract_rows`` on the benchmark's Observation, in this process."""
    from fhirservice.search.extract import extract_rows

    times = []
    for n in range(repeat):
        body = observation("p", n)
        body["id"] = "x"
        body["meta"] = {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00.000Z"}
        started = time.perf_counter()
        extract_rows("Observation/x", body)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def timed(api: HttpApi, paths: list[str], repeat: int) -> tuple[float, float, int]:
    """Median and p90 ms over ``repeat`` GETs (cycling through ``paths``), and the last
    answer's number of entries."""
    for path in paths[:2]:
        api.get(path)
    times, entries = [], 0
    for n in range(repeat):
        path = paths[n % len(paths)]
        started = time.perf_counter()
        body = api.get(path)
        times.append(time.perf_counter() - started)
        entries = len(orjson.loads(body).get("entry", []))
    times.sort()
    p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
    return statistics.median(times) * 1000, p90 * 1000, entries


def main() -> None:
    """Build (or reuse) the data, serve it, time the searches, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--no-migrate", action="store_true")
    args = parser.parse_args()
    env.setup(migrate=not args.no_migrate)
    print(f"# search bench: {env.metadata_backend()}; {env.machine()}", file=sys.stderr)
    if args.no_build:
        ids, build_p50 = stored_patients(args.patients), None
    else:
        ids, build_p50 = build(args.patients)
    analyze()
    extract_p50 = extraction_p50()
    var = Path(os.environ.get("FHIR_VAR_DIR") or "/tmp")
    server = Server(
        {"FHIR_AUTH": "off", "DATABASE_URL": env.database_url() or ""},
        base_path="/4_0_0",
        log_path=var / "bench-search-server.log",
    )
    server.start()
    try:
        api = HttpApi(server.base_url)
        rng = random.Random(13)
        rows = [
            (
                "token: Observation?code=…&_count=50",
                timed(
                    api,
                    [f"/Observation?code={LOINC}|{c}&_count=50" for c in CODES],
                    args.repeat,
                ),
                BUDGET_PAGE_MS,
            ),
            (
                "reference: Observation?subject=Patient/…&_count=50",
                timed(
                    api,
                    [
                        f"/Observation?subject=Patient/{rng.choice(ids)}&_count=50"
                        for _ in range(args.repeat)
                    ],
                    args.repeat,
                ),
                BUDGET_PAGE_MS,
            ),
            (
                "date range: Observation?date=ge…&date=lt…&_count=50",
                timed(
                    api,
                    [
                        f"/Observation?date=ge2024-{m:02d}-01&date=lt2024-{m:02d}-08&_count=50"
                        for m in range(1, 13)
                    ],
                    args.repeat,
                ),
                BUDGET_PAGE_MS,
            ),
            (
                "chained: Observation?subject:Patient.name=…&_count=50",
                timed(
                    api,
                    [
                        f"/Observation?subject:Patient.name=Family{family}&_count=50"
                        for family in rng.choices(range(min(FAMILIES, len(ids))), k=args.repeat)
                    ],
                    args.repeat,
                ),
                BUDGET_PAGE_MS,
            ),
            (
                "token + _include=Observation:subject",
                timed(
                    api,
                    [
                        f"/Observation?code={LOINC}|{c}&_count=50&_include=Observation:subject"
                        for c in CODES
                    ],
                    args.repeat,
                ),
                None,
            ),
            (
                f"total: Observation?code=…&_total=accurate ({len(ids):,} match)",
                timed(
                    api,
                    [f"/Observation?code={LOINC}|{c}&_total=accurate&_count=0" for c in CODES],
                    args.repeat,
                ),
                BUDGET_TOTAL_MS,
            ),
        ]
        # _include's budget is what it adds to the same token search.
        include = rows[4][1][0] - rows[0][1][0]
        rows[4] = (
            f"{rows[4][0]} (adds {include:.1f} ms)",
            rows[4][1],
            rows[0][1][0] + BUDGET_INCLUDE_MS,
        )
        create = []
        for n in range(args.repeat):
            body = orjson.dumps(observation(rng.choice(ids), n))
            started = time.perf_counter()
            api.post("/Observation", body)
            create.append(time.perf_counter() - started)
        create_p50 = statistics.median(create) * 1000
    finally:
        server.stop()
    total = len(ids) * 11
    print(f"\n{env.metadata_backend()}; {total:,} resources; {env.machine()}")
    print("| what | p50 ms | p90 ms | entries | budget ms | |\n|---|---|---|---|---|---|")
    for label, (p50, p90, entries), budget in rows:
        verdict = "PASS" if p50 <= budget else "FAIL"
        print(f"| {label} | {p50:.1f} | {p90:.1f} | {entries} | {budget:.0f} | {verdict} |")
    verdict = "PASS" if extract_p50 <= BUDGET_EXTRACT_MS else "FAIL"
    print(f"| extraction per Observation (in process) | {extract_p50:.2f} | | | 3 | {verdict} |")
    if build_p50 is not None:
        print(f"| extraction while building (in process) | {build_p50:.2f} | | | 3 | |")
    print(f"| POST /Observation (return=minimal, context) | {create_p50:.1f} | | | | |")


if __name__ == "__main__":
    main()

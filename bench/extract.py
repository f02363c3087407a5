"""Extraction benchmark (issues 13, 16, 17): the CPU cost of search-value extraction per
written resource, and the rate of ``reindex_search``.

    # the environment picks the metadata store, as for ``python -m bench`` (bench/README.md)
    .venv/bin/python -m bench.extract [--repeat 2000] [--reindex 20000]

- extraction: ``extract_rows`` (what a write inserts) of a typical Patient and of the
  typical Observation of ``bench.search`` (subject, code, date, value), in this process:
  p50 and p90 µs over ``--repeat`` calls after warm-up, and the rows each yields;
- reindex: ``--reindex`` N Observations stored straight into the metadata store (as
  ``bench.search`` does), then ``search_reindex`` over them in this process (one worker):
  resources per second of wall time and of this process's CPU time. 0 skips it.

The machine is shared: every line carries the 1-minute load average.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable

from bench import env
from bench.search import _store, observation

PATIENT = {
    "resourceType": "Patient",
    "id": "x",
    "meta": {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00.000Z"},
    "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}],
    "active": True,
    "name": [{"use": "official", "family": "Chalmers", "given": ["Peter", "James"]}],
    "telecom": [{"system": "phone", "value": "(03) 5555 6473", "use": "work"}],
    "gender": "male",
    "birthDate": "1974-12-25",
    "address": [
        {"use": "home", "line": ["534 Erewhon St"], "city": "PleasantVille", "postalCode": "3999"}
    ],
    "managingOrganization": {"reference": "Organization/1"},
}


def _observation() -> dict:
    body = observation("p", 7)
    body["id"] = "x"
    body["meta"] = {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00.000Z"}
    return body


def timed_us(call: Callable[[], object], repeat: int) -> tuple[float, float]:
    """p50 and p90 µs of ``call`` over ``repeat`` runs (after a tenth as warm-up)."""
    for _ in range(max(10, repeat // 10)):
        call()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    times.sort()
    return statistics.median(times) * 1e6, times[int(0.9 * (len(times) - 1))] * 1e6


def reindex_rate(count: int) -> tuple[float, float, int]:
    """Resources per second of ``search_reindex`` over ``count`` stored Observations (wall
    time, and CPU time of this process: the database server's is not in it), and rows."""
    from fhirservice.models import (
        ResourceVersion,
        SearchReindexCheckpoint,
        SearchToken,
        StoredResource,
    )
    from fhirservice.search.reindex import search_reindex

    for model in (SearchToken, StoredResource, ResourceVersion):
        model.objects.filter(resource_type="Observation").delete()
    SearchReindexCheckpoint.objects.all().delete()
    for first in range(0, count, 1000):
        batch = []
        for n in range(first, min(first + 1000, count)):
            body = observation(f"p{n % 997}", n)
            body["id"] = str(uuid.uuid4())
            batch.append(body)
        _store(batch, [])
    started, cpu = time.perf_counter(), time.process_time()
    report = search_reindex(resource_type="Observation")
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return report.resources / elapsed, report.resources / cpu, report.rows


def main() -> None:
    """Time extraction and reindex, print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--reindex", type=int, default=0)
    args = parser.parse_args()
    env.setup()
    from fhirservice.search.extract import extract_rows

    print(env.machine())
    for name, body in (("Patient", PATIENT), ("Observation", _observation())):
        rows = len(extract_rows(f"{name}/x", body))
        p50, p90 = timed_us(lambda b=body, n=name: extract_rows(f"{n}/x", b), args.repeat)
        print(
            f"extract {name:<12} p50 {p50:7.0f} µs  p90 {p90:7.0f} µs  {rows} rows"
            f"  (load {env.load_average():.1f})"
        )
    if args.reindex:
        rate, cpu_rate, rows = reindex_rate(args.reindex)
        print(
            f"reindex {args.reindex:,} Observations: {rate:,.0f} resources/s"
            f" ({cpu_rate:,.0f} per CPU-second of this process), {rows:,} rows"
            f"  (load {env.load_average():.1f})"
        )


if __name__ == "__main__":
    main()

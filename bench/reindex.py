"""Reindex benchmark (issue 13): resources per second of ``manage.py reindex_search``.

    # the environment picks the backends, as for ``python -m bench`` (bench/README.md)
    .venv/bin/python -m bench.reindex --patients 2000 [--runs 3] [--workers 2] [--no-build]
        [--cases intact,rebuild,emptied]

Data: the search bench's (``bench.search.build``): ``--patients`` N Patients and 10·N
Observations with subject, code, date and value, stored with batch inserts; ``--no-build``
reuses what a previous run stored. Each run forgets the checkpoint and re-extracts every
resource (``search_reindex``, as the command does) in each of three cases: over the intact
index (as after a definitions upgrade that changes few values: the rows already right are
not rewritten), over the intact index with ``rebuild`` (``--rebuild``: every row written,
the search indexes dropped and built again) and over an emptied one (as after a migration
that changes how values are indexed; the emptying is not timed; the run rebuilds since
there is nothing to compare with). It prints resources per second, the seconds spent
reading bodies and writing rows in the writing process (the rest is extraction, or waiting
for the workers' extraction), the seconds building the indexes again (included in the
run's), how far the process's resident memory rose over the run, and the load average
around the run: on a shared machine the numbers mean little without it. The budget: 10^6
resources in 15 minutes, 1,111 resources per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import env

BUDGET_PER_SECOND = 10**6 / (15 * 60)
CASES = ("intact", "rebuild", "emptied")


def empty_index() -> None:
    """Delete every SearchToken row (TRUNCATE where the backend has it) and let the
    planner know."""
    from django.db import connection

    from fhirservice.models import SearchToken

    if connection.vendor == "postgresql":
        table = connection.ops.quote_name(SearchToken._meta.db_table)
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {table}")
    else:
        SearchToken.objects.all().delete()


def main() -> None:
    """Build (or reuse) the data, then time ``--runs`` full reindex runs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=2_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--no-build", action="store_true")
    parser.add_argument("--cases", default=",".join(CASES), help="Of " + ", ".join(CASES))
    args = parser.parse_args()
    cases = args.cases.split(",")
    if not set(cases) <= set(CASES):
        parser.error(f"--cases: each one of {', '.join(CASES)}")
    env.setup(migrate=not args.no_build)
    from bench import search

    print(f"# reindex bench: {env.metadata_backend()}; {env.machine()}", file=sys.stderr)
    if not args.no_build:
        search.build(args.patients)
    search.stored_patients(args.patients)
    search.analyze()
    from bench.measure import RssWatch
    from fhirservice.search.reindex import reindex_checkpoint_reset, search_reindex

    print(f"\n{env.metadata_backend()}; workers {args.workers}; batch {args.batch_size}")
    print(
        "| run | index | resources | rows written | s | res/s | read s | write s | index s "
        "| RSS rise MB | load | |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run, case in ((run, case) for run in range(1, args.runs + 1) for case in cases):
        reindex_checkpoint_reset(None)
        if case == "emptied":
            empty_index()
        load = os.getloadavg()[0]
        rss = RssWatch()
        started = time.perf_counter()
        report = search_reindex(
            workers=args.workers,
            batch_size=args.batch_size,
            rebuild=case == "rebuild",
            progress=lambda *_, watch=rss, **__: watch.sample(),
        )
        seconds = time.perf_counter() - started
        rate = report.resources / seconds
        verdict = "PASS" if rate >= BUDGET_PER_SECOND else "FAIL"
        print(
            f"| {run} | {case} | {report.resources:,} | {report.rows:,} | {seconds:.1f} | "
            f"{rate:,.0f} | "
            f"{report.read_seconds:.1f} | {report.write_seconds:.1f} | "
            f"{report.index_seconds:.1f} | {rss.growth() / 2**20:.0f} | "
            f"{load:.1f} / {os.getloadavg()[0]:.1f} | {verdict} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

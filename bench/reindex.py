"""Reindex benchmark (issue 13): resources per second of ``manage.py reindex_search``.

    # the environment picks the backends, as for ``python -m bench`` (bench/README.md)
    .venv/bin/python -m bench.reindex --patients 2000 [--runs 3] [--workers 2] [--no-build]

Data: the search bench's (``bench.search.build``): ``--patients`` N Patients and 10·N
Observations with subject, code, date and value, stored with batch inserts; ``--no-build``
reuses what a previous run stored. Each run forgets the checkpoint and re-extracts every
resource (``search_reindex``, as the command does) twice: over the intact index (as after a
definitions upgrade that changes few values: the rows already right are not rewritten) and
over an emptied one (every row written, as after a migration that changes how values are
indexed; the emptying is not timed). It prints resources per second, the seconds spent
reading bodies and writing rows in the writing process (the rest is extraction, or waiting
for the workers' extraction), and the load average around the run: on a shared machine the
numbers mean little without it. The budget: 10^6 resources in 15 minutes, 1,111 resources
per second.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from bench import env

BUDGET_PER_SECOND = 10**6 / (15 * 60)
INDEX = ("intact", "emptied")


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
    args = parser.parse_args()
    env.setup(migrate=not args.no_build)
    from bench import search

    print(f"# reindex bench: {env.metadata_backend()}; {env.machine()}", file=sys.stderr)
    if not args.no_build:
        search.build(args.patients)
    search.stored_patients(args.patients)
    search.analyze()
    from fhirservice.search.reindex import reindex_checkpoint_reset, search_reindex

    print(f"\n{env.metadata_backend()}; workers {args.workers}; batch {args.batch_size}")
    print("| run | index | resources | rows written | s | res/s | read s | write s | load | |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run, index in ((run, index) for run in range(1, args.runs + 1) for index in INDEX):
        reindex_checkpoint_reset(None)
        if index == "emptied":
            empty_index()
        load = os.getloadavg()[0]
        started = time.perf_counter()
        report = search_reindex(workers=args.workers, batch_size=args.batch_size)
        seconds = time.perf_counter() - started
        rate = report.resources / seconds
        verdict = "PASS" if rate >= BUDGET_PER_SECOND else "FAIL"
        print(
            f"| {run} | {index} | {report.resources:,} | {report.rows:,} | {seconds:.1f} | "
            f"{rate:,.0f} | "
            f"{report.read_seconds:.1f} | {report.write_seconds:.1f} | "
            f"{load:.1f} / {os.getloadavg()[0]:.1f} | {verdict} |",
            flush=True,
        )


if __name__ == "__main__":
    main()

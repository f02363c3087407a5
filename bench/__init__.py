"""Benchmarks of the Group roster budgets (DESIGN.md, "Performance budgets").

Run ``python -m bench`` (or ``make bench`` for both backend pairs). The backends come from the
environment exactly as for the server: ``DATABASE_URL``, ``CLICKHOUSE_URL``, ``FHIR_VAR_DIR``.
The benchmark drives the real Django stack in-process through ``django.test.Client`` (all
middleware, DRF views and services; no HTTP server or network in between) and prints one table
row per budget with its median, p90 and PASS/FAIL. See ``bench/README.md``.

Modules:

- ``bench.runner``: the command line and the order of the measurements;
- ``bench.api``: the FHIR requests the rows send;
- ``bench.data``: request bodies and the synthetic member events behind ``Group?member=``;
- ``bench.measure``: timing, statistics and memory (RSS) sampling;
- ``bench.report``: the printed table;
- ``bench.env``: Django set-up, migrations, and the description of backends and machine.
"""

from bench.runner import main

__all__ = ["main"]

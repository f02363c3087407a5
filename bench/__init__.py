"""Benchmarks of the Group roster budgets (docs/design.md, "Performance budgets").

Run ``python -m bench`` (or ``make bench`` for both backend pairs). The backends come from the
environment exactly as for the server: ``DATABASE_URL``, ``CLICKHOUSE_URL``, ``FHIR_VAR_DIR``.
The benchmark starts the service as ``make run`` serves it (gunicorn via ``scripts/serve.sh``)
and times HTTP requests from its own process, as a client sees them (``--in-process`` drives
the Django stack through ``django.test.Client`` instead, for profiling); it prints one table
row per budget with its median, p90 and PASS/FAIL. See ``bench/README.md``.

Modules:

- ``bench.runner``: the command line and the order of the measurements;
- ``bench.server``: the served service (start, restart, stop, the worker's RSS and CPU);
- ``bench.http_api``: the FHIR requests the rows send, over HTTP;
- ``bench.api``: the same requests in-process (``--in-process``), and the bench's client;
- ``bench.data``: request bodies and the synthetic member events behind ``Group?member=``;
- ``bench.measure``: timing, statistics and memory (RSS) sampling;
- ``bench.report``: the printed table;
- ``bench.env``: Django set-up, migrations, and the description of backends and machine.
"""

from bench.runner import main

__all__ = ["main"]

"""Fault-injection tests: servers and the app killed and restarted for real (the faults pass).

They run only in the ``faults`` pass of ``scripts/run-tests.sh`` (``-m faults``), which starts
a PostgreSQL and a ClickHouse server of its own for them: these tests kill and restart those
servers. Elsewhere (no ``FHIR_FAULT_SERVERS``) they skip.
"""

"""The export app's keys of the service settings namespace (``settings.FHIR_SERVICE``).

Registered with ``fhirservice.conf.register`` when ``operations.export.apps`` is imported,
before any app's ``ready()`` validates the namespace.
"""

from __future__ import annotations

from typing import Any

from fhirservice.conf import register

DEFAULTS: dict[str, Any] = {
    # An NDJSON part is closed once it holds this many bytes (checked after each resource,
    # so a part may exceed it by one resource); the next part of the type starts.
    "EXPORT_FILE_MAX_BYTES": 256 * 1024 * 1024,
    # Queued or running exports one client may have at once; one more answers 429.
    "EXPORT_MAX_PER_CLIENT": 3,
    # How long a finished export's manifest and files stay (seconds), then the worker deletes
    # them; the status answer's Expires header says when.
    "EXPORT_RETENTION_SECONDS": 24 * 3600,
    # A running job whose worker has not reported for this long is taken over by another
    # worker (its process died); workers report after every chunk.
    "EXPORT_LEASE_SECONDS": 120,
    # Seconds a worker sleeps when no job is queued; also the Retry-After of status polls.
    "EXPORT_POLL_SECONDS": 2,
    # Patients (roster members) per chunk, and resources read per query.
    "EXPORT_CHUNK": 1000,
    # Run one worker thread inside each server process (the embedded default works alone);
    # off when workers run as ``manage.py run_export_worker``.
    "EXPORT_WORKER_THREAD": True,
}

CHECKS = {
    "EXPORT_FILE_MAX_BYTES": lambda v: type(v) is int and v > 0,
    "EXPORT_MAX_PER_CLIENT": lambda v: type(v) is int and v > 0,
    "EXPORT_RETENTION_SECONDS": lambda v: isinstance(v, int | float) and v > 0,
    "EXPORT_LEASE_SECONDS": lambda v: isinstance(v, int | float) and v > 0,
    "EXPORT_POLL_SECONDS": lambda v: isinstance(v, int | float) and v > 0,
    "EXPORT_CHUNK": lambda v: type(v) is int and v > 0,
    "EXPORT_WORKER_THREAD": lambda v: isinstance(v, bool),
}

register(DEFAULTS, CHECKS)

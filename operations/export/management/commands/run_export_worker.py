"""``manage.py run_export_worker``: run export jobs (FHIR Bulk Data ``$export``).

With the embedded member store (chdb) the command opens the data path first: chdb lets one
process use a path, so while the server runs (and holds it) the command refuses with
:data:`MSG_CHDB_BUSY` instead of claiming jobs whose rosters it could not read; the server's
own worker thread runs them.
"""

from __future__ import annotations

import signal
import threading
from typing import Any
from urllib.parse import urlsplit

from django.core.management.base import BaseCommand, CommandError
from django.db import close_old_connections

from fhirservice.clickhouse import ClickHouseUnavailable, get_clickhouse
from fhirservice.conf import fhir_settings
from operations.export.worker import run_once, worker_name

MSG_CHDB_BUSY = (
    "The embedded member store ({url}) is open in another process, most likely the "
    "server, and chdb lets one process use a data path: exports run in that server's own "
    "worker thread (EXPORT_WORKER_THREAD), and separate workers need a ClickHouse server."
)


class Command(BaseCommand):
    """Claim queued export jobs and run them; any number of workers may run at once."""

    help = (
        "Run $export jobs: claim one, write its NDJSON files, repeat; also deletes expired "
        "exports. Several workers (on any host sharing the database and the exports storage) "
        "never run the same job."
    )

    def add_arguments(self, parser: Any) -> None:
        """``--once``: one round (expiry sweep and at most one job), then exit."""
        parser.add_argument("--once", action="store_true", help="Run at most one job, then exit")

    def handle(self, *args: Any, **options: Any) -> None:
        """Loop until SIGTERM or SIGINT (or one round with ``--once``); a job running then
        goes back to the queue after the chunk in hand."""
        url = fhir_settings.CLICKHOUSE_URL
        if urlsplit(url).scheme == "chdb":
            try:
                get_clickhouse()
            except ClickHouseUnavailable as exc:
                raise CommandError(MSG_CHDB_BUSY.format(url=url)) from exc
        name = worker_name()
        stopping = threading.Event()
        previous = {
            number: signal.signal(number, lambda *_: stopping.set())
            for number in (signal.SIGTERM, signal.SIGINT)
        }
        self.stdout.write(f"Export worker {name} started")
        try:
            while not stopping.is_set():
                busy = run_once(worker=name, stopping=stopping)
                close_old_connections()
                if busy:
                    self.stdout.write(self.style.SUCCESS("Ran one export job"))
                if options["once"]:
                    return
                if not busy:
                    stopping.wait(fhir_settings.EXPORT_POLL_SECONDS)
            self.stdout.write("Export worker stopped")
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

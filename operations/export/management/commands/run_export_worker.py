"""``manage.py run_export_worker``: run export jobs (FHIR Bulk Data ``$export``)."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand
from django.db import close_old_connections

from fhirservice.conf import fhir_settings
from operations.export.worker import run_once, worker_name


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
        """Loop until interrupted (or one round with ``--once``)."""
        name = worker_name()
        self.stdout.write(f"Export worker {name} started")
        while True:
            busy = run_once(worker=name)
            close_old_connections()
            if busy:
                self.stdout.write(self.style.SUCCESS("Ran one export job"))
            if options["once"]:
                return
            if not busy:
                time.sleep(fhir_settings.EXPORT_POLL_SECONDS)

"""``manage.py ship_member_events``: ship pending member event batches to ClickHouse.

Run once (after an outage), or with ``--loop`` as a side process (the outbox relay).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from groups.management.cli import embedded_clickhouse_or_refuse
from groups.models import MemberOutbox
from groups.services import member_batches_ship


class Command(BaseCommand):
    """Ship pending outbox batches once or in a loop."""

    help = (
        "Ship member event batches that are committed in the metadata store but not yet "
        "in ClickHouse (after an outage or a crash). Idempotent: batches ClickHouse "
        "already holds are only marked shipped."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Command-line options."""
        parser.add_argument(
            "--loop",
            action="store_true",
            help="Keep running; ship whatever is pending every --interval.",
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=2.0,
            help="Seconds between rounds with --loop (default 2).",
        )
        parser.add_argument(
            "--min-age",
            type=float,
            default=1.0,
            help="Only ship batches older than this many seconds, leaving fresh "
            "ones to the request that wrote them (default 1).",
        )
        parser.add_argument(
            "--batch-limit", type=int, default=1000, help="Most batches per round (default 1000)."
        )
        parser.add_argument(
            "--rounds",
            type=int,
            default=None,
            help="With --loop: stop after this many rounds (for tests).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Ship, report, and exit non-zero when batches stay pending after a single run."""
        if options["interval"] <= 0 or options["batch_limit"] <= 0 or options["min_age"] < 0:
            raise CommandError("--interval and --batch-limit must be positive, --min-age >= 0")
        embedded_clickhouse_or_refuse()
        rounds = 0
        while True:
            shipped = self._round(options)
            rounds += 1
            if not options["loop"]:
                pending = MemberOutbox.objects.filter(shipped_at__isnull=True).count()
                if pending and shipped.error:
                    raise CommandError(f"{pending} batches still pending: {shipped.error}")
                return
            if options["rounds"] is not None and rounds >= options["rounds"]:
                return
            time.sleep(options["interval"])

    def _round(self, options: dict[str, Any]) -> Any:
        cutoff = timezone.now() - timedelta(seconds=options["min_age"])
        keys = list(
            MemberOutbox.objects.filter(shipped_at__isnull=True, recorded_at__lte=cutoff)
            .order_by("recorded_at")
            .values_list("key", flat=True)[: options["batch_limit"]]
        )
        report = member_batches_ship(keys=keys, check_existing=True)
        if report.batches or report.error or options["verbosity"] > 1:
            style = self.style.ERROR if report.error else self.style.SUCCESS
            self.stdout.write(
                style(
                    f"shipped {report.batches} batches ({report.events} events), "
                    f"{report.skipped} already in ClickHouse, recounted {len(report.recounted)} "
                    f"groups" + (f"; error: {report.error}" if report.error else "")
                )
            )
        return report

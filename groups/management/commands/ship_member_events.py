"""``manage.py ship_member_events``: ship pending member event batches to ClickHouse.

Run once (after an outage: it drains every batch left behind, or exits non-zero saying
what is left), or with ``--loop`` as a side process (the outbox relay: rounds until
interrupted, backing off while ClickHouse is down).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from groups.management.cli import embedded_clickhouse_or_refuse
from groups.outbox.pending import outbox_backlog
from groups.outbox.ship import ShipReport, member_batches_relay

MSG_BAD_ARGUMENTS = (
    "--interval, --max-interval and --batch-limit must be positive, --min-age >= 0, "
    "and --max-interval at least --interval"
)
MSG_LEFT = "{batches} batches still pending (the oldest committed {age:.0f} s ago)"
MSG_FRESH = "{batches} batches younger than --min-age left to the writes that made them"


class Command(BaseCommand):
    """Ship pending outbox batches once or in a loop."""

    help = (
        "Ship member event batches that are committed in the metadata store but not yet "
        "in ClickHouse (after an outage or a crash), and correct the quantity of versions "
        "written while ClickHouse was down. Idempotent: batches ClickHouse already holds "
        "are only marked shipped. A single run drains everything older than --min-age or "
        "exits non-zero saying what is left."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Command-line options."""
        parser.add_argument(
            "--loop",
            action="store_true",
            help="Keep running until interrupted (SIGINT, SIGTERM): a relay process.",
        )
        parser.add_argument(
            "--interval",
            type=float,
            default=2.0,
            help="Seconds between rounds with --loop (default 2).",
        )
        parser.add_argument(
            "--max-interval",
            type=float,
            default=60.0,
            help="With --loop: while rounds fail, the wait doubles up to this (default 60).",
        )
        parser.add_argument(
            "--min-age",
            type=float,
            default=1.0,
            help="Only ship batches older than this many seconds (or whose shipping "
            "failed), leaving fresh ones to the request that wrote them (default 1).",
        )
        parser.add_argument(
            "--batch-limit",
            type=int,
            default=1000,
            help="Batches per ClickHouse round trip (default 1000); a run ships them all.",
        )
        parser.add_argument(
            "--rounds",
            type=int,
            default=None,
            help="With --loop: stop after this many rounds (for tests).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Ship, report, and exit non-zero when batches stay pending after a single run."""
        if (
            options["interval"] <= 0
            or options["batch_limit"] <= 0
            or options["min_age"] < 0
            or options["max_interval"] < options["interval"]
        ):
            raise CommandError(MSG_BAD_ARGUMENTS)
        embedded_clickhouse_or_refuse()
        if not options["loop"]:
            report = self._round(options)
            self._check_drained(report)
            return
        stop = threading.Event()
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            self._loop(options, stop)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _loop(self, options: dict[str, Any], stop: threading.Event) -> None:
        """Rounds until stopped; the wait doubles after each failed round (backoff)."""
        rounds, wait = 0, options["interval"]
        while not stop.is_set():
            report = self._round(options)
            rounds += 1
            if options["rounds"] is not None and rounds >= options["rounds"]:
                return
            wait = min(wait * 2, options["max_interval"]) if report.error else options["interval"]
            stop.wait(wait)

    def _round(self, options: dict[str, Any]) -> ShipReport:
        report = member_batches_relay(
            min_age=options["min_age"], batch_limit=options["batch_limit"]
        )
        if report.batches or report.error or report.recounted or options["verbosity"] > 1:
            style = self.style.ERROR if report.error else self.style.SUCCESS
            self.stdout.write(
                style(
                    f"shipped {report.batches} batches ({report.events} events), "
                    f"{report.skipped} already in ClickHouse, recounted {len(report.recounted)} "
                    f"groups" + (f"; error: {report.error}" if report.error else "")
                )
            )
        return report

    def _check_drained(self, report: ShipReport) -> None:
        """Exit non-zero unless every batch left behind has shipped."""
        backlog = outbox_backlog()
        if report.left:
            raise CommandError(
                MSG_LEFT.format(batches=report.left, age=backlog.oldest_age)
                + (f": {report.error}" if report.error else "")
            )
        if backlog.batches:
            self.stdout.write(MSG_FRESH.format(batches=backlog.batches))

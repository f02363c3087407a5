"""``manage.py repair_group_members``: find and repair damage in Group rosters.

Checks every roster (or those of ``--group``) across the outbox, the ClickHouse event log,
the current-state tables and ``Group.quantity``, ships pending batches, and with ``--fix``
repairs the rest. See ``groups.maintenance.scan`` for the kinds of damage and
``groups.maintenance.repair`` for how each is fixed.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fhirservice.errors import FhirError
from groups.maintenance.common import MaintenanceError
from groups.maintenance.repair import RepairReport, rosters_repair
from groups.maintenance.scan import KINDS, PENDING, Finding, ScanReport
from groups.management.cli import (
    ProgressBar,
    add_no_input,
    confirm,
    embedded_clickhouse_or_refuse,
    named_groups,
    positive,
)

# Exit status when damage is left (bad arguments and failures exit with 1).
EXIT_PROBLEMS_REMAIN = 3


class Command(BaseCommand):
    """Report and repair roster damage across the metadata store and ClickHouse."""

    help = (
        "Check Group rosters: ship pending member batches; report ClickHouse events no "
        "committed version backs (newer than the Group's version, of no Group incarnation, "
        "or without an outbox record), committed events missing from ClickHouse, "
        "current-state rows that disagree with the event log, and quantity values that "
        "disagree with the roster. With --fix, repair all of them (asks first). "
        f"Exit status {EXIT_PROBLEMS_REMAIN} when problems remain, 1 on bad arguments."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Command-line options."""
        parser.add_argument(
            "--fix",
            action="store_true",
            help="Repair what is found: delete stray ClickHouse rows, re-insert missing "
            "events, rebuild state rows, recount quantity.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Print the report only: ship nothing, change nothing.",
        )
        parser.add_argument(
            "--group",
            action="append",
            dest="groups",
            metavar="ID",
            help="Only the rosters of this Group (repeatable); default: every roster.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=500,
            help="Rosters per ClickHouse check query (default 500).",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=300.0,
            help="Seconds to wait for ClickHouse delete mutations to finish (default 300).",
        )
        parser.add_argument(
            "--show",
            type=int,
            default=20,
            help="Findings listed per kind (default 20; the counts are always complete).",
        )
        add_no_input(parser, "Do not ask for confirmation before repairing.")

    def handle(self, *args: Any, **options: Any) -> None:
        """Scan, report, repair when asked, report what is left; exit non-zero if any."""
        positive(options, "batch-size")
        positive(options, "show")
        if options["timeout"] <= 0:
            raise CommandError(f"--timeout must be positive, not {options['timeout']}")
        embedded_clickhouse_or_refuse()
        group_ids = named_groups(options["groups"])
        dry_run, fix = options["dry_run"], options["fix"]

        def review(found: ScanReport) -> bool:
            bar.close()
            self._report("Found", found.findings, options["show"], found.rosters)
            destructive = any(f.kind != PENDING for f in found.findings)
            if dry_run or not fix or not destructive or not options["interactive"]:
                return True
            agreed = confirm(
                self,
                f"Repair {len(found.findings)} problems? Stray ClickHouse rows are deleted "
                f"and state rows rebuilt.",
            )
            if not agreed:
                self.stdout.write("Repair cancelled; nothing changed.")
            return agreed

        bar = ProgressBar(self, unit="roster", verbosity=options["verbosity"])
        try:
            report = rosters_repair(
                group_ids=group_ids,
                batch_size=options["batch_size"],
                fix=fix and not dry_run,
                ship=not dry_run,
                timeout=options["timeout"],
                progress=bar,
                review=review,
            )
        except (MaintenanceError, FhirError) as exc:
            bar.close()
            text = exc.diagnostics if isinstance(exc, FhirError) else str(exc)
            raise CommandError(f"Repair stopped: {text}") from exc
        bar.close()
        self._summary(report, dry_run=dry_run, fix=fix)

    def _report(self, title: str, findings: list[Finding], show: int, rosters: int) -> None:
        if not findings:
            self.stdout.write(self.style.SUCCESS(f"{title}: no problems in {rosters} rosters."))
            return
        self.stdout.write(
            self.style.WARNING(f"{title}: {len(findings)} problems in {rosters} rosters.")
        )
        for kind, meaning in KINDS.items():
            of_kind = [f for f in findings if f.kind == kind]
            if not of_kind:
                continue
            self.stdout.write(f"  {kind}: {len(of_kind)} — {meaning}")
            for finding in of_kind[:show]:
                self.stdout.write(f"    {finding.roster_key}: {finding.detail}")
            if len(of_kind) > show:
                self.stdout.write(f"    … and {len(of_kind) - show} more (--show)")

    def _summary(self, report: RepairReport, *, dry_run: bool, fix: bool) -> None:
        for fixed in report.fixed:
            self.stdout.write(
                f"Shipped {fixed.shipped_batches} batches, removed {fixed.deleted} stray row "
                f"sets, re-inserted {fixed.reinserted_events} events, rebuilt "
                f"{fixed.rebuilt} rosters, recounted {fixed.recounted} quantities."
            )
            for error in fixed.errors:
                self.stderr.write(self.style.ERROR(error))
        if dry_run:
            self.stdout.write("Dry run: nothing was shipped or changed.")
        remaining = report.remaining
        if not remaining:
            if not report.found.ok:
                self.stdout.write(self.style.SUCCESS("Repaired: no problems remain."))
            return
        if report.fixed:
            self._report("Remaining", remaining, 20, len({f.roster_key for f in remaining}))
        if not fix and not dry_run and any(f.kind != PENDING for f in remaining):
            self.stdout.write("Run again with --fix to repair.")
        raise CommandError(f"{len(remaining)} problems remain.", returncode=EXIT_PROBLEMS_REMAIN)

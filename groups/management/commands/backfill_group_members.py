"""``manage.py backfill_group_members``: move inline Group rosters into ClickHouse events.

For databases written with ``GROUP_ROSTER_STORAGE = "inline"`` (the roster inside the Group
body) and now switched to ``"clickhouse"``. Each Group with an inline roster gets exactly one
new version whose body has no ``member``; its members become events. The run keeps a
checkpoint in the metadata store and resumes after an interruption; Groups already moved are
skipped, so running it twice changes nothing.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from fhirservice.conf import fhir_settings
from fhirservice.errors import FhirError
from groups.maintenance.backfill import (
    MSG_INLINE_MODE,
    BackfillReport,
    backfill_candidates,
    backfill_checkpoint,
    backfill_checkpoint_reset,
    groups_backfill,
)
from groups.maintenance.common import MaintenanceError
from groups.management.cli import (
    ProgressBar,
    add_no_input,
    confirm,
    embedded_clickhouse_or_refuse,
    named_groups,
    positive,
)

MSG_GROUP_AND_RESTART = "--restart concerns the checkpoint, which --group runs do not use"


class Command(BaseCommand):
    """Backfill inline Group rosters into the ClickHouse member event store."""

    help = (
        "Move the rosters of Groups stored inline (Group.member in the stored body, written "
        "with GROUP_ROSTER_STORAGE='inline') into ClickHouse member events. Each such Group "
        "gets one new version without `member`; quantity is set from its roster. Resumable: "
        "a checkpoint in the metadata store records the last Group done, and an interrupted "
        "run continues after it. Idempotent: Groups without an inline roster are skipped. "
        "Exit status 1 on bad arguments, on failed Groups and when interrupted."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Command-line options."""
        parser.add_argument(
            "--group",
            action="append",
            dest="groups",
            metavar="ID",
            help="Backfill only this Group (repeatable). Such runs ignore the checkpoint.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=100,
            help="Groups per metadata query and per checkpoint save (default 100).",
        )
        parser.add_argument(
            "--limit",
            type=int,
            default=None,
            help="Stop after moving this many Groups (resume later from the checkpoint).",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="Count the Groups and members that would move; change nothing.",
        )
        parser.add_argument(
            "--restart",
            action="store_true",
            help="Forget the checkpoint and start from the first Group.",
        )
        parser.add_argument(
            "--actor",
            default="backfill_group_members",
            help="Who the new versions and member events are recorded as.",
        )
        add_no_input(parser, "Do not ask for confirmation before writing.")

    def handle(self, *args: Any, **options: Any) -> None:
        """Check arguments, confirm, run with a progress bar, print the summary."""
        positive(options, "batch-size")
        positive(options, "limit")
        group_ids = options["groups"]
        if group_ids is not None and options["restart"]:
            raise CommandError(MSG_GROUP_AND_RESTART)
        if fhir_settings.GROUP_ROSTER_STORAGE != "clickhouse":
            raise CommandError(MSG_INLINE_MODE)
        group_ids = named_groups(group_ids)
        checkpoint = None if group_ids is not None else backfill_checkpoint()
        resume = checkpoint is not None and checkpoint.finished_at is None
        if options["dry_run"]:
            self._dry_run(group_ids, checkpoint if resume else None)
            return
        embedded_clickhouse_or_refuse()
        if options["interactive"]:
            where = (
                f"resuming after {checkpoint.last_key}"
                if resume and not options["restart"]
                else "from the first Group"
            )
            scope = f"{len(group_ids)} named Groups" if group_ids else f"all Groups, {where}"
            question = (
                f"Backfill inline rosters ({scope}): every Group with an inline roster gets "
                f"a new version. Continue?"
            )
            if not confirm(self, question):
                raise CommandError("Backfill cancelled; nothing changed.")
        if options["restart"]:
            backfill_checkpoint_reset()
        bar = ProgressBar(self, unit="group", verbosity=options["verbosity"])
        try:
            report = groups_backfill(
                group_ids=group_ids,
                batch_size=options["batch_size"],
                limit=options["limit"],
                actor=options["actor"],
                progress=bar,
            )
        except KeyboardInterrupt:
            bar.close()
            raise CommandError(
                "Interrupted; the checkpoint is saved: run the command again to resume.",
                returncode=130,
            ) from None
        except (MaintenanceError, FhirError) as exc:
            bar.close()
            text = exc.diagnostics if isinstance(exc, FhirError) else str(exc)
            raise CommandError(f"Backfill stopped: {text}. Run it again to resume.") from exc
        bar.close()
        self._summary(report, use_checkpoint=group_ids is None)

    def _dry_run(self, group_ids: list[str] | None, checkpoint: Any) -> None:
        groups, members = backfill_candidates(group_ids=group_ids)
        self.stdout.write(
            f"Dry run: {groups} Groups with inline rosters ({members} members) would move, "
            f"one new version each; nothing was changed."
        )
        if checkpoint is not None:
            self.stdout.write(
                f"A run would resume after {checkpoint.last_key} "
                f"({checkpoint.groups_done} Groups done so far)."
            )

    def _summary(self, report: BackfillReport, *, use_checkpoint: bool) -> None:
        rate = report.members / report.seconds if report.seconds else 0.0
        self.stdout.write(
            self.style.SUCCESS(
                f"Moved {report.moved} Groups ({report.members} members) in "
                f"{report.seconds:.1f} s ({rate:,.0f} members/s); skipped {report.skipped} "
                f"without an inline roster."
            )
        )
        if report.resumed_from:
            self.stdout.write(f"Resumed after {report.resumed_from}.")
        if use_checkpoint:
            if report.finished:
                self.stdout.write("Checkpoint: finished; every Group has been looked at.")
            else:
                self.stdout.write(
                    f"Checkpoint: stopped after {report.last_key}; run again to continue."
                )
        if report.failed:
            for group_id, reason in sorted(report.failed.items()):
                self.stderr.write(self.style.ERROR(f"Group/{group_id}: {reason}"))
            raise CommandError(
                f"{len(report.failed)} Groups could not be moved (listed above); fix them and "
                f"rerun with --group ID."
            )

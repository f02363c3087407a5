"""``manage.py reindex_search``: re-extract the search index of stored resources.

Run after a definitions upgrade (``scripts/generate_definitions.py``) or a migration that
changes how values are indexed. Resumable: a checkpoint records the last resource done, and
an interrupted run continues after it; ``--restart`` starts over.

Over an empty index, or with ``--rebuild``, a run writes every row with the search indexes
dropped and builds them again at the end (``fhirservice.search.reindex_indexes``); while
they are missing, searches are slow (and, over an emptied index, incomplete), and the next
run completes the rebuild whatever stopped this one.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from fhirservice.fhir.resource_types import is_resource_type
from fhirservice.search.reindex import (
    reindex_checkpoint,
    reindex_checkpoint_reset,
    reindex_remaining,
    search_reindex,
)

MSG_UNKNOWN_TYPE = "--type {type!r} is not an R4 resource type"
MSG_POSITIVE = "--{name} must be a positive whole number, not {value}"


class Command(BaseCommand):
    """Re-extract SearchToken rows for stored resources, in batches, resumably."""

    help = (
        "Re-extract the search index (SearchToken rows) of stored resources from the R4 "
        "search parameter definitions. Batches of --batch-size resources, one transaction "
        "each; a checkpoint records the last resource done so an interrupted run resumes "
        "after it. Resources written meanwhile keep the rows their write stored. Over an "
        "empty index (or with --rebuild) every row is written with the search indexes "
        "dropped, and they are built again at the end: searches are slow until then."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Command-line options."""
        parser.add_argument("--type", dest="resource_type", help="Only this resource type.")
        parser.add_argument(
            "--batch-size", type=int, default=500, help="Resources per batch (default 500)."
        )
        parser.add_argument(
            "--limit", type=int, default=None, help="Stop after this many resources."
        )
        parser.add_argument(
            "--workers",
            type=int,
            # Extraction is ~70 us a resource since the path walker; the database's index
            # writes bound a run, and a second worker gave nothing on 2 cores (bench/README).
            default=1,
            help="Processes extracting values while this one writes rows (default 1: "
            "extraction in this process); more only pay where the database outruns one core.",
        )
        parser.add_argument(
            "--restart", action="store_true", help="Forget the checkpoint; start over."
        )
        parser.add_argument(
            "--rebuild",
            action="store_true",
            help="Write every row without comparing, the search indexes dropped and built "
            "again at the end (done anyway over an empty index; PostgreSQL and SQLite). "
            "Searches are slow until the run finishes; an interrupted rebuild is completed by "
            "the next run.",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Say how many resources a run would visit."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Check arguments, run with a progress bar, print the summary."""
        resource_type = options["resource_type"]
        if resource_type is not None and not is_resource_type(resource_type):
            raise CommandError(MSG_UNKNOWN_TYPE.format(type=resource_type))
        for name in ("batch_size", "limit", "workers"):
            if options[name] is not None and options[name] <= 0:
                raise CommandError(
                    MSG_POSITIVE.format(name=name.replace("_", "-"), value=options[name])
                )
        if options["restart"] and not options["dry_run"]:
            reindex_checkpoint_reset(resource_type)
        checkpoint = reindex_checkpoint(resource_type)
        after = (
            checkpoint.last_key
            if checkpoint is not None and checkpoint.finished_at is None and not options["restart"]
            else ""
        )
        remaining = reindex_remaining(resource_type=resource_type, after=after)
        if options["limit"] is not None:
            remaining = min(remaining, options["limit"])
        where = f"after {after}" if after else "from the start"
        if options["dry_run"]:
            self.stdout.write(f"Would re-extract {remaining} resources ({where}).")
            return
        bar = tqdm(
            total=remaining,
            unit="res",
            file=getattr(self.stderr, "_out", self.stderr),
            disable=options["verbosity"] == 0,
            mininterval=0.5,
            dynamic_ncols=True,
        )
        try:
            report = search_reindex(
                resource_type=resource_type,
                batch_size=options["batch_size"],
                limit=options["limit"],
                workers=options["workers"],
                rebuild=options["rebuild"],
                progress=lambda n, **counts: (bar.update(n), bar.set_postfix(counts)),
            )
        finally:
            bar.close()
        state = "finished" if report.finished else f"stopped after {report.last_key}"
        if report.rebuild:
            state += (
                f"; rebuilt, search indexes built again in {report.index_seconds:.0f} s"
                if report.finished
                else "; rebuilding: the search indexes are built when a run finishes"
            )
        self.stdout.write(
            self.style.SUCCESS(
                f"Re-extracted {report.resources} resources ({report.rows} index rows written, "
                f"{report.up_to_date} resources already up to date), {state}."
            )
        )

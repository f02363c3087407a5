"""``manage.py report_binding_violations``: find stored resources that break required bindings.

Writes have been checked against R4's required value-set bindings since the rule came in
(``fhirservice.fhir.bindings``); data written before it, or with
``FHIR_SERVICE["REQUIRED_BINDINGS"]`` off, may hold codes outside their value sets. This
command reads every current (not deleted) resource, in key order and in batches, so memory
stays flat however many there are, and reports each violation with the resource's key and
version, the element's path and the diagnostics a write would get. It changes nothing.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, TextIO

import orjson
from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from fhirservice.fhir.bindings import binding_issues
from fhirservice.fhir.resource_types import R4_RESOURCE_TYPES
from fhirservice.models import StoredResource

# Exit status when violations were found (bad arguments exit with 1).
EXIT_VIOLATIONS = 3
# Violations reported per resource: enough to fix it, bounded for a badly broken one.
PER_RESOURCE = 100

MSG_UNKNOWN_TYPE = "--type {name} is not an R4 resource type"
MSG_BAD_BATCH = "--batch-size must be a positive whole number, not {value}"
MSG_NONE = "No violations of required bindings in {count} resources."
MSG_FOUND = "{violations} violations of required bindings in {resources} of {count} resources."


class Command(BaseCommand):
    """Scan stored current resources for required-binding violations and report them."""

    help = (
        "Check every current stored resource (or those of --type) against the required "
        "value-set bindings of FHIR R4 and report the violations: a summary by resource type, "
        "element and value set, the first --show of them, and with --output every one as a "
        "JSON line. Read-only. "
        f"Exit status {EXIT_VIOLATIONS} when violations were found, 1 on bad arguments."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """Command-line options."""
        parser.add_argument(
            "--type",
            action="append",
            dest="types",
            metavar="TYPE",
            help="Only resources of this type (repeatable); default: every type.",
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=1000,
            help="Resources read per query (default 1000).",
        )
        parser.add_argument(
            "--output",
            metavar="PATH",
            help="Write every violation to PATH as JSON lines: key, versionId, expression, "
            "diagnostics.",
        )
        parser.add_argument(
            "--show",
            type=int,
            default=20,
            help="Violations printed in full (default 20; the summary counts all).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Check the arguments, scan with a progress bar, print the report."""
        types = options["types"]
        for name in types or ():
            if name not in R4_RESOURCE_TYPES:
                raise CommandError(MSG_UNKNOWN_TYPE.format(name=name))
        batch_size = options["batch_size"]
        if batch_size <= 0:
            raise CommandError(MSG_BAD_BATCH.format(value=batch_size))
        rows = StoredResource.objects.filter(deleted=False)
        if types:
            rows = rows.filter(resource_type__in=types)
        report = _Report(show=options["show"])
        path = options["output"]
        with open(path, "w", encoding="utf-8") if path else contextlib.nullcontext() as output:
            self._scan(rows, batch_size, report, output, options["verbosity"])
        self._print(report)
        if report.violations:
            raise CommandError(
                MSG_FOUND.format(
                    violations=report.violations,
                    resources=report.resources,
                    count=report.scanned,
                ),
                returncode=EXIT_VIOLATIONS,
            )

    def _scan(
        self, rows: Any, batch_size: int, report: _Report, output: TextIO | None, verbosity: int
    ) -> None:
        """Read the rows in key order, one batch per query (keyset paging), into the report."""
        # The wrapped stream: Django's OutputWrapper adds a newline to every write, which
        # breaks the bar's in-place redraws.
        bar = tqdm(
            total=rows.count(),
            unit="resource",
            file=getattr(self.stderr, "_out", self.stderr),
            disable=verbosity == 0,
            mininterval=0.5,
            dynamic_ncols=True,
        )
        last_key = None
        try:
            while True:
                page = rows.order_by("key")
                if last_key is not None:
                    page = page.filter(key__gt=last_key)
                batch = list(page.values_list("key", "version_id", "body")[:batch_size])
                if not batch:
                    break
                for key, version_id, body in batch:
                    issues = binding_issues(orjson.loads(body), limit=PER_RESOURCE)
                    report.add(key, version_id, issues)
                    if output is not None:
                        for issue in issues:
                            line = {
                                "key": key,
                                "versionId": str(version_id),
                                "expression": issue["expression"][0],
                                "diagnostics": issue["diagnostics"],
                            }
                            output.write(orjson.dumps(line).decode() + "\n")
                last_key = batch[-1][0]
                bar.update(len(batch))
                bar.set_postfix(violations=report.violations, refresh=False)
        finally:
            bar.close()

    def _print(self, report: _Report) -> None:
        """Print the counts by element and the first violations (the totals end the run)."""
        if not report.violations:
            self.stdout.write(self.style.SUCCESS(MSG_NONE.format(count=report.scanned)))
            return
        self.stdout.write("By element:")
        for element, n in report.by_element.most_common():
            self.stdout.write(f"  {n:>9}  {element}")
        self.stdout.write(f"First {len(report.shown)}:")
        for line in report.shown:
            self.stdout.write(f"  {line}")


class _Report:
    """What the scan found: counts, counts by element path, the first violations in full."""

    def __init__(self, *, show: int) -> None:
        self.show = show
        self.scanned = 0
        self.resources = 0  # resources with at least one violation
        self.violations = 0
        self.by_element: collections.Counter[str] = collections.Counter()
        self.shown: list[str] = []

    def add(self, key: str, version_id: int, issues: list[dict[str, Any]]) -> None:
        """Count one scanned resource and its violations."""
        self.scanned += 1
        if not issues:
            return
        self.resources += 1
        self.violations += len(issues)
        for issue in issues:
            self.by_element[_without_indexes(issue["expression"][0])] += 1
            if len(self.shown) < self.show:
                self.shown.append(f"{key} v{version_id}: {issue['diagnostics']}")


def _without_indexes(expression: str) -> str:
    """``Patient.contact[0].gender`` → ``Patient.contact.gender``: the summary's key."""
    parts = expression.split("[")
    return parts[0] + "".join(part.split("]", 1)[1] for part in parts[1:])

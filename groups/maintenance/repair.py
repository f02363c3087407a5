"""Repairing rosters: ship pending batches, rebuild state rows, fix what a scan found.

Repair runs in dependency order: ship pending batches; remove stray rosters and events (and
wait for those mutations, as the next steps read the log); re-insert missing committed
events from the outbox; rebuild the state of every roster whose log changed or whose state
disagreed; recount ``quantity`` of every Group whose roster was touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from fhirservice.models import StoredResource
from fhirservice.store.json import loads
from groups.maintenance.common import (
    MUTATION_TIMEOUT,
    Progress,
    group_row,
    no_progress,
    split_key,
    wait_for_mutations,
)
from groups.maintenance.scan import (
    MISSING_EVENTS,
    PENDING,
    QUANTITY,
    STATE,
    STRAY_EVENTS,
    STRAY_ROSTER,
    STRAY_VERSION,
    Finding,
    ScanReport,
    rosters_scan,
)
from groups.models import MemberOutbox
from groups.outbox.ship import (
    ShipReport,
    batch_event_rows,
    group_quantity_recount,
    member_batches_ship,
)
from groups.repository import MemberEventRepository
from groups.selectors import clickhouse_required, roster_key

# -- one Group: rebuild, ship ---------------------------------------------------------------


@dataclass
class RebuildReport:
    """``roster_rebuild``: which roster was rebuilt and how long the mutations took."""

    roster_key: str
    members: int
    seconds: float


def roster_rebuild(
    *, roster_key: str, timeout: float = MUTATION_TIMEOUT, wait: bool = True
) -> RebuildReport:
    """Replace a roster's current-state rows (both tables) with states from its event log."""
    started = time.monotonic()
    repository = MemberEventRepository()
    with clickhouse_required():
        repository.rebuild_state(roster_key)
        if wait:
            wait_for_mutations(repository, timeout=timeout)
        check = repository.consistency([roster_key]).get(roster_key)
    return RebuildReport(roster_key, check.log_present if check else 0, time.monotonic() - started)


def group_roster_rebuild(*, group_id: str, timeout: float = MUTATION_TIMEOUT) -> RebuildReport:
    """Rebuild the current roster of a Group (the admin's action)."""
    row = group_row(group_id)
    return roster_rebuild(roster_key=roster_key(group_id, row.incarnation), timeout=timeout)


def group_batches_ship(*, group_ids: list[str]) -> ShipReport:
    """Ship the pending outbox batches of some Groups (every incarnation)."""
    keys = list(
        MemberOutbox.objects.filter(group_id__in=group_ids, shipped_at__isnull=True).values_list(
            "key", flat=True
        )
    )
    if not keys:
        return ShipReport()
    return member_batches_ship(keys=keys, check_existing=True)


# -- fixing findings --------------------------------------------------------------------------


@dataclass
class FixReport:
    """What ``repair_fix`` changed."""

    shipped_batches: int = 0
    deleted: int = 0
    reinserted_events: int = 0
    rebuilt: int = 0
    recounted: int = 0
    errors: list[str] = field(default_factory=list)


class _Fix:
    """One ``repair_fix`` run: the findings by kind, the rosters touched, the report."""

    def __init__(self, findings: list[Finding], progress: Progress) -> None:
        self.by_kind: dict[str, list[Finding]] = {}
        for finding in findings:
            self.by_kind.setdefault(finding.kind, []).append(finding)
        self.progress = progress
        self.repository = MemberEventRepository()
        self.report = FixReport()
        self.touched: set[str] = set()
        self.rebuilt: set[str] = set()

    def of(self, *kinds: str) -> list[Finding]:
        """The findings of some kinds, in that order."""
        return [finding for kind in kinds for finding in self.by_kind.get(kind, [])]

    def ship_pending(self) -> None:
        """Ship the pending batches of the rosters that have them."""
        keys = sorted({f.roster_key for f in self.of(PENDING)})
        if not keys:
            return
        shipped = member_batches_ship(roster_keys=keys, check_existing=True)
        self.report.shipped_batches = shipped.batches
        if shipped.error:
            self.report.errors.append(f"shipping failed: {shipped.error}")
        self.progress(len(self.of(PENDING)))

    def remove_strays(self, timeout: float) -> None:
        """Delete stray rosters and events, and wait until the deletes have run."""
        for finding in self.of(STRAY_ROSTER):
            self.repository.delete_roster(finding.roster_key)
            self.report.deleted += 1
            self.progress(1)
        for finding in self.of(STRAY_VERSION, STRAY_EVENTS):
            self.repository.delete_events(
                finding.roster_key, version=finding.version, min_seq=finding.min_seq
            )
            self.report.deleted += 1
            self.touched.add(finding.roster_key)
            self.progress(1)
        if self.report.deleted:
            wait_for_mutations(self.repository, timeout=timeout)

    def reinsert_missing(self) -> None:
        """Insert committed versions' events again from their outbox rows (idempotent)."""
        for finding in self.of(MISSING_EVENTS):
            batches = MemberOutbox.objects.filter(
                roster_key=finding.roster_key, version=finding.version or 0
            )
            for batch in batches.order_by("chunk"):
                rows = batch_event_rows(batch, orjson.loads(batch.events))
                self.report.reinserted_events += self.repository.insert_events(rows)
            self.touched.add(finding.roster_key)
            self.progress(1)

    def rebuild_states(self, timeout: float) -> None:
        """Rebuild the state rows of rosters that disagreed or whose log lost strays."""
        self.rebuilt = {f.roster_key for f in self.of(STATE, STRAY_VERSION, STRAY_EVENTS)}
        for key in sorted(self.rebuilt):
            self.repository.rebuild_state(key)
            self.report.rebuilt += 1
        if self.rebuilt:
            wait_for_mutations(self.repository, timeout=timeout)
        self.progress(len(self.of(STATE)))

    def recount(self) -> None:
        """Recount ``quantity`` where it was wrong or its roster was repaired."""
        # Shipping recounts what was written blind by itself; a roster whose log or state
        # was repaired may have had its quantity counted from the damage.
        group_ids = {f.group_id for f in self.of(QUANTITY)}
        group_ids |= {split_key(key)[0] for key in self.touched | self.rebuilt}
        for group_id in sorted(group_ids):
            before = StoredResource.objects.filter(key=f"Group/{group_id}").first()
            old = loads(before.body).get("quantity") if before and not before.deleted else None
            new = group_quantity_recount(group_id=group_id)
            self.report.recounted += new is not None and new != old
        self.progress(len(self.of(QUANTITY)))


def repair_fix(
    findings: list[Finding],
    *,
    timeout: float = MUTATION_TIMEOUT,
    progress: Progress = no_progress,
) -> FixReport:
    """Repair what a scan found, in dependency order (see the module's docstring)."""
    fix = _Fix(findings, progress)
    progress(total=len(findings), desc="repairing", unit="problem")
    with clickhouse_required():
        fix.ship_pending()
        fix.remove_strays(timeout)
        fix.reinsert_missing()
        fix.rebuild_states(timeout)
        fix.recount()
    return fix.report


@dataclass
class RepairReport:
    """``rosters_repair``: what was found, what was done, what is left."""

    found: ScanReport
    fixed: list[FixReport] = field(default_factory=list)
    remaining: list[Finding] = field(default_factory=list)


def rosters_repair(
    *,
    group_ids: list[str] | None = None,
    batch_size: int = 500,
    fix: bool = False,
    ship: bool = True,
    timeout: float = MUTATION_TIMEOUT,
    rounds: int = 3,
    progress: Progress = no_progress,
    review: Callable[[ScanReport], bool] = lambda report: True,
) -> RepairReport:
    """Scan, then ship pending batches (``ship``) or repair everything (``fix``), re-scan.

    A fix can uncover more (events missing behind strays that were removed), so fixing and
    re-scanning the touched rosters repeat up to ``rounds`` times. ``review`` sees the scan
    before anything is changed; when it answers False nothing is.
    """
    found = rosters_scan(group_ids=group_ids, batch_size=batch_size, progress=progress)
    report = RepairReport(found=found, remaining=list(found.findings))
    if not review(found) or not (fix or ship) or found.ok:
        return report
    todo = found.findings if fix else [f for f in found.findings if f.kind == PENDING]
    for _ in range(rounds):
        if not todo:
            break
        report.fixed.append(repair_fix(todo, timeout=timeout, progress=progress))
        keys = sorted({f.roster_key for f in report.remaining})
        rescan = rosters_scan(roster_keys=keys, batch_size=batch_size)
        report.remaining = rescan.findings
        todo = rescan.findings if fix else []
    return report

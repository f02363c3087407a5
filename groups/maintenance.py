"""Roster maintenance: verify, rebuild, ship, repair and backfill.

The admin's actions and the ``backfill_group_members`` / ``repair_group_members`` commands
are thin wrappers over the services here. A roster is stored three times over, and each copy
can be checked against another:

- the **outbox** (metadata store): every committed member event, written with its version;
- the **event log** (ClickHouse ``Group_4_0_0_MemberEvents``): the shipped copy;
- the **current-state tables** (``MemberState``, ``MemberGroups``): kept from the log by
  materialized views;
- and the Group's ``quantity`` in its metadata body.

The outbox is the authority (ADR 0004): an event in ClickHouse that no outbox row backs was
never committed; a committed event missing from ClickHouse is re-inserted from the outbox;
state rows that disagree with the log are rebuilt from the log; ``quantity`` is recounted
from the roster.

ClickHouse 18.16 has no lightweight ``DELETE``, and argMax states cannot be overridden by
inserting "better" ones (a bogus state with a higher position would always win), so removal
uses ``ALTER TABLE … DELETE WHERE`` mutations: asynchronous, applied to the parts that exist
when the mutation is created. Repair waits for them to finish (``system.mutations``) before
it derives anything from the log, and a rebuild inserts the new states after creating the
delete, so the roster stays readable throughout (see ``MaintenanceRepository``).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.utils import timezone

from fhirservice.conf import fhir_settings
from fhirservice.errors import FhirError
from fhirservice.models import ResourceVersion, StoredResource
from fhirservice.store.content import without_server_meta
from fhirservice.store.handlers import VersionWrite, WriteContext
from fhirservice.store.json import loads
from fhirservice.store.services import write_version
from groups.handlers import parse_roster
from groups.middleware import FLAG
from groups.models import BackfillCheckpoint, MemberOutbox
from groups.repository import (
    IN_LIST_BYTES,
    MaintenanceRepository,
    RosterConsistency,
    in_chunks,
)
from groups.selectors import clickhouse_required, roster_key
from groups.services import (
    RosterSession,
    ShipReport,
    batch_event_rows,
    group_quantity_recount,
    member_batches_ship,
    member_events_record,
)

# Kinds of damage, in the order repair fixes them.
PENDING = "pending"
STRAY_ROSTER = "stray-roster"
STRAY_VERSION = "stray-version"
STRAY_EVENTS = "stray-events"
MISSING_EVENTS = "missing-events"
STATE = "state"
QUANTITY = "quantity"
KINDS = {
    PENDING: "member batches committed but not shipped to ClickHouse",
    STRAY_ROSTER: "ClickHouse rows of a roster key that belongs to no Group incarnation",
    STRAY_VERSION: "ClickHouse events of a version that was never committed",
    STRAY_EVENTS: "ClickHouse events beyond those a committed version holds",
    MISSING_EVENTS: "committed events missing from the ClickHouse event log",
    STATE: "current-state rows that disagree with the event log",
    QUANTITY: "Group.quantity that disagrees with the roster",
}

BACKFILL_CHECKPOINT = "backfill_group_members"
INLINE_MARKER = '"member":'
MUTATION_TIMEOUT = 300.0

MSG_NO_GROUP = "No Group with id {id!r}"
MSG_INLINE_MODE = (
    "GROUP_ROSTER_STORAGE is 'inline': set it to 'clickhouse' before moving rosters there"
)
MSG_MUTATION_TIMEOUT = (
    "ClickHouse mutations of the member tables are still running after {seconds:.0f} s; "
    "see system.mutations, then run the repair again"
)


class MaintenanceError(Exception):
    """A maintenance step cannot run (unknown Group, wrong mode, mutations stuck)."""


Progress = Callable[..., None]


def _no_progress(*_: Any, **__: Any) -> None:
    """Progress sink for callers that show none."""


def _repository() -> MaintenanceRepository:
    return MaintenanceRepository()


def _split_key(key: str) -> tuple[str, int | None]:
    """(group id, incarnation) of a roster key; incarnation None when malformed."""
    group_id, _, incarnation = key.rpartition("/")
    return group_id, int(incarnation) if incarnation.isdigit() and group_id else None


def _group_row(group_id: str) -> StoredResource:
    row = StoredResource.objects.filter(key=f"Group/{group_id}").first()
    if row is None:
        raise MaintenanceError(MSG_NO_GROUP.format(id=group_id))
    return row


def wait_for_mutations(
    repository: MaintenanceRepository, *, timeout: float = MUTATION_TIMEOUT
) -> float:
    """Block until no mutation of the member tables is running; the seconds waited."""
    started = time.monotonic()
    delay = 0.02
    while repository.pending_mutations():
        waited = time.monotonic() - started
        if waited > timeout:
            raise MaintenanceError(MSG_MUTATION_TIMEOUT.format(seconds=waited))
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    return time.monotonic() - started


# -- reads the admin lists need ------------------------------------------------------------


def pending_batch_counts(group_ids: Iterable[str]) -> dict[str, int]:
    """{group id: unshipped outbox batches} for some Groups (one query for a list page)."""
    counts: Counter[str] = Counter(
        MemberOutbox.objects.filter(
            group_id__in=list(group_ids), shipped_at__isnull=True
        ).values_list("group_id", flat=True)
    )
    return dict(counts)


def groups_with_pending_batches() -> list[str]:
    """Ids of Groups that have unshipped outbox batches (normally none or few)."""
    return sorted(
        set(MemberOutbox.objects.filter(shipped_at__isnull=True).values_list("group_id", flat=True))
    )


# -- scanning ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One piece of damage found in one roster."""

    kind: str
    roster_key: str
    detail: str
    group_id: str = ""
    version: int | None = None
    min_seq: int | None = None

    def __str__(self) -> str:
        return f"[{self.kind}] {self.roster_key}: {self.detail}"


@dataclass
class RosterStats:
    """What a scan measured for one roster key."""

    roster_key: str
    group_id: str
    incarnation: int | None
    legit: bool = False
    current: bool = False
    quantity: int | None = None
    clickhouse_versions: int = 0
    clickhouse_events: int = 0
    outbox_versions: int = 0
    outbox_events: int = 0
    pending_batches: int = 0
    pending_events: int = 0
    consistency: RosterConsistency | None = None


def _scan_batch(
    keys: list[str], repository: MaintenanceRepository
) -> tuple[list[Finding], dict[str, RosterStats]]:
    """Check a batch of roster keys against each other's stores; findings and statistics.

    ClickHouse is read before the metadata store: an event reaches ClickHouse only after its
    version and outbox row have committed, so outbox rows read afterwards back every event
    that was read, and a write racing the scan is never mistaken for a stray.
    """
    with clickhouse_required():
        counts = repository.version_counts(keys)
        consistency = repository.consistency(keys)
    parsed = {key: _split_key(key) for key in keys}
    ids = {group_id for group_id, _ in parsed.values()}
    rows = {
        row.resource_id: row
        for row in StoredResource.objects.filter(key__in=[f"Group/{i}" for i in ids])
    }
    incarnations = set(
        ResourceVersion.objects.filter(resource_type="Group", resource_id__in=list(ids))
        .values_list("resource_id", "incarnation")
        .distinct()
    )
    outbox: dict[tuple[str, int], list[tuple[int, bool]]] = {}
    batches = MemberOutbox.objects.filter(roster_key__in=keys)
    # shipped_at is filtered on, never selected: on SQLite, reading the column stored after
    # ``events`` walks the whole event payload of every row.
    unshipped = set(batches.filter(shipped_at__isnull=True).values_list("key", flat=True))
    for batch_key, key, version, n in batches.values_list(
        "key", "roster_key", "version", "event_count"
    ):
        outbox.setdefault((key, version), []).append((n, batch_key not in unshipped))
    versions_by_key: dict[str, list[int]] = {}
    for key, version in set(counts) | set(outbox):
        versions_by_key.setdefault(key, []).append(version)

    findings: list[Finding] = []
    stats: dict[str, RosterStats] = {}
    for key in keys:
        group_id, incarnation = parsed[key]
        row = rows.get(group_id)
        stat = RosterStats(key, group_id, incarnation, consistency=consistency.get(key))
        stats[key] = stat
        stat.legit = row is not None and (group_id, incarnation) in incarnations
        stat.current = stat.legit and not row.deleted and row.incarnation == incarnation
        in_clickhouse = [
            counts[(key, v)] for v in versions_by_key.get(key, []) if (key, v) in counts
        ]
        stat.clickhouse_versions = len(in_clickhouse)
        stat.clickhouse_events = sum(n for n, _ in in_clickhouse)
        if not stat.legit:
            # Rows of such a key in any state table are all mismatches: no log backs them.
            state_rows = stat.consistency.state_mismatches if stat.consistency else 0
            if in_clickhouse or stat.consistency is not None:
                findings.append(
                    Finding(
                        STRAY_ROSTER,
                        key,
                        f"roster key of no Group incarnation: {stat.clickhouse_events} events "
                        f"in {stat.clickhouse_versions} versions, {state_rows} state rows",
                        group_id,
                    )
                )
            continue
        for version in sorted(versions_by_key.get(key, [])):
            batches = outbox.get((key, version), [])
            committed = sum(n for n, _ in batches)
            pending = [n for n, shipped in batches if not shipped]
            stat.outbox_versions += bool(batches)
            stat.outbox_events += committed
            stat.pending_batches += len(pending)
            stat.pending_events += sum(pending)
            stored, top = counts.get((key, version), (0, -1))
            if not batches:
                newer = row.incarnation == incarnation and version > row.version_id
                reason = (
                    f"is newer than the Group's version {row.version_id}"
                    if newer
                    else "has no outbox record"
                )
                findings.append(
                    Finding(
                        STRAY_VERSION,
                        key,
                        f"{stored} events of version {version}, which {reason}: never committed",
                        group_id,
                        version=version,
                    )
                )
            elif top >= committed:
                findings.append(
                    Finding(
                        STRAY_EVENTS,
                        key,
                        f"version {version} committed {committed} events (seq 0–"
                        f"{committed - 1}); ClickHouse holds seq up to {top}",
                        group_id,
                        version=version,
                        min_seq=committed,
                    )
                )
            elif not pending and stored < committed:
                findings.append(
                    Finding(
                        MISSING_EVENTS,
                        key,
                        f"version {version}: {committed - stored} of {committed} committed "
                        f"events missing in ClickHouse",
                        group_id,
                        version=version,
                    )
                )
        if stat.pending_batches:
            findings.append(
                Finding(
                    PENDING,
                    key,
                    f"{stat.pending_batches} batches ({stat.pending_events} events) not shipped",
                    group_id,
                )
            )
        check = stat.consistency
        if check is not None and not check.consistent:
            findings.append(
                Finding(
                    STATE,
                    key,
                    f"{check.state_mismatches} MemberState and {check.reverse_mismatches} "
                    f"MemberGroups rows disagree with the event log (e.g. {check.sample})",
                    group_id,
                )
            )
        if stat.current:
            body = loads(row.body)
            stat.quantity = body.get("quantity", 0)
            active = check.log_active if check is not None else 0
            # With batches pending, ClickHouse lags the quantity on purpose: shipping first.
            if "member" not in body and not stat.pending_batches and stat.quantity != active:
                findings.append(
                    Finding(
                        QUANTITY,
                        key,
                        f"quantity is {stat.quantity}; the roster has {active} active members",
                        group_id,
                    )
                )
    return findings, stats


def group_roster_keys(group_ids: Iterable[str], repository: MaintenanceRepository) -> list[str]:
    """Roster keys of some Groups: every incarnation, and any key ClickHouse has for them."""
    ids = list(group_ids)
    keys = {
        roster_key(group_id, incarnation)
        for group_id, incarnation in ResourceVersion.objects.filter(
            resource_type="Group", resource_id__in=ids
        )
        .values_list("resource_id", "incarnation")
        .distinct()
    }
    with clickhouse_required():
        for group_id in ids:
            keys |= repository.roster_keys(prefix=f"{group_id}/")
    return sorted(keys)


def all_roster_keys(repository: MaintenanceRepository) -> list[str]:
    """Every roster key any store knows: ClickHouse, the outbox, and live Groups."""
    with clickhouse_required():
        keys = repository.roster_keys()
    keys.update(MemberOutbox.objects.values_list("roster_key", flat=True).distinct())
    live = StoredResource.objects.filter(resource_type="Group", deleted=False)
    keys.update(
        roster_key(group_id, incarnation)
        for group_id, incarnation in live.values_list("resource_id", "incarnation").iterator()
    )
    return sorted(keys)


@dataclass
class ScanReport:
    """The outcome of scanning many rosters."""

    rosters: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damage found."""
        return not self.findings

    def by_kind(self) -> Counter[str]:
        """How many findings of each kind."""
        return Counter(finding.kind for finding in self.findings)


def rosters_scan(
    *,
    group_ids: list[str] | None = None,
    roster_keys: list[str] | None = None,
    batch_size: int = 500,
    progress: Progress = _no_progress,
) -> ScanReport:
    """Find damage in every roster (or those of ``group_ids``, or exactly ``roster_keys``).

    Reads only. ``progress(n)`` is called after each batch with the rosters it covered;
    ``progress(total=n)`` once at the start.
    """
    repository = _repository()
    if roster_keys is None:
        roster_keys = (
            group_roster_keys(group_ids, repository)
            if group_ids is not None
            else all_roster_keys(repository)
        )
    progress(total=len(roster_keys), desc="checking", unit="roster")
    report = ScanReport(rosters=len(roster_keys))
    # The check query names its keys three times: keep it well under max_query_size.
    for chunk in in_chunks(roster_keys, max_bytes=IN_LIST_BYTES // 4):
        for start in range(0, len(chunk), batch_size):
            batch = list(chunk[start : start + batch_size])
            findings, _ = _scan_batch(batch, repository)
            report.findings.extend(findings)
            progress(len(batch))
    return report


# -- one Group: verify, rebuild, ship --------------------------------------------------------


@dataclass
class RosterReport:
    """``roster_verify``: one Group's roster across the outbox, ClickHouse and metadata."""

    group_id: str
    roster_key: str
    version_id: int
    deleted: bool
    stats: RosterStats
    findings: list[Finding]
    seconds: float

    @property
    def ok(self) -> bool:
        """All copies agree."""
        return not self.findings

    def summary(self) -> str:
        """One line for a message."""
        if self.ok:
            c = self.stats.consistency
            active = c.log_active if c is not None else 0
            return (
                f"Group/{self.group_id}: roster {self.roster_key} is consistent "
                f"({active} active members, quantity {self.stats.quantity}, "
                f"{self.stats.clickhouse_events} events in {self.stats.clickhouse_versions} "
                f"versions)"
            )
        return f"Group/{self.group_id}: {len(self.findings)} problems: " + "; ".join(
            f.detail for f in self.findings
        )


def roster_verify(*, group_id: str) -> RosterReport:
    """Check a Group's current roster: ClickHouse state against the event log, the log
    against the outbox, and ``quantity`` against the roster; also strays of its other keys."""
    started = time.monotonic()
    row = _group_row(group_id)
    repository = _repository()
    key = roster_key(group_id, row.incarnation)
    keys = sorted(set(group_roster_keys([group_id], repository)) | {key})
    findings, stats = _scan_batch(keys, repository)
    return RosterReport(
        group_id=group_id,
        roster_key=key,
        version_id=row.version_id,
        deleted=row.deleted,
        stats=stats[key],
        findings=findings,
        seconds=time.monotonic() - started,
    )


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
    repository = _repository()
    with clickhouse_required():
        repository.rebuild_state(roster_key)
        if wait:
            wait_for_mutations(repository, timeout=timeout)
        check = repository.consistency([roster_key]).get(roster_key)
    return RebuildReport(roster_key, check.log_present if check else 0, time.monotonic() - started)


def group_roster_rebuild(*, group_id: str, timeout: float = MUTATION_TIMEOUT) -> RebuildReport:
    """Rebuild the current roster of a Group (the admin's action)."""
    row = _group_row(group_id)
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


# -- repair ----------------------------------------------------------------------------------


@dataclass
class FixReport:
    """What ``repair_fix`` changed."""

    shipped_batches: int = 0
    deleted: int = 0
    reinserted_events: int = 0
    rebuilt: int = 0
    recounted: int = 0
    errors: list[str] = field(default_factory=list)


def _reinsert(repository: MaintenanceRepository, key: str, version: int) -> int:
    """Insert a committed version's events again from its outbox rows (idempotent)."""
    inserted = 0
    for batch in MemberOutbox.objects.filter(roster_key=key, version=version).order_by("chunk"):
        events = orjson.loads(batch.events)
        inserted += repository.insert_events(batch_event_rows(batch, events))
    return inserted


def repair_fix(
    findings: list[Finding],
    *,
    timeout: float = MUTATION_TIMEOUT,
    progress: Progress = _no_progress,
) -> FixReport:
    """Repair what a scan found, in dependency order.

    Ship pending batches; remove stray rosters and events (and wait for those mutations, as
    the next steps read the log); re-insert missing committed events from the outbox;
    rebuild the state of every roster whose log changed or whose state disagreed; recount
    ``quantity`` of every Group whose roster was touched.
    """
    report = FixReport()
    repository = _repository()
    progress(total=len(findings), desc="repairing", unit="problem")
    by_kind: dict[str, list[Finding]] = {}
    for finding in findings:
        by_kind.setdefault(finding.kind, []).append(finding)
    touched: set[str] = set()
    with clickhouse_required():
        pending_keys = sorted({f.roster_key for f in by_kind.get(PENDING, [])})
        if pending_keys:
            shipped = member_batches_ship(roster_keys=pending_keys, check_existing=True)
            report.shipped_batches = shipped.batches
            if shipped.error:
                report.errors.append(f"shipping failed: {shipped.error}")
            progress(len(by_kind[PENDING]))
        for finding in by_kind.get(STRAY_ROSTER, []):
            repository.delete_roster(finding.roster_key)
            report.deleted += 1
            progress(1)
        for finding in by_kind.get(STRAY_VERSION, []) + by_kind.get(STRAY_EVENTS, []):
            repository.delete_events(
                finding.roster_key, version=finding.version, min_seq=finding.min_seq
            )
            report.deleted += 1
            touched.add(finding.roster_key)
            progress(1)
        if report.deleted:
            wait_for_mutations(repository, timeout=timeout)
        for finding in by_kind.get(MISSING_EVENTS, []):
            report.reinserted_events += _reinsert(
                repository, finding.roster_key, finding.version or 0
            )
            touched.add(finding.roster_key)
            progress(1)
        rebuild = {f.roster_key for f in by_kind.get(STATE, [])}
        rebuild |= {
            f.roster_key for f in by_kind.get(STRAY_VERSION, []) + by_kind.get(STRAY_EVENTS, [])
        }
        for key in sorted(rebuild):
            repository.rebuild_state(key)
            report.rebuilt += 1
        if rebuild:
            wait_for_mutations(repository, timeout=timeout)
        progress(len(by_kind.get(STATE, [])))
        # Shipping recounts what was written blind by itself; a roster whose log or state
        # was repaired may have had its quantity counted from the damage.
        recount = {f.group_id for f in by_kind.get(QUANTITY, [])}
        recount |= {_split_key(key)[0] for key in touched | rebuild}
        for group_id in sorted(recount):
            before = StoredResource.objects.filter(key=f"Group/{group_id}").first()
            old = loads(before.body).get("quantity") if before and not before.deleted else None
            new = group_quantity_recount(group_id=group_id)
            report.recounted += new is not None and new != old
        progress(len(by_kind.get(QUANTITY, [])))
    return report


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
    progress: Progress = _no_progress,
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


# -- backfill of inline rosters ---------------------------------------------------------------


def group_roster_backfill(*, group_id: str, context: WriteContext) -> int | None:
    """Move one inline Group's roster into member events: one new version of the Group.

    The new version's body has no ``member``; its roster becomes events (via the outbox,
    shipped after commit) and ``quantity`` counts its active members. Returns the number of
    members moved, or None when the Group is deleted or has no inline roster (already moved:
    idempotent). Older versions keep their inline bodies, so vread still shows them.
    """
    if fhir_settings.GROUP_ROSTER_STORAGE != "clickhouse":
        raise MaintenanceError(MSG_INLINE_MODE)
    moved: list[int] = []

    def build(draft: VersionWrite) -> None:
        body = without_server_meta(loads(draft.previous.body))
        if "member" not in body:
            draft.body = body  # identical content: write_version makes no version
            return
        incoming = parse_roster(body["member"])
        del body["member"]
        session = RosterSession(roster_key(draft.resource_id, draft.incarnation))
        # replace_all, not plain adds: ClickHouse may hold an older roster for this key (the
        # Group was written in clickhouse mode before the switch to inline).
        session.replace_all(incoming)
        member_events_record(write=draft, roster=session.roster_key, events=session.events)
        draft.body = {**body, "quantity": sum(not m.inactive for m in incoming.values())}
        draft.changed = True
        setattr(draft.context.request, FLAG, True)
        moved[:] = [len(incoming)]

    row = StoredResource.objects.filter(key=f"Group/{group_id}").first()
    if row is None or row.deleted or INLINE_MARKER not in row.body:
        return None
    with clickhouse_required():
        write_version(
            resource_type="Group",
            resource_id=group_id,
            method="PUT",
            context=context,
            build=build,
            must_exist=True,
        )
    return moved[0] if moved else None


def inline_member_count(group_id: str) -> int | None:
    """Members of a Group's inline roster (None: none stored inline); for dry runs."""
    row = StoredResource.objects.filter(key=f"Group/{group_id}", deleted=False).first()
    if row is None or INLINE_MARKER not in row.body:
        return None
    members = loads(row.body).get("member")
    # Counted, not validated: a dry run reports invalid rosters only when it tries them.
    return len(members) if isinstance(members, list) else None


def backfill_checkpoint() -> BackfillCheckpoint | None:
    """The stored checkpoint of the backfill, if a run has started."""
    return BackfillCheckpoint.objects.filter(name=BACKFILL_CHECKPOINT).first()


def backfill_checkpoint_reset() -> None:
    """Forget the checkpoint: the next run starts from the first Group."""
    BackfillCheckpoint.objects.filter(name=BACKFILL_CHECKPOINT).delete()


def _checkpoint_save(report: BackfillReport, *, finished: bool = False) -> None:
    now = timezone.now()
    checkpoint = backfill_checkpoint() or BackfillCheckpoint(
        name=BACKFILL_CHECKPOINT, started_at=now
    )
    checkpoint.last_key = report.last_key
    checkpoint.groups_done = report.resumed_groups + report.moved
    checkpoint.members_done = report.resumed_members + report.members
    checkpoint.updated_at = now
    checkpoint.finished_at = now if finished else None
    checkpoint.save()


def backfill_remaining(*, after: str = "", group_ids: list[str] | None = None) -> int:
    """Live Groups the backfill still has to look at (after the checkpoint key)."""
    rows = StoredResource.objects.filter(resource_type="Group", deleted=False, key__gt=after)
    if group_ids is not None:
        rows = rows.filter(resource_id__in=group_ids)
    return rows.count()


def backfill_candidates(*, group_ids: list[str] | None = None) -> tuple[int, int]:
    """(Groups with an inline roster, their members): what a backfill would move."""
    rows = StoredResource.objects.filter(
        resource_type="Group", deleted=False, body__contains=INLINE_MARKER
    )
    if group_ids is not None:
        rows = rows.filter(resource_id__in=group_ids)
    groups = members = 0
    for group_id in rows.order_by("key").values_list("resource_id", flat=True).iterator():
        count = inline_member_count(group_id)
        if count is not None:
            groups += 1
            members += count
    return groups, members


@dataclass
class BackfillReport:
    """``groups_backfill``: Groups moved, skipped and failed, and where the run stopped."""

    moved: int = 0
    members: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    last_key: str = ""
    resumed_from: str = ""
    resumed_groups: int = 0
    resumed_members: int = 0
    finished: bool = False
    seconds: float = 0.0


def groups_backfill(
    *,
    group_ids: list[str] | None = None,
    batch_size: int = 100,
    limit: int | None = None,
    actor: str = "backfill_group_members",
    progress: Progress = _no_progress,
) -> BackfillReport:
    """Move the rosters of inline Groups into ClickHouse events, one version per Group.

    Walks live Groups in key order from the checkpoint (none when ``group_ids`` names the
    Groups: then exactly those are done and the checkpoint is left alone), ``batch_size``
    keys per query, and saves the checkpoint after every batch and when stopped by an
    error. ``limit`` stops after that many Groups moved. Groups whose roster is invalid are
    reported and skipped; ClickHouse being down stops the run.
    """
    if fhir_settings.GROUP_ROSTER_STORAGE != "clickhouse":
        raise MaintenanceError(MSG_INLINE_MODE)
    started = time.monotonic()
    report = BackfillReport()
    use_checkpoint = group_ids is None
    if use_checkpoint:
        checkpoint = backfill_checkpoint()
        if checkpoint is not None and checkpoint.finished_at is None:
            report.resumed_from = report.last_key = checkpoint.last_key
            report.resumed_groups = checkpoint.groups_done
            report.resumed_members = checkpoint.members_done
    progress(
        total=backfill_remaining(after=report.last_key, group_ids=group_ids),
        desc="backfill",
        unit="group",
    )
    rows = StoredResource.objects.filter(resource_type="Group", deleted=False)
    if group_ids is not None:
        rows = rows.filter(resource_id__in=group_ids)
    done = False
    try:
        while not done:
            keys = list(
                rows.filter(key__gt=report.last_key)
                .order_by("key")
                .values_list("key", flat=True)[:batch_size]
            )
            if not keys:
                report.finished = True
                break
            for key in keys:
                group_id = key.partition("/")[2]
                try:
                    moved = group_roster_backfill(
                        group_id=group_id,
                        context=WriteContext(actor=actor, source="backfill"),
                    )
                except FhirError as exc:
                    if exc.status == 503:
                        raise
                    report.failed[group_id] = exc.diagnostics
                    moved = None
                if moved is None:
                    report.skipped += group_id not in report.failed
                else:
                    report.moved += 1
                    report.members += moved
                report.last_key = key
                progress(1, moved=report.moved, members=report.members)
                if limit is not None and report.moved >= limit:
                    done = True
                    break
            if use_checkpoint:
                _checkpoint_save(report)
    except BaseException:
        if use_checkpoint:
            _checkpoint_save(report)
        raise
    if use_checkpoint and report.finished:
        _checkpoint_save(report, finished=True)
    report.seconds = time.monotonic() - started
    return report

"""Scanning rosters for damage: every roster, some Groups' rosters, or one Group (verify).

Reads only. A scan compares, per roster key, the ClickHouse event log (distinct events and
highest seq per version), the current-state tables (against the log), the outbox (the
committed events) and the Group's ``quantity``, and reports each disagreement as a
:class:`Finding` of one of ``KINDS``; ``groups.maintenance.repair`` fixes them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from fhirservice.models import ResourceVersion, StoredResource
from fhirservice.store.json import loads
from groups.maintenance.common import Progress, group_row, no_progress, split_key
from groups.models import MemberOutbox
from groups.repository import IN_LIST_BYTES, MemberEventRepository, RosterConsistency, in_chunks
from groups.selectors import clickhouse_required, roster_key

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


# -- findings and what a scan measured --------------------------------------------------------


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


@dataclass
class _Stores:
    """A batch of roster keys as each store holds them, read once per batch."""

    # {(roster key, version): (distinct events, highest seq)} in the ClickHouse log
    counts: dict[tuple[str, int], tuple[int, int]]
    consistency: dict[str, RosterConsistency]
    rows: dict[str, StoredResource]
    incarnations: set[tuple[str, int]]
    # {(roster key, version): [(events, shipped) per outbox batch]}
    outbox: dict[tuple[str, int], list[tuple[int, bool]]]
    versions: dict[str, list[int]]


def _read_stores(keys: list[str], repository: MemberEventRepository) -> _Stores:
    """Read a batch of roster keys from ClickHouse, then from the metadata store.

    ClickHouse is read before the metadata store: an event reaches ClickHouse only after its
    version and outbox row have committed, so outbox rows read afterwards back every event
    that was read, and a write racing the scan is never mistaken for a stray.
    """
    with clickhouse_required():
        counts = repository.version_counts(keys)
        consistency = repository.consistency(keys)
    ids = {split_key(key)[0] for key in keys}
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
    versions: dict[str, list[int]] = {}
    for key, version in set(counts) | set(outbox):
        versions.setdefault(key, []).append(version)
    return _Stores(counts, consistency, rows, incarnations, outbox, versions)


def _roster_stats(key: str, stores: _Stores) -> RosterStats:
    """Which Group incarnation a key belongs to, and what the ClickHouse log holds of it."""
    group_id, incarnation = split_key(key)
    row = stores.rows.get(group_id)
    stat = RosterStats(key, group_id, incarnation, consistency=stores.consistency.get(key))
    stat.legit = row is not None and (group_id, incarnation) in stores.incarnations
    stat.current = stat.legit and not row.deleted and row.incarnation == incarnation
    in_clickhouse = [
        stores.counts[(key, v)] for v in stores.versions.get(key, []) if (key, v) in stores.counts
    ]
    stat.clickhouse_versions = len(in_clickhouse)
    stat.clickhouse_events = sum(n for n, _ in in_clickhouse)
    return stat


def _stray_roster(stat: RosterStats) -> list[Finding]:
    """A key of no Group incarnation: any row of it in any table is a stray."""
    # Rows of such a key in any state table are all mismatches: no log backs them.
    state_rows = stat.consistency.state_mismatches if stat.consistency else 0
    if not stat.clickhouse_versions and stat.consistency is None:
        return []
    detail = (
        f"roster key of no Group incarnation: {stat.clickhouse_events} events "
        f"in {stat.clickhouse_versions} versions, {state_rows} state rows"
    )
    return [Finding(STRAY_ROSTER, stat.roster_key, detail, stat.group_id)]


def _version_finding(
    stat: RosterStats,
    row: StoredResource,
    version: int,
    batches: list[tuple[int, bool]],
    stored: tuple[int, int],
) -> Finding | None:
    """Compare one version's events in ClickHouse with its outbox batches (and count them)."""
    key, group_id = stat.roster_key, stat.group_id
    committed = sum(n for n, _ in batches)
    pending = [n for n, shipped in batches if not shipped]
    stat.outbox_versions += bool(batches)
    stat.outbox_events += committed
    stat.pending_batches += len(pending)
    stat.pending_events += sum(pending)
    events, top = stored
    if not batches:
        newer = row.incarnation == stat.incarnation and version > row.version_id
        reason = (
            f"is newer than the Group's version {row.version_id}"
            if newer
            else "has no outbox record"
        )
        detail = f"{events} events of version {version}, which {reason}: never committed"
        return Finding(STRAY_VERSION, key, detail, group_id, version=version)
    if top >= committed:
        detail = (
            f"version {version} committed {committed} events (seq 0–{committed - 1}); "
            f"ClickHouse holds seq up to {top}"
        )
        return Finding(STRAY_EVENTS, key, detail, group_id, version=version, min_seq=committed)
    if not pending and events < committed:
        detail = (
            f"version {version}: {committed - events} of {committed} committed "
            f"events missing in ClickHouse"
        )
        return Finding(MISSING_EVENTS, key, detail, group_id, version=version)
    return None


def _quantity_finding(stat: RosterStats, row: StoredResource) -> Finding | None:
    """The current Group's ``quantity`` against the active members of its log."""
    body = loads(row.body)
    stat.quantity = body.get("quantity", 0)
    check = stat.consistency
    active = check.log_active if check is not None else 0
    # With batches pending, ClickHouse lags the quantity on purpose: shipping first.
    if "member" in body or stat.pending_batches or stat.quantity == active:
        return None
    detail = f"quantity is {stat.quantity}; the roster has {active} active members"
    return Finding(QUANTITY, stat.roster_key, detail, stat.group_id)


def _roster_findings(stat: RosterStats, stores: _Stores) -> list[Finding]:
    """Everything wrong with one roster key (and its statistics filled in on the way)."""
    if not stat.legit:
        return _stray_roster(stat)
    key, row = stat.roster_key, stores.rows[stat.group_id]
    findings = []
    for version in sorted(stores.versions.get(key, [])):
        batches = stores.outbox.get((key, version), [])
        stored = stores.counts.get((key, version), (0, -1))
        finding = _version_finding(stat, row, version, batches, stored)
        if finding is not None:
            findings.append(finding)
    if stat.pending_batches:
        detail = f"{stat.pending_batches} batches ({stat.pending_events} events) not shipped"
        findings.append(Finding(PENDING, key, detail, stat.group_id))
    check = stat.consistency
    if check is not None and not check.consistent:
        detail = (
            f"{check.state_mismatches} MemberState and {check.reverse_mismatches} "
            f"MemberGroups rows disagree with the event log (e.g. {check.sample})"
        )
        findings.append(Finding(STATE, key, detail, stat.group_id))
    if stat.current:
        finding = _quantity_finding(stat, row)
        if finding is not None:
            findings.append(finding)
    return findings


def _scan_batch(
    keys: list[str], repository: MemberEventRepository
) -> tuple[list[Finding], dict[str, RosterStats]]:
    """Check a batch of roster keys against each other's stores; findings and statistics."""
    stores = _read_stores(keys, repository)
    findings: list[Finding] = []
    stats: dict[str, RosterStats] = {}
    for key in keys:
        stats[key] = _roster_stats(key, stores)
        findings.extend(_roster_findings(stats[key], stores))
    return findings, stats


# -- which rosters ----------------------------------------------------------------------------


def group_roster_keys(group_ids: Iterable[str], repository: MemberEventRepository) -> list[str]:
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


def all_roster_keys(repository: MemberEventRepository) -> list[str]:
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


# -- many rosters -----------------------------------------------------------------------------


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
    progress: Progress = no_progress,
) -> ScanReport:
    """Find damage in every roster (or those of ``group_ids``, or exactly ``roster_keys``).

    Reads only. ``progress(n)`` is called after each batch with the rosters it covered;
    ``progress(total=n)`` once at the start.
    """
    repository = MemberEventRepository()
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


# -- one Group --------------------------------------------------------------------------------


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
    row = group_row(group_id)
    repository = MemberEventRepository()
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

"""Shipping outbox batches to ClickHouse: insert their events, mark them shipped, recount.

Called after a write commits (``groups.outbox.background``), by ``ship_member_events`` (the
relay) and by repair. Shipping is idempotent: a batch shipped twice only duplicates rows that
every read collapses. A batch written while ClickHouse was down (``recount``) carried a
guessed quantity: once shipped, the Group's quantity and its version's are recounted.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import orjson
from django.db.models import F, Q
from django.utils import timezone

from fhirservice import db
from fhirservice.clickhouse import ClickHouseUnavailable
from fhirservice.conf import fhir_settings
from fhirservice.models import ResourceVersion, StoredResource
from fhirservice.store.json import loads
from groups.models import MemberOutbox
from groups.repository import MemberEventRepository, event_row
from groups.selectors import iter_members, roster_key

logger = logging.getLogger(__name__)

# A pending batch this old was left behind by its writer (see written_batches_ship). Its
# writer ships it right after commit, but that can take seconds on a busy machine; until then
# reads merge it, so waiting costs nothing but a later shipping by the next write or relay.
LEFT_BEHIND_AFTER = timedelta(seconds=30)


def written_batches_ship(
    written: dict[str, list[str]], known: dict[str, Sequence[list[Any]]] | None = None
) -> None:
    """Ship writes' own batches (their keys by roster), and what earlier writes of those
    rosters left behind, together: a round of the background shipper covering many rosters
    is then one ClickHouse insert (up to MEMBER_BATCH_SIZE events), not one per roster.

    Left behind: its shipping failed (ClickHouse was down), or it is older than
    LEFT_BEHIND_AFTER (its writer died before shipping). Batches other writers committed a
    moment ago are theirs to ship: when every writer shipped every pending batch of the
    roster, concurrent writers inserted each other's batches again and again, each insert
    then waiting for the metadata store's write lock to mark the batch shipped.
    """
    keys = [key for roster_keys in written.values() for key in roster_keys]
    cutoff = timezone.now() - LEFT_BEHIND_AFTER
    left_behind = (
        MemberOutbox.objects.filter(roster_key__in=list(written), shipped_at__isnull=True)
        .filter(Q(last_error__gt="") | Q(recorded_at__lte=cutoff))
        .exclude(key__in=keys)
        .values_list("key", flat=True)
    )
    member_batches_ship(keys=[*keys, *left_behind], known=known)


@dataclass
class ShipReport:
    """What one shipping run did."""

    batches: int = 0
    events: int = 0
    skipped: int = 0
    failed: int = 0
    recounted: list[str] = field(default_factory=list)
    error: str = ""
    left: int = 0  # batches the relay found left behind and could not ship

    def add(self, other: ShipReport) -> None:
        """Count another run's work in this report (the relay's rounds)."""
        self.batches += other.batches
        self.events += other.events
        self.skipped += other.skipped
        self.failed += other.failed
        self.recounted.extend(other.recounted)
        self.error = other.error or self.error


def member_batches_ship(
    *,
    keys: list[str] | None = None,
    roster_keys: list[str] | None = None,
    limit: int | None = None,
    check_existing: bool = False,
    known: dict[str, Sequence[list[Any]]] | None = None,
) -> ShipReport:
    """Ship pending outbox batches to ClickHouse and mark them shipped.

    Idempotent: a batch shipped twice (a crash between insert and mark) only duplicates rows
    that every read collapses. ``check_existing`` skips the insert when every ClickHouse
    table that serves reads already holds the batch (the relay and repair use it; the hot
    path does not).
    ``known``: the decoded events of some batches (by key), which then are not read back.
    """
    report = ShipReport()
    known = known or {}
    pending = MemberOutbox.objects.filter(shipped_at__isnull=True)
    if known:
        pending = pending.defer("events")
    if keys is not None:
        pending = pending.filter(key__in=keys)
    if roster_keys is not None:
        pending = pending.filter(roster_key__in=roster_keys)
    pending = pending.order_by("recorded_at", "version", "chunk")
    if limit is not None:
        pending = pending[:limit]
    batches = list(pending)
    try:
        repository = MemberEventRepository()
        for window in _windows(batches, fhir_settings.MEMBER_BATCH_SIZE):
            _window_ship(repository, window, known, report, check_existing=check_existing)
        for roster in sorted({batch.roster_key for batch in batches if batch.recount}):
            roster_quantities_recount(roster=roster, repository=repository)
            report.recounted.append(roster.rpartition("/")[0])
    except ClickHouseUnavailable as exc:
        report.failed += 1
        report.error = str(exc)
        logger.warning("Member events not shipped (ClickHouse unavailable): %s", exc)
        MemberOutbox.objects.filter(pk__in=[b.pk for b in batches], shipped_at__isnull=True).update(
            last_error=str(exc)[:500]
        )
    return report


def _windows(batches: list[MemberOutbox], size: int) -> Iterator[list[MemberOutbox]]:
    """Consecutive batches, cut where their events (``event_count``, known before they are
    decoded) would pass ``size``: one window is checked, inserted and marked at once, and no
    more than one window's events are decoded at a time."""
    window: list[MemberOutbox] = []
    events = 0
    for batch in batches:
        if window and events + batch.event_count > size:
            yield window
            window, events = [], 0
        window.append(batch)
        events += batch.event_count
    if window:
        yield window


def _window_ship(
    repository: MemberEventRepository,
    window: list[MemberOutbox],
    known: dict[str, Sequence[list[Any]]],
    report: ShipReport,
    *,
    check_existing: bool,
) -> None:
    """Ship one window of batches: those ClickHouse holds already (``check_existing``) are
    only marked; the others go to ClickHouse in one insert (a burst of small PATCHes: every
    insert runs both materialized views, tens of milliseconds even for one row), then are
    marked. The check is one query per table for the whole window, not one per batch: after
    an outage the relay ships thousands of small batches."""
    decoded = []
    for batch in window:
        events = known.get(batch.key)
        decoded.append((batch, orjson.loads(batch.events) if events is None else events))
    if check_existing:
        held = repository.held_batches(
            [(batch.roster_key, batch.version, events) for batch, events in decoded]
        )
        skipped = [item for item, is_held in zip(decoded, held, strict=True) if is_held]
        if skipped:
            report.skipped += len(skipped)
            _batches_mark_shipped(repository, skipped, report, insert=False)
        decoded = [item for item, is_held in zip(decoded, held, strict=True) if not is_held]
    if decoded:
        _batches_mark_shipped(repository, decoded, report)


def member_batches_relay(*, min_age: float, batch_limit: int = 1000) -> ShipReport:
    """Ship every batch left behind, whatever its roster, then correct the quantities of
    versions written blind: the relay's round (a service thread's, ``ship_member_events``).

    Left behind: its last shipping failed, or it was committed more than ``min_age`` seconds
    ago (its writer ships it right after commit, unless it died). Batches go out
    ``batch_limit`` at a time until none is left or shipping fails; batches committed
    during the round are their writers' to ship. Checked against ClickHouse first
    (``check_existing``): a batch inserted before a crash is not inserted twice.
    """
    total = ShipReport()
    started = timezone.now()
    left_behind = MemberOutbox.objects.filter(
        Q(recorded_at__lte=started - timedelta(seconds=min_age)) | Q(last_error__gt=""),
        shipped_at__isnull=True,
        recorded_at__lte=started,
    ).order_by("recorded_at", "version", "chunk")
    while keys := list(left_behind.values_list("key", flat=True)[:batch_limit]):
        report = member_batches_ship(keys=keys, check_existing=True)
        total.add(report)
        if report.error or not report.batches:
            break  # ClickHouse is down (the next round tries again), or another relay won
    if not total.error:
        try:
            total.recounted.extend(
                group for group in member_quantities_recount() if group not in total.recounted
            )
        except ClickHouseUnavailable as exc:
            total.failed += 1
            total.error = str(exc)
    total.left = left_behind.count()
    return total


def outbox_relay_round() -> bool:
    """One round of a server process's relay (groups.outbox.background.Relay); False: it failed."""
    report = member_batches_relay(min_age=LEFT_BEHIND_AFTER.total_seconds())
    if report.batches or report.recounted:
        logger.info(
            "Relay shipped %d batches (%d events), corrected quantities of %d groups",
            report.batches,
            report.events,
            len(report.recounted),
        )
    return not report.error


def batch_event_rows(batch: MemberOutbox, events: Sequence[list[Any]]) -> Iterator[tuple]:
    """ClickHouse event rows of one outbox batch (its decoded ``events``)."""
    for event in events:
        yield event_row(
            batch.roster_key,
            batch.version,
            event,
            batch.recorded_at,
            batch.request_id,
            batch.source,
            batch.actor,
        )


def _batches_mark_shipped(
    repository: MemberEventRepository,
    group: list[tuple[MemberOutbox, Sequence[list[Any]]]],
    report: ShipReport,
    *,
    insert: bool = True,
) -> None:
    """Insert some batches' events in one insert, then mark them shipped."""
    if insert:
        repository.insert_events(
            row for batch, events in group for row in batch_event_rows(batch, events)
        )
    MemberOutbox.objects.filter(
        key__in=[batch.key for batch, _ in group], shipped_at__isnull=True
    ).update(shipped_at=timezone.now(), last_error="", attempts=F("attempts") + 1)
    for _, events in group:
        report.batches += 1
        report.events += len(events)


# -- quantity of versions written blind --------------------------------------------------------


class _VersionMoved(Exception):
    """The Group got a new version between reading and updating its quantity."""


# Versions whose corrected quantity one UPDATE writes (CASE over the keys; two bound values
# per version, well under SQLite's 32,766).
RECOUNT_UPDATE_BATCH = 500
MSG_RECOUNT_RACE = "Group/{id}: kept getting new versions while its quantity was recounted"


def roster_quantities_recount(
    *, roster: str, repository: MemberEventRepository | None = None
) -> list[int]:
    """Correct ``quantity`` of a roster's versions written blind, and of every version
    written after them; returns the versions whose quantity changed.

    A blind write (ClickHouse down) guessed its change in active members from the outbox
    alone, and every later version added its own change to that guess. A version's exact
    change depends on events only, which never change: its own events, and for the members
    they name each one's state just before it (ClickHouse's log merged with pending batches).
    Only those members are read, never the whole roster. Then, under the Group's row lock,
    so against the version that is current, each blind version gets ``quantity(v - 1) +
    change(v)`` and every other version moves by what the one before it moved. Running it
    again changes nothing, so a recount cut short is simply run again.
    """
    versions = sorted(
        set(
            MemberOutbox.objects.filter(roster_key=roster, recount=True).values_list(
                "version", flat=True
            )
        )
    )
    if not versions:
        return []
    changes = _active_changes(roster, versions, repository or MemberEventRepository())
    group_id = roster.rpartition("/")[0]
    return db.run_retrying(
        partial(_quantities_correct, roster, changes),
        races=(_VersionMoved,),
        retries=fhir_settings.WRITE_RETRIES,
        exhausted=RuntimeError(MSG_RECOUNT_RACE.format(id=group_id)),
    )


def _active_changes(
    roster: str, versions: list[int], repository: MemberEventRepository
) -> dict[int, int]:
    """{version: exact change in active members} of some versions of a roster."""
    after: dict[int, dict[str, bool]] = {version: {} for version in versions}
    rows = MemberOutbox.objects.filter(roster_key=roster, version__in=versions)
    for version, events in rows.order_by("version", "chunk").values_list("version", "events"):
        for event in orjson.loads(events):  # in seq order: a member's last event wins
            after[version][event[0]] = event[1] != "removed" and not event[6]
    refs = sorted({ref for final in after.values() for ref in final})
    # The outbox before ClickHouse (as in the selectors): a batch shipped in between is then
    # in one of the two reads, never in neither.
    history: dict[str, dict[int, bool]] = {}
    pending = MemberOutbox.objects.filter(
        roster_key=roster, shipped_at__isnull=True, version__lt=versions[-1]
    )
    wanted = set(refs)
    for version, events in pending.values_list("version", "events"):
        for event in orjson.loads(events):
            if event[0] in wanted:
                active = event[1] != "removed" and not event[6]
                history.setdefault(event[0], {})[(version << 32) | event[2]] = active
    for ref, pos, active in repository.activity_history(roster, refs, below_version=versions[-1]):
        history.setdefault(ref, {})[pos] = active
    timelines = {ref: sorted(events.items()) for ref, events in history.items()}
    changes = {}
    for version in versions:
        start = version << 32
        change = 0
        for ref, active in after[version].items():
            timeline = timelines.get(ref, [])
            before = bisect_left(timeline, (start,))
            change += active - (timeline[before - 1][1] if before else False)
        changes[version] = change
    return changes


def _quantities_correct(roster: str, changes: dict[int, int]) -> list[int]:
    """Apply exact changes to the stored quantities (in a transaction; see the caller)."""
    group_id, _, life = roster.rpartition("/")
    incarnation = int(life)
    key = f"Group/{group_id}"
    current = db.lock_rows(StoredResource.objects.filter(key=key)).first()
    rows = (
        ResourceVersion.objects.filter(
            resource_type="Group",
            resource_id=group_id,
            incarnation=incarnation,
            deleted=False,
            version_id__gte=min(changes) - 1,
        )
        .order_by("version_id")
        .only("key", "version_id", "body")
    )
    corrected: list[ResourceVersion] = []
    previous: tuple[int, int, int] | None = None  # (version, stored, corrected) quantity
    for row in rows:
        body = loads(row.body)
        stored = body.get("quantity", 0)
        follows = previous is not None and previous[0] == row.version_id - 1
        if row.version_id in changes and (follows or row.version_id == incarnation):
            quantity = (previous[2] if follows else 0) + changes[row.version_id]
        elif previous is not None:
            quantity = stored + previous[2] - previous[1]
        else:
            quantity = stored
        previous = (row.version_id, stored, quantity)
        if quantity == stored:
            continue
        body["quantity"] = quantity
        text = row.body = orjson.dumps(body).decode()
        corrected.append(row)
        if current is not None and (current.version_id, current.incarnation) == (
            row.version_id,
            incarnation,
        ):
            updated = StoredResource.objects.filter(key=key, version_id=row.version_id).update(
                body=text
            )
            if updated != 1:
                raise _VersionMoved(key)
    # One statement per RECOUNT_UPDATE_BATCH versions, not one per version: after a long
    # outage every version written since the first wrong guess moves.
    ResourceVersion.objects.bulk_update(corrected, ["body"], batch_size=RECOUNT_UPDATE_BATCH)
    MemberOutbox.objects.filter(roster_key=roster, version__in=list(changes)).update(recount=False)
    return [row.version_id for row in corrected]


def member_quantities_recount() -> list[str]:
    """Recount every roster that has versions written blind (the relay); their group ids."""
    rosters = sorted(
        set(MemberOutbox.objects.filter(recount=True).values_list("roster_key", flat=True))
    )
    repository = MemberEventRepository()
    for roster in rosters:
        roster_quantities_recount(roster=roster, repository=repository)
    return [roster.rpartition("/")[0] for roster in rosters]


def group_quantity_recount(*, group_id: str) -> int | None:
    """Set a Group's current quantity from its roster (repair); no new version.

    The roster is counted first, then the quantity is stored only if the version counted is
    still current (under the row lock); otherwise it is counted again.
    """
    for _ in range(fhir_settings.WRITE_RETRIES + 1):
        row = StoredResource.objects.filter(key=f"Group/{group_id}", deleted=False).first()
        if row is None:
            return None
        roster = roster_key(group_id, row.incarnation)
        count = sum(1 for state in iter_members(roster) if state.active)
        with db.atomic():
            current = db.lock_rows(StoredResource.objects.filter(key=row.key)).first()
            if current is None or current.version_id != row.version_id or current.deleted:
                continue
            body = loads(current.body)
            if body.get("quantity") != count:
                body["quantity"] = count
                text = orjson.dumps(body).decode()
                StoredResource.objects.filter(key=row.key, version_id=row.version_id).update(
                    body=text
                )
                ResourceVersion.objects.filter(key=f"{row.key}/_history/{row.version_id}").update(
                    body=text
                )
            return count
    raise RuntimeError(MSG_RECOUNT_RACE.format(id=group_id))

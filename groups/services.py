"""Roster writes: member events into the outbox, shipping to ClickHouse, PATCH and diffs.

One write is one Group version. Its member events get ``seq`` 0, 1, 2 … in the order the
write produced them, so (version, seq) orders every event of a roster, never the wall clock.
Events are stored in the outbox inside the version's transaction and shipped after commit.
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

import jsonpatch
import orjson
from django.db.models import F, Q
from django.utils import timezone

from fhirservice import db
from fhirservice.clickhouse import ClickHouseUnavailable
from fhirservice.conf import fhir_settings
from fhirservice.errors import MSG_TOO_MANY_PATCH_OPS as MSG_TOO_MANY_OPS
from fhirservice.errors import BadRequest, ServiceUnavailable, TooCostly, UnprocessableEntity
from fhirservice.models import ResourceVersion, StoredResource
from fhirservice.store.content import apply_json_patch, without_server_meta
from fhirservice.store.handlers import VersionWrite
from fhirservice.store.json import loads
from fhirservice.store.services import write_version
from groups import shipping
from groups.digest import digests
from groups.members import Member, parse_member
from groups.middleware import FLAG
from groups.models import MemberOutbox
from groups.repository import MemberEventRepository, MemberState, event_row
from groups.selectors import (
    MSG_CLICKHOUSE_DOWN,
    clickhouse_required,
    iter_members,
    member_states,
    pending_states,
    roster_key,
)

logger = logging.getLogger(__name__)

MEMBER_PATH = re.compile(r"/member(?:/(?P<index>-|0|[1-9][0-9]*)(?P<rest>/.*)?)?")
MSG_MEMBER_MOVE = "op {index}: move and copy are not supported on /member"
MSG_MEMBER_INDEX = "op {index} ({op} {path}): the roster has no member at index {n}"
MSG_MEMBER_TEST = "op {index} (test {path}): the value differs"
MSG_MEMBER_OP = "op {index} ({op} {path}): not supported on the roster"
MSG_ROSTER_NOT_LIST = "Group.member must be an array"
# A pending batch this old was left behind by its writer (see _ship_after_commit). Its
# writer ships it right after commit, but that can take seconds on a busy machine; until then
# reads merge it, so waiting costs nothing but a later shipping by the next write or relay.
LEFT_BEHIND_AFTER = timedelta(seconds=30)


# -- member states as patch overlays ------------------------------------------------------


def _state_of(member: Member | None, ref: str) -> MemberState:
    """A patch-local state: newer than anything stored (pos at the top of the range)."""
    if member is None:
        return MemberState(ref, "", "", "", False, "", 1 << 63, False)
    return MemberState(
        member.ref,
        member.member_type,
        member.period_start,
        member.period_end,
        member.inactive,
        member.extra,
        1 << 63,
        True,
    )


def _member_of(state: MemberState | None) -> Member | None:
    if state is None or not state.present:
        return None
    return Member(
        state.ref,
        state.member_type,
        state.period_start,
        state.period_end,
        state.inactive,
        state.extra,
    )


def _active(member: Member | None) -> bool:
    return member is not None and not member.inactive


@dataclass
class RosterSession:
    """Member changes of one write, applied in op order over the roster's current state."""

    roster_key: str
    # The committed version the write builds on (None: a new roster) and about how many
    # members the roster has: with them, the roster digest answers for members it certainly
    # does not hold, without asking ClickHouse (groups.digest).
    version: int | None = None
    size: int = 0
    blind: bool = False
    base: dict[str, Member | None] = field(default_factory=dict)
    overlay: dict[str, Member | None] = field(default_factory=dict)
    events: list[list[Any]] = field(default_factory=list)

    def preload(self, refs: list[str]) -> None:
        """Fetch the stored state of the members the write names, in one query."""
        missing = [ref for ref in dict.fromkeys(refs) if ref not in self.base]
        if missing and self.version is not None:
            absent = digests.absent(self.roster_key, self.version, missing, size=self.size)
            for ref in absent:
                self.base[ref] = None
            missing = [ref for ref in missing if ref not in absent]
        if not missing:
            return
        try:
            states = member_states(self.roster_key, missing)
        except ClickHouseUnavailable:
            # Writes go on while ClickHouse is down; the quantity is recounted on shipping.
            self.blind = True
            states = pending_states(self.roster_key, refs=set(missing))
        for ref in missing:
            self.base[ref] = _member_of(states.get(ref))

    def current(self, ref: str) -> Member | None:
        """The member as this write has left it so far (None: not in the roster)."""
        if ref in self.overlay:
            return self.overlay[ref]
        if ref not in self.base:
            self.preload([ref])
        return self.base[ref]

    def members(self) -> Iterator[MemberState]:
        """Present members in reference order, as this write has left them so far."""
        if self.blind:
            raise ServiceUnavailable(MSG_CLICKHOUSE_DOWN, detail_code="MSG_MEMBER_STORE_DOWN")
        overrides = {ref: _state_of(m, ref) for ref, m in self.overlay.items()}
        with clickhouse_required():
            yield from iter_members(self.roster_key, overrides=overrides)

    def nth(self, n: int) -> Member | None:
        """The member at index ``n`` of the roster (reference order), or None."""
        stream = self.members()
        try:
            for position, state in enumerate(stream):
                if position == n:
                    return _member_of(state)
        finally:
            stream.close()
        return None

    def _emit(self, event_type: str, member: Member) -> None:
        self.events.append(
            [
                member.ref,
                event_type,
                len(self.events),
                member.member_type,
                member.period_start,
                member.period_end,
                member.inactive,
                member.extra,
            ]
        )

    def put(self, member: Member) -> None:
        """Add a member, or update it when present; identical content is no change."""
        now = self.current(member.ref)
        if now == member:
            return
        self._emit("updated" if now is not None else "added", member)
        self.overlay[member.ref] = member

    def remove(self, ref: str) -> bool:
        """Remove a member; False when it was not in the roster (known only when not blind)."""
        now = self.current(ref)
        if now is None:
            if not self.blind:
                return False
            # ClickHouse is down, so "not in the roster" only means "not pending": the member
            # may well be stored there. Record the removal; for an absent member it is a no-op.
            now = parse_member({"entity": {"reference": ref}}, ref)
        self._emit("removed", now)
        self.overlay[ref] = None
        return True

    def replace_all(self, incoming: dict[str, Member]) -> None:
        """Make the roster equal ``incoming``: remove, update and add what differs."""
        removed = []
        for state in self.members():
            if state.ref not in incoming:
                removed.append(state.ref)
            self.base.setdefault(state.ref, _member_of(state))
        for ref in removed:
            self.remove(ref)
        for ref in sorted(incoming):
            self.base.setdefault(ref, None)
            self.put(incoming[ref])

    def quantity_delta(self) -> int:
        """Change in active members this write makes."""
        return sum(
            _active(after) - _active(self.base.get(ref)) for ref, after in self.overlay.items()
        )


# -- outbox and shipping --------------------------------------------------------------------


def member_events_record(
    *, write: VersionWrite, roster: str, events: list[list[Any]], recount: bool = False
) -> list[str]:
    """Store a version's member events in the outbox (inside its transaction) and ship them
    after commit. Returns the outbox keys."""
    if not events:
        return []
    size = fhir_settings.MEMBER_BATCH_SIZE
    moment = timezone.now()
    context = write.context
    chunks = [events[start : start + size] for start in range(0, len(events), size)]
    rows = [
        MemberOutbox(
            key=f"{roster}/{write.version_id}/{chunk}",
            roster_key=roster,
            group_id=write.resource_id,
            version=write.version_id,
            chunk=chunk,
            event_count=len(part),
            events=orjson.dumps(part).decode(),
            recorded_at=moment,
            request_id=context.request_id,
            source=context.source,
            actor=context.actor,
            recount=recount,
        )
        for chunk, part in enumerate(chunks)
    ]
    # One INSERT per row, not bulk_create: on PostgreSQL, Django 5.2 bulk-inserts through
    # UNNEST(array), and psycopg escapes array elements in Python (a regex substitution per
    # quote character): 4 s for one 10^5-member create's 6 MB of events, 0.2 s this way.
    for row in rows:
        row.save(force_insert=True)
    keys = [row.key for row in rows]
    digests.note_write(roster, write.version_id, events)
    ship: shipping.ShipFunction = _ship_after_commit
    if len(events) >= size:
        # Shipped before the answer (see shipping.after_commit): from the events in hand,
        # not read back and decoded from the outbox (~1 s of a 10^6-member create).
        ship = partial(_ship_after_commit, known=dict(zip(keys, chunks, strict=True)))
    db.on_commit(lambda: shipping.after_commit(roster, keys, ship, len(events)))
    return keys


def _ship_after_commit(
    roster: str, keys: list[str], known: dict[str, list[list[Any]]] | None = None
) -> None:
    """Ship a write's own batches, and what earlier writes of its roster left behind.

    Left behind: its shipping failed (ClickHouse was down), or it is older than
    LEFT_BEHIND_AFTER (its writer died before shipping). Batches other writers committed a
    moment ago are theirs to ship: when every writer shipped every pending batch of the
    roster, concurrent writers inserted each other's batches again and again, each insert
    then waiting for the metadata store's write lock to mark the batch shipped.
    """
    cutoff = timezone.now() - LEFT_BEHIND_AFTER
    left_behind = (
        MemberOutbox.objects.filter(roster_key=roster, shipped_at__isnull=True)
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
    known: dict[str, list[list[Any]]] | None = None,
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
        # Consecutive small batches (a burst of PATCHes) go to ClickHouse in one insert:
        # every insert runs both materialized views, tens of milliseconds even for one row.
        group: list[tuple[MemberOutbox, list[list[Any]]]] = []
        size = 0
        for batch in batches:
            events = known.get(batch.key)
            if events is None:
                events = orjson.loads(batch.events)
            if check_existing and repository.holds_batch(batch.roster_key, batch.version, events):
                report.skipped += 1
                _batches_mark_shipped(repository, [(batch, events)], report, insert=False)
                continue
            group.append((batch, events))
            size += len(events)
            if size >= fhir_settings.MEMBER_BATCH_SIZE:
                _batches_mark_shipped(repository, group, report)
                group, size = [], 0
        if group:
            _batches_mark_shipped(repository, group, report)
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
    """One round of a server process's relay (groups.shipping.Relay); False: it failed."""
    report = member_batches_relay(min_age=LEFT_BEHIND_AFTER.total_seconds())
    if report.batches or report.recounted:
        logger.info(
            "Relay shipped %d batches (%d events), corrected quantities of %d groups",
            report.batches,
            report.events,
            len(report.recounted),
        )
    return not report.error


def outbox_relay_start(**_: Any) -> None:
    """Receiver of ``service_starting``: run this server process's relay."""
    shipping.relay_start(
        outbox_relay_round,
        interval=fhir_settings.MEMBER_RELAY_INTERVAL,
        max_interval=fhir_settings.MEMBER_RELAY_MAX_INTERVAL,
    )


def batch_event_rows(batch: MemberOutbox, events: list[list[Any]]) -> Iterator[tuple]:
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
    group: list[tuple[MemberOutbox, list[list[Any]]]],
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
    rows = ResourceVersion.objects.filter(
        resource_type="Group",
        resource_id=group_id,
        incarnation=incarnation,
        deleted=False,
        version_id__gte=min(changes) - 1,
    ).order_by("version_id")
    corrected = []
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
        text = orjson.dumps(body).decode()
        ResourceVersion.objects.filter(key=row.key).update(body=text)
        corrected.append(row.version_id)
        if current is not None and (current.version_id, current.incarnation) == (
            row.version_id,
            incarnation,
        ):
            updated = StoredResource.objects.filter(key=key, version_id=row.version_id).update(
                body=text
            )
            if updated != 1:
                raise _VersionMoved(key)
    MemberOutbox.objects.filter(roster_key=roster, version__in=list(changes)).update(recount=False)
    return corrected


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


# -- PATCH ----------------------------------------------------------------------------------


def _is_member_path(path: Any) -> bool:
    return isinstance(path, str) and (path == "/member" or path.startswith("/member/"))


def _sub_patch(member: Member, op: dict[str, Any], rest: str, where: str) -> Member:
    """Apply an op below one member (``/member/N/<rest>``) and re-validate the member."""
    sub = {**op, "path": rest}
    try:
        result = jsonpatch.apply_patch(member.to_dict(), [sub])
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
        raise UnprocessableEntity(f"{where}: {exc}", detail_code="MSG_PATCH_FAILED") from exc
    return parse_member(result, where)


def apply_member_op(session: RosterSession, index: int, op: dict[str, Any]) -> None:
    """Apply one JSON Patch op on ``/member…`` to the roster session."""
    name, path = op["op"], op["path"]
    where = f"op {index} ({name} {path})"
    match = MEMBER_PATH.fullmatch(path)
    if match is None:
        raise UnprocessableEntity(
            MSG_MEMBER_OP.format(index=index, op=name, path=path), detail_code="MSG_PATCH_FAILED"
        )
    position, rest = match.group("index"), match.group("rest")
    value = op.get("value")
    if position is None:  # the whole roster
        if name in ("add", "replace"):
            if not isinstance(value, list):
                raise BadRequest(
                    f"{where}: {MSG_ROSTER_NOT_LIST}", detail_code="MSG_MEMBER_INVALID"
                )
            incoming = {}
            for i, item in enumerate(value):
                member = parse_member(item, f"{where} value[{i}]")
                incoming[member.ref] = member
            session.replace_all(incoming)
        elif name == "remove" and isinstance(value, dict):
            # The seed system's removal by reference: {"op": "remove", "path": "/member",
            # "value": {"entity": {"reference": "Patient/1"}}}.
            session.remove(parse_member(value, where).ref)
        elif name == "remove":
            session.replace_all({})
        else:
            raise UnprocessableEntity(
                MSG_MEMBER_OP.format(index=index, op=name, path=path),
                detail_code="MSG_PATCH_FAILED",
            )
        return
    if position == "-":
        if rest is None and name == "add":
            session.put(parse_member(value, where))
            return
        if rest is None and name == "remove" and isinstance(value, dict):
            session.remove(parse_member(value, where).ref)
            return
        raise UnprocessableEntity(
            MSG_MEMBER_OP.format(index=index, op=name, path=path), detail_code="MSG_PATCH_FAILED"
        )
    n = int(position)
    if name == "add" and rest is None:
        # The roster is a set ordered by reference: an insert position has no meaning, so
        # add at an index adds the member like /member/-.
        session.put(parse_member(value, where))
        return
    current = session.nth(n)
    if current is None:
        raise UnprocessableEntity(
            MSG_MEMBER_INDEX.format(index=index, op=name, path=path, n=n),
            detail_code="MSG_PATCH_FAILED",
        )
    if name == "test":
        target = current.to_dict()
        if rest is not None:
            try:
                target = jsonpatch.JsonPointer(rest).resolve(target)
            except jsonpatch.JsonPointerException as exc:
                raise UnprocessableEntity(
                    MSG_MEMBER_TEST.format(index=index, path=path),
                    detail_code="MSG_PATCH_TEST_FAILED",
                ) from exc
        if target != value:
            raise UnprocessableEntity(
                MSG_MEMBER_TEST.format(index=index, path=path), detail_code="MSG_PATCH_TEST_FAILED"
            )
        return
    if name == "remove" and rest is None:
        session.remove(current.ref)
        return
    if name == "replace" and rest is None:
        new = parse_member(value, where)
    elif name in ("add", "remove", "replace") and rest is not None:
        new = _sub_patch(current, op, rest, where)
    else:
        raise UnprocessableEntity(
            MSG_MEMBER_OP.format(index=index, op=name, path=path), detail_code="MSG_PATCH_FAILED"
        )
    if new.ref != current.ref:
        session.remove(current.ref)
    session.put(new)


def group_patch(draft: VersionWrite, ops: list[dict[str, Any]], *, validate: Any) -> None:
    """Build a Group version from JSON Patch ops: members as events, the rest on the body.

    Member ops and other ops touch disjoint parts of the document, so applying each kind in
    its own op order equals applying the patch in op order; the version is bumped once.
    """
    if len(ops) > fhir_settings.MAX_PATCH_OPS:
        raise TooCostly(
            MSG_TOO_MANY_OPS.format(count=len(ops), limit=fhir_settings.MAX_PATCH_OPS),
            detail_code="MSG_TOO_MANY_OPERATIONS",
        )
    # The ops were checked once by resource_patch (parse_patch); at 10^4 ops a second check
    # was a third of the request's time.
    previous = without_server_meta(loads(draft.previous.body))
    member_ops, other_ops = [], []
    for index, op in enumerate(ops):
        if _is_member_path(op.get("path")) or _is_member_path(op.get("from")):
            if op["op"] in ("move", "copy"):
                raise UnprocessableEntity(
                    MSG_MEMBER_MOVE.format(index=index), detail_code="MSG_PATCH_FAILED"
                )
            member_ops.append((index, op))
        else:
            other_ops.append(op)
    body = previous
    if other_ops:
        body = apply_json_patch(previous, other_ops)
        body.pop("member", None)
        validate(body)
    quantity = previous.get("quantity", 0)
    if member_ops:
        session = RosterSession(
            roster_key(draft.resource_id, draft.incarnation),
            version=draft.previous.version_id,
            size=quantity,
        )
        session.preload(
            [
                op["value"]["entity"]["reference"]
                for _, op in member_ops
                if isinstance(op.get("value"), dict)
                and isinstance(op["value"].get("entity"), dict)
                and isinstance(op["value"]["entity"].get("reference"), str)
            ]
        )
        for index, op in member_ops:
            apply_member_op(session, index, op)
        quantity += session.quantity_delta()
        member_events_record(
            write=draft, roster=session.roster_key, events=session.events, recount=session.blind
        )
        draft.changed = bool(session.events)
    draft.body = {**body, "quantity": max(quantity, 0)}
    setattr(draft.context.request, FLAG, True)


# -- explicit member changes (operations) ----------------------------------------------------


@dataclass
class RosterDelta:
    """Member changes named one by one (operations), instead of a whole incoming roster."""

    puts: list[Member] = field(default_factory=list)
    removes: list[str] = field(default_factory=list)


def group_members_change(
    *, group_id: str, delta: RosterDelta, context: Any, if_match: int | None = None
) -> Any:
    """A new Group version that applies ``delta`` to the roster (body otherwise unchanged).

    Runs the post-save handler without the members-written flag, so the events go through
    the same outbox and shipping as every other roster write.
    """

    def build(draft: VersionWrite) -> None:
        draft.body = without_server_meta(loads(draft.previous.body))
        if fhir_settings.GROUP_ROSTER_STORAGE == "inline":
            draft.body = _inline_apply(draft.body, delta)
        else:
            draft.payload = delta

    return write_version(
        resource_type="Group",
        resource_id=group_id,
        method="PATCH",
        context=context,
        build=build,
        if_match=if_match,
        must_exist=True,
    )


def _inline_apply(body: dict[str, Any], delta: RosterDelta) -> dict[str, Any]:
    """Apply a delta to a Group stored whole (inline mode); quantity counts active members."""
    members = {parse_member(m, "Group.member").ref: m for m in body.get("member", [])}
    for ref in delta.removes:
        members.pop(ref, None)
    for member in delta.puts:
        members[member.ref] = member.to_dict()
    roster = [members[ref] for ref in sorted(members)]
    out = {k: v for k, v in body.items() if k != "member"}
    if roster:
        out["member"] = roster
    out["quantity"] = sum(1 for m in roster if not m.get("inactive", False))
    return out


# -- the post-save handler --------------------------------------------------------------------


def group_post_save(write: VersionWrite) -> None:
    """Diff the incoming roster against the current one and emit member events.

    Skipped when the request already wrote its member events (the members-written flag set
    by PATCH). Runs for POST, PUT, transaction Bundle entries, the admin and operations.
    ``write.payload`` is the incoming roster ({reference: Member}) or None when the body had
    no ``member`` element.
    """
    if getattr(write.context.request, FLAG, False) or write.deleted:
        return
    previous_alive = write.previous is not None and not write.previous.deleted
    previous_quantity = loads(write.previous.body).get("quantity", 0) if previous_alive else 0
    incoming = write.payload
    if incoming is None:
        if write.method == "PUT" and previous_alive and fhir_settings.GROUP_PUT_KEEPS_ROSTER:
            write.body = {**write.body, "quantity": previous_quantity}
            return
        incoming = {}
    key = roster_key(write.resource_id, write.incarnation)
    session = RosterSession(
        key,
        version=write.previous.version_id if previous_alive else None,
        size=previous_quantity,
    )
    if isinstance(incoming, RosterDelta):
        session.preload([*incoming.removes, *(m.ref for m in incoming.puts)])
        for ref in incoming.removes:
            session.remove(ref)
        for member in incoming.puts:
            session.put(member)
    elif previous_alive:
        session.replace_all(incoming)
    else:
        # A new roster (first create or re-create after delete) is empty: no read needed,
        # and every member is an "added" event (built in one pass: 10^6 on a create).
        events = [
            [m.ref, "added", seq, m.member_type, m.period_start, m.period_end, m.inactive, m.extra]
            for seq, m in enumerate(incoming[ref] for ref in sorted(incoming))
        ]
        member_events_record(write=write, roster=key, events=events)
        digests.note_new_roster(key, write.version_id, events)
        active = sum(1 for m in incoming.values() if not m.inactive)
        write.body = {**write.body, "quantity": active}
        write.changed = write.changed or bool(events)
        return
    member_events_record(write=write, roster=key, events=session.events)
    write.body = {**write.body, "quantity": previous_quantity + session.quantity_delta()}
    write.changed = write.changed or bool(session.events)

"""Roster reads: ClickHouse state merged with events not yet shipped from the outbox.

Normally nothing is pending and a read is one ClickHouse range scan. When batches wait in the
outbox (just committed, or ClickHouse was down), their events are applied on top, member by
member, by position (version << 32 | seq): the newer state wins, so a batch that is shipped
while we read is never counted twice. Clients therefore always read their own writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from django.db.models import Count, Min, Q, Sum
from django.utils import timezone

from fhirservice.clickhouse import ClickHouseUnavailable
from fhirservice.errors import ServiceUnavailable
from fhirservice.models import StoredResource
from groups.models import MemberOutbox
from groups.repository import MemberEventRepository, MemberState

MSG_CLICKHOUSE_DOWN = "The member store (ClickHouse) is unavailable; try again later"


def roster_key(group_id: str, incarnation: int) -> str:
    """The key of one life of a Group's roster: a re-created id starts a new, empty one."""
    return f"{group_id}/{incarnation}"


def row_roster_key(row: Any) -> str:
    """The roster key of a stored Group version (current row or history row)."""
    return roster_key(row.resource_id, row.incarnation)


@contextmanager
def clickhouse_required() -> Iterator[None]:
    """Turn an unreachable ClickHouse into a 503 OperationOutcome."""
    try:
        yield
    except ClickHouseUnavailable as exc:
        raise ServiceUnavailable(MSG_CLICKHOUSE_DOWN, detail_code="MSG_MEMBER_STORE_DOWN") from exc


def event_state(version: int, event: list[Any]) -> MemberState:
    """The member state an outbox event leaves behind."""
    ref, event_type, seq, member_type, start, end, inactive, extra = event
    return MemberState(
        ref,
        member_type,
        start,
        end,
        bool(inactive),
        extra,
        (version << 32) | seq,
        event_type != "removed",
    )


# Above this many references, scanning each batch's text once per reference costs more than
# decoding it.
_NEEDLES_MAX = 32


def _json_needles(refs: Iterable[str]) -> tuple[str, ...] | None:
    """The JSON string literals of ``refs``, to skip outbox batches that cannot hold them.

    A batch (JSON text) whose text contains none of them has no event for these members,
    so it need not be decoded (a 50,000-event batch takes ~0.1 s to decode). None when the
    check cannot be used: too many references, or one whose JSON spelling could vary
    (non-ASCII, quotes, backslashes, control characters).
    """
    needles = []
    for ref in refs:
        if len(needles) == _NEEDLES_MAX or not (ref.isascii() and ref.isprintable()):
            return None
        if '"' in ref or "\\" in ref:
            return None
        needles.append(f'"{ref}"')
    return tuple(needles)


def _holding_any(needles: tuple[str, ...]) -> Q:
    """Outbox rows whose text contains any needle, found by the metadata store.

    The store scans the text where it lies instead of sending it over: after a 10^6-member
    create, a PATCH +1 named one member but fetched 45 MB of pending events to look in.
    (SQLite's LIKE ignores ASCII case: a superset, and callers check the text again.)
    """
    condition = Q()
    for needle in needles:
        condition |= Q(events__contains=needle)
    return condition


def pending_states(
    roster_key: str, *, max_version: int | None = None, refs: set[str] | None = None
) -> dict[str, MemberState]:
    """Latest state per member from unshipped outbox batches of a roster."""
    rows = MemberOutbox.objects.filter(roster_key=roster_key, shipped_at__isnull=True)
    if max_version is not None:
        rows = rows.filter(version__lte=max_version)
    states: dict[str, MemberState] = {}
    needles = _json_needles(refs) if refs is not None else None
    if needles is not None:
        rows = rows.filter(_holding_any(needles))
    for version, events in rows.order_by("version", "chunk").values_list("version", "events"):
        if needles is not None and not any(needle in events for needle in needles):
            continue
        for event in orjson.loads(events):
            if refs is None or event[0] in refs:
                state = event_state(version, event)
                known = states.get(state.ref)
                if known is None or known.pos < state.pos:
                    states[state.ref] = state
    return states


def merge_states(
    stream: Iterable[MemberState], overrides: dict[str, MemberState], *, after: str = ""
) -> Iterator[MemberState]:
    """Merge a reference-ordered state stream with overrides; yield present members only."""
    keys = sorted(ref for ref in overrides if ref > after)
    index = 0
    for state in stream:
        while index < len(keys) and keys[index] < state.ref:
            extra = overrides[keys[index]]
            if extra.present:
                yield extra
            index += 1
        if index < len(keys) and keys[index] == state.ref:
            other = overrides[keys[index]]
            state = other if other.pos >= state.pos else state
            index += 1
        if state.present:
            yield state
    for key in keys[index:]:
        if overrides[key].present:
            yield overrides[key]


def iter_members(
    roster_key: str,
    *,
    after: str = "",
    as_of: int | None = None,
    overrides: dict[str, MemberState] | None = None,
    repository: MemberEventRepository | None = None,
    limit: int | None = None,
) -> Iterator[MemberState]:
    """Present members in reference order: ClickHouse, pending batches, then ``overrides``.

    ``limit`` caps the members ClickHouse returns when nothing is pending or overridden (a
    page); with pending states the stream stays unbounded, since the merge may drop members.
    Callers still stop reading after the members they need.
    """
    repository = repository or MemberEventRepository()
    merged = pending_states(roster_key, max_version=as_of)
    if overrides:
        merged.update(overrides)
    include_removed = bool(merged)
    bound = None if merged else limit
    if as_of is None:
        stream = repository.iter_roster(
            roster_key, after=after, limit=bound, include_removed=include_removed
        )
    else:
        stream = repository.iter_roster_as_of(
            roster_key, as_of, after=after, limit=bound, include_removed=include_removed
        )
    if not merged:
        return stream
    return merge_states(stream, merged, after=after)


def iter_members_for_render(roster_key: str, *, as_of: int | None = None) -> Iterator[Any]:
    """The roster for a streamed read: each member as its JSON text (str) when ClickHouse
    rendered it, else as a MemberState.

    The current roster with nothing pending is rendered by ClickHouse (the common case of a
    large GET); older versions and rosters with pending batches merge states in Python.
    """
    pending = MemberOutbox.objects.filter(roster_key=roster_key, shipped_at__isnull=True)
    if as_of is None and not pending.exists():
        return MemberEventRepository().iter_roster(roster_key, as_json=True)
    return iter_members(roster_key, as_of=as_of)


def member_states(
    roster_key: str, refs: list[str], *, repository: MemberEventRepository | None = None
) -> dict[str, MemberState]:
    """Current state of some members (ClickHouse merged with pending batches).

    The outbox is read before ClickHouse: a batch shipped between the two reads is then seen
    in one of them, never in neither.
    """
    repository = repository or MemberEventRepository()
    pending = pending_states(roster_key, refs=set(refs))
    states = repository.lookup(roster_key, refs)
    for ref, state in pending.items():
        if ref not in states or states[ref].pos < state.pos:
            states[ref] = state
    return states


def roster_page(
    roster_key: str,
    *,
    after: str = "",
    count: int,
    as_of: int | None = None,
    active: bool | None = None,
) -> list[MemberState]:
    """One page of the roster in reference order, optionally only (in)active members."""
    page: list[MemberState] = []
    with clickhouse_required():
        # Without an activity filter the page is the first ``count`` members: ClickHouse
        # need not return (nor aggregate) more.
        limit = count if active is None else None
        stream = iter_members(roster_key, after=after, as_of=as_of, limit=limit)
        try:
            for state in stream:
                if active is None or state.active == active:
                    page.append(state)
                    if len(page) == count:
                        break
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
    return page


def _pending_by_member(refs: set[str]) -> dict[tuple[str, str], MemberState]:
    """Latest unshipped state per (member, roster) for some members, over all rosters."""
    latest: dict[tuple[str, str], MemberState] = {}
    pending = MemberOutbox.objects.filter(shipped_at__isnull=True)
    needles = _json_needles(refs)
    if needles is not None:
        pending = pending.filter(_holding_any(needles))
    for roster, version, events in pending.values_list("roster_key", "version", "events"):
        if needles is not None and not any(needle in events for needle in needles):
            continue
        for event in orjson.loads(events):
            if event[0] in refs:
                state = event_state(version, event)
                known = latest.get((state.ref, roster))
                if known is None or known.pos < state.pos:
                    latest[(state.ref, roster)] = state
    return latest


def groups_with_members(refs: list[str], *, active_only: bool = False) -> list[str]:
    """Keys (``Group/id``) of current, non-deleted Groups that have any of these members."""
    with clickhouse_required():
        repository = MemberEventRepository()
        # The outbox first, ClickHouse second: a batch shipped between the two reads is then
        # in one of them, never in neither (issue 15: with ClickHouse read first, searches
        # right after a PATCH missed the member it added in 8 of 300 rounds).
        pending = _pending_by_member(set(refs))
        pairs = set(repository.rosters_of(refs, active_only=active_only))
        for (ref, roster), state in pending.items():
            stored = repository.lookup(roster, [ref]).get(ref)
            newest = state if stored is None or stored.pos < state.pos else stored
            if newest.active if active_only else newest.present:
                pairs.add((ref, roster))
            else:
                pairs.discard((ref, roster))
    # A re-created id has several roster keys (one per incarnation): only the current one
    # counts, whichever of them the member is in.
    candidates: dict[str, set[int]] = {}
    for _, roster in pairs:
        group_id, _, incarnation = roster.rpartition("/")
        candidates.setdefault(f"Group/{group_id}", set()).add(int(incarnation))
    current = StoredResource.objects.filter(key__in=list(candidates), deleted=False)
    return sorted(
        key
        for key, incarnation in current.values_list("key", "incarnation")
        if incarnation in candidates[key]
    )


@dataclass(frozen=True)
class OutboxBacklog:
    """What waits in the outbox: for metrics, readiness and the admin."""

    batches: int  # committed member event batches not yet in ClickHouse
    events: int
    failing: int  # of which the last shipping attempt failed
    oldest_age: float  # seconds since the oldest of them was committed (0: none)
    recounts: int  # batches of versions written blind whose quantity is not yet corrected


def outbox_backlog() -> OutboxBacklog:
    """The shipping backlog, read from the outbox (two indexed queries)."""
    pending = MemberOutbox.objects.filter(shipped_at__isnull=True).aggregate(
        batches=Count("key"),
        events=Sum("event_count"),
        failing=Count("key", filter=Q(last_error__gt="")),
        oldest=Min("recorded_at"),
    )
    oldest = pending["oldest"]
    return OutboxBacklog(
        batches=pending["batches"],
        events=pending["events"] or 0,
        failing=pending["failing"],
        oldest_age=(timezone.now() - oldest).total_seconds() if oldest else 0.0,
        recounts=MemberOutbox.objects.filter(recount=True).count(),
    )

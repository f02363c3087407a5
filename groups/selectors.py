"""Roster reads: ClickHouse state merged with events not yet shipped from the outbox
(``groups.outbox.pending``).

Normally nothing is pending and a read is one ClickHouse range scan. When batches wait in the
outbox (just committed, or ClickHouse was down), their events are applied on top, member by
member, by position (version << 32 | seq): the newer state wins, so a batch that is shipped
while we read is never counted twice. Clients therefore always read their own writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from fhirservice.clickhouse import ClickHouseUnavailable
from fhirservice.errors import MSG_CLICKHOUSE_DOWN, ServiceUnavailable
from fhirservice.models import StoredResource
from groups.outbox.pending import has_pending, pending_by_member, pending_states
from groups.repository import MemberEventRepository, MemberState


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


def iter_roster_as_of(roster_key: str, *, as_of: int) -> Iterator[MemberState]:
    """The present members as of a version in reference order, streamed from ClickHouse a
    window of the state table's sort key at a time (never the whole roster in memory; a
    whole-roster walk such as an export's), merged with pending batches up to that version.
    """
    with clickhouse_required():
        pending = pending_states(roster_key, max_version=as_of)
        stream = MemberEventRepository().iter_roster_windows_as_of(roster_key, as_of)
        if pending:
            yield from merge_states(stream, pending)
        else:
            yield from (state for state in stream if state.present)


def iter_members_for_render(
    roster_key: str, *, as_of: int | None = None
) -> Iterator[bytes | MemberState]:
    """The roster for a streamed read, in reference order: runs of members as their JSON
    elements joined by commas (bytes) where ClickHouse rendered them, the others as
    MemberStates.

    The current roster with nothing pending is rendered by ClickHouse (the common case of a
    large GET); older versions and rosters with pending batches merge states in Python.
    """
    if as_of is None and not has_pending(roster_key):
        return MemberEventRepository().iter_roster_json(roster_key)
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


def groups_with_members(refs: list[str], *, active_only: bool = False) -> list[str]:
    """Keys (``Group/id``) of current, non-deleted Groups that have any of these members."""
    with clickhouse_required():
        repository = MemberEventRepository()
        # The outbox first, ClickHouse second: a batch shipped between the two reads is then
        # in one of them, never in neither (issue 15: with ClickHouse read first, searches
        # right after a PATCH missed the member it added in 8 of 300 rounds).
        pending = pending_by_member(set(refs))
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

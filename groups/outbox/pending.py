"""Pending reads: member states from outbox batches that are not shipped yet, and the backlog.

Roster reads (``groups.selectors``) apply these on top of ClickHouse, member by member, by
position (version << 32 | seq): the newer state wins, so a batch that is shipped while a read
runs is never counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
from django.db.models import Count, Min, Q, Sum
from django.utils import timezone

from groups.models import MemberOutbox
from groups.repository import MemberState


def has_pending(roster_key: str) -> bool:
    """Whether any batch of the roster waits to be shipped."""
    return MemberOutbox.objects.filter(roster_key=roster_key, shipped_at__isnull=True).exists()


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


def pending_by_member(refs: set[str]) -> dict[tuple[str, str], MemberState]:
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

"""Where Group rosters live, chosen once: ``GROUP_ROSTER_STORAGE`` picks one strategy object.

- :class:`ClickHouseRosters` (``clickhouse``, the default): the metadata store keeps the Group
  without ``member``; every roster change becomes member events (outbox, then ClickHouse),
  reads stream the roster from ClickHouse.
- :class:`InlineRosters` (``inline``): a Group is stored whole, roster included, like any
  FHIR resource (the benchmark baseline and the backfill source).

Everything that differs between the two asks :func:`roster_storage` for the strategy: the
Group handler (split, PATCH, streamed reads), the post-save path, ``$members``, the member
operations' look-ups, ``Group?member=`` and ``$group-memberships``. Every Group write reaches
:meth:`RosterStorage.write` once, with one roster change (``groups.session.RosterChange``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from functools import cache
from itertools import chain
from typing import Any

import orjson
from django.db.models import Q

from fhirservice.conf import fhir_settings
from fhirservice.errors import MSG_TOO_MANY_PATCH_OPS as MSG_TOO_MANY_OPS
from fhirservice.errors import BadRequest, Conflict, NotFound, TooCostly
from fhirservice.fhir.validation import validate_resource
from fhirservice.models import StoredResource
from fhirservice.search.extract import search_params
from fhirservice.store.content import apply_json_patch, without_server_meta
from fhirservice.store.handlers import VersionWrite
from fhirservice.store.json import loads
from groups.digest import digests
from groups.members import (
    Member,
    PlainRoster,
    parse_member,
    parse_members,
    render_member,
    split_plain_roster,
)
from groups.middleware import members_written_mark
from groups.outbox.record import member_events_record
from groups.repository import MemberState
from groups.selectors import (
    clickhouse_required,
    groups_with_members,
    iter_members_for_render,
    member_states,
    roster_key,
    roster_page,
    row_roster_key,
)
from groups.session import (
    MSG_ROSTER_NOT_LIST,
    Replace,
    RosterChange,
    RosterDelta,
    RosterSession,
    member_of,
    split_patch,
)

MSG_INLINE = "$members needs rosters stored in ClickHouse (GROUP_ROSTER_STORAGE=clickhouse)"
MSG_NOT_BACKFILLED = (
    "{key} still holds its roster inline (written with GROUP_ROSTER_STORAGE=inline): move it "
    "to ClickHouse with backfill_group_members before patching it or running an operation"
)
# Members per chunk of a streamed roster.
RENDER_BATCH = 1000
# ``quantity`` as an element of a search parameter's FHIRPath expression.
_QUANTITY_PATH = re.compile(r"\.quantity\b")
_ABSENT = object()


def parse_roster(members: Any) -> Mapping[str, Member]:
    """Validate Group.member on the fast path; a set keyed by reference (last one wins).
    A PlainRoster (read from the body's text, ``ClickHouseRosters.decode``) is one already."""
    if isinstance(members, PlainRoster):
        return members
    if not isinstance(members, list):
        raise BadRequest(
            MSG_ROSTER_NOT_LIST, expression="Group.member", detail_code="MSG_MEMBER_INVALID"
        )
    return parse_members(members, "Group.member")


def _split(body: dict[str, Any]) -> tuple[dict[str, Any], Replace]:
    """The Group without its roster (validated by the models) and the parsed roster."""
    members = body.get("member")
    rest = {k: v for k, v in body.items() if k != "member"}
    roster = parse_roster(members) if members is not None else None
    validate_resource(rest)
    return rest, Replace(roster)


def inline_roster(row: Any) -> dict[str, Member] | None:
    """The roster a stored version carries in its body, or None (events hold it)."""
    if '"member":' not in row.body:  # most rows: no decoding
        return None
    members = loads(row.body).get("member")
    return None if members is None else parse_roster(members)


def _page_of(
    roster: dict[str, Member], *, after: str, count: int, active: bool | None
) -> list[MemberState]:
    """One page of a roster held in a body, in reference order, as roster_page gives it."""
    page: list[MemberState] = []
    for ref in sorted(ref for ref in roster if ref > after):
        member = roster[ref]
        if len(page) == count:
            break
        if active is None or (not member.inactive) == active:
            page.append(MemberState(*member, pos=0, present=True))
    return page


@cache
def _quantity_searchable() -> bool:
    """Whether a search parameter of Group reads ``quantity`` (none of R4's does)."""
    return any(
        _QUANTITY_PATH.search(part.expression)
        for param in search_params("Group").values()
        for part in param.parts
    )


def _same_searchable(previous: dict[str, Any], body: dict[str, Any] | None) -> bool:
    """Whether a new Group body (without server meta) leaves every element a search
    parameter reads as ``previous`` (a stored body) has it: equal but for ``quantity``,
    which the roster write sets and no search parameter reads. Then the write keeps the
    stored search values instead of extracting both versions' to compare (PATCH +1 and
    $add-member change nothing else)."""
    if body is None or _quantity_searchable():
        return False
    before = without_server_meta(previous)
    return len(before) - ("quantity" in before) == len(body) - ("quantity" in body) and all(
        key == "quantity" or body.get(key, _ABSENT) == value for key, value in before.items()
    )


def _refuse_if_inline(row: Any) -> None:
    """409 for a PATCH or an operation on a Group whose body still holds its roster (not
    backfilled yet): its changes would apply to an empty ClickHouse roster, and a PATCH
    dropped the body's roster. A whole new roster (PUT) replaces it and is accepted."""
    if inline_roster(row) is not None:
        raise Conflict(
            MSG_NOT_BACKFILLED.format(key=f"Group/{row.resource_id}"),
            detail_code="MSG_ROSTER_NOT_BACKFILLED",
        )


class RosterStorage:
    """What differs between the roster storage modes."""

    name: str
    # The top-level element kept outside the metadata store and streamed into reads.
    external_element: str | None

    def decode(self, data: bytes) -> Any:
        """An incoming Group's JSON, decoded (400 when malformed)."""
        return loads(data)

    def prepare(self, body: dict[str, Any]) -> tuple[dict[str, Any], Replace]:
        """Validate an incoming Group; (the body to store, its roster as a change)."""
        raise NotImplementedError

    def patch(self, draft: VersionWrite, ops: list[dict[str, Any]]) -> None:
        """Build a Group version from JSON Patch ops."""
        raise NotImplementedError

    def write(self, write: VersionWrite, change: RosterChange) -> None:
        """Apply a write's roster change inside its transaction (body, quantity, events)."""
        raise NotImplementedError

    def chunks(self, row: Any, *, current: bool) -> Iterator[bytes] | None:
        """The roster of a stored version as JSON member chunks, or None (in the body)."""
        raise NotImplementedError

    def page(
        self, row: Any, *, after: str, count: int, as_of: int | None, active: bool | None
    ) -> list[MemberState]:
        """Up to ``count`` members after ``after`` in reference order (0: none, no read)."""
        raise NotImplementedError

    def member(self, row: StoredResource, ref: str) -> Member | None:
        """One member of a current Group, or None when it is not in the roster."""
        raise NotImplementedError

    def groups_with(self, refs: list[str], *, active_only: bool = False) -> list[str]:
        """Keys (``Group/id``) of current Groups that have any of these members."""
        raise NotImplementedError


class ClickHouseRosters(RosterStorage):
    """Rosters as member events: outbox in the write's transaction, ClickHouse after commit."""

    name = "clickhouse"
    external_element = "member"

    def decode(self, data: bytes) -> Any:
        """A roster of plain members in compact JSON stays text until it is read as
        references (``members.split_plain_roster``): 10^6 members cost ~70 MB of strings
        instead of ~750 MB of decoded objects and Members. Any other body is decoded."""
        body = split_plain_roster(data)
        return body if body is not None else loads(data)

    def prepare(self, body: dict[str, Any]) -> tuple[dict[str, Any], Replace]:
        """The Group without ``member`` and ``quantity`` (server-computed from the roster)."""
        rest, roster = _split(body)
        rest.pop("quantity", None)
        return rest, roster

    def patch(self, draft: VersionWrite, ops: list[dict[str, Any]]) -> None:
        """Member ops become events; other ops change the body; the version is bumped once.

        This is the PATCH path of the members-written flag (``groups.middleware``): it writes
        the member events itself, so the post-save path must not.
        """
        if len(ops) > fhir_settings.MAX_PATCH_OPS:
            raise TooCostly(
                MSG_TOO_MANY_OPS.format(count=len(ops), limit=fhir_settings.MAX_PATCH_OPS),
                detail_code="MSG_TOO_MANY_OPERATIONS",
            )
        # The ops were checked once by resource_patch (parse_patch); at 10^4 ops a second
        # check was a third of the request's time.
        member_ops, other_ops = split_patch(ops)
        body = without_server_meta(loads(draft.previous.body))
        if other_ops:
            body = apply_json_patch(body, other_ops)
            body.pop("member", None)
            validate_resource(body)
        draft.body = body
        self.write(draft, member_ops)
        members_written_mark(draft.context)

    def write(self, write: VersionWrite, change: RosterChange) -> None:
        """Turn the change into member events in the outbox; set quantity, ``changed`` and
        ``same_search_values``."""
        previous_alive = write.previous is not None and not write.previous.deleted
        previous_body = loads(write.previous.body) if previous_alive else {}
        previous_quantity = previous_body.get("quantity", 0)
        write.same_search_values = previous_alive and _same_searchable(previous_body, write.body)
        if isinstance(change, Replace) and change.members is None:
            if write.method == "PUT" and previous_alive and fhir_settings.GROUP_PUT_KEEPS_ROSTER:
                write.body = {**write.body, "quantity": previous_quantity}
                return
            change = Replace({})
        key = roster_key(write.resource_id, write.incarnation)
        if isinstance(change, Replace) and not previous_alive:
            self._create(write, key, change.members or {})
            return
        if not isinstance(change, Replace):
            _refuse_if_inline(write.previous)
        session = RosterSession(
            key,
            version=write.previous.version_id if previous_alive else None,
            size=previous_quantity,
        )
        session.apply(change)
        member_events_record(write=write, roster=key, events=session.events, recount=session.blind)
        quantity = max(previous_quantity + session.quantity_delta(), 0)
        write.body = {**write.body, "quantity": quantity}
        write.changed = write.changed or bool(session.events)

    @staticmethod
    def _create(write: VersionWrite, key: str, incoming: Mapping[str, Member]) -> None:
        """A new roster (first create or re-create after delete) is empty: no read needed,
        and every member is an "added" event (built in one pass: 10^6 on a create)."""
        if isinstance(incoming, PlainRoster):  # no Member built; none is inactive
            events = incoming.added_events()
            active = len(incoming)
        else:
            # [ref, "added", seq, type, start, end, inactive, extra]: a Member after its ref.
            members = (incoming[ref] for ref in sorted(incoming))
            events = [[m.ref, "added", seq, *m[1:]] for seq, m in enumerate(members)]
            active = sum(1 for m in incoming.values() if not m.inactive)
        member_events_record(write=write, roster=key, events=events)
        digests.note_new_roster(key, write.version_id, events)
        write.body = {**write.body, "quantity": active}
        write.changed = write.changed or bool(events)

    def chunks(self, row: Any, *, current: bool) -> Iterator[bytes] | None:
        """The roster as JSON member elements, streamed in reference order.

        The first member is fetched before returning, so an unreachable ClickHouse answers
        503 before the response starts.
        """
        key = row_roster_key(row)
        with clickhouse_required():
            stream = iter_members_for_render(key, as_of=None if current else row.version_id)
            first = next(stream, None)
        if first is None:
            return iter(())

        def chunks() -> Iterator[bytes]:
            # Runs ClickHouse rendered go out as they came; members rendered here go out
            # RENDER_BATCH at a time, comma-joined: one chunk per member cost more in the
            # response machinery than rendering it.
            batch: list[bytes] = []
            with clickhouse_required():
                for item in chain([first], stream):
                    if type(item) is bytes:
                        if batch:
                            yield b",".join(batch)
                            batch = []
                        yield item
                        continue
                    batch.append(render_member(*item.rendered()))
                    if len(batch) == RENDER_BATCH:
                        yield b",".join(batch)
                        batch = []
            if batch:
                yield b",".join(batch)

        return chunks()

    def page(
        self, row: Any, *, after: str, count: int, as_of: int | None, active: bool | None
    ) -> list[MemberState]:
        """From ClickHouse; from the body for a version written inline and not backfilled
        yet, whose roster ClickHouse does not hold (a read serves that body as stored)."""
        if count == 0:
            return []
        roster = inline_roster(row)
        if roster is not None:
            return _page_of(roster, after=after, count=count, active=active)
        key = row_roster_key(row)
        return roster_page(key, after=after, count=count, as_of=as_of, active=active)

    def member(self, row: StoredResource, ref: str) -> Member | None:
        """The member's current state (ClickHouse merged with pending batches)."""
        _refuse_if_inline(row)
        with clickhouse_required():
            return member_of(member_states(row_roster_key(row), [ref]).get(ref))

    def groups_with(self, refs: list[str], *, active_only: bool = False) -> list[str]:
        """From the reverse member table (its sort key: the member reference)."""
        return groups_with_members(refs, active_only=active_only)


class InlineRosters(RosterStorage):
    """Rosters inside the stored Group, written and read like any other element."""

    name = "inline"
    external_element = None

    def prepare(self, body: dict[str, Any]) -> tuple[dict[str, Any], Replace]:
        """The Group as sent (members validated on the fast path)."""
        _, roster = _split(body)
        return body, roster

    def patch(self, draft: VersionWrite, ops: list[dict[str, Any]]) -> None:
        """Plain JSON Patch on the stored document, roster included."""
        document = loads(draft.previous.body)
        draft.body, draft.payload = self.prepare(
            without_server_meta(apply_json_patch(document, ops))
        )

    def write(self, write: VersionWrite, change: RosterChange) -> None:
        """A delta changes the stored ``member`` array; a whole roster is stored as sent."""
        if isinstance(change, RosterDelta):
            write.body = _inline_apply(write.body, change)

    def chunks(self, row: Any, *, current: bool) -> Iterator[bytes] | None:
        """Nothing to splice in: the body holds the roster."""
        return None

    def page(
        self, row: Any, *, after: str, count: int, as_of: int | None, active: bool | None
    ) -> list[MemberState]:
        """Refused: a client reads an inline roster with the Group itself."""
        raise NotFound(MSG_INLINE, detail_code="MSG_OPERATION_UNAVAILABLE")

    def member(self, row: StoredResource, ref: str) -> Member | None:
        """From the stored body."""
        return parse_roster(loads(row.body).get("member", [])).get(ref)

    def groups_with(self, refs: list[str], *, active_only: bool = False) -> list[str]:
        """Groups whose stored body holds any of the references as a member.

        Inline rosters have no index by member: the metadata store finds the candidate
        bodies by their text (a scan of the Group rows), and each candidate's roster is
        checked (the reference may stand elsewhere in the body, e.g. ``managingEntity``).
        """
        wanted = set(refs)
        candidates = StoredResource.objects.filter(resource_type="Group", deleted=False)
        holding = Q()
        for ref in wanted:
            holding |= Q(body__contains=f'"reference":{orjson.dumps(ref).decode()}')
        candidates = candidates.filter(holding)
        keys = []
        for key, body in candidates.values_list("key", "body"):
            members = loads(body).get("member", [])
            for item in members if isinstance(members, list) else []:
                member = parse_member(item, "Group.member")
                if member.ref in wanted and not (active_only and member.inactive):
                    keys.append(key)
                    break
        return sorted(keys)


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


_STORAGES: dict[str, RosterStorage] = {
    storage.name: storage for storage in (ClickHouseRosters(), InlineRosters())
}


def roster_storage() -> RosterStorage:
    """The strategy ``GROUP_ROSTER_STORAGE`` names (read per call: tests change it)."""
    return _STORAGES[fhir_settings.GROUP_ROSTER_STORAGE]

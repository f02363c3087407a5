"""One write's member changes, applied in op order over the roster's stored state.

A Group write carries one roster change (:data:`RosterChange`): a whole roster
(:class:`Replace`: POST, PUT, Bundle entries), members named one by one (:class:`RosterDelta`:
operations), or JSON Patch ops on ``/member`` (:class:`MemberOps`). A :class:`RosterSession`
applies it and collects the member events: ``seq`` 0, 1, 2 … in the order the write produced
them, so (version, seq) orders every event of a roster, never the wall clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonpatch

from fhirservice.clickhouse import ClickHouseUnavailable
from fhirservice.errors import BadRequest, ServiceUnavailable, UnprocessableEntity
from groups.digest import digests
from groups.members import Member, parse_member
from groups.outbox.pending import pending_states
from groups.repository import MemberState
from groups.selectors import MSG_CLICKHOUSE_DOWN, clickhouse_required, iter_members, member_states

MEMBER_PATH = re.compile(r"/member(?:/(?P<index>-|0|[1-9][0-9]*)(?P<rest>/.*)?)?")
MSG_MEMBER_MOVE = "op {index}: move and copy are not supported on /member"
MSG_MEMBER_INDEX = "op {index} ({op} {path}): the roster has no member at index {n}"
MSG_MEMBER_TEST = "op {index} (test {path}): the value differs"
MSG_MEMBER_OP = "op {index} ({op} {path}): not supported on the roster"
MSG_ROSTER_NOT_LIST = "Group.member must be an array"


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


def member_of(state: MemberState | None) -> Member | None:
    """The member a stored state describes; None when it is not in the roster."""
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
            self.base[ref] = member_of(states.get(ref))

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
                    return member_of(state)
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

    def replace_all(self, incoming: Mapping[str, Member]) -> None:
        """Make the roster equal ``incoming``: remove, update and add what differs."""
        removed = []
        for state in self.members():
            if state.ref not in incoming:
                removed.append(state.ref)
            self.base.setdefault(state.ref, member_of(state))
        for ref in removed:
            self.remove(ref)
        for ref in sorted(incoming):
            self.base.setdefault(ref, None)
            self.put(incoming[ref])

    def apply(self, change: Replace | RosterDelta | MemberOps) -> None:
        """Apply a roster change (a whole roster, a delta or member ops) to the session."""
        if isinstance(change, Replace):
            self.replace_all(change.members or {})
        elif isinstance(change, RosterDelta):
            self.preload([*change.removes, *(m.ref for m in change.puts)])
            for ref in change.removes:
                self.remove(ref)
            for member in change.puts:
                self.put(member)
        else:
            self.preload(
                [
                    op["value"]["entity"]["reference"]
                    for _, op in change.ops
                    if isinstance(op.get("value"), dict)
                    and isinstance(op["value"].get("entity"), dict)
                    and isinstance(op["value"]["entity"].get("reference"), str)
                ]
            )
            for index, op in change.ops:
                apply_member_op(self, index, op)

    def quantity_delta(self) -> int:
        """Change in active members this write makes."""
        return sum(
            _active(after) - _active(self.base.get(ref)) for ref, after in self.overlay.items()
        )


# -- member ops (JSON Patch on /member) ----------------------------------------------------


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


# -- roster changes -------------------------------------------------------------------------


@dataclass(frozen=True)
class Replace:
    """A whole incoming roster ({reference: Member}); None when the body had no ``member``."""

    members: Mapping[str, Member] | None


@dataclass
class RosterDelta:
    """Member changes named one by one (operations), instead of a whole incoming roster."""

    puts: list[Member] = field(default_factory=list)
    removes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MemberOps:
    """JSON Patch ops on ``/member…``, each with its index in the patch document."""

    ops: list[tuple[int, dict[str, Any]]]


RosterChange = Replace | RosterDelta | MemberOps


def split_patch(ops: list[dict[str, Any]]) -> tuple[MemberOps, list[dict[str, Any]]]:
    """The member ops of a patch document and the other ops, each kind in op order.

    Member ops and other ops touch disjoint parts of the document, so applying each kind in
    its own op order equals applying the patch in op order.
    """
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
    return MemberOps(member_ops), other_ops

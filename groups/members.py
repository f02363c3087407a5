"""Group members on the fast path: parsing, validation and JSON rendering without models.

Full model validation costs ~50 µs per member; a million-member roster cannot afford it.
A member here is checked for what matters: an ``entity.reference`` that is well formed and
points to a type Group.member may reference, a ``period`` whose bounds are FHIR dateTimes
with start ≤ end, and a boolean ``inactive``. Everything else the client sent for the member
(``id``, ``extension``, ``entity.display`` …) travels as ``extra`` JSON and comes back as sent.
"""

from __future__ import annotations

import operator
import re
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from typing import Any, NamedTuple, overload

import orjson

from fhirservice.errors import BadRequest, InvalidResource
from fhirservice.fhir.validation import DATETIME_RE, validate_resource
from fhirservice.search.values import date_range

MEMBER_TYPES = (
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Device",
    "Medication",
    "Substance",
    "Group",
)
REFERENCE_RE = re.compile(
    r"(?:https?://[^\s/]+(?:/[^\s/]+)*/)?"
    rf"(?P<type>{'|'.join(MEMBER_TYPES)})/[A-Za-z0-9\-.]{{1,64}}"
    r"(?:/_history/[A-Za-z0-9\-.]{1,64})?"
)
# The common reference, "Type/id": checked without REFERENCE_RE's URL and version parts.
_PLAIN_REFERENCE = re.compile(r"([A-Za-z]+)/[A-Za-z0-9\-.]{1,64}")
_MEMBER_TYPE_SET = frozenset(MEMBER_TYPES)
MEMBER_KEYS = {"id", "extension", "modifierExtension", "entity", "period", "inactive"}

MSG_MEMBER_NOT_OBJECT = "{where}: a member must be a JSON object"
MSG_MEMBER_UNKNOWN = "{where}: unknown member element {name!r}"
MSG_ENTITY_MISSING = "{where}: member.entity.reference is required"
MSG_BAD_REFERENCE = (
    "{where}: member.entity.reference {ref!r} must be Type/id with Type one of "
    + ", ".join(MEMBER_TYPES)
)
MSG_BAD_PERIOD = "{where}: member.period must be an object with dateTime start and/or end"
MSG_PERIOD_ORDER = "{where}: member.period.start {start} is after its end {end}"
MSG_BAD_INACTIVE = "{where}: member.inactive must be true or false"
MSG_EXTRA_INVALID = "{where}: {problem}"
MSG_SLICE_STEP = "PlainEvents slices have no step"


class Member(NamedTuple):
    """A member's content: what the roster stores per member reference.

    A named tuple (immutable, compared by value): a 10^6-member create builds one per member,
    and a tuple is built several times faster than a frozen dataclass.
    """

    ref: str
    member_type: str
    period_start: str = ""
    period_end: str = ""
    inactive: bool = False
    extra: str = ""

    def to_json(self) -> bytes:
        """The Group.member element as JSON bytes."""
        return render_member(
            self.ref, self.period_start, self.period_end, self.inactive, self.extra
        )

    def to_dict(self) -> dict[str, Any]:
        """The Group.member element as a dict."""
        return orjson.loads(self.to_json())


def parse_member(value: Any, where: str) -> Member:
    """Validate one Group.member element; 400 naming ``where`` (the op or element) if bad."""
    # Fast path for the common member, exactly {"entity": {"reference": "Type/id"}}: the
    # general path below gives the same Member for it, at several times the cost (it runs
    # once per member of a 10^6-member create). Anything else, or a bad reference, takes
    # the general path, which also produces the error.
    member = _plain_member(value)
    return member if member is not None else _parse_member(value, where)


def _plain_member(value: Any) -> Member | None:
    """The Member of ``{"entity": {"reference": "Type/id"}}`` (relative, no version), else
    None: the caller then takes the general path."""
    if type(value) is dict and len(value) == 1:
        entity = value.get("entity")
        if type(entity) is dict and len(entity) == 1:
            ref = entity.get("reference")
            if type(ref) is str:
                match = _PLAIN_REFERENCE.fullmatch(ref)
                if match is not None and match.group(1) in _MEMBER_TYPE_SET:
                    return Member(ref, match.group(1))
    return None


def parse_members(values: list[Any], where: str) -> dict[str, Member]:
    """Validate a list of Group.member elements (``where[i]`` names a bad one); a set keyed by
    reference, the last one of a reference winning."""
    roster: dict[str, Member] = {}
    plain = _plain_member
    for index, value in enumerate(values):
        member = plain(value)
        if member is None:
            member = _parse_member(value, f"{where}[{index}]")
        roster[member.ref] = member
    return roster


def _parse_member(value: Any, where: str) -> Member:
    if not isinstance(value, dict):
        raise BadRequest(
            MSG_MEMBER_NOT_OBJECT.format(where=where),
            expression=where,
            detail_code="MSG_MEMBER_INVALID",
        )
    for name in value:
        if name not in MEMBER_KEYS:
            raise BadRequest(
                MSG_MEMBER_UNKNOWN.format(where=where, name=name),
                expression=where,
                detail_code="MSG_MEMBER_INVALID",
            )
    entity = value.get("entity")
    ref = entity.get("reference") if isinstance(entity, dict) else None
    if not isinstance(ref, str):
        raise BadRequest(
            MSG_ENTITY_MISSING.format(where=where),
            expression=where,
            detail_code="MSG_MEMBER_INVALID",
        )
    match = REFERENCE_RE.fullmatch(ref)
    if not match:
        raise BadRequest(
            MSG_BAD_REFERENCE.format(where=where, ref=ref),
            expression=where,
            detail_code="MSG_MEMBER_REFERENCE_INVALID",
        )
    start = end = ""
    period = value.get("period")
    if period is not None:
        if (
            not isinstance(period, dict)
            or not period
            or set(period) - {"start", "end", "id", "extension"}
        ):
            raise BadRequest(
                MSG_BAD_PERIOD.format(where=where),
                expression=where,
                detail_code="MSG_MEMBER_INVALID",
            )
        start, end = period.get("start", ""), period.get("end", "")
        for bound in (start, end):
            if not isinstance(bound, str) or (bound and not DATETIME_RE.fullmatch(bound)):
                raise BadRequest(
                    MSG_BAD_PERIOD.format(where=where),
                    expression=where,
                    detail_code="MSG_MEMBER_INVALID",
                )
        if start and end:
            # date_range gives [low, high): a start at or after the end's high bound is later
            # than every instant the end names ("2021" after "2020", a day after a day).
            start_range, end_range = date_range(start), date_range(end)
            if start_range is None or end_range is None or start_range[0] >= end_range[1]:
                raise BadRequest(
                    MSG_PERIOD_ORDER.format(where=where, start=start, end=end),
                    expression=where,
                    detail_code="MSG_MEMBER_PERIOD_INVALID",
                )
    inactive = value.get("inactive", False)
    if not isinstance(inactive, bool):
        raise BadRequest(
            MSG_BAD_INACTIVE.format(where=where), expression=where, detail_code="MSG_MEMBER_INVALID"
        )
    extra = ""
    if (
        len(value) > 1 + ("period" in value) + ("inactive" in value)
        or len(entity) > 1
        or (period is not None and set(period) - {"start", "end"})
    ):
        rest = {k: v for k, v in value.items() if k not in ("entity", "period", "inactive")}
        entity_rest = {k: v for k, v in entity.items() if k != "reference"}
        if entity_rest:
            rest["entity"] = entity_rest
        period_rest = {k: v for k, v in (period or {}).items() if k not in ("start", "end")}
        if period_rest:
            rest["period"] = period_rest
        extra = orjson.dumps(rest).decode() if rest else ""
        if extra:
            _check_extra(value, where)
    return Member(
        ref=ref,
        member_type=match.group("type"),
        period_start=start,
        period_end=end,
        inactive=inactive,
        extra=extra,
    )


def _check_extra(value: dict[str, Any], where: str) -> None:
    """Validate a member with extra content through the models: it is served back as sent.

    Only members carrying more than reference, period bounds and inactive pay for this.
    """
    try:
        validate_resource(
            {"resourceType": "Group", "type": "person", "actual": True, "member": [value]}
        )
    except InvalidResource as exc:
        problem = exc.diagnostics.removeprefix("Group.member[0].")
        raise BadRequest(
            MSG_EXTRA_INVALID.format(where=where, problem=problem),
            expression=where,
            detail_code="MSG_MEMBER_INVALID",
        ) from exc


def render_member(ref: str, start: str, end: str, inactive: bool | int, extra: str) -> bytes:
    """JSON of a Group.member element from the stored columns (hot path of roster reads)."""
    if not extra:
        out = b'{"entity":{"reference":' + orjson.dumps(ref) + b"}"
        if start or end:
            period = {"start": start} if start else {}
            if end:
                period["end"] = end
            out += b',"period":' + orjson.dumps(period)
        if inactive:
            out += b',"inactive":true'
        return out + b"}"
    rest = orjson.loads(extra)
    member: dict[str, Any] = {k: v for k, v in rest.items() if k not in ("entity", "period")}
    member["entity"] = {"reference": ref, **rest.get("entity", {})}
    period = dict(rest.get("period", {}))
    if start:
        period["start"] = start
    if end:
        period["end"] = end
    if period:
        member["period"] = period
    if inactive:
        member["inactive"] = True
    return orjson.dumps(member)


# A plain member in compact JSON, as clients usually write rosters: a whole array of them is
# read from the request's text (split_plain_roster) instead of being decoded into two dicts
# per member (a 10^6-member body became ~450 MB of objects, then ~300 MB of Members).
_PLAIN_HEAD = '{"entity":{"reference":"'
_PLAIN_TAIL = '"}}'
_PLAIN_SEPARATOR = _PLAIN_TAIL + "," + _PLAIN_HEAD
_PLAIN_MEMBER = re.compile(
    re.escape(_PLAIN_HEAD)
    + rf"((?:{'|'.join(MEMBER_TYPES)})/[A-Za-z0-9\-.]{{1,64}})"
    + re.escape(_PLAIN_TAIL)
)
_MEMBER_KEY = re.compile(rb'"member"\s*:\s*\[')
# What the top-level member array is replaced with while the rest of the body is decoded:
# "\u0000", which no body can hold (limits.check_control_characters refuses it), so finding
# it as the decoded ``member`` proves the array replaced was the top-level one.
_PLACEHOLDER = b'"\\u0000"'
_PLACEHOLDER_VALUE = "\x00"
# Group.member types, one str object each: a member's type is looked up, not sliced anew.
_TYPE_OF = {name: name for name in MEMBER_TYPES}
# Events PlainEvents makes at a time while iterated.
_EVENT_BLOCK = 4096


class PlainRoster(Mapping[str, Member]):
    """A roster of plain members (a reference and nothing else), as sorted unique references.

    The Member of a reference is built when asked for; a new roster's events come from the
    references directly (``added_events``).
    """

    __slots__ = ("refs",)

    def __init__(self, refs: list[str]) -> None:
        refs.sort()
        if any(map(operator.eq, refs, islice(refs, 1, None))):
            refs = list(dict.fromkeys(refs))  # sorted still
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __contains__(self, ref: object) -> bool:
        index = bisect_left(self.refs, ref) if type(ref) is str else len(self.refs)
        return index < len(self.refs) and self.refs[index] == ref

    def __getitem__(self, ref: str) -> Member:
        if ref not in self:
            raise KeyError(ref)
        return Member(ref, _TYPE_OF[ref[: ref.index("/")]])

    def added_events(self) -> PlainEvents:
        """The outbox events of a new roster of these members, ``seq`` in reference order."""
        return PlainEvents(self.refs, 0, len(self.refs))


class PlainEvents(Sequence[list[Any]]):
    """The "added" events of a new roster of plain members, each made when it is read.

    A create's events are read three times (the outbox rows, the digest, the ClickHouse
    insert after commit); held as lists, 10^6 of them were ~160 MB from the write until its
    shipping ended. A slice is a view of the same references.
    """

    __slots__ = ("refs", "start", "stop")

    def __init__(self, refs: list[str], start: int, stop: int) -> None:
        self.refs = refs
        self.start = start
        self.stop = stop

    def __len__(self) -> int:
        return self.stop - self.start

    @overload
    def __getitem__(self, index: int) -> list[Any]: ...

    @overload
    def __getitem__(self, index: slice) -> PlainEvents: ...

    def __getitem__(self, index: int | slice) -> list[Any] | PlainEvents:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError(MSG_SLICE_STEP)
            return PlainEvents(self.refs, self.start + start, self.start + max(start, stop))
        position = index + len(self) if index < 0 else index
        if not 0 <= position < len(self):
            raise IndexError(index)
        return self._event(self.start + position)

    def __iter__(self) -> Iterator[list[Any]]:
        # A block at a time by a comprehension: a call per event cost ~3x as much.
        for start in range(self.start, self.stop, _EVENT_BLOCK):
            yield from self._events(start, min(start + _EVENT_BLOCK, self.stop))

    def _event(self, seq: int) -> list[Any]:
        return self._events(seq, seq + 1)[0]

    def _events(self, start: int, stop: int) -> list[list[Any]]:
        types = _TYPE_OF
        return [
            [ref, "added", seq, types[ref[: ref.index("/")]], "", "", False, ""]
            for seq, ref in enumerate(self.refs[start:stop], start)
        ]


def split_plain_roster(data: bytes) -> dict[str, Any] | None:
    """A JSON body whose top-level ``member`` array holds only plain members in compact JSON
    (``{"entity":{"reference":"Type/id"}}`` joined by commas), decoded with that array as a
    :class:`PlainRoster`; None for any other body (the caller decodes it whole, which also
    reports any error).

    The array is found by its text and must be exactly the compact rendering of the
    references found in it; the body without it is decoded, and the array counts only if
    its placeholder is the decoded top-level ``member``.
    """
    if _PLACEHOLDER in data:
        return None
    for match in _MEMBER_KEY.finditer(data):
        start = match.end()
        end = data.find(b"]", start)  # no "]" in a plain member
        if end < 0:
            return None
        try:
            text = str(memoryview(data)[start:end], "ascii")
        except UnicodeDecodeError:
            continue
        refs = _PLAIN_MEMBER.findall(text)
        if not refs or not _renders_as(text, refs):
            continue
        del text
        rest = data[: match.start()] + b'"member":' + _PLACEHOLDER + data[end + 1 :]
        try:
            body = orjson.loads(rest)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(body, dict) or body.get("member") != _PLACEHOLDER_VALUE:
            continue
        body["member"] = PlainRoster(refs)
        return body
    return None


def _renders_as(text: str, refs: list[str]) -> bool:
    """Whether ``text`` is exactly the plain members of ``refs`` joined by commas."""
    joined = _PLAIN_SEPARATOR.join(refs)
    return (
        len(text) == len(_PLAIN_HEAD) + len(joined) + len(_PLAIN_TAIL)
        and text.startswith(_PLAIN_HEAD)
        and text.startswith(joined, len(_PLAIN_HEAD))
        and text.endswith(_PLAIN_TAIL)
    )

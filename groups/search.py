"""``Group?member=``: answered by the roster storage (ClickHouse: the reverse table's sort key);
``_include=Group:member``: the first members of the page's rosters, as many as the include
limit leaves room for (a roster is never read whole for an include)."""

from __future__ import annotations

from typing import Any

from django.db.models import Q

from fhirservice.errors import BadRequest
from groups.members import REFERENCE_RE
from groups.storage import inline_roster, roster_storage

MSG_BAD_MEMBER = "member must be a reference like Patient/123: {value!r}"


def member_param(values: list[str], modifier: str) -> Q:
    """Groups that have any of the given members (present, active or inactive)."""
    refs = []
    for value in values:
        ref = f"{modifier}/{value}" if modifier and "/" not in value else value
        if not REFERENCE_RE.fullmatch(ref):
            raise BadRequest(MSG_BAD_MEMBER.format(value=value), detail_code="MSG_PARAM_INVALID")
        refs.append(ref)
    return Q(key__in=roster_storage().groups_with(refs))


def member_references(groups: list[Any], limit: int) -> list[str]:
    """Up to ``limit`` member references of these stored Groups, roster by roster in
    reference order (one roster page per Group, stopping once ``limit`` are found)."""
    storage = roster_storage()
    refs: list[str] = []
    for row in groups:
        room = limit - len(refs)
        if room <= 0:
            break
        roster = inline_roster(row)
        if roster is not None:
            refs.extend(sorted(roster)[:room])
        elif storage.external_element is not None:
            page = storage.page(row, after="", count=room, as_of=None, active=None)
            refs.extend(state.ref for state in page)
    return refs

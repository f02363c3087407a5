"""Roster look-ups shared by the member operations (metadata row + member store)."""

from __future__ import annotations

from fhirservice.errors import UnprocessableEntity
from fhirservice.models import StoredResource
from fhirservice.store.json import loads
from groups.handlers import clickhouse_rosters, parse_roster
from groups.members import Member
from groups.selectors import clickhouse_required, member_states, row_roster_key

MSG_NOT_A_MEMBER = "{ref} is not a member of {group}"


def current_member(group: StoredResource, ref: str) -> Member:
    """The member ``ref`` of a Group as it stands now; 422 when it is not in the roster."""
    if clickhouse_rosters():
        with clickhouse_required():
            state = member_states(row_roster_key(group), [ref]).get(ref)
        if state is not None and state.present:
            return Member(
                state.ref,
                state.member_type,
                state.period_start,
                state.period_end,
                state.inactive,
                state.extra,
            )
    else:
        member = parse_roster(loads(group.body).get("member", [])).get(ref)
        if member is not None:
            return member
    raise UnprocessableEntity(
        MSG_NOT_A_MEMBER.format(ref=ref, group=group.key), detail_code="MSG_NOT_A_MEMBER"
    )

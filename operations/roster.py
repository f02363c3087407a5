"""Roster look-ups shared by the member operations (metadata row + member store)."""

from __future__ import annotations

from fhirservice.errors import UnprocessableEntity
from fhirservice.models import StoredResource
from groups.members import Member
from groups.storage import roster_storage

MSG_NOT_A_MEMBER = "{ref} is not a member of {group}"


def current_member(group: StoredResource, ref: str) -> Member:
    """The member ``ref`` of a Group as it stands now; 422 when it is not in the roster."""
    member = roster_storage().member(group, ref)
    if member is not None:
        return member
    raise UnprocessableEntity(
        MSG_NOT_A_MEMBER.format(ref=ref, group=group.key), detail_code="MSG_NOT_A_MEMBER"
    )

"""``Group?member=``: answered by the roster storage (ClickHouse: the reverse table's sort key)."""

from __future__ import annotations

from django.db.models import Q

from fhirservice.errors import BadRequest
from groups.members import REFERENCE_RE
from groups.storage import roster_storage

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

"""Reads of the versioned resource store: read, vread and history pages.

Every read stays inside the caller's organization boundary (``fhirservice.access``): an
out-of-bounds id answers exactly like an unknown one (404, never 403 or 410).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import Q

from fhirservice import access
from fhirservice.access.boundaries import is_visible, visible_q
from fhirservice.errors import (
    MSG_DELETED,
    MSG_NOT_FOUND,
    MSG_VERSION_NOT_FOUND,
    BadRequest,
    Gone,
    NotFound,
)
from fhirservice.models import ResourceVersion, StoredResource
from fhirservice.search.query import decode_cursor, encode_cursor
from fhirservice.search.values import date_range
from fhirservice.store.rows import ReadAhead
from fhirservice.store.services import check_id, check_type, current_row

MSG_BAD_SINCE = "_since must be an instant, e.g. 2026-01-01T00:00:00Z: {value!r}"


def resource_read(
    *,
    resource_type: str,
    resource_id: str,
    lock: bool = False,
    read_ahead: ReadAhead | None = None,
) -> StoredResource:
    """The current version; 404 when unknown, 410 when deleted. ``lock``: the row locked
    until the transaction commits, where the backend locks rows (``current_row``).

    ``read_ahead``: the row as read already in this request (with the bearer token), used
    when it was read by this key and no lock is asked for.
    """
    check_type(resource_type)
    check_id(resource_id)
    key = f"{resource_type}/{resource_id}"
    if read_ahead is not None and read_ahead.key == key and not lock:
        row = read_ahead.row
    else:
        row = current_row(key, lock=lock)
    if row is None or not is_visible(row):
        raise NotFound(MSG_NOT_FOUND.format(type=resource_type, id=resource_id))
    if row.deleted:
        raise Gone(
            MSG_DELETED.format(type=resource_type, id=resource_id, version=row.version_id),
            headers={"ETag": f'W/"{row.version_id}"'},
        )
    return row


def resource_vread(*, resource_type: str, resource_id: str, version_id: str) -> ResourceVersion:
    """One version; 404 when unknown, 410 when that version is a delete."""
    check_type(resource_type)
    check_id(resource_id)
    row = None
    if version_id.isdigit():
        row = ResourceVersion.objects.filter(
            key=f"{resource_type}/{resource_id}/_history/{int(version_id)}"
        ).first()
    if row is not None and not is_visible(row):
        raise NotFound(MSG_NOT_FOUND.format(type=resource_type, id=resource_id))
    if row is None:
        if not StoredResource.objects.filter(
            visible_q(), key=f"{resource_type}/{resource_id}"
        ).exists():
            raise NotFound(MSG_NOT_FOUND.format(type=resource_type, id=resource_id))
        raise NotFound(
            MSG_VERSION_NOT_FOUND.format(type=resource_type, id=resource_id, version=version_id)
        )
    if row.deleted:
        raise Gone(MSG_DELETED.format(type=resource_type, id=resource_id, version=row.version_id))
    return row


@dataclass
class HistoryPage:
    """One page of history, newest first."""

    rows: list[ResourceVersion]
    total: int
    next_cursor: str | None


def parse_since(raw: str | None) -> datetime | None:
    """``_since`` as an instant (the start of the range it names)."""
    if raw is None:
        return None
    covered = date_range(raw)
    if covered is None:
        raise BadRequest(MSG_BAD_SINCE.format(value=raw), detail_code="MSG_PARAM_INVALID")
    return covered[0]


def history_page(
    *,
    resource_type: str | None = None,
    resource_id: str | None = None,
    since: datetime | None = None,
    count: int,
    cursor: str | None = None,
) -> HistoryPage:
    """History at system, type or instance level, newest first, keyset-paged.

    Only versions inside the caller's boundary are listed; system history lists only the
    types the caller may search.
    """
    queryset = ResourceVersion.objects.filter(visible_q())
    if resource_type is None:
        searchable = access.current().scopes.types_with("s")
        if searchable is not None:
            queryset = queryset.filter(resource_type__in=sorted(searchable))
    if resource_type is not None:
        check_type(resource_type)
        queryset = queryset.filter(resource_type=resource_type)
    if resource_id is not None:
        check_id(resource_id)
        if not StoredResource.objects.filter(
            visible_q(), key=f"{resource_type}/{resource_id}"
        ).exists():
            raise NotFound(MSG_NOT_FOUND.format(type=resource_type, id=resource_id))
        queryset = queryset.filter(resource_id=resource_id)
    if since is not None:
        queryset = queryset.filter(last_updated__gte=since)
    total = queryset.count()
    if count == 0:
        return HistoryPage(rows=[], total=total, next_cursor=None)
    ordered = queryset.order_by("-last_updated", "-version_id", "-key")
    if cursor:
        values = decode_cursor(cursor)
        try:
            moment, version, key = datetime.fromisoformat(values[0]), int(values[1]), values[2]
        except (IndexError, TypeError, ValueError) as exc:
            raise BadRequest(
                "The paging cursor is not valid", detail_code="MSG_PARAM_INVALID"
            ) from exc
        ordered = ordered.filter(
            Q(last_updated__lt=moment)
            | Q(last_updated=moment, version_id__lt=version)
            | Q(last_updated=moment, version_id=version, key__lt=key)
        )
    rows = list(ordered[: count + 1])
    next_cursor = None
    if len(rows) > count:
        rows = rows[:count]
        last = rows[-1]
        next_cursor = encode_cursor([last.last_updated.isoformat(), last.version_id, last.key])
    return HistoryPage(rows=rows, total=total, next_cursor=next_cursor)

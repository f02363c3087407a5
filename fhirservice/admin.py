"""Django admin over the generic resource store: a read-only list and page per resource.

Types with an admin of their own (an app registers it: ``fhirservice.plugins.
register_admin_page``) are left out here and linked to. Nothing in this admin writes:
resources change through the FHIR API only, so every change keeps its version, history row
and search index.

The helpers for version history (``version_history``) are shared with the apps' admins.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonpatch
import orjson
from django.contrib import admin
from django.contrib.admin.utils import quote, unquote
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.urls import NoReverseMatch, reverse

from fhirservice.models import ResourceVersion, StoredResource
from fhirservice.plugins import admin_page, types_with_admin_pages
from fhirservice.store.content import without_server_meta

HISTORY_PAGE = 20
# Longest value shown in a change line; longer values are cut (the JSON above is whole).
VALUE_CHARS = 160


def pretty_json(value: Any) -> str:
    """JSON for people: indented, keys in stored order."""
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).decode()


def _short(value: Any) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 1] + "…"


def body_changes(
    before: dict[str, Any] | None, after: dict[str, Any] | None, *, skip: tuple[str, ...] = ()
) -> list[str]:
    """What changed between two stored bodies, as JSON Patch lines (server meta ignored).

    ``skip`` names top-level elements left out of the comparison (e.g. an element an app's
    admin shows otherwise).
    """
    if after is None:
        return ["deleted"]
    if before is None:
        return ["created"]

    def clean(body: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in without_server_meta(body).items() if k not in skip}

    lines = []
    for op in jsonpatch.make_patch(clean(before), clean(after)).patch:
        if op["op"] == "remove":
            lines.append(f"remove {op['path']}")
        elif op["op"] in ("move", "copy"):
            lines.append(f"{op['op']} {op['from']} → {op['path']}")
        else:
            lines.append(f"{op['op']} {op['path']} = {_short(op['value'])}")
    return lines or ["no change to the stored body"]


@dataclass
class VersionLine:
    """One row of a version history table (an app's admin may subclass it to add columns)."""

    row: ResourceVersion
    changes: list[str]


def version_history(
    resource_type: str,
    resource_id: str,
    *,
    before: int | None = None,
    size: int = HISTORY_PAGE,
    skip: tuple[str, ...] = (),
    line_type: type[VersionLine] = VersionLine,
) -> tuple[list[Any], int | None]:
    """A page of versions, newest first, below version ``before``; and the next cursor.

    One row more than the page is read: the body each oldest version is compared with.
    Lines are ``line_type`` instances.
    """
    rows = ResourceVersion.objects.filter(resource_type=resource_type, resource_id=resource_id)
    if before is not None:
        rows = rows.filter(version_id__lt=before)
    window = list(rows.order_by("-version_id")[: size + 1])
    bodies = [orjson.loads(r.body) if r.body else None for r in window]
    lines = []
    for index, row in enumerate(window[:size]):
        previous = bodies[index + 1] if index + 1 < len(window) else None
        if row.version_id == row.incarnation and not row.deleted:
            previous = None  # the first version of this life of the id: a create
        lines.append(line_type(row, body_changes(previous, bodies[index], skip=skip)))
    more = len(window) > size
    return lines, (window[size - 1].version_id if more else None)


def admin_link(reference: str) -> str | None:
    """The admin page of a stored resource named by a relative ``Type/id``, if any."""
    resource_type, _, resource_id = reference.partition("/")
    if not resource_id or "/" in resource_id:
        return None
    url_name = admin_page(resource_type) or "admin:fhirservice_storedresource_change"
    try:
        return reverse(url_name, args=[quote(reference)])
    except NoReverseMatch:
        return None


class ResourceTypeFilter(admin.SimpleListFilter):
    """Filter by resource type; lists the types the store holds."""

    title = "resource type"
    parameter_name = "type"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        """The stored types (one DISTINCT over the type index)."""
        types = (
            StoredResource.objects.exclude(resource_type__in=types_with_admin_pages())
            .order_by()
            .values_list("resource_type", flat=True)
            .distinct()
        )
        return [(t, t) for t in sorted(types)]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        """Rows of the chosen type."""
        if self.value():
            return queryset.filter(resource_type=self.value())
        return queryset


@admin.register(StoredResource)
class StoredResourceAdmin(admin.ModelAdmin):
    """Read-only list and pages of stored resources (types without an admin of their own)."""

    list_display = ("key", "resource_type", "version_id", "last_updated", "deleted", "organization")
    list_filter = (ResourceTypeFilter, "deleted")
    search_fields = ("resource_id",)
    search_help_text = "An id, Type/id, or a type name"
    ordering = ("-last_updated",)
    list_per_page = 50
    # The exact total of a filtered list would count the whole table a second time.
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        """Every stored resource but those of types with an admin of their own."""
        return super().get_queryset(request).exclude(resource_type__in=types_with_admin_pages())

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        """Exact id, exact ``Type/id`` or a type name: all answered from indexes."""
        term = search_term.strip()
        if not term:
            return queryset, False
        return queryset.filter(Q(resource_id=term) | Q(key=term) | Q(resource_type=term)), False

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Resources are created through the FHIR API only."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Read-only: changes go through the FHIR API, which versions them."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Read-only: a delete is a new version, made through the FHIR API."""
        return False

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """The resource as stored (pretty JSON) and its version history with changes."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        key = unquote(object_id)
        row = (
            StoredResource.objects.filter(key=key)
            .exclude(resource_type__in=types_with_admin_pages())
            .first()
        )
        if row is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        before = request.GET.get("hist")
        lines, next_before = version_history(
            row.resource_type,
            row.resource_id,
            before=int(before) if before and before.isdigit() else None,
        )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": key,
            "row": row,
            "body": pretty_json(orjson.loads(row.body)) if row.body else "",
            "history": lines,
            "history_next": next_before,
            "has_view_permission": True,
        }
        return render(request, "admin/fhirservice/resource_detail.html", context)

"""Django admin for Groups: find groups, read a roster and its history, repair it.

- **List** (``GroupResource``, the ``StoredResource`` rows of type Group): id, name, type,
  actual, quantity, version, lastUpdated, pending member batches, deleted. Search by id, name,
  identifier, and by member reference (``Patient/123``: answered from ClickHouse's reverse
  table). Filters: type, actual, deleted, has pending batches. The list reads the metadata
  store only (one extra query for the page's pending counts), never ClickHouse per row.
- **Group page**: the resource JSON without its roster; the roster paged (keyset, by member
  reference) through the API's own selector (``groups.selectors.roster_page``, as
  ``$members`` pages it), with a member search and an "as of version" selector; the
  pending batches; the member event timeline (version, op, who, when, source); the version
  history with each version's body changes and member event counts. A current page reads a
  window of the state table; a page as of an older version aggregates the log up to it.
- **Actions** (list and page) call ``groups.maintenance`` (``scan``, ``repair``): ship
  pending batches, verify a roster, rebuild a roster's current-state rows (after a
  confirmation page).

Only staff users reach the admin; ship and rebuild need the change permission on Groups,
verify the view permission.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from django.contrib import admin, messages
from django.contrib.admin.utils import quote, unquote
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth.models import Group as AuthGroup
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.functional import cached_property
from django.utils.http import urlencode

from fhirservice.admin import VersionLine, admin_link, pretty_json, version_history
from fhirservice.errors import FhirError
from fhirservice.models import ResourceVersion, SearchToken
from fhirservice.search.values import normalize_string
from groups.maintenance.common import MaintenanceError
from groups.maintenance.repair import group_batches_ship, group_roster_rebuild
from groups.maintenance.scan import groups_with_pending_batches, pending_batch_counts, roster_verify
from groups.members import REFERENCE_RE
from groups.models import GroupResource, MemberOutbox
from groups.repository import MemberEventRepository, MemberState
from groups.selectors import clickhouse_required, groups_with_members, roster_key, roster_page

GROUP_TYPES = ("person", "animal", "practitioner", "device", "medication", "substance")
PAGE_SIZES = (25, 100, 500, 1000)
DEFAULT_PAGE_SIZE = 100
TIMELINE_PAGE = 50
# The as-of selector lists this many most recent versions; the version history links to
# every version ("as of vN").
AS_OF_CHOICES = 200
# Selected Groups one verify or rebuild action handles (each is a whole-roster check).
MAX_SELECTED = 50

MSG_BAD_VERSION = "There is no version {value} of this roster: choose {low}–{high}"
MSG_TOO_MANY = "Select at most {n} Groups for this action"
MSG_SEARCH_CAPPED = "More than {n} Groups match one part of the search; refine it to see all"
# Beyond this many matches a search or a rare-value filter stops listing keys.
KEY_LIST_LIMIT = 1000
# Versions with more member events than this show their total only (no split by op).
TYPE_SPLIT_LIMIT = 100_000
# Filtered or searched lists count their matches up to this many (20 pages).
COUNT_LIMIT = 1000
UPDATED_FORMAT = "%Y-%m-%d %H:%M:%S"
# Query parameters of the list that do not narrow it: with only these, the count is exact.
UNFILTERED_PARAMS = {"o", "p", "all", "e", "_changelist_filters"}


def _loads(text: str) -> dict[str, Any]:
    return orjson.loads(text) if text else {}


def _before(prefix: str) -> str:
    """A string just below every string that starts with ``prefix`` (roster cursor).

    Member references are ASCII, and U+10FFFF sorts above every ASCII byte in UTF-8, so the
    result sorts after every reference below ``prefix`` and before ``prefix`` itself.
    """
    last = prefix[-1]
    return prefix[:-1] + chr(ord(last) - 1) + "\U0010ffff" if ord(last) > 0 else prefix[:-1]


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


# -- list ------------------------------------------------------------------------------------


def token_match(queryset: QuerySet, tokens: QuerySet) -> QuerySet:
    """Rows that have one of ``tokens``: a list of keys when few match, else a subquery.

    A rare value becomes primary-key lookups. A common one stays an uncorrelated
    ``IN (subquery)``, which databases materialize once; a correlated ``EXISTS`` probe
    would be cheaper per row, but SQLite (without statistics) plans it on the wrong index
    and probes every token for every Group.
    """
    keys = list(tokens.values_list("resource_key", flat=True)[: KEY_LIST_LIMIT + 1])
    if len(keys) <= KEY_LIST_LIMIT:
        return queryset.filter(key__in=keys)
    return queryset.filter(key__in=tokens.values("resource_key"))


class CappedPaginator(Paginator):
    """Counts matching rows only up to ``COUNT_LIMIT`` (the list says "more than" beyond).

    An exact count of a filtered list of 10^5 Groups reads every match, while the page
    itself needs only the newest 50. (The unfiltered list counts exactly: one index.)
    """

    @cached_property
    def count(self) -> int:
        """Rows up to COUNT_LIMIT + 1."""
        return self.object_list[: COUNT_LIMIT + 1].count()


class TokenFilter(admin.SimpleListFilter):
    """Filter on a Group search parameter through the search index (no body scans)."""

    param = ""
    codes: tuple[str, ...] = ()

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        """The parameter's codes."""
        return [(code, code) for code in self.codes]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        """Groups indexed with the chosen code."""
        if not self.value():
            return queryset
        tokens = SearchToken.objects.filter(
            resource_type="Group", param=self.param, value=self.value()
        )
        return token_match(queryset, tokens)


class TypeFilter(TokenFilter):
    """Group.type."""

    title = "type"
    parameter_name = "type"
    param = "type"
    codes = GROUP_TYPES


class ActualFilter(TokenFilter):
    """Group.actual."""

    title = "actual"
    parameter_name = "actual"
    param = "actual"
    codes = ("true", "false")


class PendingFilter(admin.SimpleListFilter):
    """Groups with member batches that are committed but not yet in ClickHouse."""

    title = "pending member batches"
    parameter_name = "pending"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        """Yes or no."""
        return [("yes", "has pending batches"), ("no", "none pending")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        """Filter by the (normally tiny) set of Groups with pending batches."""
        if self.value() not in ("yes", "no"):
            return queryset
        ids = groups_with_pending_batches()
        if self.value() == "yes":
            return queryset.filter(resource_id__in=ids)
        return queryset.exclude(resource_id__in=ids)


class GroupChangeList(ChangeList):
    """Decorates the page's rows once: parsed body and pending batch count."""

    def get_results(self, request: HttpRequest) -> None:
        """The page's rows, plus one query for their pending batch counts."""
        super().get_results(request)
        self.count_capped = (
            isinstance(self.paginator, CappedPaginator) and self.result_count > COUNT_LIMIT
        )
        self.count_limit = COUNT_LIMIT
        rows = list(self.result_list)
        counts = pending_batch_counts(row.resource_id for row in rows)
        for row in rows:
            row.parsed = _loads(row.body)
            row.pending_batches = counts.get(row.resource_id, 0)


# -- the Group page --------------------------------------------------------------------------


@dataclass
class RosterView:
    """One roster page as the template shows it."""

    members: list[MemberState]
    next_after: str | None
    error: str = ""


def _inline_page(members: list[dict[str, Any]], after: str, prefix: str, size: int) -> RosterView:
    """A page of a roster still stored inline (before backfill): it is in memory anyway."""
    states = sorted(
        (
            MemberState(
                m["entity"]["reference"],
                m["entity"]["reference"].partition("/")[0],
                m.get("period", {}).get("start", ""),
                m.get("period", {}).get("end", ""),
                bool(m.get("inactive")),
                "",
                0,
                True,
            )
            for m in members
            if isinstance(m, dict) and isinstance(m.get("entity"), dict)
        ),
        key=lambda s: s.ref,
    )
    chosen = [s for s in states if s.ref > after and s.ref.startswith(prefix)]
    page = chosen[:size]
    return RosterView(page, page[-1].ref if len(chosen) > size else None)


def _roster_view(key: str, *, after: str, prefix: str, size: int, as_of: int | None) -> RosterView:
    """A page of members in reference order, from ``after`` (or the search prefix on)."""
    start = after or (_before(prefix) if prefix else "")
    try:
        page = roster_page(key, after=start, count=size + 1, as_of=as_of)
    except FhirError as exc:
        return RosterView([], None, error=exc.diagnostics)
    if prefix:
        page = [state for state in page if state.ref.startswith(prefix)]
    more = len(page) > size
    page = page[:size]
    return RosterView(page, page[-1].ref if more else None)


def _timeline_low(
    group_id: str, key: str, before: tuple[int, int] | None, limit: int
) -> tuple[int, int] | None:
    """The (version, seq) from which ``limit`` shipped events lie below ``before``.

    Counted from the outbox (events per version, newest first), so the timeline query reads
    one page of the log's sort key. None: the page reaches the start of the log.
    """
    rows = MemberOutbox.objects.filter(group_id=group_id, roster_key=key, shipped_at__isnull=False)
    if before is not None:
        rows = rows.filter(version__lte=before[0])
    need = limit
    totals: list[list[int]] = []
    for version, n in rows.order_by("-version", "-chunk").values_list("version", "event_count"):
        if totals and totals[-1][0] == version:
            totals[-1][1] += n
            continue
        if totals:
            low, need = _take(totals[-1], before, need)
            if low is not None:
                return low
        totals.append([version, n])
    if totals:
        low, need = _take(totals[-1], before, need)
        return low
    return None


def _take(
    version_total: list[int], before: tuple[int, int] | None, need: int
) -> tuple[tuple[int, int] | None, int]:
    """Consume one version's events for the timeline bound; (bound or None, still needed)."""
    version, total = version_total
    available = total if before is None or version < before[0] else min(before[1], total)
    if available >= need:
        return (version, available - need), 0
    return None, need - available


def _timeline(
    group_id: str, key: str, *, before: tuple[int, int] | None, member_ref: str | None
) -> tuple[list[dict[str, Any]], str | None, str]:
    """A page of member events newest first, the cursor of the next page, and any error."""
    # A member's events are sparse in the log: no bound, the member filter prunes instead.
    low = None if member_ref else _timeline_low(group_id, key, before, TIMELINE_PAGE + 1)
    try:
        with clickhouse_required():
            events = MemberEventRepository().timeline(
                key, before=before, low=low, member_ref=member_ref, limit=TIMELINE_PAGE + 1
            )
    except FhirError as exc:
        return [], None, exc.diagnostics
    more = len(events) > TIMELINE_PAGE
    events = events[:TIMELINE_PAGE]
    cursor = None
    if more:
        cursor = f"{events[-1]['version']}.{events[-1]['seq']}"
    elif low is not None and low != (0, 0):
        # Fewer events than the outbox promised (some are missing from ClickHouse): the
        # next page starts below the bound rather than ending the timeline here.
        cursor = f"{low[0]}.{low[1]}"
    return events, cursor, ""


# Django's permission groups ("Groups", next to "FHIR Groups") are not used here: staff
# rights are granted per user. Unlisted so that "Groups" in the admin means FHIR Groups.
admin.site.unregister(AuthGroup)


@admin.register(GroupResource)
class GroupAdmin(admin.ModelAdmin):
    """Groups: list, roster page, member timeline, history, and roster maintenance."""

    list_display = (
        "group_id",
        "name",
        "group_type",
        "actual",
        "quantity",
        "version_id",
        "updated",
        "pending",
        "deleted",
    )
    list_display_links = ("group_id",)
    list_filter = (TypeFilter, ActualFilter, "deleted", PendingFilter)
    search_fields = ("resource_id",)
    search_help_text = (
        "A Group id (or its beginning), a name, an identifier (value or system|value), "
        "or a member reference such as Patient/123 to find the Groups that member is in"
    )
    ordering = ("-last_updated",)
    list_per_page = 50
    show_full_result_count = False
    actions = ("ship_pending", "verify_rosters", "rebuild_rosters")

    # -- list ------------------------------------------------------------------------------

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The list, titled for what it is (the admin's default asks to pick one to change).

        Without the admin's navigation sidebar: beside the filters it left the nine columns
        ~700 px of a 1400 px window, cutting off the last ones.
        """
        context = {"title": "FHIR Groups", "is_nav_sidebar_enabled": False}
        return super().changelist_view(request, {**context, **(extra_context or {})})

    def get_paginator(
        self, request: HttpRequest, queryset: QuerySet, per_page: int, **kwargs: Any
    ) -> Paginator:
        """Exact counts for the whole list, capped ones once it is filtered or searched."""
        if set(request.GET) <= UNFILTERED_PARAMS:
            return Paginator(queryset, per_page, **kwargs)
        return CappedPaginator(queryset, per_page, **kwargs)

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        """Stored rows of type Group (deleted ones too, as tombstones)."""
        return super().get_queryset(request).filter(resource_type="Group")

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        """The change list that adds pending counts for the whole page in one query."""
        return GroupChangeList

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet, search_term: str
    ) -> tuple[QuerySet, bool]:
        """Member reference → reverse table; otherwise id, identifier and name from indexes."""
        term = search_term.strip()
        if not term:
            return queryset, False
        if REFERENCE_RE.fullmatch(term):
            try:
                keys = groups_with_members([term])
            except FhirError as exc:
                messages.error(request, f"Member search unavailable: {exc.diagnostics}")
                return queryset.none(), False
            return queryset.filter(key__in=sorted({*keys, term})), False
        tokens = SearchToken.objects.filter(resource_type="Group")
        system, bar, value = term.rpartition("|")
        identifiers = tokens.filter(param="identifier", value=value if bar else term)
        if bar and system:
            identifiers = identifiers.filter(system=system)
        names = tokens.filter(param="name", value__contains=normalize_string(term))
        # Each index is asked on its own and the page is then read by key: one OR over
        # them makes the database scan every Group.
        sources = [
            queryset.filter(resource_id__gte=term, resource_id__lt=term + "\U0010ffff")
            .order_by("resource_id")
            .values_list("key", flat=True),
            identifiers.values_list("resource_key", flat=True),
            names.values_list("resource_key", flat=True),
        ]
        keys: set[str] = set()
        for source in sources:
            found = list(source[: KEY_LIST_LIMIT + 1])
            if len(found) > KEY_LIST_LIMIT:
                messages.warning(request, MSG_SEARCH_CAPPED.format(n=KEY_LIST_LIMIT))
            keys.update(found[:KEY_LIST_LIMIT])
        return queryset.filter(key__in=sorted(keys)), False

    @admin.display(description="id", ordering="resource_id")
    def group_id(self, row: GroupResource) -> str:
        """The Group id."""
        return row.resource_id

    @admin.display(description="name")
    def name(self, row: GroupResource) -> str:
        """Group.name."""
        return row.parsed.get("name", "")

    @admin.display(description="type")
    def group_type(self, row: GroupResource) -> str:
        """Group.type."""
        return row.parsed.get("type", "")

    @admin.display(description="actual", boolean=True)
    def actual(self, row: GroupResource) -> bool | None:
        """Group.actual."""
        return row.parsed.get("actual")

    @admin.display(description="quantity")
    def quantity(self, row: GroupResource) -> Any:
        """Group.quantity (active members, kept exact in the metadata store)."""
        return row.parsed.get("quantity", "")

    @admin.display(description="lastUpdated", ordering="last_updated")
    def updated(self, row: GroupResource) -> str:
        """When the current version was written (UTC), compact: the default format wraps."""
        return row.last_updated.strftime(UPDATED_FORMAT)

    @admin.display(description="pending")
    def pending(self, row: GroupResource) -> int:
        """Unshipped outbox batches."""
        return row.pending_batches

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Groups are created through the FHIR API."""
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """A delete is a new version, made through the FHIR API."""
        return False

    # -- actions ---------------------------------------------------------------------------

    @admin.action(description="Ship pending member batches", permissions=["change"])
    def ship_pending(self, request: HttpRequest, queryset: QuerySet) -> None:
        """Ship the selected Groups' unshipped batches to ClickHouse."""
        ids = list(queryset.values_list("resource_id", flat=True))
        self._ship(request, ids)

    @admin.action(description="Verify rosters", permissions=["view"])
    def verify_rosters(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        """Check the selected rosters and show the reports."""
        ids = list(queryset.values_list("resource_id", flat=True)[: MAX_SELECTED + 1])
        if len(ids) > MAX_SELECTED:
            self.message_user(request, MSG_TOO_MANY.format(n=MAX_SELECTED), messages.ERROR)
            return None
        return self._verify_response(request, ids)

    @admin.action(description="Rebuild roster state from the event log", permissions=["change"])
    def rebuild_rosters(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        """Ask for confirmation, then rebuild the selected rosters' state rows."""
        ids = list(queryset.values_list("resource_id", flat=True)[: MAX_SELECTED + 1])
        if len(ids) > MAX_SELECTED:
            self.message_user(request, MSG_TOO_MANY.format(n=MAX_SELECTED), messages.ERROR)
            return None
        if request.POST.get("confirmed") == "yes":
            self._rebuild(request, ids)
            return None
        return self._rebuild_confirmation(request, ids, from_list=True)

    def _ship(self, request: HttpRequest, ids: list[str]) -> None:
        report = group_batches_ship(group_ids=ids)
        if report.error:
            self.message_user(
                request,
                f"Shipped {report.batches} batches; ClickHouse failed: {report.error}",
                messages.ERROR,
            )
        else:
            self.message_user(
                request,
                f"Shipped {report.batches} batches ({report.events} events, "
                f"{report.skipped} already in ClickHouse); recounted "
                f"{len(report.recounted)} quantities.",
                messages.SUCCESS,
            )

    def _rebuild(self, request: HttpRequest, ids: list[str]) -> None:
        for group_id in ids:
            try:
                result = group_roster_rebuild(group_id=group_id)
            except (MaintenanceError, FhirError) as exc:
                text = exc.diagnostics if isinstance(exc, FhirError) else str(exc)
                self.message_user(request, f"Group/{group_id}: {text}", messages.ERROR)
                continue
            self.message_user(
                request,
                f"Group/{group_id}: rebuilt roster {result.roster_key} from its event log "
                f"({result.members} members, {result.seconds:.2f} s).",
                messages.SUCCESS,
            )

    def _verify_response(self, request: HttpRequest, ids: list[str]) -> HttpResponse:
        reports, errors = [], []
        for group_id in ids:
            try:
                reports.append(roster_verify(group_id=group_id))
            except (MaintenanceError, FhirError) as exc:
                text = exc.diagnostics if isinstance(exc, FhirError) else str(exc)
                errors.append(f"Group/{group_id}: {text}")
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Roster verification",
            "reports": reports,
            "errors": errors,
        }
        return TemplateResponse(request, "admin/groups/verify_report.html", context)

    def _rebuild_confirmation(
        self, request: HttpRequest, ids: list[str], *, from_list: bool
    ) -> HttpResponse:
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Rebuild roster state?",
            "group_ids": ids,
            "from_list": from_list,
            "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            "selected": request.POST.getlist(admin.helpers.ACTION_CHECKBOX_NAME),
        }
        return TemplateResponse(request, "admin/groups/rebuild_confirmation.html", context)

    # -- the Group page and its buttons ---------------------------------------------------

    def get_urls(self) -> list[Any]:
        """The Group page's buttons: verify, rebuild (confirmed), ship."""
        info = f"{self.opts.app_label}_{self.opts.model_name}"
        wrap = self.admin_site.admin_view
        return [
            path("<path:object_id>/verify/", wrap(self.verify_view), name=f"{info}_verify"),
            path("<path:object_id>/rebuild/", wrap(self.rebuild_view), name=f"{info}_rebuild"),
            path("<path:object_id>/ship/", wrap(self.ship_view), name=f"{info}_ship"),
            *super().get_urls(),
        ]

    def _group(self, request: HttpRequest, object_id: str) -> GroupResource | None:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return self.get_queryset(request).filter(key=unquote(object_id)).first()

    def _page_url(self, row: GroupResource) -> str:
        return reverse("admin:groups_groupresource_change", args=[quote(row.key)])

    def verify_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """Verify one roster and show the report."""
        row = self._group(request, object_id)
        if row is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        return self._verify_response(request, [row.resource_id])

    def rebuild_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """GET: the confirmation page; POST: rebuild, then back to the Group page."""
        row = self._group(request, object_id)
        if row is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_change_permission(request, row):
            raise PermissionDenied
        if request.method == "POST" and request.POST.get("confirmed") == "yes":
            self._rebuild(request, [row.resource_id])
            return HttpResponseRedirect(self._page_url(row))
        return self._rebuild_confirmation(request, [row.resource_id], from_list=False)

    def ship_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: ship this Group's pending batches, then back to its page."""
        row = self._group(request, object_id)
        if row is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if request.method != "POST" or not self.has_change_permission(request, row):
            raise PermissionDenied
        self._ship(request, [row.resource_id])
        return HttpResponseRedirect(self._page_url(row))

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        """The Group page (read-only): resource, roster, pending, timeline, history."""
        row = self._group(request, object_id)
        if row is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        context = {
            **self.admin_site.each_context(request),
            **group_page_context(request, row),
            "opts": self.opts,
            "title": f"Group/{row.resource_id}",
            "can_change": self.has_change_permission(request, row),
            "page_url": self._page_url(row),
        }
        return render(request, "admin/groups/group_detail.html", context)


@dataclass
class PageQuery:
    """The Group page's query string, checked against the Group's versions."""

    prefix: str
    size: int
    after: str
    as_of: int | None
    error: str = ""

    @property
    def base(self) -> dict[str, Any]:
        """The parameters every link of the page keeps."""
        return {"member": self.prefix, "size": self.size, "as_of": self.as_of or ""}


def _page_query(params: Any, row: GroupResource) -> PageQuery:
    """``member``, ``size``, ``after`` and ``as_of``; a version outside the Group's current
    life is dropped with an error."""
    size = _int(params.get("size")) or DEFAULT_PAGE_SIZE
    query = PageQuery(
        prefix=params.get("member", "").strip(),
        size=size if size in PAGE_SIZES else DEFAULT_PAGE_SIZE,
        after=params.get("after", ""),
        as_of=_int(params.get("as_of")),
    )
    if query.as_of is not None and not row.incarnation <= query.as_of <= row.version_id:
        query.error = MSG_BAD_VERSION.format(
            value=query.as_of, low=row.incarnation, high=row.version_id
        )
        query.as_of = None
    return query


def _shown_version(row: GroupResource, as_of: int | None) -> Any:
    """The version the page's header and resource show: version ``as_of``, or the current."""
    if as_of is None or as_of >= row.version_id:
        return row
    version = ResourceVersion.objects.filter(
        resource_type="Group", resource_id=row.resource_id, version_id=as_of
    ).first()
    return version or row


def _roster_section(
    row: GroupResource, query: PageQuery, inline_members: list[Any] | None, read_as_of: int | None
) -> RosterView:
    """The roster as the page shows it: from the shown version's body when it held the
    roster inline, else from ClickHouse (now, or as of an older version)."""
    if row.deleted:
        return RosterView([], None, error="The Group is deleted; see its history.")
    if inline_members is not None:
        return _inline_page(inline_members, query.after, query.prefix, query.size)
    key = roster_key(row.resource_id, row.incarnation)
    return _roster_view(
        key, after=query.after, prefix=query.prefix, size=query.size, as_of=read_as_of
    )


def _timeline_section(
    row: GroupResource, query: PageQuery, ev: str, read_as_of: int | None
) -> tuple[list[dict[str, Any]], str | None, str]:
    """The member event timeline from cursor ``ev`` (or from the version shown)."""
    ev_version, _, ev_seq = ev.partition(".")
    before = (int(ev_version), int(ev_seq)) if ev_version.isdigit() and ev_seq.isdigit() else None
    if before is None and read_as_of is not None:
        before = (read_as_of + 1, 0)
    member_ref = query.prefix if REFERENCE_RE.fullmatch(query.prefix) else None
    key = roster_key(row.resource_id, row.incarnation)
    return _timeline(row.resource_id, key, before=before, member_ref=member_ref)


def group_page_context(request: HttpRequest, row: GroupResource) -> dict[str, Any]:
    """Everything the Group page shows, from its query string.

    ``member`` (a reference or its beginning), ``after`` (roster cursor), ``size``,
    ``as_of`` (a version: the header, resource and roster are then that version's), ``ev``
    (timeline cursor ``version.seq``), ``hist`` (history cursor).
    """
    params = request.GET
    query = _page_query(params, row)
    shown = _shown_version(row, query.as_of)
    body = _loads(shown.body)
    inline_members = body.pop("member", None)
    # The current version's roster is the current state: read the state table, not the log.
    read_as_of = shown.version_id if shown is not row else None
    roster = _roster_section(row, query, inline_members, read_as_of)
    ev = params.get("ev", "")
    events, events_next, events_error = _timeline_section(row, query, ev, read_as_of)
    history, history_next, history_error = group_history(
        row, before=_int(params.get("hist")), key_of=roster_key
    )
    oldest = max(row.incarnation, row.version_id - AS_OF_CHOICES + 1)
    pending = list(
        MemberOutbox.objects.filter(group_id=row.resource_id, shipped_at__isnull=True)
        .order_by("version", "chunk")
        .values("key", "version", "chunk", "event_count", "recorded_at", "attempts", "last_error")
    )
    base = query.base
    return {
        "row": row,
        "shown": shown,
        "body": pretty_json(body),
        "inline_count": len(inline_members) if inline_members is not None else None,
        "roster_key": roster_key(row.resource_id, row.incarnation),
        "quantity": body.get("quantity"),
        "roster": roster,
        "member_rows": [_member_row(state) for state in roster.members],
        "member": query.prefix,
        "size": query.size,
        "sizes": PAGE_SIZES,
        "as_of": query.as_of,
        "versions": list(range(row.version_id, oldest - 1, -1)),
        "error": query.error,
        "roster_next": _query(base, after=roster.next_after) if roster.next_after else None,
        "roster_first": _query(base) if query.after else None,
        "events": events,
        "events_error": events_error,
        "events_next": _query(base, ev=events_next) if events_next else None,
        "events_first": _query(base) if ev else None,
        "history": history,
        "history_error": history_error,
        "history_next": _query(base, hist=history_next) if history_next else None,
        "history_first": _query(base) if params.get("hist") else None,
        "pending": pending,
        "changelist_url": reverse("admin:groups_groupresource_changelist"),
    }


def _member_row(state: MemberState) -> dict[str, Any]:
    """A roster table row: the state, the version of its last change, an admin link."""
    # Pending (unshipped) states carry real positions too; 0 marks an inline roster.
    version = state.pos >> 32 if state.pos else None
    return {
        "ref": state.ref,
        "member_type": state.member_type,
        "period_start": state.period_start,
        "period_end": state.period_end,
        "inactive": state.inactive,
        "version": version,
        "link": admin_link(state.ref),
    }


def _query(base: dict[str, Any], **extra: Any) -> str:
    return "?" + urlencode({k: v for k, v in {**base, **extra}.items() if v not in ("", None)})


@dataclass
class GroupVersionLine(VersionLine):
    """A version of a Group with its member events: by op (from ClickHouse) and in the outbox."""

    members: dict[str, int] = field(default_factory=dict)
    outbox_events: int = 0
    pending_events: int = 0


def group_history(
    row: GroupResource, *, before: int | None, key_of: Any
) -> tuple[list[Any], int | None, str]:
    """A page of the Group's versions with body changes and member event counts.

    Counts come from ClickHouse (by event type, per version of the page) and from the
    outbox (committed and pending events), so a version whose events are missing or
    pending shows it.
    """
    lines, next_before = version_history(
        "Group", row.resource_id, before=before, skip=("member",), line_type=GroupVersionLine
    )
    by_version = {line.row.version_id: line for line in lines}
    batches = MemberOutbox.objects.filter(group_id=row.resource_id, version__in=list(by_version))
    # Two narrow queries, never shipped_at in the select list: SQLite stores a row's columns
    # in order, and reading the one after ``events`` walks the whole event payload.
    for version, n in batches.values_list("version", "event_count"):
        by_version[version].outbox_events += n
    for version, n in batches.filter(shipped_at__isnull=True).values_list("version", "event_count"):
        by_version[version].pending_events += n
    error = ""
    by_incarnation: dict[int, list[int]] = {}
    for line in lines:
        # Splitting a version's events by op reads all of them; for a huge version (a bulk
        # create) the outbox total is shown instead, keeping the page within its budget.
        if 0 < line.outbox_events <= TYPE_SPLIT_LIMIT:
            by_incarnation.setdefault(line.row.incarnation, []).append(line.row.version_id)
    try:
        with clickhouse_required():
            repository = MemberEventRepository()
            for incarnation, numbers in by_incarnation.items():
                key = key_of(row.resource_id, incarnation)
                counts = repository.event_type_counts(key, numbers)
                page = [line for line in lines if line.row.version_id in numbers]
                # Row counts include re-shipped duplicates until ClickHouse merges them:
                # where they exceed what was shipped, count distinct events instead.
                inflated = [
                    line.row.version_id
                    for line in page
                    if sum(counts.get(line.row.version_id, {}).values())
                    > line.outbox_events - line.pending_events
                ]
                counts.update(repository.event_type_counts(key, inflated, exact=True))
                for line in page:
                    line.members = counts.get(line.row.version_id, {})
    except FhirError as exc:
        error = exc.diagnostics
    return lines, next_before, error

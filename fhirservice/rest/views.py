"""FHIR REST interactions: one thin view per route, each calling one service or selector."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import parse_qsl, urlencode

from django.http import HttpResponse
from rest_framework.request import Request

from fhirservice import access
from fhirservice.access.authentication import READ_ROW_ATTR
from fhirservice.access.policy import require_permission
from fhirservice.bundles import process_bundle
from fhirservice.capability import capability_statement
from fhirservice.conf import fhir_settings
from fhirservice.errors import (
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
    information_outcome,
    operation_outcome,
)
from fhirservice.rest.base import (
    MSG_BODY_TOO_LARGE,
    FhirView,
    base_url,
    fhir_http_response,
    version_headers,
)
from fhirservice.rest.limits import check_query_string
from fhirservice.rest.rendering import Body, VersionRow, bundle_body, render_resource
from fhirservice.rest.subsetting import subset
from fhirservice.search.include import MSG_INCLUDES_CAPPED, include_page
from fhirservice.search.query import SearchSpec, parse_count, parse_search, run_search
from fhirservice.search.system import parse_system_search, run_system_search
from fhirservice.store.json import dumps
from fhirservice.store.selectors import (
    history_page,
    parse_since,
    resource_read,
    resource_vread,
)
from fhirservice.store.services import (
    check_type,
    format_instant,
    now,
    resource_conditional_delete,
    resource_conditional_patch,
    resource_conditional_update,
    resource_create,
    resource_delete,
    resource_patch,
    resource_update,
)

MSG_UNKNOWN_ROUTE = "No FHIR endpoint at {path}"
MSG_SEARCH_FORM = "POST _search takes a form body: Content-Type {found}, expected {expected}"
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
MSG_DELETED_MATCHES = "Deleted {count} matching resource(s): {keys}"
METHOD_OF = {"POST": "POST", "PUT": "PUT", "PATCH": "PATCH", "DELETE": "DELETE"}


def _page_link(
    request: Request, path: str, params: list[tuple[str, str]], cursor: str | None
) -> str:
    """A page of a search: ``path`` under the base (``""``: the base itself, system search)."""
    query = [(k, v) for k, v in params if k != "_cursor"]
    if cursor is not None:
        query.append(("_cursor", cursor))
    url = f"{base_url(request)}/{path}" if path else base_url(request)
    return url + (f"?{urlencode(query)}" if query else "")


def _row_entries(
    rows: Iterable[VersionRow],
    base: str,
    mode: str,
    summary: str | None,
    elements: list[str] | None = None,
) -> Iterator[tuple[dict[str, Any], Body]]:
    """Searchset entries of stored rows: fullUrl, search mode and the rendered resource."""
    for row in rows:
        yield (
            {
                "fullUrl": f"{base}/{row.resource_type}/{row.resource_id}",
                "search": {"mode": mode},
            },
            render_resource(row, current=True, summary=summary, elements=elements, in_bundle=True),
        )


class TypeView(FhirView):
    """``[base]/[type]``: search (GET), create (POST), and the conditional update (PUT),
    patch (PATCH) and delete (DELETE) of ``[type]?[search]``."""

    def get(self, request: Request, resource_type: str) -> HttpResponse:
        """Search: a searchset Bundle, keyset-paged."""
        check_type(resource_type)
        return self.search(request, resource_type, query_pairs(request))

    def search(
        self, request: Request, resource_type: str, flat: list[tuple[str, str]]
    ) -> HttpResponse:
        """A searchset Bundle for the parameters ``flat`` (from the query or a form body)."""
        spec = parse_search(resource_type, flat, strict=self.strict())
        page = run_search(spec)
        included = include_page(spec.includes, page.rows)
        # Resources defined in code (built-in OperationDefinitions) lead the first page.
        built_in = self.built_in_matches(spec) if spec.cursor is None else []
        base = base_url(request)
        header: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if page.total is not None:
            header["total"] = page.total + len(built_in)
        used = [(k, v) for k, v in flat if k not in spec.ignored]
        links = [
            {"relation": "self", "url": _page_link(request, resource_type, used, flat_cursor(flat))}
        ]
        if page.next_cursor:
            links.append(
                {
                    "relation": "next",
                    "url": _page_link(request, resource_type, used, page.next_cursor),
                }
            )
        header["link"] = links
        summary = spec.summary if spec.summary != "count" else None

        def entries():
            if spec.count and spec.summary != "count":
                for resource in built_in:
                    body, _ = subset(resource, summary=summary, elements=spec.elements)
                    yield (
                        {
                            "fullUrl": f"{base}/{resource_type}/{resource['id']}",
                            "search": {"mode": "match"},
                        },
                        render_json(body),
                    )
            yield from _row_entries(page.rows, base, "match", summary, spec.elements)
            # --- included resources (fhirservice.search.include) ---
            yield from _row_entries(included.rows, base, "include", summary)
            issues = [
                {
                    "severity": "warning",
                    "code": "not-supported",
                    "diagnostics": f"Unknown search parameter {name!r} was ignored",
                }
                for name in spec.ignored
            ]
            if included.capped:
                issues.append(
                    {
                        "severity": "warning",
                        "code": "too-costly",
                        "diagnostics": MSG_INCLUDES_CAPPED.format(limit=fhir_settings.INCLUDE_MAX),
                    }
                )
            if issues:
                yield {"search": {"mode": "outcome"}}, render_json(operation_outcome(issues))

        return fhir_http_response(bundle_body(header, entries()))

    def built_in_matches(self, spec: SearchSpec) -> list[dict[str, Any]]:
        """Resources defined in code rather than stored that match ``spec`` (none here)."""
        return []

    def post(self, request: Request, resource_type: str) -> HttpResponse:
        """Create, optionally conditional on If-None-Exist."""
        # The parsed body is not kept here: resource_create lets it go once the handler has
        # taken it apart (a 10^6-member Group's JSON objects are ~0.5 GB).
        result = resource_create(
            resource_type=resource_type,
            body=self.read_resource(),
            context=self.write_context(),
            if_none_exist=request.META.get("HTTP_IF_NONE_EXIST"),
            assigned_id=getattr(request._request, "fhir_assigned_id", None),
        )
        return self.write_response(result, status=201 if result.created else 200)

    def put(self, request: Request, resource_type: str) -> HttpResponse:
        """Conditional update: update the one match, or create when nothing matches."""
        result = resource_conditional_update(
            resource_type=resource_type,
            query=request.META.get("QUERY_STRING"),
            body=self.read_resource(),
            context=self.write_context(),
            if_match=self.if_match(),
            assigned_id=getattr(request._request, "fhir_assigned_id", None),
        )
        return self.write_response(result)

    def patch(self, request: Request, resource_type: str) -> HttpResponse:
        """Conditional patch (JSON Patch) of the one match."""
        ops = self.read_json(patch=True)
        result = resource_conditional_patch(
            resource_type=resource_type,
            query=request.META.get("QUERY_STRING"),
            ops=ops,
            context=self.write_context(),
            if_match=self.if_match(),
        )
        return self.write_response(result)

    def delete(self, request: Request, resource_type: str) -> HttpResponse:
        """Conditional delete: 204 whether it deleted none, one or (mode multiple) several."""
        results = resource_conditional_delete(
            resource_type=resource_type,
            query=request.META.get("QUERY_STRING"),
            context=self.write_context(),
        )
        headers = version_headers(results[0].row) if len(results) == 1 else {}
        if self.prefer("return") == "OperationOutcome":
            deleted = ", ".join(f"{r.row.resource_type}/{r.row.resource_id}" for r in results)
            text = MSG_DELETED_MATCHES.format(count=len(results), keys=deleted or "none")
            return fhir_http_response(render_json(information_outcome(text)), headers=headers)
        return fhir_http_response(None, status=204, headers=headers)


class TypeSearchView(TypeView):
    """``POST [base]/[type]/_search``: search with parameters in a form body.

    The body's parameters follow the query's; the Bundle is the GET search's, its links GET
    URLs (a client pages with GET).
    """

    access_rule = "search"
    http_method_names = ["post"]

    def post(self, request: Request, resource_type: str) -> HttpResponse:  # type: ignore[override]
        """Search: a searchset Bundle for the query's and the form body's parameters."""
        check_type(resource_type)
        media = (request.content_type or "").split(";")[0].strip().lower()
        if media != FORM_MEDIA_TYPE:
            raise UnsupportedMediaType(
                MSG_SEARCH_FORM.format(found=media or "none", expected=FORM_MEDIA_TYPE)
            )
        body = request._request.body
        if len(body) > fhir_settings.MAX_BODY_BYTES:
            raise PayloadTooLarge(
                MSG_BODY_TOO_LARGE.format(size=len(body), limit=fhir_settings.MAX_BODY_BYTES)
            )
        text = body.decode("utf-8", errors="replace")
        check_query_string(text)
        form = parse_qsl(text, keep_blank_values=True)
        return self.search(request, resource_type, query_pairs(request) + form)


def query_pairs(request: Request) -> list[tuple[str, str]]:
    """The query string's parameters, in order, repeated names kept."""
    return [(k, v) for k, values in request.query_params.lists() for v in values]


def flat_cursor(flat: list[tuple[str, str]]) -> str | None:
    """The ``_cursor`` value of the current request, if any."""
    return next((v for k, v in flat if k == "_cursor"), None)


def render_json(value: Any) -> bytes:
    """JSON-encode a small resource built in code."""
    return dumps(value)


class InstanceView(FhirView):
    """``[base]/[type]/[id]``: read, update, patch, delete."""

    def read_ahead_key(self, request: Request) -> str | None:
        """A read's row: read with the bearer token, in one statement."""
        kwargs = self.kwargs
        if request.method not in ("GET", "HEAD") or "resource_type" not in kwargs:
            return None  # a write, or a route without a type (OperationDefinition/[id])
        return f"{kwargs['resource_type']}/{kwargs['resource_id']}"

    def get(self, request: Request, resource_type: str, resource_id: str) -> HttpResponse:
        """Read the current version (304 when If-None-Match names it)."""
        row = resource_read(
            resource_type=resource_type,
            resource_id=resource_id,
            read_ahead=getattr(request._request, READ_ROW_ATTR, None),
        )
        headers = version_headers(row)
        if request.META.get("HTTP_IF_NONE_MATCH", "").strip() == headers["ETag"]:
            return fhir_http_response(None, status=304, headers=headers)
        summary, elements = self.summary_params()
        return fhir_http_response(
            render_resource(row, current=True, summary=summary, elements=elements), headers=headers
        )

    def put(self, request: Request, resource_type: str, resource_id: str) -> HttpResponse:
        """Update (or create with a client id when UPDATE_CREATE is on)."""
        result = resource_update(
            resource_type=resource_type,
            resource_id=resource_id,
            body=self.read_resource(),
            context=self.write_context(),
            if_match=self.if_match(),
        )
        return self.write_response(result)

    def patch(self, request: Request, resource_type: str, resource_id: str) -> HttpResponse:
        """JSON Patch."""
        ops = self.read_json(patch=True)
        result = resource_patch(
            resource_type=resource_type,
            resource_id=resource_id,
            ops=ops,
            context=self.write_context(),
            if_match=self.if_match(),
        )
        return self.write_response(result)

    def delete(self, request: Request, resource_type: str, resource_id: str) -> HttpResponse:
        """Delete: a new version; deleting a deleted resource is harmless (204)."""
        result = resource_delete(
            resource_type=resource_type, resource_id=resource_id, context=self.write_context()
        )
        headers = version_headers(result.row) if result else {}
        if self.prefer("return") == "OperationOutcome":
            text = f"Deleted {resource_type}/{resource_id}" if result else "Already deleted"
            return fhir_http_response(render_json(information_outcome(text)), headers=headers)
        return fhir_http_response(None, status=204, headers=headers)


class VersionView(FhirView):
    """``[base]/[type]/[id]/_history/[vid]``: vread."""

    def get(
        self, request: Request, resource_type: str, resource_id: str, version_id: str
    ) -> HttpResponse:
        """One version, with the roster as it was then."""
        row = resource_vread(
            resource_type=resource_type, resource_id=resource_id, version_id=version_id
        )
        summary, elements = self.summary_params()
        return fhir_http_response(
            render_resource(row, current=False, summary=summary, elements=elements),
            headers=version_headers(row),
        )


class HistoryView(FhirView):
    """History at system, type and instance level: a history Bundle, newest first."""

    access_rule = "history"

    def get(
        self, request: Request, resource_type: str | None = None, resource_id: str | None = None
    ) -> HttpResponse:
        """One page of history."""
        params = request.query_params
        count = fhir_settings.DEFAULT_COUNT
        if "_count" in params:
            count = parse_count(params["_count"])
        page = history_page(
            resource_type=resource_type,
            resource_id=resource_id,
            since=parse_since(params.get("_since")),
            count=count,
            cursor=params.get("_cursor"),
        )
        base = base_url(request)
        path = "/".join(p for p in (resource_type, resource_id, "_history") if p)
        flat = [(k, v) for k, values in params.lists() for v in values]
        links = [{"relation": "self", "url": _page_link(request, path, flat, flat_cursor(flat))}]
        if page.next_cursor:
            links.append(
                {"relation": "next", "url": _page_link(request, path, flat, page.next_cursor)}
            )
        header = {"resourceType": "Bundle", "type": "history", "total": page.total, "link": links}

        def entries():
            for row in page.rows:
                full_url = f"{base}/{row.resource_type}/{row.resource_id}"
                method = METHOD_OF.get(row.method, "PUT")
                entry: dict[str, Any] = {
                    "fullUrl": full_url,
                    "request": {
                        "method": method,
                        "url": row.resource_type
                        if method == "POST"
                        else f"{row.resource_type}/{row.resource_id}",
                    },
                    "response": {
                        "status": "201 Created"
                        if method == "POST"
                        else ("204 No Content" if row.deleted else "200 OK"),
                        "etag": f'W/"{row.version_id}"',
                        "lastModified": format_instant(row.last_updated),
                    },
                }
                yield entry, None if row.deleted else render_resource(row, current=False)

        return fhir_http_response(bundle_body(header, entries()))


class UnknownRouteView(FhirView):
    """Any path under the FHIR base that no route matches: 404 for every method."""

    access_rule = "authenticated"

    def dispatch_unknown(self, request: Request, *args: Any, **kwargs: Any) -> HttpResponse:
        """Raise NotFound (rendered as an OperationOutcome)."""
        raise NotFound(MSG_UNKNOWN_ROUTE.format(path=request.path), detail_code="MSG_UNKNOWN_ROUTE")

    get = post = put = patch = delete = head = dispatch_unknown


class SystemView(FhirView):
    """``[base]``: search across types (GET, ``fhirservice.search.system``), and batch and
    transaction Bundles (POST; each entry is checked as itself)."""

    access_rule = "authenticated"

    def get(self, request: Request) -> HttpResponse:
        """Search of several types (``_type``) or of all: a searchset Bundle, keyset-paged."""
        flat = query_pairs(request)
        search = parse_system_search(flat, strict=self.strict())
        caller = access.current()
        for resource_type in search.types or [None]:
            require_permission(caller, resource_type, "s", "search-system")
        if search.types is None:
            # As system history: all types means every type the caller may search.
            allowed = caller.scopes.types_with("s")
            if allowed is not None:
                search.types = sorted(allowed)
        page = run_system_search(search)
        spec = search.spec
        base = base_url(request)
        header: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
        if page.total is not None:
            header["total"] = page.total
        used = [(k, v) for k, v in flat if k not in spec.ignored]
        links = [{"relation": "self", "url": _page_link(request, "", used, flat_cursor(flat))}]
        if page.next_cursor:
            links.append(
                {"relation": "next", "url": _page_link(request, "", used, page.next_cursor)}
            )
        header["link"] = links
        summary = spec.summary if spec.summary != "count" else None

        def entries():
            yield from _row_entries(page.rows, base, "match", summary, spec.elements)
            if spec.ignored:
                issues = [
                    {
                        "severity": "warning",
                        "code": "not-supported",
                        "diagnostics": f"Search parameter {name!r} was ignored",
                    }
                    for name in spec.ignored
                ]
                yield {"search": {"mode": "outcome"}}, render_json(operation_outcome(issues))

        return fhir_http_response(bundle_body(header, entries()))

    def post(self, request: Request) -> HttpResponse:
        """Run a batch or transaction Bundle."""
        header, entries = process_bundle(request._request, self.read_json())
        return fhir_http_response(bundle_body(header, entries))


class MetadataView(FhirView):
    """``[base]/metadata``: the CapabilityStatement."""

    access_rule = "public"

    def get(self, request: Request) -> HttpResponse:
        """The CapabilityStatement of this server."""
        statement = capability_statement(base_url(request), format_instant(now()))
        return fhir_http_response(render_json(statement))

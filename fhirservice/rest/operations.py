"""$operations and OperationDefinitions, served from the plug-in registry.

The routes ``[base]/$op``, ``[base]/[type]/$op`` and ``[base]/[type]/[id]/$op`` go to
:func:`operation_route`: it finds the operation an app registered
(``fhirservice.plugins.register_operation``) and hands the request to the operation's own
view or to :class:`OperationView`, which enforces the method rule (GET only for operations
without side effects and with primitive inputs, else 405), checks the Parameters against the
definition, and calls the operation's handler.

The definitions of registered operations are built in: read at
``OperationDefinition/[type]-[code]`` (``System-[code]`` at system level, e.g.
``OperationDefinition/Group-add-member``), read-only, and found by ``GET OperationDefinition``
(``_id``, ``url``, ``code``, ``name``) ahead of stored OperationDefinitions.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework.request import Request

from fhirservice.errors import MethodNotAllowed, NotFound
from fhirservice.plugins import find_operation, operation_definition, operation_definitions
from fhirservice.rest.base import FhirView, base_url, fhir_http_response
from fhirservice.rest.parameters import parse_parameters, parse_query
from fhirservice.rest.rendering import bundle_body, render_resource
from fhirservice.rest.views import InstanceView, TypeView
from fhirservice.search.query import SearchSpec
from fhirservice.search.values import normalize_string
from fhirservice.store.json import dumps
from fhirservice.store.services import check_type

MSG_UNKNOWN_OPERATION = "No operation ${code} at {where}"
MSG_GET_NOT_ALLOWED = "${code} changes state or takes complex inputs: use POST"
MSG_DEFINITION_READ_ONLY = "OperationDefinition/{id} is built in and cannot be changed"


def _level(resource_type: str | None, resource_id: str | None) -> str:
    return "instance" if resource_id else ("type" if resource_type else "system")


class OperationView(FhirView):
    """``[base]/$op``, ``[base]/[type]/$op`` and ``[base]/[type]/[id]/$op``."""

    access_rule = "operation"

    def _run(
        self,
        request: Request,
        *,
        code: str,
        resource_type: str | None,
        resource_id: str | None,
        method: str,
    ) -> HttpResponse:
        if resource_type is not None:
            check_type(resource_type)
        found = find_operation(code, resource_type, _level(resource_type, resource_id))
        if found is None or found.handler is None:
            where = "/".join(p for p in (resource_type, resource_id and "[id]") if p) or "[base]"
            raise NotFound(
                MSG_UNKNOWN_OPERATION.format(code=code, where=where),
                detail_code="MSG_OPERATION_UNKNOWN",
            )
        definition, handler = found.definition, found.handler
        if method == "GET":
            if not definition.get_allowed:
                raise MethodNotAllowed(MSG_GET_NOT_ALLOWED.format(code=code))
            values = parse_query(definition, dict(request.query_params.lists()))
        else:
            values = parse_parameters(definition, self.read_json())
        context = self.write_context()
        context.source = f"${code}"
        result = handler(values=values, resource_id=resource_id, context=context)
        if isinstance(result, list):
            return self._bundle(request, result)
        return fhir_http_response(dumps(result))

    def _bundle(self, request: Request, rows: list[Any]) -> HttpResponse:
        base = base_url(request)
        header = {"resourceType": "Bundle", "type": "searchset", "total": len(rows)}
        entries = [
            (
                {
                    "fullUrl": f"{base}/{row.resource_type}/{row.resource_id}",
                    "search": {"mode": "match"},
                },
                render_resource(row, current=True, in_bundle=True),
            )
            for row in rows
        ]
        return fhir_http_response(bundle_body(header, entries))

    def get(
        self,
        request: Request,
        code: str,
        resource_type: str | None = None,
        resource_id: str | None = None,
    ) -> HttpResponse:
        """GET (read-only operations with primitive inputs)."""
        return self._run(
            request, code=code, resource_type=resource_type, resource_id=resource_id, method="GET"
        )

    def post(
        self,
        request: Request,
        code: str,
        resource_type: str | None = None,
        resource_id: str | None = None,
    ) -> HttpResponse:
        """POST with a Parameters body."""
        return self._run(
            request, code=code, resource_type=resource_type, resource_id=resource_id, method="POST"
        )


_OPERATION_VIEW = OperationView.as_view()


@csrf_exempt
def operation_route(request: HttpRequest, **route: Any) -> HttpResponse:
    """Hand an $operation request to the registered operation's own view, or the generic one.

    csrf_exempt like every DRF view: the callers are API clients, not browser forms.
    """
    found = find_operation(
        route["code"],
        route.get("resource_type"),
        _level(route.get("resource_type"), route.get("resource_id")),
    )
    view = found.view if found is not None and found.view is not None else _OPERATION_VIEW
    return view(request, **route)


class OperationDefinitionView(InstanceView):
    """``OperationDefinition/[id]``: built-in definitions first, then the generic store."""

    access_rule = "operation-definition"
    access_resource_type = "OperationDefinition"

    def get(
        self, request: Request, resource_id: str, resource_type: str = "OperationDefinition"
    ) -> HttpResponse:
        """A built-in definition, or a stored OperationDefinition."""
        definition = operation_definition(resource_id)
        if definition is not None:
            return fhir_http_response(dumps(definition.to_resource()))
        return super().get(request, "OperationDefinition", resource_id)

    def _guard(self, resource_id: str) -> None:
        if operation_definition(resource_id) is not None:
            raise MethodNotAllowed(MSG_DEFINITION_READ_ONLY.format(id=resource_id))

    def put(
        self, request: Request, resource_id: str, resource_type: str = "OperationDefinition"
    ) -> HttpResponse:
        """Store an OperationDefinition (not over a built-in one)."""
        self._guard(resource_id)
        return super().put(request, "OperationDefinition", resource_id)

    def patch(
        self, request: Request, resource_id: str, resource_type: str = "OperationDefinition"
    ) -> HttpResponse:
        """Patch a stored OperationDefinition (not a built-in one)."""
        self._guard(resource_id)
        return super().patch(request, "OperationDefinition", resource_id)

    def delete(
        self, request: Request, resource_id: str, resource_type: str = "OperationDefinition"
    ) -> HttpResponse:
        """Delete a stored OperationDefinition (not a built-in one)."""
        self._guard(resource_id)
        return super().delete(request, "OperationDefinition", resource_id)


def _matches(resource: dict[str, Any], name_mod: str, raw: str) -> bool:
    """Whether a built-in definition matches one search parameter (any of its values)."""
    name, _, modifier = name_mod.partition(":")
    values = raw.split(",")
    if name in ("_id", "url") and not modifier:
        return resource["id" if name == "_id" else "url"] in values
    if name == "code" and not modifier:
        # token: "code" or "|code" (OperationDefinition.code has no system)
        return any(v.rpartition("|")[::2] == ("", resource["code"]) for v in values)
    if name == "name":
        have = normalize_string(resource["name"])
        if modifier == "exact":
            return resource["name"] in values
        if modifier == "contains":
            return any(normalize_string(v) in have for v in values)
        if not modifier:
            return any(have.startswith(normalize_string(v)) for v in values)
    return False  # a parameter or modifier built-in definitions are not searched by


class OperationDefinitionSearchView(TypeView):
    """``GET OperationDefinition``: the built-in definitions that match, then stored ones."""

    def built_in_matches(self, spec: SearchSpec) -> list[dict[str, Any]]:
        """Built-in definitions matching every search parameter (``_id``, ``url``, ``code``,
        ``name``; none given: all of them)."""
        resources = [definition.to_resource() for definition in operation_definitions()]
        return [r for r in resources if all(_matches(r, k, v) for k, v in spec.used)]

"""The one view behind every $operation, and the OperationDefinition reads.

It finds the operation for the route (system, type or instance level), enforces the method
rule (GET only for operations without side effects and with primitive inputs, else 405),
checks the Parameters against the definition, and calls the operation's handler.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse
from rest_framework.request import Request

from fhirservice.errors import MethodNotAllowed, NotFound
from fhirservice.rest.base import FhirView, base_url, fhir_http_response
from fhirservice.rest.rendering import bundle_body, render_resource
from fhirservice.rest.views import InstanceView
from fhirservice.store.json import dumps
from fhirservice.store.services import check_type
from operations.parameters import parse_parameters, parse_query
from operations.registry import DEFINITIONS, find

MSG_UNKNOWN_OPERATION = "No operation ${code} at {where}"
MSG_GET_NOT_ALLOWED = "${code} changes state or takes complex inputs: use POST"
MSG_DEFINITION_READ_ONLY = "OperationDefinition/{id} is built in and cannot be changed"


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
        level = "instance" if resource_id else ("type" if resource_type else "system")
        found = find(code, resource_type, level)
        if found is None:
            where = "/".join(p for p in (resource_type, resource_id and "[id]") if p) or "[base]"
            raise NotFound(
                MSG_UNKNOWN_OPERATION.format(code=code, where=where),
                detail_code="MSG_OPERATION_UNKNOWN",
            )
        definition, handler = found
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


class OperationDefinitionView(InstanceView):
    """``OperationDefinition/[id]``: built-in definitions first, then the generic store."""

    access_rule = "operation-definition"
    access_resource_type = "OperationDefinition"

    def get(
        self, request: Request, resource_id: str, resource_type: str = "OperationDefinition"
    ) -> HttpResponse:
        """A built-in definition, or a stored OperationDefinition."""
        definition = DEFINITIONS.get(resource_id)
        if definition is not None:
            return fhir_http_response(dumps(definition.to_resource()))
        return super().get(request, "OperationDefinition", resource_id)

    def _guard(self, resource_id: str) -> None:
        if resource_id in DEFINITIONS:
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

"""Django's 404/500 handlers: OperationOutcomes under the FHIR base, plain pages elsewhere."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views import defaults

from fhirservice.conf import fhir_settings
from fhirservice.errors import FhirError, NotFound
from fhirservice.rest.base import fhir_http_response
from fhirservice.store.json import dumps


def _is_fhir(request: HttpRequest) -> bool:
    return request.path.startswith(f"/{fhir_settings.BASE_PATH}")


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """404 handler."""
    if _is_fhir(request):
        error = NotFound(f"No FHIR endpoint at {request.path}", detail_code="MSG_UNKNOWN_ROUTE")
        return fhir_http_response(dumps(error.outcome()), status=404)
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    """500 handler: never a stack trace."""
    if _is_fhir(request):
        return fhir_http_response(dumps(FhirError().outcome()), status=500)
    return defaults.server_error(request)

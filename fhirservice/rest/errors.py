"""Django's 400/404/500 handlers: OperationOutcomes under the FHIR base, plain pages elsewhere
(except a bad Host header, answered with an OperationOutcome on every path)."""

from __future__ import annotations

from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse
from django.views import defaults

from fhirservice.conf import fhir_settings
from fhirservice.errors import BadRequest, FhirError, NotFound
from fhirservice.rest.base import fhir_http_response
from fhirservice.store.json import dumps


def _is_fhir(request: HttpRequest) -> bool:
    return request.path.startswith(f"/{fhir_settings.BASE_PATH}")


MSG_BAD_HOST = "The Host header names a host this server does not serve (ALLOWED_HOSTS)"
MSG_BAD_REQUEST = "The request could not be read"


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """400 handler (Django's answer to a SuspiciousOperation, e.g. a bad Host header)."""
    if isinstance(exception, DisallowedHost):
        error = BadRequest(MSG_BAD_HOST, detail_code="MSG_BAD_HOST")
    elif _is_fhir(request):
        error = BadRequest(MSG_BAD_REQUEST, detail_code="MSG_HTTP_400")
    else:
        return defaults.bad_request(request, exception)
    return fhir_http_response(dumps(error.outcome()), status=400)


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

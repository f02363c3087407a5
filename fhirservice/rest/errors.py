"""Django's 400/404/500 handlers: OperationOutcomes under the FHIR base, plain pages elsewhere
(except a bad Host header and a store that cannot serve, answered with an OperationOutcome on
every path).

The 500 handler sees what failed outside the REST views' own error handling: in a middleware
(a session, a throttle's shared cache), in a plain Django view (``/metrics``, the token
endpoint, the admin). A store that is down there is a 503 too, as in the views, and a
transaction the store aborted as a lost race a 409.
"""

from __future__ import annotations

import sys

from django.core.exceptions import DisallowedHost
from django.http import HttpRequest, HttpResponse
from django.views import defaults

from fhirservice.conf import fhir_settings
from fhirservice.errors import BadRequest, FhirError, NotFound, store_error
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
    """500 handler: never a stack trace; a 503 when a store cannot serve, a 409 when the
    store aborted a lost race (Django calls it while handling the exception)."""
    exc = sys.exc_info()[1]
    error = store_error(exc) if exc is not None else None
    if error is not None:
        return fhir_http_response(
            dumps(error.outcome()), status=error.status, headers=error.headers
        )
    if _is_fhir(request):
        return fhir_http_response(dumps(FhirError().outcome()), status=500)
    return defaults.server_error(request)

"""Request-scoped middleware of the FHIR core."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9\-_.]{1,64}")


class RequestIdMiddleware:
    """Give every request an id (the client's X-Request-ID when well-formed) and echo it.

    The id is stored on every version and member event, so a client's log line can be
    matched to what the server did.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Set ``request.request_id`` and the X-Request-ID response header."""
        given = request.META.get("HTTP_X_REQUEST_ID", "")
        request.request_id = given if REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
        response = self.get_response(request)
        response["X-Request-ID"] = request.request_id
        return response

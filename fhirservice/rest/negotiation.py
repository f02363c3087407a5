"""Content negotiation: JSON in all its FHIR spellings; anything else (XML, …) is 406."""

from __future__ import annotations

from typing import Any

from rest_framework.negotiation import BaseContentNegotiation

from fhirservice.errors import NotAcceptable

JSON_TYPES = {
    "application/fhir+json",
    "application/json",
    "application/json+fhir",
    "json",
    "*/*",
    "application/*",
    "text/html",
    "text/plain",
    "text/*",
}


def _media_types(header: str) -> list[str]:
    return [part.split(";")[0].strip().lower() for part in header.split(",") if part.strip()]


class FhirContentNegotiation(BaseContentNegotiation):
    """Pick the FHIR JSON renderer unless the client accepts no JSON at all."""

    def select_parser(self, request: Any, parsers: list[Any]) -> Any:
        """Bodies are read by the views themselves (see FhirView.read_json)."""
        return None

    def select_renderer(self, request: Any, renderers: list[Any], format_suffix: str | None = None):
        """The renderer and media type for the response."""
        renderer = renderers[0]
        wanted = request.query_params.get("_format")
        if wanted is not None:
            if wanted.lower() not in JSON_TYPES:
                raise NotAcceptable(f"_format={wanted} is not supported; use json")
            return renderer, renderer.media_type
        accepted = _media_types(request.META.get("HTTP_ACCEPT", "") or "*/*")
        if not any(t in JSON_TYPES for t in accepted):
            raise NotAcceptable(f"Cannot produce {', '.join(accepted)}; use application/fhir+json")
        return renderer, renderer.media_type

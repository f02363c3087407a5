"""DRF's renderers of FHIR bodies (the error answers): JSON with orjson, and XML.

Pre-encoded JSON bodies pass through the JSON renderer; both follow ``_pretty``.
"""

from __future__ import annotations

from typing import Any

import orjson
from rest_framework.renderers import BaseRenderer

from fhirservice.fhir.xml import resource_to_xml
from fhirservice.rest.negotiation import FHIR_JSON, FHIR_XML, current_format


class FhirJsonRenderer(BaseRenderer):
    """Renders dicts as FHIR JSON; bytes (stored resource text) are sent unchanged."""

    media_type = FHIR_JSON
    format = "json"
    charset = "utf-8"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: dict[str, Any] | None = None,
    ) -> bytes:
        """Encode ``data``; None renders as an empty body."""
        if data is None:
            return b""
        if current_format().pretty:
            value = orjson.loads(data) if isinstance(data, bytes | bytearray) else data
            return orjson.dumps(value, option=orjson.OPT_INDENT_2)
        if isinstance(data, bytes | bytearray):
            return bytes(data)
        return orjson.dumps(data)


class FhirXmlRenderer(BaseRenderer):
    """Renders resources (dicts, or JSON bytes) as FHIR XML."""

    media_type = FHIR_XML
    format = "xml"
    charset = "utf-8"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: dict[str, Any] | None = None,
    ) -> bytes:
        """Encode ``data``; None renders as an empty body."""
        if data is None:
            return b""
        value = orjson.loads(data) if isinstance(data, bytes | bytearray) else data
        return resource_to_xml(value, pretty=current_format().pretty)

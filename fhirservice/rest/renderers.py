"""The one renderer: FHIR JSON, encoded with orjson. Pre-encoded bodies pass through."""

from __future__ import annotations

from typing import Any

import orjson
from rest_framework.renderers import BaseRenderer

FHIR_JSON = "application/fhir+json"


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
        if isinstance(data, bytes | bytearray):
            return bytes(data)
        return orjson.dumps(data)

"""The kick-off parameters of ``$export`` (Bulk Data Access IG 2.0.0), read and checked.

``GET`` takes them from the query, ``POST`` from a Parameters body; both become one
:class:`ExportRequest`, which the job keeps as JSON. Every check here runs at kick-off, so a
request the worker could not run answers 400 at once instead of becoming a failed job.
Unsupported parameters and values answer 400 unless ``Prefer: handling=lenient``, which
drops them (the IG's rule).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from fhirservice.errors import BadRequest
from fhirservice.fhir.resource_types import is_resource_type
from fhirservice.search.query import parse_search
from fhirservice.search.values import date_range

OUTPUT_FORMATS = {"application/fhir+ndjson", "application/ndjson", "ndjson"}
# Accepted and without effect on an export (the status and files are not rendered by them).
IGNORED = {"_format", "_pretty"}
KNOWN = {
    "_outputFormat",
    "_since",
    "_until",
    "_type",
    "_elements",
    "_typeFilter",
    "patient",
    "includeAssociatedData",
}
ELEMENT_RE = re.compile(r"(?:([A-Z][A-Za-z]+)\.)?([a-z][A-Za-z0-9]*)")
# Several _typeFilter queries in one value: a comma starts a new one only before "Type?".
TYPE_FILTER_SPLIT = re.compile(r",(?=[A-Z][A-Za-z]+\?)")
PATIENT_REF_RE = re.compile(r"Patient/([A-Za-z0-9\-.]{1,64})")

MSG_UNKNOWN_PARAM = "$export does not support the parameter {name!r}"
MSG_BAD_VALUE = "Bad value for {name}: {value!r}"
MSG_OUTPUT_FORMAT = "_outputFormat {value!r} is not supported; use application/fhir+ndjson"
MSG_UNKNOWN_TYPE = "_type names an unknown resource type: {value!r}"
MSG_TYPE_FILTER = "_typeFilter must be Type?query: {value!r}"
MSG_TYPE_FILTER_TYPE = "_typeFilter on {type}, which _type does not include"
MSG_ASSOCIATED_DATA = "includeAssociatedData is not supported"
MSG_PATIENT_AT_SYSTEM = "patient applies to Patient and Group exports only"
MSG_PATIENT_REF = "patient must reference a Patient (Patient/id): {value!r}"
MSG_NOT_PARAMETERS = "The body must be a Parameters resource"
MSG_UNTIL_BEFORE_SINCE = "_until is before _since"


@dataclass
class ExportRequest:
    """What one export is asked for, checked."""

    output_format: str = "application/fhir+ndjson"
    since: datetime | None = None
    until: datetime | None = None
    types: list[str] | None = None
    elements: list[str] | None = None
    type_filters: dict[str, list[str]] = field(default_factory=dict)
    patients: list[str] | None = None

    def as_json(self) -> dict[str, Any]:
        """The request as JSON (the job's ``params``)."""
        out = asdict(self)
        for name in ("since", "until"):
            out[name] = out[name].isoformat() if out[name] else None
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportRequest:
        """The request a job keeps."""
        values = dict(data)
        for name in ("since", "until"):
            values[name] = datetime.fromisoformat(values[name]) if values[name] else None
        return cls(**values)

    def elements_for(self, resource_type: str) -> list[str] | None:
        """The ``_elements`` that apply to one type (None: the whole resource)."""
        if self.elements is None:
            return None
        mine = []
        for item in self.elements:
            match = ELEMENT_RE.fullmatch(item)
            if match and match.group(1) in (None, resource_type):
                mine.append(match.group(2))
        return mine or None


def query_pairs(query: dict[str, list[str]]) -> list[tuple[str, str]]:
    """The kick-off parameters of a GET."""
    return [(name, value) for name, values in query.items() for value in values]


def _value(item: dict[str, Any]) -> str:
    for name, value in item.items():
        if name == "valueReference" and isinstance(value, dict):
            return str(value.get("reference", ""))
        if name.startswith("value"):
            return str(value).lower() if isinstance(value, bool) else str(value)
    raise BadRequest(
        MSG_BAD_VALUE.format(name=item.get("name"), value=item), detail_code="MSG_PARAM_INVALID"
    )


def body_pairs(body: Any) -> list[tuple[str, str]]:
    """The kick-off parameters of a POST (a Parameters resource)."""
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise BadRequest(MSG_NOT_PARAMETERS, detail_code="MSG_PARAM_INVALID")
    pairs = []
    for item in body.get("parameter", []):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(MSG_NOT_PARAMETERS, detail_code="MSG_PARAM_INVALID")
        pairs.append((item["name"], _value(item)))
    return pairs


def _instant(name: str, raw: str) -> datetime:
    covered = date_range(raw)
    if covered is None:
        raise BadRequest(
            MSG_BAD_VALUE.format(name=name, value=raw), detail_code="MSG_PARAM_INVALID"
        )
    return covered[0]


def parse_export(pairs: list[tuple[str, str]], *, level: str, lenient: bool) -> ExportRequest:
    """Check the kick-off parameters (400 on what cannot be honoured, unless ``lenient``)."""
    request = ExportRequest()
    filters: list[str] = []

    def refuse(message: str) -> None:
        if not lenient:
            raise BadRequest(message, detail_code="MSG_PARAM_INVALID")

    for name, raw in pairs:
        if name in IGNORED:
            continue
        if name not in KNOWN:
            refuse(MSG_UNKNOWN_PARAM.format(name=name))
        elif name == "_outputFormat":
            if raw not in OUTPUT_FORMATS:
                raise BadRequest(
                    MSG_OUTPUT_FORMAT.format(value=raw), detail_code="MSG_PARAM_INVALID"
                )
        elif name in ("_since", "_until"):
            setattr(request, name[1:], _instant(name, raw))
        elif name == "_type":
            for item in (part.strip() for part in raw.split(",") if part.strip()):
                if is_resource_type(item):
                    request.types = [*(request.types or []), item]
                else:
                    refuse(MSG_UNKNOWN_TYPE.format(value=item))
        elif name == "_elements":
            for item in (part.strip() for part in raw.split(",") if part.strip()):
                if ELEMENT_RE.fullmatch(item):
                    request.elements = [*(request.elements or []), item]
                else:
                    refuse(MSG_BAD_VALUE.format(name=name, value=item))
        elif name == "_typeFilter":
            filters.extend(TYPE_FILTER_SPLIT.split(raw))
        elif name == "patient":
            if level == "system":
                raise BadRequest(MSG_PATIENT_AT_SYSTEM, detail_code="MSG_PARAM_INVALID")
            for item in (part.strip() for part in raw.split(",") if part.strip()):
                match = PATIENT_REF_RE.fullmatch(item)
                if match is None:
                    raise BadRequest(
                        MSG_PATIENT_REF.format(value=item), detail_code="MSG_PARAM_INVALID"
                    )
                request.patients = [*(request.patients or []), match.group(1)]
        elif name == "includeAssociatedData":
            refuse(MSG_ASSOCIATED_DATA)
    if request.since and request.until and request.until < request.since:
        raise BadRequest(MSG_UNTIL_BEFORE_SINCE, detail_code="MSG_PARAM_INVALID")
    for raw in filters:
        resource_type, mark, query = raw.partition("?")
        if not mark or not is_resource_type(resource_type):
            raise BadRequest(MSG_TYPE_FILTER.format(value=raw), detail_code="MSG_PARAM_INVALID")
        if request.types is not None and resource_type not in request.types:
            raise BadRequest(
                MSG_TYPE_FILTER_TYPE.format(type=resource_type), detail_code="MSG_PARAM_INVALID"
            )
        # The service's own search checks the query (unknown parameters and bad values: 400);
        # the worker runs it through the same entry point (search_keys).
        parse_search(resource_type, parse_qsl(query, keep_blank_values=True), strict=True)
        request.type_filters.setdefault(resource_type, []).append(query)
    return request

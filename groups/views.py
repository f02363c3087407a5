"""``GET [base]/Group/{id}/$members``: the roster page by page.

Answer: a ``Parameters`` resource, one ``member`` parameter per member (parts ``entity``,
``period``, ``inactive``), then ``groupVersion``, ``quantity`` and, when more members follow,
``next`` (the URL of the next page). The cursor is the last member reference served: pages
follow the roster's reference order, so members added or removed by concurrent writes never
make a page repeat or skip a member that stayed in the roster.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlencode

from django.http import HttpResponse
from rest_framework.request import Request

from fhirservice.errors import BadRequest
from fhirservice.fhir.operation_definition import OperationDef, ParamDef
from fhirservice.rest.base import FhirView, base_url, fhir_http_response, version_headers
from fhirservice.store.json import dumps, loads
from fhirservice.store.selectors import resource_read, resource_vread
from groups.repository import MemberState
from groups.storage import roster_storage

OPERATION = OperationDef(
    code="members",
    resource="Group",
    instance=True,
    affects_state=False,
    title="Members",
    description="The roster page by page (GET): Parameters with one member parameter per "
    "member (parts entity, period, inactive), groupVersion, quantity and next.",
    parameters=(
        ParamDef(
            "_count",
            "in",
            0,
            "1",
            "integer",
            "Page size (default 1000, at most 10000; 0: no member, only quantity)",
        ),
        ParamDef("_cursor", "in", 0, "1", "string", "The cursor of the next link"),
        ParamDef("active", "in", 0, "1", "boolean", "Only active (true) or inactive (false)"),
        ParamDef("version", "in", 0, "1", "string", "The roster as of this Group version"),
        ParamDef("return", "out", 1, "1", "Parameters", "One page of the roster"),
    ),
)

DEFAULT_PAGE = 1000
MAX_PAGE = 10_000
MSG_BAD_PARAM = "Bad value for {name}: {value!r}"


def _member_parameter(state: MemberState) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"name": "entity", "valueReference": {"reference": state.ref}}]
    period = {k: v for k, v in (("start", state.period_start), ("end", state.period_end)) if v}
    if period:
        parts.append({"name": "period", "valuePeriod": period})
    parts.append({"name": "inactive", "valueBoolean": state.inactive})
    return {"name": "member", "part": parts}


def _cursor(ref: str) -> str:
    return base64.urlsafe_b64encode(ref.encode()).decode().rstrip("=")


def _after(raw: str | None) -> str:
    if not raw:
        return ""
    try:
        # validate: the lenient decoder drops foreign characters, so a mangled cursor would
        # silently restart the roster from its first page.
        padded = raw + "=" * (-len(raw) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(
            MSG_BAD_PARAM.format(name="_cursor", value=raw), detail_code="MSG_PARAM_INVALID"
        ) from exc


class GroupMembersView(FhirView):
    """The paged roster of a Group, optionally as of a version and filtered by activity."""

    access_rule = "operation"

    def get(self, request: Request, resource_id: str, **route: str) -> HttpResponse:
        """One page of members (``route``: the code and type the operation route matched)."""
        params = request.query_params
        count = self._int(params.get("_count"), "_count", DEFAULT_PAGE)
        count = min(count, MAX_PAGE)
        active = {"true": True, "false": False, None: None}.get(params.get("active"), "bad")
        if active == "bad":
            raise BadRequest(
                MSG_BAD_PARAM.format(name="active", value=params.get("active")),
                detail_code="MSG_PARAM_INVALID",
            )
        version = params.get("version")
        if version is None:
            row = resource_read(resource_type="Group", resource_id=resource_id)
            as_of = None
        else:
            row = resource_vread(resource_type="Group", resource_id=resource_id, version_id=version)
            as_of = row.version_id
        after = _after(params.get("_cursor"))
        # _count=0 asks for the total alone (as on searches): no roster read, no next link.
        page = roster_storage().page(
            row, after=after, count=count + 1 if count else 0, as_of=as_of, active=active
        )
        parameters = [_member_parameter(state) for state in page[:count]]
        parameters.append({"name": "groupVersion", "valueString": str(row.version_id)})
        parameters.append({"name": "quantity", "valueInteger": loads(row.body).get("quantity", 0)})
        if len(page) > count:
            query = [(k, v) for k, v in params.items() if k != "_cursor"]
            query.append(("_cursor", _cursor(page[count - 1].ref)))
            url = f"{base_url(request)}/Group/{resource_id}/$members?{urlencode(query)}"
            parameters.append({"name": "next", "valueUri": url})
        body = {"resourceType": "Parameters", "parameter": parameters}
        return fhir_http_response(dumps(body), headers=version_headers(row))

    @staticmethod
    def _int(raw: str | None, name: str, default: int) -> int:
        if raw is None:
            return default
        if not raw.isdigit():
            raise BadRequest(
                MSG_BAD_PARAM.format(name=name, value=raw), detail_code="MSG_PARAM_INVALID"
            )
        return int(raw)

"""``$export`` over HTTP: kick-off, status (and cancel), file download.

- Kick-off: ``GET``/``POST [base]/$export``, ``[base]/Patient/$export``,
  ``[base]/Group/{id}/$export`` → 202 with ``Content-Location`` (the status URL).
- Status: ``GET [base]/$export-poll-status?_jobId=…`` → 202 (``X-Progress``,
  ``Retry-After``) while queued or running, the failure's 4xx/5xx OperationOutcome, or 200
  with the manifest (``Expires``); ``DELETE`` cancels (202), after which it answers 404.
- Files: ``GET [base]/$export-file?_jobId=…&_file=…`` streams one NDJSON part.

With access control on, status and files answer only the client that kicked the export off
(anyone else: 404), and every export reads within that client's organization boundary and
the types its scopes may read.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpResponse, StreamingHttpResponse
from django.utils.http import http_date
from rest_framework.request import Request

from fhirservice.access import Access
from fhirservice.conf import fhir_settings
from fhirservice.errors import BadRequest, Forbidden, information_outcome
from fhirservice.fhir.operation_definition import OperationDef, ParamDef
from fhirservice.rest.base import FhirView, base_url, fhir_http_response
from fhirservice.store.json import dumps
from fhirservice.store.selectors import resource_read
from operations.export.compartment import patient_compartment
from operations.export.models import ExportJob
from operations.export.parameters import (
    ExportRequest,
    body_pairs,
    parse_export,
    query_pairs,
)
from operations.export.selectors import export_file_get, export_job_get, export_manifest
from operations.export.services import export_job_cancel, export_job_create, export_storage

BULK_DATA = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition"
NDJSON = "application/fhir+ndjson"

_KICKOFF_PARAMS = (
    ParamDef("_outputFormat", "in", 0, "1", "string", "application/fhir+ndjson (the default)"),
    ParamDef("_since", "in", 0, "1", "instant", "Only resources changed since then"),
    ParamDef("_until", "in", 0, "1", "instant", "Only resources changed until then"),
    ParamDef("_type", "in", 0, "*", "string", "Resource types to export (comma-separated)"),
    ParamDef("_elements", "in", 0, "*", "string", "Elements to keep ([Type.]element)"),
    ParamDef("_typeFilter", "in", 0, "*", "string", "Type?search-query; several: any of them"),
    ParamDef("includeAssociatedData", "in", 0, "*", "code", "Not supported: 400 unless lenient"),
)
_PATIENT_PARAM = ParamDef(
    "patient", "in", 0, "*", "Reference", "Only these Patients", target=("Patient",)
)

SYSTEM_EXPORT = OperationDef(
    code="export",
    resource=None,
    system=True,
    affects_state=False,
    title="Export",
    description="FHIR Bulk Data system export: NDJSON files of every type the client may read.",
    parameters=_KICKOFF_PARAMS,
    canonical=f"{BULK_DATA}/export",
)
PATIENT_EXPORT = OperationDef(
    code="export",
    resource="Patient",
    type=True,
    affects_state=False,
    title="Patient export",
    description="FHIR Bulk Data Patient export: every Patient and their compartments' data.",
    parameters=(*_KICKOFF_PARAMS, _PATIENT_PARAM),
    canonical=f"{BULK_DATA}/patient-export",
)
GROUP_EXPORT = OperationDef(
    code="export",
    resource="Group",
    instance=True,
    affects_state=False,
    title="Group export",
    description="FHIR Bulk Data Group export: the Group's active Patient members as of the "
    "kick-off and their compartments' data; with _since, all data of members who joined "
    "after it.",
    parameters=(*_KICKOFF_PARAMS, _PATIENT_PARAM),
    canonical=f"{BULK_DATA}/group-export",
)
POLL_STATUS = OperationDef(
    code="export-poll-status",
    resource=None,
    system=True,
    affects_state=False,
    title="Export poll status",
    description="The status of an export (GET: 202 in progress, 200 manifest, or the error) "
    "and its cancellation (DELETE).",
    parameters=(ParamDef("_jobId", "in", 1, "1", "string", "The export job"),),
)
EXPORT_FILE = OperationDef(
    code="export-file",
    resource=None,
    system=True,
    affects_state=False,
    title="Export file",
    description="One NDJSON file of a completed export (application/fhir+ndjson).",
    parameters=(
        ParamDef("_jobId", "in", 1, "1", "string", "The export job"),
        ParamDef("_file", "in", 1, "1", "string", "The file name"),
    ),
)

MSG_ACCEPT = "$export needs Accept: application/fhir+json"
MSG_RESPOND_ASYNC = "$export needs Prefer: respond-async"
MSG_TYPE_OUTSIDE = "{type} is not in the Patient compartment; a {level} export cannot give it"
MSG_TYPE_FORBIDDEN = "The token's scopes do not allow reading {types}"
MSG_JOB_PARAM = "Give the export with _jobId"
MSG_IN_PROGRESS = "Export {state}"
MSG_CANCELLED = "Export {id} cancelled"
MSG_QUEUED = "Export queued: poll {location}"
MSG_TYPE_FILTER_AS_OF = (
    "_typeFilter reads the current search index: resources are written as of "
    "transactionTime, and one changed after it is filtered on its current state; the "
    "manifest's error files list each such resource"
)


class ExportBaseView(FhirView):
    """The export views' shared parts: operation access rule, lenient negotiation."""

    access_rule = "operation"

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        """Our own rules apply (kick-off: 400 on a wrong Accept; files: NDJSON): never 406."""
        return self.renderer_classes[0](), self.renderer_classes[0].media_type

    def job(self) -> ExportJob:
        """The job ``_jobId`` names (404 when unknown, cancelled or another client's)."""
        job_id = self.request.query_params.get("_jobId")
        if not job_id:
            raise BadRequest(MSG_JOB_PARAM, detail_code="MSG_PARAM_INVALID")
        return export_job_get(job_id=job_id, access=self.request.access)


class KickOffView(ExportBaseView):
    """``$export`` at system, Patient and Group level."""

    def get(self, request: Request, resource_id: str | None = None, **route: Any) -> HttpResponse:
        """Kick-off with query parameters."""
        return self._kick_off(query_pairs(dict(request.query_params.lists())), route, resource_id)

    def post(self, request: Request, resource_id: str | None = None, **route: Any) -> HttpResponse:
        """Kick-off with a Parameters body."""
        return self._kick_off(body_pairs(self.read_json()), route, resource_id)

    def _kick_off(
        self, pairs: list[tuple[str, str]], route: dict[str, Any], resource_id: str | None
    ) -> HttpResponse:
        lenient = self.prefer("handling") == "lenient"
        accept = self.request.META.get("HTTP_ACCEPT", "")
        if "application/fhir+json" not in accept and not lenient:
            raise BadRequest(MSG_ACCEPT, detail_code="MSG_EXPORT_HEADERS")
        if self.prefer("respond-async") is None and not lenient:
            raise BadRequest(MSG_RESPOND_ASYNC, detail_code="MSG_EXPORT_HEADERS")
        resource_type = route.get("resource_type")
        level = {None: "system", "Patient": "patient", "Group": "group"}[resource_type]
        request = parse_export(pairs, level=level, lenient=lenient)
        access: Access = self.request.access
        request.types = _types(request, level=level, access=access, lenient=lenient)
        group_version = None
        if level == "group":
            group_version = resource_read(resource_type="Group", resource_id=resource_id).version_id
        job = export_job_create(
            access=access,
            level=level,
            request_url=self.request.build_absolute_uri(),
            request=request,
            group_id=resource_id or "",
            group_version=group_version,
        )
        location = f"{base_url(self.request)}/$export-poll-status?_jobId={job.pk}"
        outcome = information_outcome(MSG_QUEUED.format(location=location))
        if request.type_filters:
            outcome["issue"].append(information_outcome(MSG_TYPE_FILTER_AS_OF)["issue"][0])
        return fhir_http_response(
            dumps(outcome),
            status=202,
            headers={"Content-Location": location},
        )


def _types(
    request: ExportRequest, *, level: str, access: Access, lenient: bool
) -> list[str] | None:
    """The types the job writes: those asked for (or all), that the level can give and the
    scopes allow reading. None: every type present (a system export with ``system/*.r``)."""
    readable = access.scopes.types_with("r")
    if level == "system":
        wanted = request.types
        if wanted is None:
            return None if readable is None else sorted(readable)
    else:
        offered = sorted({"Patient", *patient_compartment()})
        wanted = request.types if request.types is not None else offered
        outside = [t for t in wanted if t not in offered]
        if outside and not lenient:
            raise BadRequest(
                MSG_TYPE_OUTSIDE.format(type=outside[0], level=level),
                detail_code="MSG_PARAM_INVALID",
            )
        wanted = [t for t in wanted if t in offered]
    if readable is None:
        return sorted(set(wanted))
    forbidden = sorted(set(wanted) - readable)
    if forbidden and request.types is not None:
        raise Forbidden(MSG_TYPE_FORBIDDEN.format(types=", ".join(forbidden)))
    return sorted(set(wanted) & readable)


class StatusView(ExportBaseView):
    """The status location: poll (GET) and cancel (DELETE)."""

    def get(self, request: Request, **route: Any) -> HttpResponse:
        """202 while running, the error when failed, 200 with the manifest when complete."""
        job = self.job()
        if job.state in (ExportJob.State.QUEUED, ExportJob.State.RUNNING):
            progress = job.progress or job.state
            return HttpResponse(
                status=202,
                headers={
                    "X-Progress": progress,
                    "Retry-After": str(int(fhir_settings.EXPORT_POLL_SECONDS)),
                },
            )
        expires = {"Expires": http_date(job.expires.timestamp())} if job.expires else {}
        if job.state == ExportJob.State.FAILED:
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "exception", "diagnostics": job.error}],
            }
            return fhir_http_response(
                dumps(outcome), status=job.error_status or 500, headers=expires
            )
        manifest = export_manifest(job=job, base=base_url(request))
        return HttpResponse(dumps(manifest), content_type="application/json", headers=expires)

    def delete(self, request: Request, **route: Any) -> HttpResponse:
        """Cancel the export (202); its files are deleted, its status then answers 404."""
        job = self.job()
        export_job_cancel(job=job)
        return fhir_http_response(
            dumps(information_outcome(MSG_CANCELLED.format(id=job.pk))), status=202
        )


class FileView(ExportBaseView):
    """One NDJSON file of a completed export, streamed from the exports storage."""

    def get(self, request: Request, **route: Any) -> HttpResponse:
        """The file (404 unless it is in the manifest of the caller's completed export)."""
        job = self.job()
        record = export_file_get(job=job, name=request.query_params.get("_file", ""))
        handle = export_storage().open(record.id, "rb")
        response = StreamingHttpResponse(_chunks(handle), content_type=NDJSON)
        response["Content-Length"] = str(record.size)
        return response


def _chunks(handle: Any, size: int = 1 << 20) -> Any:
    with handle:
        while chunk := handle.read(size):
            yield chunk

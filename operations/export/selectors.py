"""Reads of export jobs: the job a poll or download names, and the completion manifest."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fhirservice.access import Access
from fhirservice.conf import fhir_settings
from fhirservice.errors import NotFound
from operations.export.models import ExportFile, ExportJob

MSG_NO_JOB = "No export job {id!r}"
MSG_NO_FILE = "No file {name!r} in export {id!r}"


def export_job_get(*, job_id: str, access: Access) -> ExportJob:
    """A job the caller may see: not cancelled, and (access control on) its own client's.
    Anything else answers 404, so job ids do not leak between clients."""
    job = ExportJob.objects.filter(pk=job_id).first()
    if (
        job is None
        or job.state == ExportJob.State.CANCELLED
        or (fhir_settings.AUTH and job.client_id != access.client_id)
    ):
        raise NotFound(MSG_NO_JOB.format(id=job_id), detail_code="MSG_EXPORT_UNKNOWN")
    return job


def export_file_get(*, job: ExportJob, name: str) -> ExportFile:
    """One file of a completed job's manifest."""
    record = ExportFile.objects.filter(job=job, attempt=job.attempt, name=name).first()
    if record is None or job.state != ExportJob.State.COMPLETED:
        raise NotFound(MSG_NO_FILE.format(name=name, id=job.pk), detail_code="MSG_EXPORT_UNKNOWN")
    return record


def file_url(base: str, job: ExportJob, name: str) -> str:
    """The download URL of a file."""
    return f"{base}/$export-file?{urlencode({'_jobId': job.pk, '_file': name})}"


def export_manifest(*, job: ExportJob, base: str) -> dict[str, Any]:
    """The completion manifest (Bulk Data IG 2.0.0): one entry per file, in type order."""
    files = ExportFile.objects.filter(job=job, attempt=job.attempt).order_by("resource_type", "id")
    entries: dict[str, list[dict[str, Any]]] = {kind: [] for kind in ExportFile.Kind.values}
    for record in sorted(files, key=lambda f: (f.resource_type, _part_number(f.name))):
        entries[record.kind].append(
            {
                "type": record.resource_type,
                "url": file_url(base, job, record.name),
                "count": record.count,
            }
        )
    manifest: dict[str, Any] = {
        "transactionTime": job.transaction_time.isoformat().replace("+00:00", "Z"),
        "request": job.request_url,
        "requiresAccessToken": bool(fhir_settings.AUTH),
        "output": entries[ExportFile.Kind.OUTPUT],
        "error": entries[ExportFile.Kind.ERROR],
    }
    if job.params.get("since"):
        manifest["deleted"] = entries[ExportFile.Kind.DELETED]
    return manifest


def _part_number(name: str) -> int:
    number = name.rsplit(".", 2)[-2]
    return int(number) if number.isdigit() else 0

"""Writes of export jobs: create (with the per-client limit), claim, report, finish, cancel,
expire. Every state change is a compare-and-set (an ``UPDATE … WHERE``), so two workers, or a
worker and a cancelling client, never both win (docs/adr/0008-export-jobs.md).
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from django.core.files.storage import Storage, storages
from django.db.models import Q
from django.utils import timezone

from fhirservice.access import Access
from fhirservice.conf import fhir_settings
from fhirservice.errors import FhirError
from operations.export.models import ExportFile, ExportJob
from operations.export.parameters import ExportRequest

logger = logging.getLogger(__name__)

STORAGE_ALIAS = "exports"
ACTIVE = (ExportJob.State.QUEUED, ExportJob.State.RUNNING)
MSG_TOO_MANY = "{limit} exports of this client are queued or running; retry when one finished"


class TooManyExports(FhirError):
    """The client's concurrent export limit is reached (429 with Retry-After)."""

    status = 429
    code = "throttled"
    detail_code = "MSG_EXPORT_LIMIT"


class JobLost(Exception):
    """The job is no longer this attempt's: cancelled, or taken over after a lapsed lease."""


def export_storage() -> Storage:
    """Where export files live (``STORAGES["exports"]``: the file system by default)."""
    return storages[STORAGE_ALIAS]


def export_job_create(
    *,
    access: Access,
    level: str,
    request_url: str,
    request: ExportRequest,
    group_id: str = "",
    group_version: int | None = None,
) -> ExportJob:
    """Queue an export (429 when the client already has its limit of active exports)."""
    limit = fhir_settings.EXPORT_MAX_PER_CLIENT
    active = ExportJob.objects.filter(client_id=access.client_id, state__in=ACTIVE).count()
    if active >= limit:
        raise TooManyExports(
            MSG_TOO_MANY.format(limit=limit),
            headers={"Retry-After": str(int(fhir_settings.EXPORT_POLL_SECONDS * 10))},
        )
    return ExportJob.objects.create(
        id=uuid.uuid4().hex,
        level=level,
        request_url=request_url,
        client_id=access.client_id,
        restricted=access.restricted,
        organization=access.organization or "",
        actor=access.actor,
        group_id=group_id,
        group_version=group_version,
        params=request.as_json(),
        transaction_time=timezone.now(),
    )


def export_job_claim(*, worker: str, now: datetime | None = None) -> ExportJob | None:
    """Take the oldest queued job, or a running one whose worker stopped reporting.

    The claim is one ``UPDATE … WHERE id = … AND attempt = <seen>``: of several workers
    that saw the same job, exactly one changes a row. A taken-over job starts again from
    scratch (its earlier attempt's files are deleted), so no resource is written twice.
    """
    now = now or timezone.now()
    stale = now - timedelta(seconds=fhir_settings.EXPORT_LEASE_SECONDS)
    candidates = ExportJob.objects.filter(
        Q(state=ExportJob.State.QUEUED) | Q(state=ExportJob.State.RUNNING, heartbeat__lt=stale)
    ).order_by("created")
    for job in candidates[:10]:
        taken = ExportJob.objects.filter(pk=job.pk, attempt=job.attempt, state=job.state).update(
            state=ExportJob.State.RUNNING,
            attempt=job.attempt + 1,
            worker=worker,
            heartbeat=now,
            resources=0,
            progress="started",
        )
        if taken:
            job.refresh_from_db()
            export_files_delete(job=job, before_attempt=job.attempt)
            return job
    return None


def export_job_report(*, job: ExportJob, resources: int, progress: str) -> None:
    """Record progress and renew the lease (:class:`JobLost` when the job is gone from
    this attempt: cancelled, or claimed by another worker)."""
    updated = ExportJob.objects.filter(
        pk=job.pk, attempt=job.attempt, state=ExportJob.State.RUNNING
    ).update(heartbeat=timezone.now(), resources=resources, progress=progress[:200])
    if not updated:
        raise JobLost(job.pk)


def export_file_name(*, job: ExportJob, name: str) -> str:
    """The storage name of one of this attempt's parts (attempts never share a folder)."""
    return f"{job.pk}/{job.attempt}/{name}"


def export_file_record(
    *, job: ExportJob, kind: str, resource_type: str, name: str, count: int, size: int
) -> ExportFile:
    """Record a part this attempt saved to the storage under :func:`export_file_name`."""
    return ExportFile.objects.create(
        id=export_file_name(job=job, name=name),
        job=job,
        attempt=job.attempt,
        kind=kind,
        resource_type=resource_type,
        name=name,
        count=count,
        size=size,
    )


def export_job_release(*, job: ExportJob) -> bool:
    """Put this attempt's job back in the queue (its worker is stopping); the next claim
    deletes what this attempt wrote. False: it was cancelled or taken over meanwhile."""
    return bool(
        ExportJob.objects.filter(
            pk=job.pk, attempt=job.attempt, state=ExportJob.State.RUNNING
        ).update(state=ExportJob.State.QUEUED, heartbeat=None, worker="", progress="requeued")
    )


def export_job_complete(*, job: ExportJob, resources: int) -> bool:
    """Mark this attempt's job completed (False: it was cancelled or taken over meanwhile)."""
    now = timezone.now()
    return bool(
        ExportJob.objects.filter(
            pk=job.pk, attempt=job.attempt, state=ExportJob.State.RUNNING
        ).update(
            state=ExportJob.State.COMPLETED,
            finished=now,
            expires=now + timedelta(seconds=fhir_settings.EXPORT_RETENTION_SECONDS),
            resources=resources,
            progress=f"completed: {resources} resources",
        )
    )


def export_job_fail(*, job: ExportJob, status: int, diagnostics: str) -> None:
    """Mark this attempt's job failed; its status answer is then ``status`` with the text.
    Its partial files are deleted: a failed export has no manifest."""
    now = timezone.now()
    failed = ExportJob.objects.filter(
        pk=job.pk, attempt=job.attempt, state=ExportJob.State.RUNNING
    ).update(
        state=ExportJob.State.FAILED,
        finished=now,
        expires=now + timedelta(seconds=fhir_settings.EXPORT_RETENTION_SECONDS),
        error_status=status,
        error=diagnostics,
        progress="failed",
    )
    if failed:
        export_files_delete(job=job)


def export_job_cancel(*, job: ExportJob) -> None:
    """Cancel a job: its status then answers 404. A running worker notices at its next
    report and stops; files already written are deleted now (and any the stopping worker
    still saves, by the expiry sweep)."""
    now = timezone.now()
    ExportJob.objects.filter(pk=job.pk).exclude(state=ExportJob.State.CANCELLED).update(
        state=ExportJob.State.CANCELLED, finished=now, expires=now, progress="cancelled"
    )
    export_files_delete(job=job)


def export_files_delete(*, job: ExportJob, before_attempt: int | None = None) -> int:
    """Delete a job's files (of attempts before ``before_attempt``, or all), rows and
    storage alike; the count deleted."""
    storage = export_storage()
    files = ExportFile.objects.filter(job_id=job.pk)
    if before_attempt is not None:
        files = files.filter(attempt__lt=before_attempt)
    deleted = 0
    for record in files:
        storage.delete(record.id)
        deleted += 1
    files.delete()
    # Parts an interrupted attempt saved without recording them (the process died between
    # the two steps): whatever lies under the job's folder that no row names.
    known = set(ExportFile.objects.filter(job_id=job.pk).values_list("id", flat=True))
    for name in _stored_names(storage, job.pk):
        attempt = int(name.split("/")[1]) if name.split("/")[1].isdigit() else 0
        if name not in known and (before_attempt is None or attempt < before_attempt):
            storage.delete(name)
    return deleted


def _stored_names(storage: Storage, job_id: str) -> list[str]:
    try:
        attempts, _ = storage.listdir(job_id)
    except (FileNotFoundError, NotImplementedError):
        return []
    names = []
    for attempt in attempts:
        _, files = storage.listdir(f"{job_id}/{attempt}")
        names.extend(f"{job_id}/{attempt}/{name}" for name in files)
    return names


def export_jobs_expire(*, now: datetime | None = None) -> int:
    """Delete finished jobs past their expiry, files first; the number of jobs deleted."""
    now = now or timezone.now()
    expired = ExportJob.objects.filter(
        state__in=[ExportJob.State.COMPLETED, ExportJob.State.FAILED, ExportJob.State.CANCELLED],
        expires__lt=now,
    )
    count = 0
    for job in expired:
        export_files_delete(job=job)
        job.delete()
        count += 1
    return count

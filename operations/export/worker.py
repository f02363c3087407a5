"""The export worker: claim a job, run it, record the outcome; sweep expired jobs.

Workers run as ``manage.py run_export_worker`` (any number, on any host sharing the
metadata store and the ``exports`` storage) and, unless ``EXPORT_WORKER_THREAD`` is off, as
one daemon thread in each server process, started when the process starts serving
(``fhirservice.serving.service_starting``), so the embedded default works alone. A stopping
process (``service_stopping``; the command on SIGTERM) hands a running job back to the
queue after the chunk in hand instead of leaving it to the lease.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from django.db import close_old_connections, connections

from fhirservice.conf import fhir_settings
from fhirservice.errors import FhirError
from operations.export.models import ExportJob
from operations.export.runner import WorkerStopping, export_run
from operations.export.services import (
    JobLost,
    export_files_delete,
    export_job_claim,
    export_job_complete,
    export_job_fail,
    export_job_release,
    export_jobs_expire,
)

logger = logging.getLogger(__name__)

MSG_FAILED = "The export failed: {error}"
# How long a stopping server process waits for its worker thread to hand its job back.
STOP_WAIT_SECONDS = 10.0


def worker_name() -> str:
    """This worker's name in the job table: host, process and thread."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


def run_job(job: ExportJob, stopping: threading.Event | None = None) -> None:
    """Run a claimed job and record how it ended: completed, failed, back in the queue
    (``stopping`` was set: the process is shutting down), or lost to a cancel or a take-over
    (then this attempt's files are deleted and nothing is recorded)."""
    try:
        written = export_run(job, stopping)
    except WorkerStopping:
        logger.info("Export %s attempt %s requeued: the worker is stopping", job.pk, job.attempt)
        export_job_release(job=job)
        return
    except JobLost:
        logger.info("Export %s attempt %s stopped: cancelled or taken over", job.pk, job.attempt)
        _drop_attempt(job)
        return
    except FhirError as exc:
        export_job_fail(job=job, status=exc.status, diagnostics=exc.diagnostics)
        return
    except Exception as exc:
        logger.exception("Export %s failed", job.pk)
        export_job_fail(job=job, status=500, diagnostics=MSG_FAILED.format(error=exc))
        return
    if not export_job_complete(job=job, resources=written):
        _drop_attempt(job)


def _drop_attempt(job: ExportJob) -> None:
    current = ExportJob.objects.filter(pk=job.pk).values_list("attempt", flat=True).first()
    if current is None or current == job.attempt:
        export_files_delete(job=job)  # cancelled (or deleted): every file goes
    # else another attempt runs: it deleted ours when it claimed the job


def run_once(*, worker: str | None = None, stopping: threading.Event | None = None) -> bool:
    """Sweep expired jobs, then claim and run one job; whether there was one. A job still
    running when ``stopping`` is set goes back to the queue at its next report."""
    export_jobs_expire()
    job = export_job_claim(worker=worker or worker_name())
    if job is None:
        return False
    run_job(job, stopping)
    return True


class WorkerThread(threading.Thread):
    """One in-process worker: polls for jobs until stopped."""

    def __init__(self) -> None:
        super().__init__(name="export-worker", daemon=True)
        self.stopping = threading.Event()

    def run(self) -> None:
        """Claim and run jobs; sleep ``EXPORT_POLL_SECONDS`` when none is queued."""
        while not self.stopping.is_set():
            busy = False
            try:
                busy = run_once(stopping=self.stopping)
            except Exception:
                logger.exception("Export worker round failed")
            finally:
                close_old_connections()
            if not busy:
                self.stopping.wait(fhir_settings.EXPORT_POLL_SECONDS)
        connections.close_all()  # this thread's own connections

    def stop(self) -> None:
        """Stop: a running job is handed back to the queue at its next report."""
        self.stopping.set()


_thread: WorkerThread | None = None
_lock = threading.Lock()


def worker_thread_start(**_: object) -> None:
    """Receiver of ``service_starting``: start this process's worker thread (once)."""
    global _thread
    if not fhir_settings.EXPORT_WORKER_THREAD:
        return
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = WorkerThread()
            _thread.start()


def worker_thread_stop(**_: object) -> None:
    """Stop this process's worker thread, if it runs; receiver of ``service_stopping``.

    A job it is running goes back to the queue at its next report (after the chunk in
    hand), for another worker or the next start; waits at most ``STOP_WAIT_SECONDS``."""
    global _thread
    with _lock:
        thread, _thread = _thread, None
    if thread is not None:
        thread.stop()
        thread.join(timeout=STOP_WAIT_SECONDS)

"""Export jobs outside HTTP: concurrent claims, expiry, the worker command, the admin."""

from __future__ import annotations

import importlib
import io
import threading
import time
from datetime import timedelta

import pytest
from django.apps import apps
from django.core.management import call_command
from django.utils import timezone

from operations.export.models import CompartmentLink, ExportFile, ExportJob
from operations.export.services import export_job_claim, export_storage
from operations.export.worker import run_once, worker_thread_start, worker_thread_stop

# cohort: the fixture, used by name
from tests.operations.test_export import (  # noqa: F401
    cohort,
    create,
    kick_off,
    manifest,
    observation,
    raw,
    run_jobs,
)
from tests.support import patient, run_threads


@pytest.mark.usefixtures("cohort")
def test_several_workers_claim_a_job_once(live_api):
    kick_off(live_api, "/Patient/$export")
    claimed = run_threads(lambda i: export_job_claim(worker=f"w{i}"), 4)
    taken = [job for job in claimed if job is not None]
    assert len(taken) == 1
    job = ExportJob.objects.get()
    assert (job.state, job.attempt, job.worker) == ("running", 1, taken[0].worker)


@pytest.mark.usefixtures("cohort")
def test_several_workers_run_distinct_jobs(live_api):
    for _ in range(3):
        kick_off(live_api, "/Patient/$export?_type=Patient")
    ran = run_threads(lambda i: run_once(worker=f"w{i}"), 3)
    assert ran == [True, True, True]
    jobs = ExportJob.objects.all()
    assert {job.state for job in jobs} == {"completed"}
    assert len({job.worker for job in jobs}) == 3
    assert all(job.attempt == 1 for job in jobs)


@pytest.mark.usefixtures("cohort")
def test_expired_exports_are_deleted_with_their_files(live_api):
    status = kick_off(live_api, "/Patient/$export?_type=Patient")
    run_jobs()
    names = list(ExportFile.objects.values_list("id", flat=True))
    assert all(export_storage().exists(name) for name in names)
    ExportJob.objects.update(expires=timezone.now() - timedelta(seconds=1))
    assert not run_once(worker="sweeper")
    assert not ExportJob.objects.exists()
    assert not any(export_storage().exists(name) for name in names)
    assert raw(live_api, "GET", status).status_code == 404


@pytest.mark.usefixtures("cohort")
def test_the_worker_command_runs_a_job(live_api):
    status = kick_off(live_api, "/Patient/$export?_type=Patient")
    out = io.StringIO()
    call_command("run_export_worker", "--once", stdout=out)
    assert "Ran one export job" in out.getvalue()
    assert [e["count"] for e in manifest(live_api, status)["output"]] == [3]


@pytest.mark.usefixtures("cohort")
def test_admin_shows_jobs_and_cancels_them(live_api, admin_client):
    kick_off(live_api, "/Patient/$export?_type=Patient")
    run_jobs()
    job = ExportJob.objects.get()
    listing = admin_client.get("/admin/export/exportjob/")
    assert listing.status_code == 200
    assert job.pk in listing.content.decode()
    page = admin_client.get(f"/admin/export/exportjob/{job.pk}/change/")
    assert page.status_code == 200
    assert "Patient.1.ndjson" in page.content.decode()
    response = admin_client.post(
        "/admin/export/exportjob/",
        {"action": "cancel", "_selected_action": [job.pk]},
        follow=True,
    )
    assert response.status_code == 200
    job.refresh_from_db()
    assert job.state == ExportJob.State.CANCELLED
    assert not ExportFile.objects.filter(job=job).exists()


@pytest.mark.usefixtures("cohort")
def test_a_stopping_worker_hands_its_job_back(live_api, settings):
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "EXPORT_CHUNK": 1}
    status = kick_off(live_api, "/Patient/$export")
    stopping = threading.Event()
    stopping.set()  # told to stop before its first report
    assert run_once(worker="stopping", stopping=stopping)
    job = ExportJob.objects.get()
    assert (job.state, job.attempt, job.worker) == ("queued", 1, "")
    assert raw(live_api, "GET", status).status_code == 202
    assert run_once(worker="next")
    job.refresh_from_db()
    assert (job.state, job.attempt) == ("completed", 2)
    assert ExportFile.objects.filter(job=job).exclude(attempt=2).count() == 0


@pytest.mark.usefixtures("cohort")
def test_the_server_process_worker_thread_runs_jobs_and_stops(live_api, settings):
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "EXPORT_POLL_SECONDS": 0.1}
    worker_thread_start()
    try:
        status = kick_off(live_api, "/Patient/$export?_type=Patient")
        for _ in range(300):
            if ExportJob.objects.get().state == ExportJob.State.COMPLETED:
                break
            time.sleep(0.1)
        assert [e["count"] for e in manifest(live_api, status)["output"]] == [3]
    finally:
        worker_thread_stop()


def test_the_migrations_index_resources_stored_before_the_app(live_api, cohort):  # noqa: F811
    first, second = cohort["patients"][:2]
    shared = create(live_api, {**observation(first), "performer": [{"reference": second}]})
    expected = sorted(CompartmentLink.objects.values_list("key", "shared"))
    CompartmentLink.objects.all().delete()
    index = importlib.import_module("operations.export.migrations.0002_index_existing_resources")
    flag = importlib.import_module("operations.export.migrations.0003_compartment_link_shared")
    index.index_existing(apps, None)
    flag.mark_shared(apps, None)
    assert sorted(CompartmentLink.objects.values_list("key", "shared")) == expected
    assert CompartmentLink.objects.get(key=f"{shared}>{second.split('/')[1]}").shared


def test_the_migration_indexes_patients_linked_before(live_api, cohort):  # noqa: F811
    first = cohort["patients"][0]
    body = {**patient(family="Old"), "link": [{"other": {"reference": first}, "type": "replaces"}]}
    old = create(live_api, body)
    expected = sorted(CompartmentLink.objects.values_list("key", "shared"))
    assert (f"{old}>{first.split('/')[1]}", False) in expected
    CompartmentLink.objects.filter(resource_type="Patient").delete()
    index = importlib.import_module("operations.export.migrations.0004_index_patient_links")
    index.index_patient_links(apps, None)
    index.index_patient_links(apps, None)  # again: resources with rows are skipped
    assert sorted(CompartmentLink.objects.values_list("key", "shared")) == expected

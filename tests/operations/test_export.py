"""FHIR Bulk Data ``$export``: kick-off forms, status, manifest, files, and what they hold.

Jobs are run in the test's thread by the worker's own round (``run_once``), on the backend
pair of this pass; the roster comes from ClickHouse, so the tests write through ``live_api``
(committed, shipped).
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from django.test import Client
from django.utils import timezone

from fhirservice.models import StoredResource
from operations.export import parameters as export_parameters
from operations.export import runner as export_runner
from operations.export import views
from operations.export.models import CompartmentLink, ExportFile, ExportJob
from operations.export.services import export_storage
from operations.export.worker import run_once
from tests.fhir_check import parse_strict_r4
from tests.support import BASE, FhirClient, patient

ASYNC = {"Accept": "application/fhir+json", "Prefer": "respond-async"}


def kick_off(api: FhirClient, path: str, **kwargs: Any) -> str:
    """Start an export; the status URL's path (below the base)."""
    headers = {**ASYNC, **kwargs.pop("headers", {})}
    body = kwargs.pop("body", None)
    if body is not None:
        response = api.post(path, body, headers=headers)
    else:
        response = api.get(path, headers=headers)
    assert response.status == 202, response
    location = response.headers["Content-Location"]
    assert location.startswith("http://testserver/4_0_0/$export-poll-status?_jobId=")
    return location.removeprefix("http://testserver" + BASE)


def run_jobs() -> None:
    """Run every queued job to its end."""
    while run_once(worker="test"):
        pass


def raw(api: FhirClient, method: str, url: str, **headers: str) -> Any:
    """A request without the FHIR body checks (manifests and NDJSON are not resources)."""
    client: Client = api.client
    path = urlsplit(url).path + ("?" + urlsplit(url).query if urlsplit(url).query else "")
    if not path.startswith(BASE):
        path = BASE + path
    return client.generic(method, path, headers=headers)


def manifest(api: FhirClient, status_path: str, **headers: str) -> dict[str, Any]:
    """Poll until complete; the manifest."""
    response = raw(api, "GET", status_path, **headers)
    assert response.status_code == 200, response.content
    assert response["Expires"]
    return orjson.loads(response.content)


def lines(api: FhirClient, url: str, **headers: str) -> list[dict[str, Any]]:
    """The resources of one NDJSON file, each parsed by the strict R4 models."""
    response = raw(api, "GET", url, **headers)
    assert response.status_code == 200, response
    assert response["Content-Type"] == "application/fhir+ndjson"
    text = b"".join(response.streaming_content)
    resources = [orjson.loads(line) for line in text.splitlines()]
    for resource in resources:
        parse_strict_r4(resource)
    return resources


def exported(api: FhirClient, body: dict[str, Any], **headers: str) -> dict[str, list[str]]:
    """Type → ``Type/id`` of every output line (in file order)."""
    out: dict[str, list[str]] = {}
    for entry in body["output"]:
        for resource in lines(api, entry["url"], **headers):
            assert resource["resourceType"] == entry["type"]
            out.setdefault(entry["type"], []).append(f"{entry['type']}/{resource['id']}")
    return out


def create(api: FhirClient, body: dict[str, Any]) -> str:
    """POST a resource; ``Type/id``."""
    response = api.post(f"/{body['resourceType']}", body)
    assert response.status == 201, response
    return f"{body['resourceType']}/{response.body['id']}"


def observation(subject: str, code: str = "8867-4") -> dict[str, Any]:
    """An Observation of a Patient."""
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
    }


def group(api: FhirClient, members: list[str], group_id: str | None = None) -> str:
    """Create (or replace) a Group with these members; its id."""
    body = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": ref}} for ref in members],
    }
    if group_id is None:
        return create(api, body).split("/")[1]
    response = api.put(f"/Group/{group_id}", {**body, "id": group_id})
    assert response.status == 200, response
    return group_id


@pytest.fixture
def cohort(live_api: FhirClient) -> dict[str, Any]:
    """Three Patients with two Observations each; a Group of the first two."""
    patients = [create(live_api, patient(family=f"P{i}")) for i in range(3)]
    observations = {p: [create(live_api, observation(p)) for _ in range(2)] for p in patients}
    group_id = group(live_api, patients[:2])
    return {"patients": patients, "observations": observations, "group": group_id}


# --- kick-off ------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["", "/Patient", "/Group/{group}"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_each_kick_off_form_queues_a_job(live_api, cohort, level, method):
    path = level.format(group=cohort["group"]) + "/$export"
    if method == "GET":
        status = kick_off(live_api, path + "?_type=Patient&_outputFormat=ndjson")
    else:
        body = {
            "resourceType": "Parameters",
            "parameter": [
                {"name": "_type", "valueString": "Patient"},
                {"name": "_outputFormat", "valueString": "application/fhir+ndjson"},
            ],
        }
        status = kick_off(live_api, path, body=body)
    job = ExportJob.objects.get()
    assert job.state == ExportJob.State.QUEUED
    assert job.level == (level.split("/")[1].lower() if level else "system")
    response = raw(live_api, "GET", status)
    assert response.status_code == 202
    assert response["X-Progress"] == "queued"
    assert response["Retry-After"]


@pytest.mark.parametrize(
    "headers, message",
    [
        ({"Prefer": "respond-async"}, views.MSG_ACCEPT),
        ({"Accept": "application/fhir+json"}, views.MSG_RESPOND_ASYNC),
        ({"Accept": "application/fhir+ndjson", "Prefer": "respond-async"}, views.MSG_ACCEPT),
    ],
)
def test_kick_off_without_the_async_headers_is_refused(live_api, headers, message):
    response = live_api.get("/$export", headers=headers)
    assert response.status == 400, response
    assert response.body["issue"][0]["diagnostics"] == message
    assert not ExportJob.objects.exists()
    lenient = live_api.get("/$export", headers={**headers, "Prefer": "handling=lenient"})
    assert lenient.status == 202, lenient


@pytest.mark.parametrize(
    "query, message",
    [
        ("_outputFormat=text/csv", export_parameters.MSG_OUTPUT_FORMAT.format(value="text/csv")),
        (
            "_since=yesterday",
            export_parameters.MSG_BAD_VALUE.format(name="_since", value="yesterday"),
        ),
        ("_type=Banana", export_parameters.MSG_UNKNOWN_TYPE.format(value="Banana")),
        ("_typeFilter=Patient", export_parameters.MSG_TYPE_FILTER.format(value="Patient")),
        ("includeAssociatedData=LatestProvenanceResources", export_parameters.MSG_ASSOCIATED_DATA),
        ("_mystery=1", export_parameters.MSG_UNKNOWN_PARAM.format(name="_mystery")),
        ("patient=Patient/1", export_parameters.MSG_PATIENT_AT_SYSTEM),
    ],
)
def test_bad_kick_off_parameters_answer_400(live_api, query, message):
    response = live_api.get(f"/$export?{query}", headers=ASYNC)
    assert response.status == 400, response
    assert response.body["issue"][0]["diagnostics"] == message
    assert not ExportJob.objects.exists()


def test_lenient_handling_drops_unsupported_parameters(live_api):
    headers = {**ASYNC, "Prefer": "respond-async, handling=lenient"}
    response = live_api.get("/$export?includeAssociatedData=x&_mystery=1", headers=headers)
    assert response.status == 202, response


def test_type_filter_with_an_unknown_search_parameter_answers_400(live_api):
    response = live_api.get("/Patient/$export?_typeFilter=Patient%3Fbanana=1", headers=ASYNC)
    assert response.status == 400, response
    assert "banana" in response.body["issue"][0]["diagnostics"]


def test_unknown_group_answers_404(live_api):
    response = live_api.get("/Group/nope/$export", headers=ASYNC)
    assert response.status == 404, response


def test_per_client_limit_answers_429_with_retry_after(live_api, settings):
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "EXPORT_MAX_PER_CLIENT": 2}
    kick_off(live_api, "/$export")
    kick_off(live_api, "/$export")
    response = live_api.get("/$export", headers=ASYNC)
    assert response.status == 429, response
    assert int(response.headers["Retry-After"]) > 0


# --- status, manifest, files ---------------------------------------------------------------


def test_group_export_manifest_and_files(live_api, cohort):
    status = kick_off(live_api, f"/Group/{cohort['group']}/$export")
    job = ExportJob.objects.get()
    run_jobs()
    body = manifest(live_api, status)
    assert set(body) == {"transactionTime", "request", "requiresAccessToken", "output", "error"}
    assert body["request"] == f"http://testserver{BASE}/Group/{cohort['group']}/$export"
    assert body["requiresAccessToken"] is False
    assert body["error"] == []
    assert body["transactionTime"] == job.transaction_time.isoformat().replace("+00:00", "Z")
    assert [(e["type"], e["count"]) for e in body["output"]] == [("Observation", 4), ("Patient", 2)]
    for entry in body["output"]:
        assert set(entry) == {"type", "url", "count"}
        assert entry["url"].startswith(f"http://testserver{BASE}/$export-file?_jobId={job.pk}")
    files = exported(live_api, body)
    members = cohort["patients"][:2]
    assert sorted(files["Patient"]) == sorted(members)
    assert sorted(files["Observation"]) == sorted(
        o for p in members for o in cohort["observations"][p]
    )


def test_patient_and_system_exports(live_api, cohort):
    run_jobs()
    status = kick_off(live_api, "/Patient/$export")
    run_jobs()
    files = exported(live_api, manifest(live_api, status))
    assert sorted(files["Patient"]) == sorted(cohort["patients"])
    assert len(files["Observation"]) == 6
    status = kick_off(live_api, "/$export?_type=Patient,Group")
    run_jobs()
    files = exported(live_api, manifest(live_api, status))
    assert set(files) == {"Patient", "Group"}
    assert files["Group"] == [f"Group/{cohort['group']}"]


def test_patient_parameter_restricts_a_group_export(live_api, cohort):
    first = cohort["patients"][0]
    status = kick_off(live_api, f"/Group/{cohort['group']}/$export?patient={first}")
    run_jobs()
    files = exported(live_api, manifest(live_api, status))
    assert files["Patient"] == [first]
    assert sorted(files["Observation"]) == sorted(cohort["observations"][first])


def test_files_split_at_the_configured_size(live_api, cohort, settings):
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "EXPORT_FILE_MAX_BYTES": 1}
    status = kick_off(live_api, "/Patient/$export?_type=Patient")
    run_jobs()
    body = manifest(live_api, status)
    assert [e["count"] for e in body["output"]] == [1, 1, 1]
    assert [e["url"].rsplit("=", 1)[1] for e in body["output"]] == [
        f"Patient.{n}.ndjson" for n in (1, 2, 3)
    ]


def test_elements_keep_the_named_elements(live_api, cohort):
    status = kick_off(live_api, "/Patient/$export?_type=Patient&_elements=Patient.gender")
    run_jobs()
    entry = manifest(live_api, status)["output"][0]
    for resource in lines(live_api, entry["url"]):
        assert "name" not in resource
        assert any(t["code"] == "SUBSETTED" for t in resource["meta"]["tag"])


def test_type_filter_uses_the_service_search(live_api, cohort):
    first = cohort["patients"][0]
    response = live_api.get(f"/{first}")
    family = response.body["name"][0]["family"]
    status = kick_off(
        live_api, f"/Patient/$export?_type=Patient&_typeFilter=Patient%3Ffamily={family}"
    )
    run_jobs()
    files = exported(live_api, manifest(live_api, status))
    assert files == {"Patient": [first]}


def test_type_filter_on_a_compartment_type(live_api, cohort):
    first = cohort["patients"][0]
    heart = create(live_api, observation(first, "1234-5"))
    query = "_typeFilter=Observation%3Fcode%3Dhttp://loinc.org|1234-5"
    status = kick_off(live_api, f"/Group/{cohort['group']}/$export?_type=Observation&{query}")
    run_jobs()
    files = exported(live_api, manifest(live_api, status))
    assert files == {"Observation": [heart]}


def test_type_filter_on_resources_changed_after_the_kick_off_is_reported(live_api, cohort):
    # _typeFilter runs on the current search index: a resource changed after the kick-off is
    # written as of transactionTime but filtered on its current state, and a warning per
    # such resource in the manifest's error files says so.
    first = cohort["patients"][0]
    unchanged = create(live_api, observation(first, "1234-5"))
    was_other = cohort["observations"][first][0]
    was_heart = create(live_api, observation(first, "1234-5"))
    query = "_typeFilter=Observation%3Fcode%3Dhttp://loinc.org|1234-5"
    response = live_api.get(
        f"/Group/{cohort['group']}/$export?_type=Observation&{query}", headers=ASYNC
    )
    assert response.status == 202, response
    texts = [issue["diagnostics"] for issue in response.body["issue"]]
    assert texts[1] == views.MSG_TYPE_FILTER_AS_OF
    status = response.headers["Content-Location"].removeprefix("http://testserver" + BASE)
    for key, code in ((was_other, "1234-5"), (was_heart, "9999-9")):
        live_api.put(f"/{key}", {**observation(first, code), "id": key.split("/")[1]})
    run_jobs()
    body = manifest(live_api, status)
    resources = [r for e in body["output"] for r in lines(live_api, e["url"])]
    # was_other matches now and is written in its version then (code 8867-4); was_heart
    # matched then but not now: left out.
    assert sorted(f"Observation/{r['id']}" for r in resources) == sorted([unchanged, was_other])
    assert [e["type"] for e in body["error"]] == ["OperationOutcome"]
    warnings = [o["issue"][0] for o in lines(live_api, body["error"][0]["url"])]
    assert {w["severity"] for w in warnings} == {"warning"}
    expected = [
        export_runner.MSG_TYPE_FILTER_CURRENT.format(key=key, outcome=outcome)
        for key, outcome in (
            (was_other, export_runner.MSG_TYPE_FILTER_WRITTEN),
            (was_heart, export_runner.MSG_TYPE_FILTER_LEFT_OUT),
        )
    ]
    assert sorted(w["diagnostics"] for w in warnings) == sorted(expected)


def test_group_roster_is_read_as_of_the_kick_off(live_api, cohort):
    status = kick_off(live_api, f"/Group/{cohort['group']}/$export?_type=Patient")
    group(live_api, cohort["patients"], group_id=cohort["group"])  # adds the third
    run_jobs()
    files = exported(live_api, manifest(live_api, status))
    assert sorted(files["Patient"]) == sorted(cohort["patients"][:2])


def test_members_added_while_the_export_runs_do_not_leak_in(
    live_api, cohort, settings, monkeypatch
):
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "EXPORT_CHUNK": 1}
    first, second, third = cohort["patients"]
    late = create(live_api, patient(family="Late"))
    status = kick_off(live_api, f"/Group/{cohort['group']}/$export?_type=Patient")
    original = export_runner.export_job_report

    def add_members(**kwargs: Any) -> None:
        # after the first chunk: the roster grows around the members still to come
        group(live_api, [first, second, third, late], group_id=cohort["group"])
        original(**kwargs)

    monkeypatch.setattr(export_runner, "export_job_report", add_members)
    run_jobs()
    files = exported(live_api, manifest(live_api, status))
    assert sorted(files["Patient"]) == sorted([first, second])


def test_changes_after_the_kick_off_do_not_leak_in(live_api, cohort):
    first, second = cohort["patients"][:2]
    status = kick_off(live_api, f"/Group/{cohort['group']}/$export?_type=Patient")
    live_api.put(f"/{first}", {**patient(family="Renamed"), "id": first.split("/")[1]})
    live_api.delete(f"/{second}")
    run_jobs()
    body = manifest(live_api, status)
    resources = [r for e in body["output"] for r in lines(live_api, e["url"])]
    assert sorted(f"Patient/{r['id']}" for r in resources) == sorted([first, second])
    assert all(r["name"][0]["family"] != "Renamed" for r in resources)


def test_since_gives_all_data_of_members_who_joined_after_it(live_api, cohort):
    first, second, third = cohort["patients"]
    since = (timezone.now() + timedelta(seconds=1)).replace(microsecond=0)
    time.sleep(max(0.0, (since - timezone.now()).total_seconds()) + 0.05)
    changed = cohort["observations"][first][0]
    live_api.put(f"/{changed}", {**observation(first, "1234-5"), "id": changed.split("/")[1]})
    deleted = cohort["observations"][first][1]
    live_api.delete(f"/{deleted}")
    group(live_api, [first, second, third], group_id=cohort["group"])  # third joins
    stamp = since.isoformat().replace("+00:00", "Z")
    status = kick_off(live_api, f"/Group/{cohort['group']}/$export?_since={stamp}")
    run_jobs()
    body = manifest(live_api, status)
    files = exported(live_api, body)
    # the first and second were members at _since: only what changed since (one Observation);
    # the third joined after it: all of its data.
    assert files["Patient"] == [third]
    assert sorted(files["Observation"]) == sorted([changed, *cohort["observations"][third]])
    assert [e["type"] for e in body["deleted"]] == ["Bundle"]
    bundles = lines(live_api, body["deleted"][0]["url"])
    assert [b["entry"][0]["request"] for b in bundles] == [{"method": "DELETE", "url": deleted}]


def test_until_leaves_out_what_changed_after_it(live_api, cohort):
    first, second = cohort["patients"][:2]
    until = (timezone.now() + timedelta(seconds=1)).replace(microsecond=0)
    time.sleep(max(0.0, (until - timezone.now()).total_seconds()) + 0.05)
    changed = cohort["observations"][first][0]
    live_api.put(f"/{changed}", {**observation(first, "1234-5"), "id": changed.split("/")[1]})
    stamp = until.isoformat().replace("+00:00", "Z")
    status = kick_off(live_api, f"/Group/{cohort['group']}/$export?_until={stamp}")
    run_jobs()
    files = exported(live_api, manifest(live_api, status))
    assert sorted(files["Patient"]) == sorted([first, second])
    observations = [o for p in (first, second) for o in cohort["observations"][p]]
    assert sorted(files["Observation"]) == sorted(o for o in observations if o != changed)


def test_key_lists_select_exactly_their_keys(live_api, cohort):
    # one_of: on PostgreSQL one text parameter split on a control character, or an array
    # when a value holds that character; elsewhere IN.
    first, second, third = cohort["patients"]
    for keys, wanted in (
        ([first, second], [first, second]),
        ([third, f"{first}\x1f{second}"], [third]),  # split, it would name the other two
    ):
        found = StoredResource.objects.filter(export_runner.one_of("key", keys))
        assert sorted(found.values_list("key", flat=True)) == sorted(wanted)


def test_group_export_of_an_inline_roster(live_api, settings):
    # GROUP_ROSTER_STORAGE=inline: the roster is in the Group version's body, read as of the
    # kick-off and as of _since like a ClickHouse roster.
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "GROUP_ROSTER_STORAGE": "inline"}
    first, second, third, fourth = (create(live_api, patient(family=f"I{i}")) for i in range(4))
    observations = {p: create(live_api, observation(p)) for p in (first, second, third)}
    group_id = group(live_api, [first, second])
    since = (timezone.now() + timedelta(seconds=1)).replace(microsecond=0)
    time.sleep(max(0.0, (since - timezone.now()).total_seconds()) + 0.05)
    group(live_api, [first, second, third], group_id=group_id)  # third joins after _since
    stamp = since.isoformat().replace("+00:00", "Z")
    whole = kick_off(live_api, f"/Group/{group_id}/$export")
    changes = kick_off(live_api, f"/Group/{group_id}/$export?_since={stamp}")
    group(live_api, [first, second, third, fourth], group_id=group_id)  # after the kick-off
    run_jobs()
    files = exported(live_api, manifest(live_api, whole))
    assert sorted(files["Patient"]) == sorted([first, second, third])
    assert sorted(files["Observation"]) == sorted(observations.values())
    files = exported(live_api, manifest(live_api, changes))
    assert files == {"Patient": [third], "Observation": [observations[third]]}


def test_cancel_then_404(live_api, cohort):
    status = kick_off(live_api, "/Patient/$export")
    response = raw(live_api, "DELETE", status)
    assert response.status_code == 202
    assert raw(live_api, "GET", status).status_code == 404
    assert raw(live_api, "DELETE", status).status_code == 404
    assert not run_once(worker="test")


def test_cancel_of_a_completed_export_deletes_its_files(live_api, cohort):
    status = kick_off(live_api, "/Patient/$export")
    run_jobs()
    names = list(ExportFile.objects.values_list("id", flat=True))
    assert names and all(export_storage().exists(n) for n in names)
    assert raw(live_api, "DELETE", status).status_code == 202
    assert not any(export_storage().exists(n) for n in names)
    assert raw(live_api, "GET", status).status_code == 404


def test_a_failed_job_reports_its_failure(live_api, cohort, clickhouse_down):
    status = kick_off(live_api, f"/Group/{cohort['group']}/$export")
    with clickhouse_down():
        run_jobs()
    response = raw(live_api, "GET", status)
    assert response.status_code == 503
    outcome = orjson.loads(response.content)
    assert outcome["resourceType"] == "OperationOutcome"
    parse_strict_r4(outcome)
    assert ExportJob.objects.get().state == ExportJob.State.FAILED


class Killed(BaseException):
    """Stands for the worker process dying (not an error a worker would catch)."""


def test_worker_killed_mid_job_is_taken_over_without_duplicates(
    live_api, cohort, settings, monkeypatch
):
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "EXPORT_CHUNK": 1, "EXPORT_FILE_MAX_BYTES": 1}
    status = kick_off(live_api, "/Patient/$export")
    reports = []
    original = export_runner.export_job_report

    def dying(**kwargs: Any) -> None:
        original(**kwargs)
        reports.append(1)
        if len(reports) == 2:
            raise Killed

    monkeypatch.setattr(export_runner, "export_job_report", dying)
    with pytest.raises(Killed):
        run_once(worker="first")
    monkeypatch.setattr(export_runner, "export_job_report", original)
    first_files = list(ExportFile.objects.values_list("id", flat=True))
    assert first_files  # the first attempt saved parts before it died
    job = ExportJob.objects.get()
    assert job.state == ExportJob.State.RUNNING and job.attempt == 1
    # Another worker waits for the lease to lapse, then takes the job over from scratch.
    assert not run_once(worker="second")
    ExportJob.objects.filter(pk=job.pk).update(heartbeat=timezone.now() - timedelta(hours=1))
    assert run_once(worker="second")
    job.refresh_from_db()
    assert (job.state, job.attempt, job.worker) == ("completed", 2, "second")
    assert not any(export_storage().exists(name) for name in first_files)
    files = exported(live_api, manifest(live_api, status))
    everything = [key for keys in files.values() for key in keys]
    assert len(everything) == len(set(everything)) == 9


def test_a_resource_of_two_exported_patients_is_written_once(live_api, cohort, settings):
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "EXPORT_CHUNK": 1}
    first, second = cohort["patients"][:2]
    shared = create(live_api, {**observation(first), "performer": [{"reference": second}]})
    status = kick_off(live_api, f"/Group/{cohort['group']}/$export?_type=Observation")
    run_jobs()
    files = exported(live_api, manifest(live_api, status))
    assert files["Observation"].count(shared) == 1
    assert len(files["Observation"]) == 5


def test_compartment_index_follows_the_body(live_api, cohort):
    first, second = cohort["patients"][:2]
    key = cohort["observations"][first][0]
    body = {**observation(first), "id": key.split("/")[1], "performer": [{"reference": second}]}
    live_api.put(f"/{key}", body)

    def links() -> list[str]:
        rows = CompartmentLink.objects.filter(resource_key=key)
        return sorted(rows.values_list("patient_id", flat=True))

    assert links() == sorted([first.split("/")[1], second.split("/")[1]])
    live_api.put(f"/{key}", {**observation(second), "id": key.split("/")[1]})
    assert links() == [second.split("/")[1]]


def linking(target: str, kind: str = "replaces", family: str = "Linked") -> dict[str, Any]:
    """A Patient whose link names ``target`` (which puts it in the target's compartment)."""
    return {**patient(family=family), "link": [{"other": {"reference": target}, "type": kind}]}


def test_patients_linked_to_exported_patients_are_written_once(live_api, settings):
    # Patient.link.other puts the linking Patient in the linked one's compartment (R4 Patient
    # CompartmentDefinition); not transitively, and a member that links is written once.
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "EXPORT_CHUNK": 1}
    first = create(live_api, patient(family="First"))
    old = create(live_api, linking(first))
    older = create(live_api, linking(old, "seealso"))  # in old's compartment, not first's
    second = create(live_api, linking(first, "seealso"))  # a member itself
    mine = create(live_api, observation(first))
    create(live_api, observation(old))  # old's data: not in first's compartment
    group_id = group(live_api, [first, second])
    whole = kick_off(live_api, f"/Group/{group_id}/$export")
    late = create(live_api, linking(first))  # after the kick-off
    one = kick_off(live_api, f"/Patient/$export?patient={first}")
    every = kick_off(live_api, "/Patient/$export?_type=Patient")
    run_jobs()
    files = exported(live_api, manifest(live_api, whole))
    assert sorted(files["Patient"]) == sorted([first, second, old])
    assert files["Observation"] == [mine]
    files = exported(live_api, manifest(live_api, one))
    assert sorted(files["Patient"]) == sorted([first, old, second, late])
    files = exported(live_api, manifest(live_api, every))
    assert sorted(files["Patient"]) == sorted([first, old, older, second, late])
    # The index follows the body: without its link, old is no longer in first's compartment.
    live_api.put(f"/{old}", {**patient(family="Unlinked"), "id": old.split("/")[1]})
    status = kick_off(live_api, f"/Group/{group_id}/$export?_type=Patient")
    run_jobs()
    files = exported(live_api, manifest(live_api, status))
    assert sorted(files["Patient"]) == sorted([first, second, late])


def test_export_operations_are_declared_with_their_canonical_urls(live_api):
    statement = live_api.get("/metadata").body
    rest = statement["rest"][0]
    urls = {op["definition"] for op in rest.get("operation", [])}
    for resource in rest["resource"]:
        urls.update(op["definition"] for op in resource.get("operation", []))
    bulk = "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/"
    assert {bulk + "export", bulk + "patient-export", bulk + "group-export"} <= urls
    for definition_id in ("System-export", "Patient-export", "Group-export"):
        response = live_api.get(f"/OperationDefinition/{definition_id}")  # strict R4 checked
        assert response.body["url"] in urls

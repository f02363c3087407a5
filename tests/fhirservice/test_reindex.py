"""``manage.py reindex_search``: the search index re-extracted from stored resources.

The index is emptied behind the store's back (as after a migration that changes how values
are indexed), the command restores it; a run stopped by ``--limit`` resumes after its
checkpoint; ``--type`` limits it to one type; bad arguments are refused.
"""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from fhirservice.models import SearchReindexCheckpoint, SearchToken
from fhirservice.search import reindex_indexes
from tests.support import patient


def observation(subject: str, code: str) -> dict:
    """A small Observation of ``subject`` with a LOINC code."""
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
    }


def reindex(*args: str, workers: int = 1) -> str:
    """Run the command quietly (extracting in this process unless ``workers`` > 1)."""
    out = StringIO()
    options = ("--workers", str(workers), "--verbosity", "0")
    call_command("reindex_search", *options, *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def index_rows() -> list[tuple]:
    """Every SearchToken row's values, in key order."""
    return list(SearchToken.objects.order_by("key").values_list())


def ids(api, query: str) -> set[str]:
    """Ids a search finds."""
    return {e["resource"]["id"] for e in api.get(query).body.get("entry", [])}


@pytest.fixture
def stored(api) -> dict[str, str]:
    """Three Patients and two Observations, their search index then wiped."""
    made = {}
    for n in range(3):
        made[f"p{n}"] = api.post("/Patient", patient(family=f"Family{n}")).body["id"]
    for n in range(2):
        body = observation(f"Patient/{made['p0']}", f"100{n}-0")
        made[f"o{n}"] = api.post("/Observation", body).body["id"]
    SearchToken.objects.all().delete()
    return made


def test_reindex_restores_the_index(api, stored):
    assert ids(api, "/Patient?family=family1") == set()
    assert "5 resources" in reindex()
    assert ids(api, "/Patient?family=family1") == {stored["p1"]}
    assert ids(api, f"/Observation?subject=Patient/{stored['p0']}&code=1001-0") == {stored["o1"]}
    before = SearchToken.objects.count()
    reindex()  # a finished run starts over and changes nothing
    assert SearchToken.objects.count() == before


def test_an_interrupted_run_resumes_after_its_checkpoint(api, stored):
    assert "2 resources" in reindex("--limit", "2", "--batch-size", "1")
    checkpoint = SearchReindexCheckpoint.objects.get(name="reindex:*")
    assert checkpoint.done == 2 and checkpoint.finished_at is None
    assert "Would re-extract 3 resources" in reindex("--dry-run")
    assert "3 resources" in reindex()
    assert SearchReindexCheckpoint.objects.get(name="reindex:*").finished_at is not None
    assert len(ids(api, "/Patient?family=family")) == 3


def test_type_limits_the_run(api, stored):
    assert "3 resources" in reindex("--type", "Patient")
    assert len(ids(api, "/Patient?family=family")) == 3
    assert ids(api, "/Observation?code=1000-0") == set()


def test_worker_processes_write_the_rows_one_process_writes(api, stored):
    """Extraction in two worker processes (batches of 2: several in flight) gives the very
    rows extraction in the command's own process gives."""
    assert "5 resources" in reindex("--batch-size", "2")
    alone = index_rows()
    SearchToken.objects.all().delete()
    assert "5 resources" in reindex("--batch-size", "2", workers=2)
    assert index_rows() == alone
    assert len(ids(api, "/Patient?family=family")) == 3


def test_rows_already_right_are_not_rewritten(api, stored):
    reindex()
    assert "(0 index rows written, 5 resources already up to date)" in reindex()
    # One row gone wrong behind the store's back: its resource alone is rewritten.
    key = f"Patient/{stored['p1']}"
    rows = SearchToken.objects.filter(resource_key=key)
    count = rows.count()
    rows.filter(param="family").update(value="wrong")
    assert f"({count} index rows written, 4 resources already up to date)" in reindex()
    assert ids(api, "/Patient?family=family1") == {stored["p1"]}
    assert ids(api, "/Patient?family=wrong") == set()


def raw_index_rows() -> list[tuple]:
    """Every SearchToken row as the database holds it (SQLite: dates as their text)."""
    from django.db import connection

    table = connection.ops.quote_name(SearchToken._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {table} ORDER BY key")  # noqa: S608
        return cursor.fetchall()


def test_reindex_writes_the_rows_the_write_path_wrote(api):
    """Rows written by the reindex's own SQL (COPY, executemany) equal, value for value as
    stored, the rows a create wrote: dates, numbers, composites, deleted resources left out."""
    pid = api.post("/Patient", patient(family="Dated", birthDate="1970-05-06")).body["id"]
    body = observation(f"Patient/{pid}", "2000-1")
    body["effectivePeriod"] = {"start": "2024-01-02T03:04:05.678+02:00", "end": "2024-02"}
    body["valueQuantity"] = {"value": 1.5, "system": "http://unitsofmeasure.org", "code": "mg"}
    api.post("/Observation", body)
    gone = api.post("/Patient", patient(family="Gone")).body["id"]
    api.delete(f"/Patient/{gone}")
    written = raw_index_rows()
    dated = SearchToken.objects.filter(resource_type="Observation", param="date")
    assert dated.exclude(low=None).exists() and SearchToken.objects.exclude(number=None).exists()
    SearchToken.objects.all().delete()
    assert "3 resources" in reindex("--batch-size", "2")
    assert raw_index_rows() == written


@pytest.mark.parametrize(
    "args",
    [("--type", "Nonsense"), ("--batch-size", "0"), ("--limit", "-1"), ("--workers", "0")],
)
def test_bad_arguments_are_refused(db, args):
    with pytest.raises(CommandError):
        reindex(*args)


def missing_indexes() -> list[str]:
    """The search indexes the migrations define that the database lacks."""
    from django.db import connection

    return reindex_indexes.missing(connection)


def test_a_rebuild_stopped_after_dropping_the_indexes_is_completed_by_the_next_run(api, stored):
    """Over an empty index the run rebuilds: the search indexes are dropped for the load
    and, when it stops early (as a killed run would), still missing; the next run finds
    them missing, resumes the rebuild after the checkpoint and builds them at the end."""
    assert "2 resources" in reindex("--limit", "2", "--batch-size", "1")
    assert "tok_type_param_value" in missing_indexes()
    assert "tok_resource" not in missing_indexes()  # every write's lookup stays
    assert "3 resources" in reindex()
    assert missing_indexes() == []
    assert ids(api, "/Patient?family=family1") == {stored["p1"]}
    assert ids(api, f"/Observation?subject=Patient/{stored['p0']}&code=1001-0") == {stored["o1"]}


def test_indexes_missing_after_a_finished_run_are_built_by_the_next(api, stored):
    """A run killed while building the indexes again (some built, its checkpoint at the
    end): the next run rebuilds from the start and builds the rest."""
    from django.db import connection

    reindex()
    rows = index_rows()
    reindex_indexes.drop(connection)
    assert missing_indexes() != []
    assert "(0 index rows written" not in reindex()  # every row written again
    assert missing_indexes() == []
    assert index_rows() == rows


def test_rows_after_a_rebuild_equal_rows_after_a_normal_reindex(api, stored):
    body = observation(f"Patient/{stored['p1']}", "3000-1")
    body["effectivePeriod"] = {"start": "2024-01-02T03:04:05.678+02:00", "end": "2024-02"}
    body["valueQuantity"] = {"value": 1.5, "system": "http://unitsofmeasure.org", "code": "mg"}
    api.post("/Observation", body)
    assert "6 resources" in reindex("--batch-size", "2")
    normal = raw_index_rows()
    assert "(0 index rows written, 6 resources already up to date)" in reindex()
    # --rebuild over the intact index: every row rewritten, none doubled.
    out = reindex("--rebuild", "--batch-size", "2")
    assert f"({len(normal)} index rows written, 0 resources already up to date)" in out
    assert raw_index_rows() == normal
    assert missing_indexes() == []


def test_a_write_under_way_during_a_batch_keeps_its_rows(live_api):
    """A write holding its resource's row (locked, new version and rows written, not yet
    committed) while a batch replaces that resource's rows: the batch waits for it and
    leaves the new version's rows. Unlocked, the batch read the old version (its stored rows
    gone wrong, so they are replaced), its DELETE missed the rows the write committed and
    its INSERT collided with them."""
    import threading

    from django.db import connection, transaction

    from fhirservice.models import StoredResource
    from fhirservice.search.extract import extract_rows
    from fhirservice.store.rows import insert_values

    pid = live_api.post("/Patient", patient(family="Before")).body["id"]
    key = f"Patient/{pid}"
    SearchToken.objects.filter(resource_key=key, param="family").update(value="wrong")
    locked, release, outcome = threading.Event(), threading.Event(), {}

    def write() -> None:
        try:
            with transaction.atomic():
                row = StoredResource.objects.select_for_update().get(key=key)
                body = json.loads(row.body)
                body["name"] = [{"family": "After"}]
                StoredResource.objects.filter(key=key).update(
                    body=json.dumps(body), version_id=row.version_id + 1
                )
                SearchToken.objects.filter(resource_key=key).delete()
                insert_values(SearchToken, extract_rows(key, body))
                locked.set()
                release.wait(10)
        finally:
            locked.set()
            connection.close()

    def run_reindex() -> None:
        try:
            outcome["out"] = reindex()
        except Exception as error:  # the test's assertion reports it
            outcome["error"] = error
        finally:
            connection.close()

    writer = threading.Thread(target=write)
    writer.start()
    assert locked.wait(10)
    reindexer = threading.Thread(target=run_reindex)
    reindexer.start()
    reindexer.join(1)  # the batch reaches the locked row and waits
    release.set()
    writer.join(10)
    reindexer.join(30)
    assert "error" not in outcome, outcome.get("error")
    assert "1 resources" in outcome["out"]
    assert ids(live_api, "/Patient?family=after") == {pid}
    assert ids(live_api, "/Patient?family=before") == set()


@pytest.fixture
def indexes_restored():
    """The search indexes exist after the test whatever it left: a committing test's
    database is emptied afterwards, not rolled back."""
    from django.db import connection

    yield
    reindex_indexes.build_missing(connection)


def test_a_rebuild_of_committed_rows_builds_its_indexes_in_several_sessions(
    live_api, indexes_restored
):
    """Outside a transaction PostgreSQL builds the indexes in several sessions at once
    (other connections see the rows); every index exists afterwards and finds its rows."""
    made = {n: live_api.post("/Patient", patient(family=f"Built{n}")).body["id"] for n in range(3)}
    SearchToken.objects.all().delete()
    out = reindex()
    assert "3 resources" in out and "rebuilt" in out
    assert missing_indexes() == []
    assert ids(live_api, "/Patient?family=built1") == {made[1]}

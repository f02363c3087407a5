"""``manage.py reindex_search``: the search index re-extracted from stored resources.

The index is emptied behind the store's back (as after a migration that changes how values
are indexed), the command restores it; a run stopped by ``--limit`` resumes after its
checkpoint; ``--type`` limits it to one type; bad arguments are refused.
"""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from fhirservice.models import SearchReindexCheckpoint, SearchToken
from tests.support import patient


def observation(subject: str, code: str) -> dict:
    """A small Observation of ``subject`` with a LOINC code."""
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
    }


def reindex(*args: str) -> str:
    """Run the command quietly; its stdout."""
    out = StringIO()
    call_command("reindex_search", *args, "--verbosity", "0", stdout=out, stderr=StringIO())
    return out.getvalue()


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


@pytest.mark.parametrize("args", [("--type", "Nonsense"), ("--batch-size", "0"), ("--limit", "-1")])
def test_bad_arguments_are_refused(db, args):
    with pytest.raises(CommandError):
        reindex(*args)

"""Fixtures and helpers of the Group roster tests, on whichever backend pair this run uses.

ClickHouse keeps its data between tests (only the metadata store is rolled back or flushed),
so every test works on Groups it creates itself: POST assigns a fresh UUID, and the roster
key (``id/incarnation``) is then new to ClickHouse as well. Nothing is truncated.

Helpers here are plain functions, imported by the test modules, so that a failing assertion
points at the test that made it.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fhirservice.clickhouse import get_clickhouse
from fhirservice.models import ResourceVersion, StoredResource
from groups.models import MemberOutbox
from groups.repository import MemberEventRepository
from groups.selectors import roster_key
from tests.support import FhirClient, FhirResponse

# --- request bodies ------------------------------------------------------------------------


def member(ref: str, **extra: Any) -> dict[str, Any]:
    """A Group.member element for ``ref`` (extra elements such as period, inactive)."""
    return {"entity": {"reference": ref}, **extra}


def group(refs: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    """A Group body; ``refs`` None leaves ``member`` out."""
    body: dict[str, Any] = {"resourceType": "Group", "type": "person", "actual": True, **extra}
    if refs is not None:
        body["member"] = [member(ref) for ref in refs]
    return body


def add(ref: str, **extra: Any) -> dict[str, Any]:
    """JSON Patch op adding (or updating) one member."""
    return {"op": "add", "path": "/member/-", "value": member(ref, **extra)}


def remove_ref(ref: str) -> dict[str, Any]:
    """The seed system's removal by reference (documented extension of JSON Patch)."""
    return {"op": "remove", "path": "/member", "value": member(ref)}


def patients(n: int, prefix: str = "p") -> list[str]:
    """``n`` Patient references whose reference order is their list order."""
    return [f"Patient/{prefix}{i:04d}" for i in range(n)]


# --- requests ------------------------------------------------------------------------------


def create_group(api: FhirClient, refs: list[str] | None = None, **extra: Any) -> str:
    """POST a Group and return its id."""
    response = api.post("/Group", group(refs, **extra))
    assert response.status == 201, response
    return response.body["id"]


def patch(
    api: FhirClient, gid: str, ops: list[dict[str, Any]], *, version: int | None = None
) -> FhirResponse:
    """PATCH a Group, with ``If-Match`` when ``version`` is given."""
    headers = {"If-Match": f'W/"{version}"'} if version is not None else {}
    return api.patch(f"/Group/{gid}", ops, headers=headers)


def patched(api: FhirClient, gid: str, ops: list[dict[str, Any]], **kwargs: Any) -> dict:
    """PATCH that must succeed; the returned Group."""
    response = patch(api, gid, ops, **kwargs)
    assert response.status == 200, response
    return response.body


def read(api: FhirClient, gid: str, query: str = "") -> dict[str, Any]:
    """GET the Group (200 required)."""
    response = api.get(f"/Group/{gid}{query}")
    assert response.status == 200, response
    return response.body


def refs_of(body: dict[str, Any]) -> list[str]:
    """Member references of a Group body, in served order."""
    return [m["entity"]["reference"] for m in body.get("member", [])]


def version_of(body: dict[str, Any]) -> int:
    """The numeric versionId of a served resource."""
    return int(body["meta"]["versionId"])


def member_page(api: FhirClient, gid: str, query: str = "") -> FhirResponse:
    """GET ``$members`` (any status)."""
    return api.get(f"/Group/{gid}/$members{query}")


def page_refs(parameters: dict[str, Any]) -> list[str]:
    """Member references of one ``$members`` page."""
    return [
        part["valueReference"]["reference"]
        for p in parameters["parameter"]
        if p["name"] == "member"
        for part in p["part"]
        if part["name"] == "entity"
    ]


def page_value(parameters: dict[str, Any], name: str) -> Any:
    """The value of a non-member parameter of a ``$members`` page (None when absent)."""
    for p in parameters["parameter"]:
        if p["name"] == name:
            return next(v for k, v in p.items() if k.startswith("value"))
    return None


def search_ids(api: FhirClient, query: str) -> tuple[list[str], int | None]:
    """Ids of a Group search (all pages of one request) and the Bundle's total."""
    response = api.get(f"/Group?{query}")
    assert response.status == 200, response
    ids = [e["resource"]["id"] for e in response.body.get("entry", []) if "resource" in e]
    return sorted(ids), response.body.get("total")


# --- stored state --------------------------------------------------------------------------


def current_key(gid: str) -> str:
    """The roster key of a Group's current incarnation."""
    row = StoredResource.objects.get(key=f"Group/{gid}")
    return roster_key(gid, row.incarnation)


def stored_version(gid: str) -> int:
    """The Group's version in the metadata store."""
    return StoredResource.objects.get(key=f"Group/{gid}").version_id


def history_versions(gid: str) -> list[int]:
    """Every version number of the Group in the history table, ascending."""
    return sorted(
        ResourceVersion.objects.filter(resource_type="Group", resource_id=gid).values_list(
            "version_id", flat=True
        )
    )


def outbox_rows(gid: str) -> list[MemberOutbox]:
    """The Group's outbox rows in (version, chunk) order."""
    return list(MemberOutbox.objects.filter(group_id=gid).order_by("version", "chunk"))


def outbox_events(gid: str) -> list[tuple[int, int, str, str]]:
    """(version, seq, event type, reference) of every outbox event of the Group."""
    return [
        (row.version, event[2], event[1], event[0])
        for row in outbox_rows(gid)
        for event in orjson.loads(row.events)
    ]


def clickhouse_roster(key: str) -> list[str]:
    """Present member references of a roster key, read from ClickHouse alone."""
    return [state.ref for state in MemberEventRepository().iter_roster(key)]


def clickhouse_events(key: str) -> list[tuple[int, int, str, str]]:
    """(version, seq, event type, reference) in ClickHouse for a roster key, each event once."""
    rows = MemberEventRepository().events(key, limit=1_000_000)
    return sorted((r["version"], r["seq"], r["event_type"], r["member_ref"]) for r in rows)


def clickhouse_raw_count(key: str) -> int:
    """Raw rows (duplicates included, before any merge) of a roster key in the event log."""
    rows = get_clickhouse().execute(
        "SELECT count() FROM Group_4_0_0_MemberEvents WHERE roster_key = %(k)s", {"k": key}
    )
    return int(rows[0][0])


@pytest.fixture(
    params=[
        pytest.param("pending", marks=pytest.mark.django_db),
        pytest.param("shipped", marks=pytest.mark.django_db(transaction=True)),
    ]
)
def any_api(request: pytest.FixtureRequest) -> FhirClient:
    """A FHIR client twice: writes left pending in the outbox (a rolled-back test
    transaction, so on-commit shipping never runs) and writes committed and shipped to
    ClickHouse. Roster reads must give the same answers either way.

    The database comes from the params' marks, not from ``request.getfixturevalue``:
    pytest-django sets up test databases only for tests it sees needing one at collection.
    ``api.shipped`` says which variant runs.
    """
    client = FhirClient()
    client.shipped = request.param == "shipped"  # type: ignore[attr-defined]
    return client


def snapshot(api: FhirClient, gid: str) -> dict[str, Any]:
    """Everything a write could change about a Group: the served resource (version, meta,
    roster, quantity), its history, its outbox events and its events in ClickHouse."""
    return {
        "body": read(api, gid),
        "history": history_versions(gid),
        "outbox": outbox_events(gid),
        "clickhouse": clickhouse_events(current_key(gid)),
    }


def dead_clickhouse_url() -> str:
    """A ClickHouse URL on a loopback port where nothing listens (connections are refused)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"clickhouse://default@127.0.0.1:{port}/fhir_test?connect_timeout=1"


@pytest.fixture
def clickhouse_down() -> Any:
    """A context manager under which the member store cannot be reached.

    ``override_settings`` of ``CLICKHOUSE_URL`` resets the process-wide client on entry and
    on exit, so the real store (chdb or server) is reopened afterwards.
    """
    from django.test import override_settings

    return lambda: override_settings(CLICKHOUSE_URL=dead_clickhouse_url())


@pytest.fixture
def no_shipping(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Writes commit but their batches are not shipped after commit: the process "dies"
    between the two stores. Returns the arguments of each shipping that "died"."""
    import groups.outbox.ship

    skipped: list[dict[str, Any]] = []

    def crashed(written: dict[str, list[str]], **kwargs: Any) -> None:
        skipped.extend({"roster": roster, "keys": keys} for roster, keys in written.items())
        raise RuntimeError("simulated crash between commit and shipping")

    # The writes' own shipping only: the relay and the commands ship as they would after a
    # restart.
    monkeypatch.setattr(groups.outbox.ship, "written_batches_ship", crashed)
    return skipped

"""A failed operation leaves no trace in either store.

Every case runs with ``live_api`` (writes really commit and ship), counts the rows of every
table a write touches (StoredResource, ResourceVersion, SearchToken, MemberOutbox) and the
raw member events in ClickHouse before and after, and compares the Groups as served. Some
failures come before any write (stale version, unknown or ambiguous identifier, bad
parameter, member not in group); others after the region has written (an invalid Group DTO
after Patients were created, a region that keeps losing races after writing both Groups):
the transaction must take those writes back, and nothing may reach ClickHouse.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from groups.models import MemberOutbox
from operations import transactions
from tests.operations.conftest import (
    add_member,
    assert_error,
    create_group,
    create_patient,
    diagnostics,
    group_body,
    ident,
    new_identifier,
    out_value,
    parameters,
    read_group,
    ref,
    remove_member,
    store_counts,
    text,
    transfer,
)
from tests.support import FhirClient


def state(api: FhirClient, *gids: str) -> dict[str, Any]:
    """Row counts in both stores and the Groups as served (version, roster, quantity)."""
    return {"counts": store_counts(), "groups": {gid: read_group(api, gid) for gid in gids}}


def dto(*identifiers: dict[str, str]) -> dict[str, Any]:
    """A Patient DTO parameter."""
    return {
        "name": "patient",
        "resource": {"resourceType": "Patient", "identifier": list(identifiers)},
    }


class World:
    """Two Groups A and B; member M (identifier ``m``) in A; X (``x``) in none;
    two Patients sharing identifier ``dup``; the Groups have versions 2 and 1."""

    def __init__(self, api: FhirClient) -> None:
        self.m, self.x, self.dup = new_identifier(), new_identifier(), new_identifier()
        self.member = create_patient(api, self.m)
        self.outsider = create_patient(api, self.x)
        create_patient(api, self.dup)
        create_patient(api, self.dup)
        self.a = create_group(api, [create_patient(api)])
        self.b = create_group(api)
        assert add_member(api, self.a, ident(self.m)).status == 200


Case = Callable[[FhirClient, World], Any]

FAILURES: dict[str, tuple[Case, int, str, str]] = {
    "add-member, stale groupVersion, new Patient DTO": (
        lambda api, w: add_member(api, w.a, dto(new_identifier()), text("groupVersion", "1")),
        409,
        "conflict",
        "MSG_VERSION_AWARE_CONFLICT",
    ),
    "remove-member, stale groupVersion": (
        lambda api, w: remove_member(api, w.a, ident(w.m), text("groupVersion", "1")),
        409,
        "conflict",
        "MSG_VERSION_AWARE_CONFLICT",
    ),
    "transfer, stale targetVersion": (
        lambda api, w: transfer(api, w.a, w.b, ident(w.m), text("targetVersion", "5")),
        409,
        "conflict",
        "MSG_VERSION_AWARE_CONFLICT",
    ),
    "add-member, unknown identifier": (
        lambda api, w: add_member(api, w.a, ident(new_identifier())),
        404,
        "not-found",
        "MSG_PATIENT_NOT_FOUND",
    ),
    "transfer, unknown identifier": (
        lambda api, w: transfer(api, w.a, w.b, ident(new_identifier())),
        404,
        "not-found",
        "MSG_PATIENT_NOT_FOUND",
    ),
    "add-member, ambiguous identifier": (
        lambda api, w: add_member(api, w.b, ident(w.dup)),
        409,
        "conflict",
        "MSG_PATIENT_AMBIGUOUS",
    ),
    "add-member, DTO matching two Patients": (
        lambda api, w: add_member(api, w.b, dto(w.m, w.x)),
        409,
        "conflict",
        "MSG_PATIENT_AMBIGUOUS",
    ),
    "create-roster, ambiguous identifier after new ones": (
        lambda api, w: api.post(
            "/Group/$create-roster",
            parameters(
                {"name": "group", "resource": group_body()},
                ident(new_identifier()),
                ident(new_identifier()),
                ident(w.dup),
            ),
        ),
        409,
        "conflict",
        "MSG_PATIENT_AMBIGUOUS",
    ),
    "add-member, bad period with a new Patient DTO": (
        lambda api, w: add_member(
            api,
            w.b,
            dto(new_identifier()),
            {"name": "period", "valuePeriod": {"start": "2030", "end": "2020"}},
        ),
        400,
        "invalid",
        "MSG_BAD_FORMAT",
    ),
    "transfer, unknown parameter": (
        lambda api, w: transfer(api, w.a, w.b, ident(w.m), text("reason", "moved")),
        400,
        "invalid",
        "MSG_PARAM_UNKNOWN",
    ),
    "remove-member, bad mode": (
        lambda api, w: remove_member(api, w.a, ident(w.m), {"name": "mode", "valueCode": "purge"}),
        400,
        "invalid",
        "MSG_BAD_FORMAT",
    ),
    "remove-member, not a member": (
        lambda api, w: remove_member(api, w.a, ident(w.x)),
        422,
        "processing",
        "MSG_NOT_A_MEMBER",
    ),
    "transfer, not a member of the source": (
        lambda api, w: transfer(api, w.b, w.a, ident(w.m)),
        422,
        "processing",
        "MSG_NOT_A_MEMBER",
    ),
    "create-roster, invalid Group DTO after creating Patients": (
        lambda api, w: api.post(
            "/Group/$create-roster",
            parameters(
                {
                    "name": "group",
                    "resource": {"resourceType": "Group", "actual": True},
                },
                ident(new_identifier()),
                ident(new_identifier()),
                ident(w.m),
            ),
        ),
        400,
        "invalid",
        "MSG_INVALID_RESOURCE",
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failed_operation_leaves_no_trace(live_api, case):
    call, status, issue, detail = FAILURES[case]
    world = World(live_api)
    before = state(live_api, world.a, world.b)
    response = call(live_api, world)
    assert_error(response, status, issue, detail)
    assert state(live_api, world.a, world.b) == before


@pytest.fixture
def world(live_api: FhirClient) -> World:
    """The World of one test."""
    return World(live_api)


@pytest.fixture
def regions_always_race(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every region attempt loses a race at its final check, after all its writes; three
    attempts in all. Returns, per attempt, the outbox rows its transaction saw at the end."""
    attempts: list[int] = []

    def verify(self: transactions.Region) -> None:
        attempts.append(MemberOutbox.objects.count())
        raise transactions.RegionRace("forced")

    monkeypatch.setattr(transactions.Region, "verify", verify)
    with override_settings(FHIR_SERVICE={**settings.FHIR_SERVICE, "WRITE_RETRIES": 2}):
        yield attempts


RACING: dict[str, Case] = {
    "transfer": lambda api, w: transfer(api, w.a, w.b, ident(w.m)),
    "add-member with a new Patient DTO": lambda api, w: add_member(api, w.b, dto(new_identifier())),
    "remove-member": lambda api, w: remove_member(api, w.a, ref(w.member, "member")),
    "create-roster": lambda api, w: api.post(
        "/Group/$create-roster",
        parameters(
            {"name": "group", "resource": group_body()}, ident(new_identifier()), ident(w.x)
        ),
    ),
}


@pytest.mark.parametrize("case", list(RACING))
def test_region_that_keeps_racing_after_writing_leaves_no_trace(
    live_api, world, regions_always_race, case
):
    before = state(live_api, world.a, world.b)
    response = RACING[case](live_api, world)
    assert_error(response, 409, "conflict", "MSG_CONCURRENT_WRITE")
    assert diagnostics(response) == transactions.MSG_REGION_RETRIES
    # Three attempts, each of which had written a Group version (with its outbox row).
    assert len(regions_always_race) == 3
    assert all(n > before["counts"]["MemberOutbox"] for n in regions_always_race)
    assert state(live_api, world.a, world.b) == before


def test_a_retried_region_commits_once(live_api, monkeypatch):
    """The first attempt (Patient created, Group written) is rolled back; the retry wins."""
    world = World(live_api)
    before = store_counts()
    lost: list[bool] = []
    original = transactions.Region.verify

    def verify(self: transactions.Region) -> None:
        if not lost:
            lost.append(True)
            raise transactions.RegionRace("forced once")
        original(self)

    monkeypatch.setattr(transactions.Region, "verify", verify)
    identifier = new_identifier()
    response = add_member(live_api, world.b, dto(identifier))
    assert response.status == 200, response
    assert out_value(response, "groupVersion") == "2"
    after = store_counts()
    # One Patient (version, history row, tokens), one Group version, one outbox row, one event.
    assert after["StoredResource"] == before["StoredResource"] + 1
    assert after["ResourceVersion"] == before["ResourceVersion"] + 2
    assert after["MemberOutbox"] == before["MemberOutbox"] + 1
    assert after["clickhouse events"] == before["clickhouse events"] + 1
    found = live_api.get(f"/Patient?identifier={identifier['system']}|{identifier['value']}")
    assert found.body["total"] == 1
    group = read_group(live_api, world.b)
    assert group["meta"]["versionId"] == "2"
    assert group["quantity"] == 1


@pytest.mark.parametrize("case", ["remove-member", "transfer"])
def test_member_store_down_is_503_and_leaves_no_trace(live_api, world, clickhouse_down, case):
    """Whether M is a member cannot be known without the member store: 503, nothing written."""
    before = state(live_api, world.a, world.b)
    with clickhouse_down():
        if case == "transfer":
            response = transfer(live_api, world.a, world.b, ident(world.m))
        else:
            response = remove_member(live_api, world.a, ident(world.m))
    assert_error(response, 503, "transient", "MSG_MEMBER_STORE_DOWN")
    assert state(live_api, world.a, world.b) == before

"""Concurrent member operations are serializable: the outcome equals some serial order.

Eight real threads (each with its own Django test client and database connection) run random
interleavings of ``$transfer-member``, ``$add-member`` and ``$remove-member`` on a few Groups.
Every response is recorded with the Group versions it produced. Afterwards:

1. the commit order is derived from the versions: each success produced specific versions
   of specific Groups; every Group's ``_history`` must consist of exactly those versions, and
   the per-Group orders (two of them for a transfer) must merge into one order (no cycle);
2. the operations are replayed serially in that order on a model (a dict per Group), and
   every success must be a success there with the same versions, and every failure (422,
   409) must be what the replay answers at some version of its Group that real time allows;
3. the final rosters (GET and ``$members``), the quantity, every historical version (vread)
   and ``$group-memberships`` of every Patient equal the model;
4. no Patient is ever in two Groups: each starts in at most one, adds only enrol Patients
   that were never enrolled, and only transfers move members (the model checks this at
   every step, and the model is checked against every stored version).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.db import connection

from operations import group_add_member
from tests.operations.conftest import (
    add_member,
    create_group,
    create_patient,
    group_version,
    ident,
    members_roster,
    new_identifier,
    read_group,
    ref,
    remove_member,
    roster,
    text,
    transfer,
)
from tests.support import FhirClient, FhirResponse, run_threads

SEED = 5_20261123
THREADS = 8
OPS_PER_THREAD = 25
GROUPS = 4
POOL = 32  # Patients that start as members, POOL / GROUPS per Group
RESERVE_PER_THREAD = 4  # Patients that exist but start in no Group; each is enrolled once

EXPECTED_FAILURES = {
    (422, "MSG_NOT_A_MEMBER"),
    (422, "MSG_MEMBER_INACTIVE"),
    (409, "MSG_VERSION_AWARE_CONFLICT"),
}

Roster = dict[str, bool]  # member reference → inactive


@dataclass
class Op:
    """One operation a thread ran, and what the server answered."""

    thread: int
    index: int
    kind: str  # add | remove | transfer
    group: str  # the Group it runs on (the source of a transfer)
    patient: str | None  # member reference (None: a DTO add, until the answer names it)
    by: str  # identifier | member | dto
    target: str | None = None
    mode: str = "remove"
    version: str | None = None  # groupVersion / sourceVersion the client named
    started: float = 0.0
    ended: float = 0.0
    status: int = 0
    detail: str | None = None
    versions: dict[str, int] = field(default_factory=dict)  # Group → version produced

    @property
    def outcome(self) -> tuple[int, str | None]:
        return self.status, self.detail

    def __str__(self) -> str:
        to = f"→{self.target[:8]}" if self.target else ""
        return (
            f"t{self.thread}#{self.index} {self.kind}({self.mode if self.kind == 'remove' else ''}"
            f") {self.patient} in {self.group[:8]}{to} v={self.version} by {self.by}: "
            f"{self.status} {self.detail or ''} {self.versions}"
        )


class Known:
    """Patients the threads may name, (reference, identifier), and where each was last seen
    (a hint that aims many operations at the right Group, so that threads collide)."""

    def __init__(self, patients: list[tuple[str, dict[str, str]]], seen: dict[str, str]) -> None:
        self.lock = threading.Lock()
        self.patients = list(patients)
        self.seen = dict(seen)

    def pick(self, rng: random.Random) -> tuple[str, dict[str, str], str | None]:
        with self.lock:
            patient, identifier = rng.choice(self.patients)
            return patient, identifier, self.seen.get(patient)

    def learn(self, op: Op, identifier: dict[str, str] | None = None) -> None:
        with self.lock:
            if identifier is not None:
                self.patients.append((op.patient, identifier))
            self.seen[op.patient] = op.target or op.group


def outcome(op: Op, roster_now: Roster, version_now: int) -> tuple[int, str | None]:
    """What a serial execution answers for ``op`` when its Group is at this state."""
    if op.version is not None and op.version != str(version_now):
        return 409, "MSG_VERSION_AWARE_CONFLICT"
    if op.kind == "add":
        return 200, None
    if op.patient not in roster_now:
        return 422, "MSG_NOT_A_MEMBER"
    if op.kind == "remove" and op.mode == "inactivate" and roster_now[op.patient]:
        return 422, "MSG_MEMBER_INACTIVE"
    return 200, None


def run_thread(
    index: int, groups: list[str], reserve: list[tuple[str, dict]], known: Known, log: list[Op]
) -> None:
    """One client: OPS_PER_THREAD random operations, each recorded in ``log``."""
    rng = random.Random(SEED * 100 + index)
    api = FhirClient()
    reserve = list(reserve)
    for n in range(OPS_PER_THREAD):
        roll = rng.random()
        group = rng.choice(groups)
        with_version = rng.random() < 0.25
        if roll < 0.2:
            if reserve and rng.random() < 0.6:
                patient, identifier = reserve.pop()
                op, by = Op(index, n, "add", group, patient, "identifier"), ident(identifier)
            else:
                identifier = new_identifier()
                dto = {"resourceType": "Patient", "identifier": [identifier]}
                op, by = (
                    Op(index, n, "add", group, None, "dto"),
                    {"name": "patient", "resource": dto},
                )
        else:
            patient, identifier, seen = known.pick(rng)
            if seen is not None and rng.random() < 0.7:
                group = seen
            by_identifier = rng.random() < 0.5
            by = ident(identifier) if by_identifier else ref(patient, "member")
            if roll < 0.45:
                mode = "inactivate" if rng.random() < 0.4 else "remove"
                op = Op(index, n, "remove", group, patient, by["name"], mode=mode)
            else:
                target = rng.choice([g for g in groups if g != group])
                op = Op(index, n, "transfer", group, patient, by["name"], target=target)
        items: list[dict[str, Any]] = [by]
        if with_version:
            # Read-modify-write: the version just read, which a concurrent op may outdate.
            op.version = str(group_version(api, group))
            name = "sourceVersion" if op.kind == "transfer" else "groupVersion"
            items.append(text(name, op.version))
        if op.kind == "remove":
            items.append({"name": "mode", "valueCode": op.mode})
        op.started = time.monotonic()
        if op.kind == "add":
            response = add_member(api, group, *items)
        elif op.kind == "remove":
            response = remove_member(api, group, *items)
        else:
            response = transfer(api, group, op.target, *items)
        op.ended = time.monotonic()
        record(op, response)
        if op.status == 200 and op.kind != "remove":
            known.learn(op, identifier if op.by == "dto" else None)
        log.append(op)


def record(op: Op, response: FhirResponse) -> None:
    """Fill in the answer: status, detail code, produced versions, the added Patient."""
    op.status = response.status
    if response.status != 200:
        codes = response.detail_codes()
        op.detail = codes[0] if codes else None
        return
    values = {
        p["name"]: next(v for k, v in p.items() if k.startswith("value"))
        for p in response.body["parameter"]
    }
    if op.kind == "transfer":
        op.versions = {
            op.group: int(values["sourceVersion"]),
            op.target: int(values["targetVersion"]),
        }
    else:
        op.versions = {op.group: int(values["groupVersion"])}
    if op.kind == "add":
        member = values["member"]["reference"]
        assert op.patient in (None, member), (str(op), member)
        op.patient = member


def commit_order(successes: list[Op], initial: dict[str, int], final: dict[str, int]) -> list[Op]:
    """The successes in an order consistent with every Group's version order.

    Each Group's versions after ``initial`` up to ``final`` must each have been produced by
    exactly one acknowledged operation.
    """
    claims: dict[str, dict[int, Op]] = defaultdict(dict)
    for op in successes:
        for gid, version in op.versions.items():
            assert version not in claims[gid], (
                f"version {version} of {gid} claimed twice: {claims[gid][version]} / {op}"
            )
            claims[gid][version] = op
    for gid, last in final.items():
        expected = list(range(initial[gid] + 1, last + 1))
        assert sorted(claims[gid]) == expected, (gid, sorted(claims[gid]), expected)
    after: dict[int, set[int]] = defaultdict(set)
    waiting = {id(op): 0 for op in successes}
    for versions in claims.values():
        chain = [versions[v] for v in sorted(versions)]
        for earlier, later in zip(chain, chain[1:], strict=False):
            if id(later) not in after[id(earlier)]:
                after[id(earlier)].add(id(later))
                waiting[id(later)] += 1
    by_id = {id(op): op for op in successes}
    ready = sorted((op for op in successes if waiting[id(op)] == 0), key=lambda o: o.started)
    order: list[Op] = []
    while ready:
        op = ready.pop(0)
        order.append(op)
        for nxt in sorted(after[id(op)], key=lambda i: by_id[i].started):
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                ready.append(by_id[nxt])
    stuck = [str(op) for op in successes if waiting[id(op)] > 0]
    assert not stuck, f"the Groups' version orders contradict each other: {stuck}"
    return order


def check_real_time(successes: list[Op]) -> None:
    """An op acknowledged before another started has the lower version of a shared Group."""
    for a in successes:
        for b in successes:
            if a.ended < b.started:
                for gid in set(a.versions) & set(b.versions):
                    assert a.versions[gid] < b.versions[gid], (str(a), str(b))


def test_random_interleavings_equal_a_serial_replay(live_api):
    api = live_api
    print(f"\nserializability: seed {SEED}, {THREADS} threads x {OPS_PER_THREAD} ops")
    groups = [create_group(api, name=f"S{i}") for i in range(GROUPS)]
    pool: list[tuple[str, dict[str, str]]] = []
    for _ in range(POOL):
        identifier = new_identifier()
        pool.append((create_patient(api, identifier), identifier))
    reserve = []
    for _ in range(THREADS * RESERVE_PER_THREAD):
        identifier = new_identifier()
        reserve.append((create_patient(api, identifier), identifier))
    start: dict[str, Roster] = {gid: {} for gid in groups}
    for i, (patient, identifier) in enumerate(pool):
        gid = groups[i % GROUPS]
        start[gid][patient] = False
        assert add_member(api, gid, ident(identifier)).status == 200
    initial = {gid: group_version(api, gid) for gid in groups}

    known = Known(pool + reserve, {p: g for g, members in start.items() for p in members})
    logs: list[list[Op]] = [[] for _ in range(THREADS)]

    def main(index: int) -> None:
        mine = reserve[index * RESERVE_PER_THREAD : (index + 1) * RESERVE_PER_THREAD]
        run_thread(index, groups, mine, known, logs[index])

    started = time.monotonic()
    run_threads(main, THREADS, timeout=600)
    ops = [op for log in logs for op in log]
    print(
        f"{len(ops)} operations in {time.monotonic() - started:.1f} s: "
        + ", ".join(
            f"{k}={v}"
            for k, v in sorted(Counter((op.kind, op.status, op.detail or "") for op in ops).items())
        )
    )
    unexpected = [str(op) for op in ops if op.status != 200 and op.outcome not in EXPECTED_FAILURES]
    assert not unexpected, unexpected

    # 1. The commit order, from the versions each success produced and each Group's history.
    final = {gid: group_version(api, gid) for gid in groups}
    for gid in groups:
        history = api.get(f"/Group/{gid}/_history?_count=1000")
        assert history.status == 200, history
        served = sorted(int(e["resource"]["meta"]["versionId"]) for e in history.body["entry"])
        assert served == list(range(1, final[gid] + 1)), (gid, served)
    successes = [op for op in ops if op.status == 200]
    order = commit_order(successes, initial, final)
    check_real_time(successes)

    # 2. Serial replay: each success must succeed there with the same versions.
    rosters: dict[str, Roster] = {gid: dict(members) for gid, members in start.items()}
    versions = dict(initial)
    states: dict[str, dict[int, Roster]] = {gid: {initial[gid]: dict(start[gid])} for gid in groups}
    for op in order:
        assert outcome(op, rosters[op.group], versions[op.group]) == (200, None), str(op)
        if op.kind == "add":
            assert all(op.patient not in r for r in rosters.values()), str(op)
            rosters[op.group][op.patient] = False
        elif op.kind == "remove" and op.mode == "remove":
            del rosters[op.group][op.patient]
        elif op.kind == "remove":
            rosters[op.group][op.patient] = True
        else:
            assert op.patient not in rosters[op.target], str(op)
            rosters[op.target][op.patient] = rosters[op.group].pop(op.patient)
        for gid, version in op.versions.items():
            assert version == versions[gid] + 1, str(op)
            versions[gid] = version
            states[gid][version] = dict(rosters[gid])
        everyone = [p for r in rosters.values() for p in r]
        assert len(everyone) == len(set(everyone)), f"a Patient in two Groups after {op}"

    # ... and each failure must be the replay's answer at a version real time allows.
    for op in ops:
        if op.status == 200:
            continue
        gid = op.group
        low = max(
            [initial[gid]]
            + [s.versions[gid] for s in successes if gid in s.versions and s.ended < op.started]
        )
        high = min(
            [final[gid]]
            + [s.versions[gid] - 1 for s in successes if gid in s.versions and s.started > op.ended]
        )
        assert low <= high, f"no version of {gid} fits in real time: {op}"
        fits = [k for k in range(low, high + 1) if outcome(op, states[gid][k], k) == op.outcome]
        assert fits, f"no serial point in versions {low}..{high} answers {op}"

    # 3. The stored state equals the model: now, and at every version.
    for gid in groups:
        assert roster(api, gid) == rosters[gid], gid
        assert members_roster(api, gid) == rosters[gid], gid
        active = sum(1 for inactive in rosters[gid].values() if not inactive)
        assert read_group(api, gid)["quantity"] == active, gid
        for version, expected in states[gid].items():
            body = api.get(f"/Group/{gid}/_history/{version}").body
            served = {
                m["entity"]["reference"]: m.get("inactive", False) for m in body.get("member", [])
            }
            assert served == expected, (gid, version)
            assert body["quantity"] == sum(1 for i in expected.values() if not i), (gid, version)
    for patient, _ in known.patients:
        response = api.get(f"/{patient}/$group-memberships")
        assert response.status == 200, response
        listed = sorted(e["resource"]["id"] for e in response.body.get("entry", []))
        expected = sorted(gid for gid in groups if rosters[gid].get(patient) is False)
        assert listed == expected, patient
    # The mix really exercised both outcomes of every operation.
    kinds = Counter((op.kind, op.status) for op in ops)
    assert kinds[("transfer", 200)] and kinds[("transfer", 422)], kinds
    assert kinds[("remove", 200)] and kinds[("add", 200)], kinds


# --- targeted races --------------------------------------------------------------------------


def run_together(work: Any, count: int = THREADS) -> list[Any]:
    """Run ``work(index, client)`` in ``count`` threads released together; their results."""
    return run_threads(lambda index: work(index, FhirClient()), count)


def answer(response: FhirResponse) -> tuple[int, str | None]:
    """Status and first detail code."""
    codes = response.detail_codes() if response.status >= 400 else []
    return response.status, codes[0] if codes else None


def test_one_member_transferred_to_eight_targets_at_once_moves_once(live_api):
    identifier = new_identifier()
    pid = create_patient(live_api, identifier)
    source = create_group(live_api, [pid])
    targets = [create_group(live_api) for _ in range(THREADS)]

    def work(index: int, client: FhirClient) -> tuple[int, str | None]:
        return answer(transfer(client, source, targets[index], ident(identifier)))

    results = run_together(work)
    assert Counter(results) == {(200, None): 1, (422, "MSG_NOT_A_MEMBER"): THREADS - 1}
    winner = targets[results.index((200, None))]
    assert roster(live_api, source) == {}
    assert group_version(live_api, source) == 2
    for target in targets:
        expected = {pid: False} if target == winner else {}
        assert roster(live_api, target) == expected
        assert group_version(live_api, target) == (2 if target == winner else 1)
    listed = live_api.get(f"/{pid}/$group-memberships").body
    assert [e["resource"]["id"] for e in listed["entry"]] == [winner]


def test_same_new_patient_dto_from_eight_clients_creates_one_patient(live_api):
    """The predicate race: every client sees no Patient with the identifier yet."""
    identifier = new_identifier()
    groups = [create_group(live_api) for _ in range(THREADS)]
    dto = {"resourceType": "Patient", "identifier": [identifier]}

    def work(index: int, client: FhirClient) -> tuple[int, str]:
        response = add_member(client, groups[index], {"name": "patient", "resource": dto})
        assert response.status == 200, response
        return response.status, response.body["parameter"][0]["valueReference"]["reference"]

    results = run_together(work)
    found = live_api.get(f"/Patient?identifier={identifier['system']}|{identifier['value']}")
    assert found.body["total"] == 1, found
    pid = f"Patient/{found.body['entry'][0]['resource']['id']}"
    assert results == [(200, pid)] * THREADS
    for gid in groups:
        assert roster(live_api, gid) == {pid: False}


def test_same_new_identifiers_in_eight_create_roster_calls_create_each_patient_once(live_api):
    identifiers = [new_identifier() for _ in range(20)]
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {
                "name": "group",
                "resource": {"resourceType": "Group", "type": "person", "actual": True},
            },
            *[ident(i) for i in identifiers],
        ],
    }

    def work(index: int, client: FhirClient) -> tuple[str, int]:
        response = client.post("/Group/$create-roster", body)
        assert response.status == 200, response
        values = {
            p["name"]: next(v for k, v in p.items() if k.startswith("value"))
            for p in response.body["parameter"]
        }
        return values["group"]["reference"].split("/")[1], values["created"]

    results = run_together(work)
    assert sum(created for _, created in results) == len(identifiers)
    patients = []
    for identifier in identifiers:
        found = live_api.get(f"/Patient?identifier={identifier['system']}|{identifier['value']}")
        assert found.body["total"] == 1, (identifier, found)
        patients.append(f"Patient/{found.body['entry'][0]['resource']['id']}")
    for gid, _ in results:
        assert roster(live_api, gid) == {pid: False for pid in patients}


def test_regions_run_serializable_on_postgresql(live_api, monkeypatch):
    """Without an outer transaction a region runs at SERIALIZABLE (SQLite: one writer)."""
    if connection.vendor != "postgresql":
        pytest.skip("isolation levels are PostgreSQL's; SQLite regions hold the write lock")
    seen: list[str] = []
    real = group_add_member.patient_by_identifier

    def spying(identifier: dict[str, str]) -> str:
        with connection.cursor() as cursor:
            cursor.execute("SHOW transaction_isolation")
            seen.append(cursor.fetchone()[0])
        return real(identifier)

    monkeypatch.setattr(group_add_member, "patient_by_identifier", spying)
    identifier = new_identifier()
    create_patient(live_api, identifier)
    gid = create_group(live_api)
    response = add_member(live_api, gid, ident(identifier))
    assert response.status == 200, response
    assert seen == ["serializable"]

"""When member events ship (groups/outbox/background.py): in the background for HTTP
requests, before returning for big writes and callers outside a request, and drained before
the ClickHouse client closes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from django.test import override_settings

from fhirservice.clickhouse import get_clickhouse, reset_clickhouse
from groups.models import MemberOutbox
from groups.outbox import background as shipping
from groups.outbox import ship as ship_module
from tests.groups.conftest import create_group, group, read, refs_of
from tests.support import FhirClient


class Recorder:
    """A ship function that records which thread called it, optionally after a wait."""

    def __init__(self, wait: threading.Event | None = None, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, list[str], str]] = []
        self.wait = wait
        self.delay = delay

    def __call__(self, roster: str, keys: list[str]) -> None:
        if self.wait is not None:
            assert self.wait.wait(10)
        time.sleep(self.delay)
        self.calls.append((roster, list(keys), threading.current_thread().name))


@pytest.fixture
def after_commit(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``background.after_commit`` with the shipping of each roster done by a Recorder."""
    recorders: dict[str, Recorder] = {}

    def route(written: dict[str, list[str]], known: object = None) -> None:
        for roster, keys in written.items():
            recorders[roster](roster, keys)

    monkeypatch.setattr(ship_module, "written_batches_ship", route)

    def queue(roster: str, keys: list[str], recorder: Recorder, events: int) -> None:
        recorders[roster] = recorder
        shipping.after_commit(roster, keys, events=events)

    return queue


def test_outside_a_request_writes_ship_before_returning(after_commit):
    ship = Recorder()
    after_commit("r/1", ["k1"], ship, 1)
    assert ship.calls == [("r/1", ["k1"], threading.current_thread().name)]


def test_in_a_request_small_writes_ship_in_the_background(after_commit):
    gate = threading.Event()
    ship = Recorder(wait=gate)
    with shipping.serving_request():
        after_commit("r/2", ["k1"], ship, 1)
    assert ship.calls == []  # answered before shipping
    gate.set()
    assert shipping.flush()
    assert ship.calls == [("r/2", ["k1"], "member-event-shipper")]


def test_writes_queued_while_the_shipper_is_busy_go_out_together(after_commit):
    gate = threading.Event()
    blocker, ship = Recorder(wait=gate), Recorder()
    with shipping.serving_request():
        after_commit("r/3", ["first"], blocker, 1)
        time.sleep(0.2)  # the shipper is now inside ``blocker``
        for key in ("a", "b", "c"):
            after_commit("r/4", [key], ship, 1)
    gate.set()
    assert shipping.flush()
    assert ship.calls == [("r/4", ["a", "b", "c"], "member-event-shipper")]


def test_writes_of_many_rosters_queued_meanwhile_go_out_in_one_call(monkeypatch):
    gate = threading.Event()
    calls: list[dict[str, list[str]]] = []

    def record(written: dict[str, list[str]], known: object = None) -> None:
        if not calls:
            assert gate.wait(10)  # the first round holds the shipper while others queue
        calls.append({roster: list(keys) for roster, keys in written.items()})

    monkeypatch.setattr(ship_module, "written_batches_ship", record)
    # A shipper of its own: the process's may be inside MEMBER_SHIP_INTERVAL after a round of
    # several writes, and "first" would then wait and go out with the others.
    monkeypatch.setattr(shipping, "_shipper", shipping.BackgroundShipper())
    with shipping.serving_request():
        shipping.after_commit("r/8", ["first"], events=1)
        time.sleep(0.2)  # the shipper is now inside the first round
        for roster, key in (("r/9", "a"), ("r/10", "b"), ("r/9", "c")):
            shipping.after_commit(roster, [key], events=1)
    gate.set()
    assert shipping.flush()
    # One ClickHouse insert for the round, not one per roster (a backlog of 100 rosters
    # took a round of 100 inserts).
    assert calls == [{"r/8": ["first"]}, {"r/9": ["a", "c"], "r/10": ["b"]}]


def test_rounds_start_at_most_every_ship_interval(after_commit, monkeypatch):
    # A shipper of its own: the process's may have started a round less than 1 s ago.
    monkeypatch.setattr(shipping, "_shipper", shipping.BackgroundShipper())
    gate = threading.Event()
    ship = Recorder()
    with (
        override_settings(FHIR_SERVICE={"MEMBER_SHIP_INTERVAL": 1.0}),
        shipping.serving_request(),
    ):
        after_commit("r/11", ["first"], Recorder(wait=gate), 1)
        time.sleep(0.2)  # the first round (at once: the shipper was idle) waits at the gate
        after_commit("r/12", ["x"], ship, 1)  # queued while a round runs: a load
        gate.set()
        time.sleep(0.2)  # the first round is over; the next waits for the interval
        for key in ("a", "b"):
            after_commit("r/12", [key], ship, 1)
            time.sleep(0.1)
        assert shipping.flush()
    # Under a load a round gathers the writes of the interval: one ClickHouse insert (and one
    # part to merge per table) for all three, not one each.
    assert [keys for _, keys, _ in ship.calls] == [["x", "a", "b"]]


def test_a_lone_writer_does_not_wait_for_the_ship_interval(after_commit, monkeypatch):
    monkeypatch.setattr(shipping, "_shipper", shipping.BackgroundShipper())
    ship = Recorder()
    with (
        override_settings(FHIR_SERVICE={"MEMBER_SHIP_INTERVAL": 5.0}),
        shipping.serving_request(),
    ):
        after_commit("r/13", ["first"], ship, 1)
        assert shipping.flush(timeout=3)
        # One client writing and reading in turn: nothing came while the last round ran, so
        # the next write ships at once, not MEMBER_SHIP_INTERVAL after that round started.
        after_commit("r/13", ["second"], ship, 1)
        assert shipping.flush(timeout=3)
    assert [keys for _, keys, _ in ship.calls] == [["first"], ["second"]]


def test_a_write_of_a_whole_batch_ships_before_the_answer(after_commit):
    ship = Recorder()
    with override_settings(FHIR_SERVICE={"MEMBER_BATCH_SIZE": 10}), shipping.serving_request():
        after_commit("r/5", ["k1"], ship, 10)
    assert ship.calls == [("r/5", ["k1"], threading.current_thread().name)]


def test_request_mode_ships_in_the_request(after_commit):
    ship = Recorder()
    with override_settings(FHIR_SERVICE={"MEMBER_SHIPPING": "request"}), shipping.serving_request():
        after_commit("r/6", ["k1"], ship, 1)
    assert ship.calls == [("r/6", ["k1"], threading.current_thread().name)]


def test_closing_the_clickhouse_client_waits_for_background_shipping(after_commit):
    get_clickhouse()  # the client exists, so closing it announces itself
    ship = Recorder(delay=0.5)
    with shipping.serving_request():
        after_commit("r/7", ["k1"], ship, 1)
    reset_clickhouse()
    assert ship.calls == [("r/7", ["k1"], "member-event-shipper")]
    get_clickhouse()


def test_an_api_write_is_shipped_by_the_background_thread(live_api):
    client = FhirClient(wait_for_shipping=False)
    response = client.post("/Group", group(["Patient/bg1", "Patient/bg2"]))
    assert response.status == 201, response
    gid = response.body["id"]
    # Read-your-writes holds whether or not the batch has shipped yet.
    assert refs_of(read(client, gid)) == ["Patient/bg1", "Patient/bg2"]
    assert shipping.flush()
    assert not MemberOutbox.objects.filter(group_id=gid, shipped_at__isnull=True).exists()


def test_a_big_api_write_is_shipped_when_answered(live_api):
    refs = [f"Patient/big{i:02d}" for i in range(12)]
    with override_settings(FHIR_SERVICE={"MEMBER_BATCH_SIZE": 10}):
        gid = create_group(FhirClient(wait_for_shipping=False), refs)
    rows = MemberOutbox.objects.filter(group_id=gid)
    assert rows.count() == 2
    assert not rows.filter(shipped_at__isnull=True).exists()

"""The hand-over between the stores when ClickHouse fails: nothing acknowledged is lost.

Two kinds of outage, both real (no storage is mocked):

- ``unreachable``: ``CLICKHOUSE_URL`` points at a loopback port where nothing listens, on
  either backend pair (the real store is reopened afterwards);
- ``stopped``: a ClickHouse server of this test's own (own port, own data directory) is
  killed mid-run and started again on the same data; runs where ``clickhouse-server`` is
  installed (on both passes: the metadata store differs, the member store is this one).

And the crash between commit and shipping: our own shipping entry point
(``groups.outbox.ship.member_batches_ship``) "dies" in the on-commit path, as a process killed
right after its commit would.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from datetime import timedelta
from io import StringIO
from pathlib import Path

import orjson
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import override_settings
from django.utils import timezone

from fhirservice.clickhouse import ClickHouseUnavailable, connect, get_clickhouse
from fhirservice.clickhouse import migrations as ch_migrations
from fhirservice.models import ResourceVersion, StoredResource
from groups.clickhouse_migrations import REVERSE, STATE
from groups.maintenance.common import wait_for_mutations
from groups.models import MemberOutbox
from groups.outbox import background as shipping
from groups.outbox.pending import OutboxBacklog, outbox_backlog
from groups.outbox.ship import batch_event_rows, member_batches_ship
from groups.repository import MemberEventRepository
from groups.selectors import MSG_CLICKHOUSE_DOWN
from tests.fhirservice.test_api_errors import assert_outcome
from tests.groups.conftest import (
    add,
    clickhouse_events,
    clickhouse_raw_count,
    clickhouse_roster,
    create_group,
    current_key,
    group,
    member,
    member_page,
    outbox_events,
    outbox_rows,
    page_refs,
    patch,
    patched,
    read,
    refs_of,
    remove_ref,
    search_ids,
    snapshot,
    stored_version,
)
from tests.support import FHIR_JSON, PATCH_JSON, FhirResponse

A, B, C, D, E, F = (f"Patient/out-{n}" for n in "abcdef")
X, Y = "Device/out-x", "Device/out-y"
SERVER_BINARY = shutil.which("clickhouse-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class DedicatedServer:
    """A throwaway ClickHouse server with its own ports and data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tcp, http, interserver = free_port(), free_port(), free_port()
        self.url = f"clickhouse://default@127.0.0.1:{self.tcp}/fhir_outage?connect_timeout=2"
        for name in ("data", "tmp", "user_files", "format_schemas"):
            (root / name).mkdir(parents=True, exist_ok=True)
        (root / "config.xml").write_text(
            f"""<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{root}/server.log</log>
        <errorlog>{root}/err.log</errorlog></logger>
    <listen_host>127.0.0.1</listen_host>
    <tcp_port>{self.tcp}</tcp_port>
    <http_port>{http}</http_port>
    <interserver_http_port>{interserver}</interserver_http_port>
    <path>{root}/data/</path>
    <tmp_path>{root}/tmp/</tmp_path>
    <user_files_path>{root}/user_files/</user_files_path>
    <format_schema_path>{root}/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>67108864</mark_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
"""
        )
        (root / "users.xml").write_text(
            """<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>1000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
    </interval></default></quotas>
</yandex>
"""
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        log = (self.root / "stdout.log").open("ab")
        self.process = subprocess.Popen(
            [SERVER_BINARY, f"--config-file={self.root / 'config.xml'}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with connect(self.url) as client:
                    if client.ping():
                        return
            except ClickHouseUnavailable:
                pass
            assert self.process.poll() is None, (self.root / "stdout.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the dedicated ClickHouse did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        """Kill the server, as a crash would. (A polite SIGTERM waits seconds for the
        service's open connections, which is not what this test is about.)"""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.kill()
        self.process.wait(timeout=30)


class UnreachableOutage:
    """ClickHouse "goes down" by pointing the service at a port where nothing listens."""

    def __init__(self, clickhouse_down) -> None:
        self.override = clickhouse_down()
        self.is_down = False

    def down(self) -> None:
        self.override.enable()
        self.is_down = True

    def up(self) -> None:
        if self.is_down:
            self.override.disable()
            self.is_down = False


class StoppedServerOutage:
    """ClickHouse goes down for real: the dedicated server is stopped and started again."""

    def __init__(self, server: DedicatedServer) -> None:
        self.server = server

    def down(self) -> None:
        self.server.stop()

    def up(self) -> None:
        self.server.start()


@pytest.fixture(params=["unreachable", "stopped"])
def outage(request, tmp_path, clickhouse_down):
    """One way for ClickHouse to fail, with ``down()`` and ``up()``."""
    if request.param == "unreachable":
        unreachable = UnreachableOutage(clickhouse_down)
        yield unreachable
        unreachable.up()  # a failed test must not leave the next one without ClickHouse
        return
    if SERVER_BINARY is None:
        pytest.skip("clickhouse-server is not installed")
    server = DedicatedServer(tmp_path / "clickhouse")
    server.start()
    try:
        # A single node of its own, also when the suite runs against a cluster.
        with override_settings(CLICKHOUSE_URL=server.url, CLICKHOUSE_CLUSTER=None):
            ch_migrations.apply(get_clickhouse())
            yield StoppedServerOutage(server)
    finally:
        server.stop()


def clickhouse_matches_the_outbox(gid: str) -> None:
    """Every event the metadata store holds for the Group is in ClickHouse, once each."""
    assert not MemberOutbox.objects.filter(group_id=gid, shipped_at__isnull=True).exists()
    key = current_key(gid)
    assert clickhouse_events(key) == sorted(outbox_events(gid))


# --- ClickHouse down -------------------------------------------------------------------------


def test_writes_survive_an_outage_and_ship_after_it(live_api, outage):
    gid = create_group(live_api, [A, B, C])
    patched(live_api, gid, [add(D)])
    key = current_key(gid)
    assert clickhouse_roster(key) == [A, B, C, D]

    outage.down()
    acknowledged = [
        minimal(live_api, "PATCH", f"/Group/{gid}", [remove_ref(B)]),  # B: only in ClickHouse
        minimal(live_api, "PATCH", f"/Group/{gid}", [add(E), add(A, inactive=True)]),
        minimal(
            live_api,
            "PATCH",
            f"/Group/{gid}",
            [{"op": "add", "path": "/name", "value": "n"}, add(F)],
        ),
    ]
    assert [(r.status, r.etag) for r in acknowledged] == [
        (200, 'W/"3"'),
        (200, 'W/"4"'),
        (200, 'W/"5"'),
    ]
    created = minimal(live_api, "POST", "/Group", group([Y, X]))
    assert created.status == 201, created
    other = created.headers["Location"].split("/")[-3]
    pending = list(MemberOutbox.objects.filter(shipped_at__isnull=True).order_by("version"))
    assert sorted((row.group_id, row.version) for row in pending) == sorted(
        [(gid, 3), (gid, 4), (gid, 5), (other, 1)]
    )
    assert all("cannot be reached" in row.last_error for row in pending)
    assert [e[2:] for e in outbox_events(gid) if e[0] == 3] == [("removed", B)]

    # Roster reads answer 503; the metadata, quantity included, is still served.
    for path in (
        f"/Group/{gid}",
        f"/Group/{gid}/_history/2",
        f"/Group/{gid}/_history",
        f"/Group/{gid}/$members",
        f"/Group?member={A}",
    ):
        issue = assert_outcome(live_api.get(path), 503, "MSG_MEMBER_STORE_DOWN")
        assert (issue["code"], issue["diagnostics"]) == ("transient", MSG_CLICKHOUSE_DOWN)
    for query in ("?_elements=type,actual,quantity", "?_summary=true"):
        body = read(live_api, gid, query)
        assert isinstance(body["quantity"], int)
        assert "member" not in body
    assert read(live_api, other, "?_summary=true")["quantity"] == 2
    # Writes that need the roster itself cannot be done blind: 503, and nothing changes.
    before = stored_version(gid)
    assert_outcome(
        patch(live_api, gid, [{"op": "remove", "path": "/member/0"}]), 503, "MSG_MEMBER_STORE_DOWN"
    )
    assert_outcome(
        live_api.put(f"/Group/{gid}", {**group([A]), "id": gid}), 503, "MSG_MEMBER_STORE_DOWN"
    )
    assert stored_version(gid) == before
    with pytest.raises(CommandError, match="4 batches still pending"):
        call_command("ship_member_events", min_age=0, verbosity=0)

    outage.up()
    # Before anything ships, readers see every acknowledged write (read-your-writes).
    expected = [member(A, inactive=True), member(C), member(D), member(E), member(F)]
    assert read(live_api, gid)["member"] == expected
    assert page_refs(member_page(live_api, gid).body) == [A, C, D, E, F]
    assert refs_of(read(live_api, gid, "/_history/3")) == [A, C, D]
    assert search_ids(live_api, f"member={B}&_id={gid}") == ([], 0)
    assert search_ids(live_api, f"member={X}") == ([other], 1)
    assert clickhouse_roster(key) == [A, B, C, D]  # nothing shipped yet

    call_command("ship_member_events", min_age=0, verbosity=0)
    clickhouse_matches_the_outbox(gid)
    clickhouse_matches_the_outbox(other)
    assert clickhouse_roster(key) == [A, C, D, E, F]
    assert clickhouse_roster(current_key(other)) == [X, Y]
    # Blind writes could not know what ClickHouse held: shipping recounted the quantity.
    body = read(live_api, gid)
    assert (body["member"], body["quantity"]) == (expected, 4)
    assert MemberEventRepository().count_active(key) == 4
    assert orjson.loads(StoredResource.objects.get(key=f"Group/{gid}").body)["quantity"] == 4
    version = ResourceVersion.objects.get(key=f"Group/{gid}/_history/5")
    assert orjson.loads(version.body)["quantity"] == 4
    assert stored_version(gid) == 5  # the recount is no new version
    # Every version written blind says how many members it had (vread: roster + quantity).
    for number, active in ((3, 3), (4, 3), (5, 4)):
        body = read(live_api, gid, f"/_history/{number}")
        assert sum(1 for m in body["member"] if not m.get("inactive")) == active
        assert body["quantity"] == active, number


def test_the_next_write_ships_what_an_outage_left_pending(live_api, outage):
    gid = create_group(live_api, [A])
    outage.down()
    assert minimal(live_api, "PATCH", f"/Group/{gid}", [add(B)]).status == 200
    assert minimal(live_api, "PATCH", f"/Group/{gid}", [remove_ref(A)]).status == 200
    outage.up()
    assert [row.shipped_at is None for row in outbox_rows(gid)] == [False, True, True]
    patched(live_api, gid, [add(C)])
    clickhouse_matches_the_outbox(gid)
    assert clickhouse_roster(current_key(gid)) == [B, C]
    assert read(live_api, gid)["quantity"] == 2


def history_quantities(api, gid: str) -> dict[int, tuple[int, int]]:
    """{version: (quantity served, active members served)} of every version (vread)."""
    versions = {}
    for number in range(1, stored_version(gid) + 1):
        body = read(api, gid, f"/_history/{number}")
        active = sum(1 for m in body.get("member", []) if not m.get("inactive"))
        versions[number] = (body["quantity"], active)
    return versions


def test_every_version_built_on_a_blind_write_gets_its_quantity_corrected(
    live_api, clickhouse_down, monkeypatch
):
    """D2: blind writes guess their quantity; versions written after ClickHouse returned but
    before the blind batches shipped add to the guess, and are corrected too."""
    import groups.outbox.ship

    gid = create_group(live_api, [A, B, C])
    with clickhouse_down():
        assert minimal(live_api, "PATCH", f"/Group/{gid}", [remove_ref(B)]).status == 200
        assert minimal(live_api, "PATCH", f"/Group/{gid}", [add(A)]).status == 200  # held
    with monkeypatch.context() as dead:  # the process dies after each commit from now on
        dead.setattr(groups.outbox.ship, "member_batches_ship", lambda **kwargs: None)
        patched(live_api, gid, [add(D)])
        patched(live_api, gid, [remove_ref(C), add(E, inactive=True)])
    call_command("ship_member_events", min_age=0, verbosity=0)
    quantities = history_quantities(live_api, gid)
    assert quantities == {1: (3, 3), 2: (2, 2), 3: (2, 2), 4: (3, 3), 5: (2, 2)}
    assert read(live_api, gid)["quantity"] == 2
    assert not MemberOutbox.objects.filter(group_id=gid, recount=True).exists()


def test_the_service_relay_heals_without_a_write(live_api, clickhouse_down):
    """D4: pending batches of any roster are retried by the service itself, with backoff
    while ClickHouse is down; the backlog is visible meanwhile."""
    gid = create_group(live_api, [A, B])
    other = create_group(live_api, [C])
    with clickhouse_down():
        assert minimal(live_api, "PATCH", f"/Group/{gid}", [remove_ref(B)]).status == 200
        assert minimal(live_api, "PATCH", f"/Group/{other}", [add(C), add(D)]).status == 200
        backlog = outbox_backlog()
        assert (backlog.batches, backlog.events, backlog.failing, backlog.recounts) == (2, 3, 2, 2)
        assert backlog.oldest_age >= 0
        relay = shipping.relay_start(interval=0.05, max_interval=0.2)
        try:
            time.sleep(0.6)
            assert relay.wait == 0.2  # failed rounds: 0.05, 0.1, 0.2, 0.2 ...
            assert outbox_backlog().batches == 2
        except BaseException:
            shipping.relay_stop()
            raise
    try:
        deadline = time.monotonic() + 20
        while outbox_backlog() != OutboxBacklog(0, 0, 0, 0.0, 0):
            assert time.monotonic() < deadline, outbox_backlog()
            time.sleep(0.05)
    finally:
        shipping.relay_stop()
    assert history_quantities(live_api, gid) == {1: (2, 2), 2: (1, 1)}
    assert history_quantities(live_api, other) == {1: (1, 1), 2: (2, 2)}
    clickhouse_matches_the_outbox(gid)
    clickhouse_matches_the_outbox(other)


def test_write_responses_during_an_outage_acknowledge_the_write(live_api, outage):
    """A committed write must not answer 503: the client would take it for a failure.

    The default answer (``Prefer: return=representation``) would render the Group, roster
    included, which needs ClickHouse: status and ETag say the version was written, and a
    warning OperationOutcome says why the Group is not shown.
    """
    gid = create_group(live_api, [A])
    outage.down()
    response = patch(live_api, gid, [add(B)])
    assert (response.status, response.etag) == (200, 'W/"2"'), response
    assert_written_without_body(response)
    response = live_api.post("/Group", group([C]))
    assert response.status == 201, response
    assert response.headers["Location"].endswith("/_history/1")
    assert_written_without_body(response)
    outage.up()
    assert refs_of(read(live_api, gid)) == [A, B]


def assert_written_without_body(response: FhirResponse) -> None:
    """The write is acknowledged with a warning instead of the Group it cannot show."""
    assert response.body["resourceType"] == "OperationOutcome", response
    issue = response.body["issue"][0]
    assert (issue["severity"], issue["code"]) == ("warning", "transient")
    assert MSG_CLICKHOUSE_DOWN in issue["diagnostics"]


# --- a crash between commit and shipping ----------------------------------------------------


def test_a_crash_between_commit_and_shipping_loses_nothing(live_api, no_shipping, monkeypatch):
    gid = create_group(live_api, [A, B])
    patched(live_api, gid, [remove_ref(A), add(C, period={"start": "2024"})])
    other = create_group(live_api, [D])
    assert len(no_shipping) == 3  # every commit tried to ship, and "died"
    key = current_key(gid)
    assert clickhouse_events(key) == []
    assert [row.shipped_at for row in outbox_rows(gid)] == [None, None]
    # The committed writes are readable at once.
    expected = [member(B), member(C, period={"start": "2024"})]
    assert read(live_api, gid)["member"] == expected
    assert read(live_api, gid)["quantity"] == 2
    assert refs_of(read(live_api, gid, "/_history/1")) == [A, B]
    assert search_ids(live_api, f"member={C}&_id={gid}") == ([gid], 1)

    monkeypatch.undo()  # the process restarts
    call_command("ship_member_events", min_age=3600, verbosity=0)  # too fresh: left alone
    assert MemberOutbox.objects.filter(shipped_at__isnull=True).count() == 3
    call_command("ship_member_events", min_age=0, verbosity=0)
    clickhouse_matches_the_outbox(gid)
    clickhouse_matches_the_outbox(other)
    assert clickhouse_roster(key) == [B, C]
    assert read(live_api, gid)["member"] == expected


def test_the_next_write_ships_batches_a_crash_left_behind(live_api, no_shipping, monkeypatch):
    gid = create_group(live_api, [A])
    patched(live_api, gid, [add(B)])
    monkeypatch.undo()  # the process restarts
    first, second = outbox_rows(gid)
    # Version 1 was left behind long ago; version 2 is as fresh as a concurrent writer's,
    # whose own shipping is still to come: the next write leaves it to that writer.
    MemberOutbox.objects.filter(key=first.key).update(
        recorded_at=first.recorded_at - timedelta(minutes=5)
    )
    MemberOutbox.objects.filter(key=second.key).update(
        recorded_at=timezone.now() + timedelta(minutes=5)
    )
    patched(live_api, gid, [add(C)])
    assert [row.shipped_at is not None for row in outbox_rows(gid)] == [True, False, True]
    assert clickhouse_roster(current_key(gid)) == [A, C]
    assert refs_of(read(live_api, gid)) == [A, B, C]


def test_a_crash_between_insert_and_mark_ships_nothing_twice(live_api):
    gid = create_group(live_api, [A, B, C])
    key = current_key(gid)
    raw = clickhouse_raw_count(key)
    assert raw == 3
    before = snapshot(live_api, gid)
    MemberOutbox.objects.filter(group_id=gid).update(shipped_at=None)  # "died" before marking
    out = call_command_output("ship_member_events", min_age=0)
    assert "shipped 1 batches (3 events), 1 already in ClickHouse" in out
    assert clickhouse_raw_count(key) == raw  # checked first: not even a duplicate row
    assert snapshot(live_api, gid) == before


@pytest.mark.parametrize(
    "lost",
    [(STATE, REVERSE), (STATE,), (REVERSE,)],
)
def test_a_batch_the_state_tables_lack_is_not_taken_as_shipped(
    live_api, no_shipping, monkeypatch, lost
):
    """ClickHouse died after the log's part of an insert, before the views' parts (D1)."""
    gid = create_group(live_api, [A, B, C])
    monkeypatch.undo()  # the process restarts
    key = current_key(gid)
    (batch,) = outbox_rows(gid)
    repository = MemberEventRepository()
    repository.insert_events(batch_event_rows(batch, orjson.loads(batch.events)))
    for table in lost:
        repository.delete_rows(table, key)
    wait_for_mutations(repository)
    assert clickhouse_raw_count(key) == 3
    out = call_command_output("ship_member_events", min_age=0)
    assert "shipped 1 batches (3 events), 0 already in ClickHouse" in out
    assert clickhouse_roster(key) == [A, B, C]
    assert refs_of(read(live_api, gid)) == [A, B, C]
    assert page_refs(member_page(live_api, gid).body) == [A, B, C]
    assert search_ids(live_api, f"member={B}") == ([gid], 1)


def test_the_relay_checks_a_backlog_in_one_query_per_table(live_api, no_shipping, monkeypatch):
    """A backlog of small batches on several rosters, half of them in ClickHouse already (a
    crash between insert and mark): the relay finds which with one query per table for the
    whole backlog (before: up to three per batch, ~3 batches/s after an outage), ships the
    others in one insert, and leaves every table holding each batch once."""
    gids = [create_group(live_api, [A]) for _ in range(3)]
    for gid in gids:
        patched(live_api, gid, [add(B)])
        patched(live_api, gid, [remove_ref(A), add(C)])
    monkeypatch.undo()  # the process restarts
    rows = list(MemberOutbox.objects.filter(shipped_at__isnull=True).order_by("key"))
    assert len(rows) == 9
    repository = MemberEventRepository()
    inserted = rows[::2]
    repository.insert_events(
        row for batch in inserted for row in batch_event_rows(batch, orjson.loads(batch.events))
    )
    client = type(get_clickhouse())
    queries: list[str] = []
    execute = client.execute

    def counted(self, sql, *args, **kwargs):
        if "Group_4_0_0_Member" in sql:  # the member tables (not a replica's own checks)
            queries.append(sql)
        return execute(self, sql, *args, **kwargs)

    monkeypatch.setattr(client, "execute", counted)
    out = call_command_output("ship_member_events", min_age=0)
    monkeypatch.undo()
    assert f"shipped 9 batches (12 events), {len(inserted)} already in ClickHouse" in out
    assert len(queries) == 3, queries  # the log, the state table, the reverse table
    for gid in gids:
        clickhouse_matches_the_outbox(gid)
        assert clickhouse_roster(current_key(gid)) == [B, C]
        assert refs_of(read(live_api, gid)) == [B, C]
    assert clickhouse_raw_count(current_key(gids[0])) == 4  # no batch inserted twice


def test_a_version_only_some_of_whose_chunks_are_held_is_shipped_again(
    live_api, no_shipping, monkeypatch
):
    """A big write's chunks, the first and last in ClickHouse already: the relay's windows
    (one chunk each here) insert the version again rather than take it as held."""
    with override_settings(FHIR_SERVICE={"MEMBER_BATCH_SIZE": 2}):
        gid = create_group(live_api, [A, B, C, D, E])
        monkeypatch.undo()  # the process restarts
        chunks = outbox_rows(gid)
        assert [row.event_count for row in chunks] == [2, 2, 1]
        MemberEventRepository().insert_events(
            row
            for batch in (chunks[0], chunks[2])
            for row in batch_event_rows(batch, orjson.loads(batch.events))
        )
        out = call_command_output("ship_member_events", min_age=0)
    assert "shipped 3 batches (5 events), 0 already in ClickHouse" in out
    clickhouse_matches_the_outbox(gid)
    assert refs_of(read(live_api, gid)) == [A, B, C, D, E]
    assert search_ids(live_api, f"member={E}") == ([gid], 1)


def test_the_relay_loop_ships_in_rounds(live_api, no_shipping, monkeypatch):
    gid = create_group(live_api, [A])
    monkeypatch.undo()
    out = call_command_output("ship_member_events", loop=True, rounds=2, interval=0.01, min_age=0)
    assert "shipped 1 batches (1 events), 0 already in ClickHouse" in out
    clickhouse_matches_the_outbox(gid)


def test_shipping_marks_each_batch_once(live_api, no_shipping):
    gid = create_group(live_api, [A])
    patched(live_api, gid, [add(B)])
    keys = [row.key for row in outbox_rows(gid)]
    first = member_batches_ship(keys=keys)
    second = member_batches_ship(keys=keys)
    assert (first.batches, first.events, second.batches) == (2, 2, 0)
    assert [row.attempts for row in outbox_rows(gid)] == [1, 1]


def minimal(api, method: str, path: str, body) -> FhirResponse:
    """A write asking for no body back (``Prefer: return=minimal``): the status and the
    version headers are the acknowledgement."""
    content_type = PATCH_JSON if method == "PATCH" else FHIR_JSON
    response = api.request(
        method, path, body, content_type=content_type, headers={"Prefer": "return=minimal"}
    )
    assert response.content == b"", response
    return response


def call_command_output(name: str, **options) -> str:
    out = StringIO()
    call_command(name, stdout=out, verbosity=1, **options)
    return out.getvalue()

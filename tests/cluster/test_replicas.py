"""The member store on a ClickHouse cluster: replicated tables behind Distributed ones, and a
replica killed (kill -9) while member writes go on.

Runs in the cluster pass of ``scripts/run-tests.sh`` only: ``CLICKHOUSE_CLUSTER`` names the
cluster and ``FHIR_TEST_CLUSTER_DIR`` is the state directory ``scripts/test-servers.sh
start-cluster`` started it in (the test kills and restarts replicas through that script).
Elsewhere every test here is skipped.

What must hold: every member write answered 2xx is in the roster afterwards, through the app
and on each replica's own tables, once the killed replica is back; nothing is needed but the
documented recovery (``ship_member_events``) and the replica's restart.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from contextlib import suppress
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connections
from django.test import override_settings

from fhirservice.clickhouse import connect, get_clickhouse, reset_clickhouse
from fhirservice.clickhouse.migrations import RECORD_TABLE, local_table
from fhirservice.management.commands.migrate_clickhouse import MSG_NOTHING
from groups.clickhouse_migrations import EVENTS, REVERSE, STATE
from groups.repository import EVENT_COLUMNS
from tests.groups.conftest import add, create_group, current_key, group, read, refs_of
from tests.support import FhirClient, FhirResponse

CLUSTER_DIR = os.environ.get("FHIR_TEST_CLUSTER_DIR", "")
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not CLUSTER_DIR or not os.environ.get("CLICKHOUSE_CLUSTER"),
    reason="needs the cluster pass (CLICKHOUSE_CLUSTER and FHIR_TEST_CLUSTER_DIR)",
)

# Seconds of writing before the kill, with the replica down, and after its restart.
BEFORE_KILL = 2.0
DOWN_FOR = 6.0
AFTER_RESTART = 2.0
# How long both replicas may take to hold the same rows once the victim is back.
CONVERGE_SECONDS = 60.0
# Member writes while ZooKeeper is down.
ZOOKEEPER_WRITES = 10
# Members of a create that ships before it answers (FHIR_MEMBER_SHIPPING aside).
BIG_CREATE = 60_000


def replicas() -> list[tuple[str, int]]:
    """(host, port) of each replica of the configured cluster, in replica order."""
    rows = get_clickhouse().execute(
        "SELECT host_address, port FROM system.clusters WHERE cluster = %(c)s "
        "ORDER BY shard_num, replica_num",
        {"c": settings.CLICKHOUSE_CLUSTER},
    )
    return [(host, int(port)) for host, port in rows]


def cluster_servers(command: str, *replica: int) -> None:
    """``scripts/test-servers.sh COMMAND CLUSTER_DIR [REPLICA]`` (kill-replica, start-replica,
    kill-zookeeper, start-zookeeper)."""
    subprocess.run(
        ["bash", str(ROOT / "scripts/test-servers.sh"), command, CLUSTER_DIR, *map(str, replica)],
        check=True,
        capture_output=True,
        timeout=120,
    )


def replica_state(host: str, port: int, key: str) -> tuple[list[str], int, int]:
    """(present members, distinct events, reverse rows present) of a roster key, read from
    one replica's own replicated tables."""
    database = get_clickhouse().database
    with connect(f"clickhouse://default@{host}:{port}/{database}") as client:
        members = client.execute(
            f"SELECT member_ref FROM (SELECT member_ref, argMaxMerge(present) AS p "
            f"FROM {local_table(STATE)} WHERE roster_key = %(k)s GROUP BY member_ref) "
            f"WHERE p = 1 ORDER BY member_ref",
            {"k": key},
        )
        events = client.execute(
            f"SELECT uniqExact(version, seq) FROM {local_table(EVENTS)} WHERE roster_key = %(k)s",
            {"k": key},
        )
        reverse = client.execute(
            f"SELECT count() FROM (SELECT argMaxMerge(present) AS p FROM {local_table(REVERSE)} "
            f"WHERE roster_key = %(k)s GROUP BY member_ref, roster_key) WHERE p = 1",
            {"k": key},
        )
    return [row[0] for row in members], int(events[0][0]), int(reverse[0][0])


def assert_cluster_schema(database: str) -> None:
    """Every replica holds the member tables as replicated tables behind Distributed ones."""
    hosts = replicas()
    assert len(hosts) >= 2
    for host, port in hosts:
        with connect(f"clickhouse://default@{host}:{port}/{database}") as client:
            engines = dict(
                client.execute(
                    "SELECT name, engine FROM system.tables WHERE database = currentDatabase()"
                )
            )
        assert engines[EVENTS] == "Distributed"
        assert engines[local_table(EVENTS)] == "ReplicatedReplacingMergeTree"
        assert engines[local_table(RECORD_TABLE)] == "ReplicatedMergeTree"
        for table in (STATE, REVERSE):
            assert engines[table] == "Distributed"
            assert engines[local_table(table)] == "ReplicatedAggregatingMergeTree"
            assert engines[f"{table}_mv"] == "MaterializedView"


def test_the_member_tables_are_replicated_behind_distributed_tables():
    assert_cluster_schema(get_clickhouse().database)


def test_migrate_clickhouse_builds_the_schema_on_every_replica():
    """From an empty database: the deploy step alone (``migrate_clickhouse``) makes it."""
    database = f"fhir_migrate_{uuid.uuid4().hex[:8]}"
    (first_host, first_port), (other_host, other_port) = replicas()[:2]
    try:
        out = StringIO()
        with override_settings(
            CLICKHOUSE_URL=f"clickhouse://default@{first_host}:{first_port}/{database}"
        ):
            call_command("migrate_clickhouse", stdout=out)
        assert "Applied groups.0001_member_events" in out.getvalue()
        assert_cluster_schema(database)
        # The records are replicated too: the other replica has nothing left to run.
        out = StringIO()
        with override_settings(
            CLICKHOUSE_URL=f"clickhouse://default@{other_host}:{other_port}/{database}"
        ):
            call_command("migrate_clickhouse", stdout=out)
        assert MSG_NOTHING in out.getvalue()
    finally:
        get_clickhouse().command(
            f"DROP DATABASE IF EXISTS `{database}` ON CLUSTER `{settings.CLICKHOUSE_CLUSTER}`"
        )


@pytest.mark.parametrize("victim", [1, 2], ids=["connected-replica", "other-replica"])
def test_a_replica_killed_mid_run_loses_no_acknowledged_member(live_api, victim):
    """Writes go on while a replica is killed and restarted; afterwards the roster is exactly
    the acknowledged members, through the app and on every replica."""
    hosts = replicas()
    gid = create_group(live_api, ["Patient/seed"])
    writer = FhirClient(wait_for_shipping=False)
    acknowledged = ["Patient/seed"]
    refused = 0
    failures: list[BaseException] = []

    def chaos() -> None:
        try:
            time.sleep(BEFORE_KILL)
            cluster_servers("kill-replica", victim)
            time.sleep(DOWN_FOR)
            cluster_servers("start-replica", victim)
            time.sleep(AFTER_RESTART)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failures.append(exc)

    side = threading.Thread(target=chaos)
    side.start()
    try:
        n = 0
        while side.is_alive():
            ref = f"Patient/w{n:05d}"
            response = writer.patch(
                f"/Group/{gid}", [add(ref)], headers={"Prefer": "return=minimal"}
            )
            if response.status == 200:
                acknowledged.append(ref)
            else:
                # Not acknowledged, so not expected: but only ClickHouse being away may
                # refuse a write.
                assert response.status == 503, response
                refused += 1
            n += 1
    finally:
        side.join()
        if not failures:
            # Later tests read through the first replica again, not the failover one.
            reset_clickhouse()
    assert not failures, failures
    assert len(acknowledged) > 20, (len(acknowledged), refused)

    # The documented recovery: ship whatever the outage left pending.
    call_command("ship_member_events", "--min-age", "0")
    assert_everywhere(live_api, gid, hosts, acknowledged)


@pytest.mark.parametrize("delay", [1.0, 2.0])
def test_the_connected_replica_killed_during_a_big_create_loses_nothing(live_api, delay):
    """A create big enough to ship before it answers (50,000+ events) loses the replica it
    writes to ``delay`` seconds in; what it acknowledges is all there once the replica is
    back. Replay a failure with the delay it names."""
    hosts = replicas()
    refs = [f"Patient/b{i:06d}" for i in range(BIG_CREATE)]
    writer = FhirClient(wait_for_shipping=False)
    answers: list[FhirResponse] = []

    def post() -> None:
        try:
            answers.append(writer.post("/Group", group(refs), headers={"Prefer": "return=minimal"}))
        finally:
            connections.close_all()  # this thread's own database connection

    create = threading.Thread(target=post)
    create.start()
    try:
        time.sleep(delay)
        cluster_servers("kill-replica", 1)
    finally:
        create.join()
        cluster_servers("start-replica", 1)
        reset_clickhouse()
    (answer,) = answers
    if answer.status != 201:
        # Not acknowledged, so nothing to find: but only ClickHouse being away may refuse.
        assert answer.status == 503, answer
        return
    gid = answer.headers["Location"].split("/Group/")[1].split("/")[0]
    call_command("ship_member_events", "--min-age", "0")
    assert_everywhere(live_api, gid, hosts, refs)


def test_writes_during_a_zookeeper_outage_ship_once_it_is_back(live_api):
    """Without ZooKeeper the replicated tables refuse inserts (read-only): member writes are
    still acknowledged from the outbox, and ship once ZooKeeper is back."""
    hosts = replicas()
    gid = create_group(live_api, ["Patient/seed"])
    writer = FhirClient(wait_for_shipping=False)
    acknowledged = ["Patient/seed"]
    cluster_servers("kill-zookeeper")
    try:
        for n in range(ZOOKEEPER_WRITES):
            ref = f"Patient/z{n:03d}"
            response = writer.patch(
                f"/Group/{gid}", [add(ref)], headers={"Prefer": "return=minimal"}
            )
            assert response.status == 200, response
            acknowledged.append(ref)
        # The relay reports what is left (exit 1) like during a ClickHouse outage.
        with pytest.raises(CommandError, match="still pending"):
            call_command("ship_member_events", "--min-age", "0")
    finally:
        cluster_servers("start-zookeeper")
    # The replicas renew their ZooKeeper sessions in their own time (an expired session is
    # reported a while after is_readonly is back to 0): run the relay until it has shipped
    # everything, as `ship_member_events --loop` would.
    deadline = time.monotonic() + CONVERGE_SECONDS
    while True:
        try:
            call_command("ship_member_events", "--min-age", "0")
            break
        except CommandError:
            assert time.monotonic() < deadline, "still pending a minute after ZooKeeper returned"
            time.sleep(1)
    assert_everywhere(live_api, gid, hosts, acknowledged)


def assert_everywhere(
    api: FhirClient, gid: str, hosts: list[tuple[str, int]], acknowledged: list[str]
) -> None:
    """The roster is exactly the acknowledged members through the app and on every replica,
    once replication has caught up (it is asynchronous: a replica back from a crash first
    fetches what the others took meanwhile)."""
    key = current_key(gid)
    expected = sorted(acknowledged)
    deadline = time.monotonic() + CONVERGE_SECONDS
    while True:
        body = read(api, gid)
        served = (sorted(refs_of(body)), body["quantity"])
        states = [replica_state(host, port, key) for host, port in hosts]
        if served == (expected, len(expected)) and all(
            state == (expected, len(expected), len(expected)) for state in states
        ):
            return
        assert time.monotonic() < deadline, (
            len(expected),
            (len(served[0]), served[1]),
            [(len(members), events, reverse) for members, events, reverse in states],
        )
        time.sleep(0.5)


class SwitchableProxy:
    """A loopback TCP forwarder to one replica that can go away (connections cut, new ones
    refused) and come back on the same port, so a replica "fails" without a restart."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.sockets: list[socket.socket] = []
        self.restore()

    def restore(self) -> None:
        """Listen (again) on the proxy's port."""
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                downstream, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [downstream, upstream]
            for source, sink in ((downstream, upstream), (upstream, downstream)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and cut the forwarded ones."""
        # shutdown() wakes the accepting thread; close() alone would leave it listening.
        with suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for sock in self.sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.sockets = []


def test_a_process_keeps_reading_its_writes_after_failing_over_and_back():
    """Every connection of a process uses one replica: after its replica was unreachable
    and it moved to another, a connection opened once the first replica is back must not
    read there (where the process's new writes are not, replication being stopped here)."""
    (first, other) = replicas()[:2]
    database = get_clickhouse().database
    proxy = SwitchableProxy(first)
    events = local_table(EVENTS)
    fetches = "SYSTEM {} FETCHES " + events
    with connect(f"clickhouse://default@{first[0]}:{first[1]}/{database}") as admin:
        admin.command(fetches.format("STOP"))
    client = connect(
        f"clickhouse://default@127.0.0.1:{proxy.port}/{database}"
        f"?alt_hosts={other[0]}:{other[1]}&connect_timeout=1"
    )
    try:
        # Two pooled connections on the first replica (through the proxy).
        held = [client._pool.acquire() for _ in range(2)]
        for pooled in held:
            pooled.execute("SELECT 1")
        for pooled in held:
            client._pool.release(pooled)
        proxy.cut()
        # A pooled connection finds its socket dead, is refused reconnecting, and fails over.
        client.execute("SELECT 1")
        proxy.restore()
        key = f"failover-{uuid.uuid4().hex}/1"
        params = {"k": key}
        now = datetime.now(UTC)
        for seq in range(5):
            row = (key, f"Patient/f{seq}", "Patient", "added", 1, seq, "", "", 0, "", now)
            client.insert(EVENTS, EVENT_COLUMNS, [row + ("r", "test", "")])
            # Three reads open at once: every pooled connection is used, the old ones too.
            streams = [
                client.iter_rows(f"SELECT count() FROM {EVENTS} WHERE roster_key = %(k)s", params)
                for _ in range(3)
            ]
            counts = [next(stream) for stream in streams]
            for stream in streams:
                assert list(stream) == []
            assert counts == [(seq + 1,)] * 3
    finally:
        client.close()
        proxy.cut()
        with connect(f"clickhouse://default@{first[0]}:{first[1]}/{database}") as admin:
            admin.command(fetches.format("START"))


def test_a_restarted_replica_reads_its_own_writes_before_it_has_rejoined():
    """A replica back from ``kill -9`` takes inserts at once, but reports itself infinitely
    behind (``absolute_delay`` = now) until its first replication queue update, which waits
    for ZooKeeper to expire the dead process's session (``session_timeout_ms``, 10 s here).
    A Distributed read must still run on it: sent to the other replica (ClickHouse's
    ``max_replica_delay_for_distributed_queries``), it missed what was inserted a moment
    before (replication being slower than the read; stopped here to make it certain)."""
    hosts = replicas()
    (first, other) = hosts[:2]
    database = get_clickhouse().database
    tables = [local_table(table) for table in (EVENTS, STATE, REVERSE)]
    cluster_servers("kill-replica", 1)
    cluster_servers("start-replica", 1)
    client = connect(settings.CLICKHOUSE_URL)
    try:
        with connect(f"clickhouse://default@{other[0]}:{other[1]}/{database}") as admin:
            for table in tables:
                admin.command(f"SYSTEM STOP FETCHES {table}")
        # The window this test is about: the restarted replica is writable and its queue
        # empty, yet it calls itself stale.
        ((readonly, delay),) = client.execute(
            "SELECT max(is_readonly), min(absolute_delay) FROM system.replicas "
            "WHERE database = currentDatabase()"
        )
        assert (readonly, delay > 300) == (0, True), (readonly, delay)
        key = f"restarted-{uuid.uuid4().hex}/1"
        row = (key, "Patient/r0", "Patient", "added", 1, 0, "", "", 0, "", datetime.now(UTC))
        client.insert(EVENTS, EVENT_COLUMNS, [row + ("r", "test", "")])
        counts = client.execute(
            f"SELECT count() FROM {EVENTS} WHERE roster_key = %(k)s", {"k": key}
        )
        assert counts == [(1,)]
    finally:
        client.close()
        with connect(f"clickhouse://default@{other[0]}:{other[1]}/{database}") as admin:
            for table in tables:
                admin.command(f"SYSTEM START FETCHES {table}")
        reset_clickhouse()
        wait_until_caught_up(hosts, database)


def wait_until_caught_up(hosts: list[tuple[str, int]], database: str) -> None:
    """Every replica writable and not behind (later tests read right away)."""
    deadline = time.monotonic() + CONVERGE_SECONDS
    for host, port in hosts:
        with connect(f"clickhouse://default@{host}:{port}/{database}") as client:
            while client.execute(
                "SELECT max(is_readonly) + max(absolute_delay) + max(queue_size) "
                "FROM system.replicas WHERE database = currentDatabase()"
            ) != [(0,)]:
                assert time.monotonic() < deadline, (host, port)
                time.sleep(0.5)

"""Tests of the ClickHouse client layer, against the backend that CLICKHOUSE_URL names.

``CLICKHOUSE_URL=chdb:///tmp/...`` tests embedded chdb, ``clickhouse://...`` a server (our CI
uses ClickHouse 18.16). Without the variable the tests use the chdb path already open in this
process, or a chdb store of their own in pytest's temporary directory. Most tests need no
Django; the few that do (``get_clickhouse``, the management command, ``collect``) skip when
Django cannot start.
"""

from __future__ import annotations

import datetime as dt
import importlib.machinery
import os
import subprocess
import sys
import threading
import time
import types
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from fhirservice.clickhouse import (
    INSERT_BATCH_ROWS,
    ClickHouseUnavailable,
    backends,
    connect,
    url_for_logs,
)
from fhirservice.clickhouse import migrations as ch_migrations
from fhirservice.clickhouse.migrations import Migration

HOSTILE = [
    "'",
    "\\",
    "\\'",
    "'; DROP TABLE members; --",
    "x' OR '1'='1",
    "back\\slash' quote\" double",
    "%(other)s %s %% {on_cluster} {0}",
    "new\nline\ttab\rreturn\0nul\b\f\v\a",
    "ünïcødé 😀 Ω",
    "`backtick` ) ; SELECT 1",
    "",
]

EVENT_COLUMNS = [
    "roster",
    "member",
    "version",
    "seq",
    "op",
    "inactive",
    "recorded",
    "period_end",
    "note",
]
EVENT_SCHEMA = (
    "(roster String, member String, version UInt64, seq UInt32, "
    "op Enum8('add' = 1, 'remove' = 2), inactive UInt8, recorded DateTime, "
    "period_end Nullable(DateTime), note Nullable(String)) "
    "ENGINE = MergeTree ORDER BY (roster, member, version, seq)"
)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


@pytest.fixture(scope="module")
def url(tmp_path_factory) -> str:
    if os.environ.get("CLICKHOUSE_URL"):
        return os.environ["CLICKHOUSE_URL"]
    open_path = backends.open_chdb_path()
    if open_path:
        return f"chdb://{open_path}"
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture(scope="module")
def ch(url):
    client = connect(url)
    yield client
    client.close()


@pytest.fixture
def table(ch):
    name = f"test_events_{uuid.uuid4().hex[:12]}"
    ch.command(f"CREATE TABLE {name} {EVENT_SCHEMA}")
    yield name
    ch.command(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def django_ready():
    try:
        import django
        from django.apps import apps

        if not apps.ready:
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fhirservice.settings")
            django.setup()
    except Exception as exc:  # the project may be mid-construction; test without Django
        pytest.skip(f"Django cannot start: {exc}")


def _is_chdb(url: str) -> bool:
    return url.startswith("chdb:")


# --- parameters ------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_string_parameter_round_trips_as_data(ch, value):
    assert ch.execute("SELECT %(value)s", {"value": value}) == [(value,)]


def test_hostile_strings_insert_and_filter_as_data(ch, table):
    now = dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.UTC)
    rows = [
        (value, f"Patient/{i}", 1, i, "add", 0, now, None, value) for i, value in enumerate(HOSTILE)
    ]
    assert ch.insert(table, EVENT_COLUMNS, rows) == len(HOSTILE)
    for value in HOSTILE:
        found = ch.execute(f"SELECT roster, note FROM {table} WHERE roster = %(v)s", {"v": value})
        assert found == [(value, value)]
    assert ch.execute(f"SELECT count() FROM {table}") == [(len(HOSTILE),)]


def test_parameter_kinds(ch):
    day = dt.date(2024, 2, 29)
    rows = ch.execute(
        "SELECT %(yes)s, %(no)s, %(n)s, %(big)s, %(none)s IS NULL, %(day)s, "
        "has(%(array)s, 'b'), 'c' IN %(tuple)s, %(pct)s",
        {
            "yes": True,
            "no": False,
            "n": -7,
            "big": 2**64 - 1,
            "none": None,
            "day": day,
            "array": ["a", "b"],
            "tuple": ("c", "d'"),
            "pct": "100%",
        },
    )
    assert rows == [(1, 0, -7, 2**64 - 1, 1, "2024-02-29", 1, 1, "100%")]


def test_percent_signs_need_doubling_only_with_parameters(ch):
    assert ch.execute("SELECT 'a%b'") == [("a%b",)]
    assert ch.execute("SELECT 'a%%b', %(x)s", {"x": "%"}) == [("a%b", "%")]


@pytest.mark.parametrize("value", [object(), b"bytes", {"a": 1}, {1, 2}, [object()]])
def test_unsupported_parameter_types_are_refused(ch, value):
    with pytest.raises(TypeError):
        ch.execute("SELECT %(v)s", {"v": value})


def test_bind_shows_the_escaped_sql(ch):
    assert ch.bind("SELECT %(v)s", {"v": "a'b\\"}) == "SELECT 'a\\'b\\\\'"


# --- inserts and types -------------------------------------------------------------------


def test_insert_and_select_every_column_type(ch, table):
    plus_two = dt.timezone(dt.timedelta(hours=2))
    rows = [
        (
            "Group/1@1",
            "Patient/1",
            2**64 - 1,
            2**32 - 1,
            "add",
            True,
            dt.datetime(2024, 1, 2, 3, 4, 5),
            None,
            None,
        ),
        (
            "Group/1@1",
            "Patient/2",
            0,
            0,
            "remove",
            False,
            dt.datetime(2024, 1, 2, 5, 4, 5, tzinfo=plus_two),
            dt.datetime(2030, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
            "note",
        ),
    ]
    assert ch.insert(table, EVENT_COLUMNS, rows) == 2
    got = ch.execute(f"SELECT {', '.join(EVENT_COLUMNS)} FROM {table} ORDER BY member")
    instant = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert got == [
        ("Group/1@1", "Patient/1", 2**64 - 1, 2**32 - 1, "add", 1, instant, None, None),
        (
            "Group/1@1",
            "Patient/2",
            0,
            0,
            "remove",
            0,
            instant,
            dt.datetime(2030, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
            "note",
        ),
    ]
    for value in got[0][6], got[1][7]:
        assert value.utcoffset() == dt.timedelta(0)
    # Datetime parameters are instants too, whether naive (UTC) or aware.
    for when in (dt.datetime(2024, 1, 2, 3, 4, 5), instant.astimezone(plus_two)):
        assert ch.execute(f"SELECT count() FROM {table} WHERE recorded = %(t)s", {"t": when}) == [
            (2,)
        ]


def test_datetime_columns_with_a_zone_of_their_own(ch):
    name = f"test_zoned_{uuid.uuid4().hex[:12]}"
    ch.command(
        f"CREATE TABLE {name} (k UInt8, at DateTime('Asia/Tokyo')) ENGINE = MergeTree ORDER BY k"
    )
    try:
        tokyo = dt.timezone(dt.timedelta(hours=9))
        rows = [(1, dt.datetime(2024, 1, 1)), (2, dt.datetime(2024, 1, 1, 9, tzinfo=tokyo))]
        assert ch.insert(name, ["k", "at"], rows) == 2
        instant = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        assert ch.execute(f"SELECT k, at, toString(at) FROM {name} ORDER BY k") == [
            (1, instant, "2024-01-01 09:00:00"),
            (2, instant, "2024-01-01 09:00:00"),
        ]
    finally:
        ch.command(f"DROP TABLE IF EXISTS {name}")


def test_insert_streams_a_generator_in_batches(ch, table):
    total = INSERT_BATCH_ROWS * 2 + 7
    now = dt.datetime(2024, 1, 1)
    rows = (("Group/big@1", f"Patient/{i}", 1, i, "add", 0, now, None, None) for i in range(total))
    assert ch.insert(table, EVENT_COLUMNS, rows) == total
    assert ch.execute(f"SELECT count(), uniqExact(member), max(seq) FROM {table}") == [
        (total, total, total - 1)
    ]


def test_insert_of_nothing(ch, table):
    assert ch.insert(table, EVENT_COLUMNS, []) == 0


def test_null_in_a_non_nullable_column_is_an_error(ch, table):
    row = (None, "Patient/1", 1, 1, "add", 0, dt.datetime(2024, 1, 1), None, None)
    with pytest.raises(Exception):  # noqa: B017 - each backend raises its own type
        ch.insert(table, EVENT_COLUMNS, [row])
    assert ch.execute(f"SELECT count() FROM {table}") == [(0,)]


def test_insert_refuses_odd_identifiers(ch, table):
    with pytest.raises(ValueError):
        ch.insert(f"{table}; DROP TABLE x", EVENT_COLUMNS, [])
    with pytest.raises(ValueError):
        ch.insert(table, ["roster`"], [])


# --- streaming ---------------------------------------------------------------------------


def test_iter_rows_streams_a_million_rows_with_flat_memory(ch):
    sql = "SELECT number, concat('Patient/', toString(number)) FROM numbers(%(n)s)"
    count = total = 0
    base = peak = _rss()
    for number, member in ch.iter_rows(sql, {"n": 1_000_000}):
        count += 1
        total += number
        if count % 50_000 == 0:
            assert member == f"Patient/{number}"
            peak = max(peak, _rss())
    assert count == 1_000_000
    assert total == 999_999 * 1_000_000 // 2
    # Materialised, these rows take ~150 MB of Python objects; a stream holds one block.
    assert peak - base < 120 * 2**20, f"RSS grew by {(peak - base) / 2**20:.0f} MB"


def test_iter_rows_closed_early_gives_its_connection_back(ch):
    with closing(ch.iter_rows("SELECT number FROM numbers(1000000)")) as rows:
        assert next(rows) == (0,)
    assert ch.execute("SELECT 2") == [(2,)]


def test_queries_inside_a_stream_do_not_disturb_it(ch):
    seen = 0
    for (number,) in ch.iter_rows("SELECT number FROM numbers(200000)"):
        if number % 50_000 == 0:
            assert ch.execute("SELECT %(n)s + 1", {"n": number}) == [(number + 1,)]
        seen += 1
    assert seen == 200_000


def test_iter_rows_of_an_empty_result(ch):
    # Not numbers(0): ClickHouse 18.16 reads that as an endless table.
    assert list(ch.iter_rows("SELECT number FROM numbers(3) WHERE number > 5")) == []
    assert ch.execute("SELECT number FROM numbers(3) WHERE number > 5") == []


def test_execute_lines_gives_a_string_column_as_it_is(ch):
    """One line per row, values unescaped (quotes, backslashes, UTF-8), b"" for no rows."""
    value = "a\"b\\c\u00e4'{}"
    sql = "SELECT concat(%(v)s, toString(number)) FROM numbers(3) ORDER BY number"
    expected = "".join(f"{value}{n}\n" for n in range(3)).encode()
    assert ch.execute_lines(sql, {"v": value}, settings={"max_threads": 1}) == expected
    assert ch.execute_lines("SELECT 'x' FROM numbers(3) WHERE number > 5") == b""


def test_iter_rows_converts_datetimes(ch):
    rows = list(
        ch.iter_rows(
            "SELECT toDateTime(%(t)s) FROM numbers(2)", {"t": dt.datetime(2024, 3, 4, 5, 6, 7)}
        )
    )
    assert rows == [(dt.datetime(2024, 3, 4, 5, 6, 7, tzinfo=dt.UTC),)] * 2


# --- settings, version, ping -------------------------------------------------------------


def test_per_query_settings_reach_the_engine(ch):
    sql = "SELECT value FROM system.settings WHERE name = %(name)s"
    assert ch.execute(sql, {"name": "max_block_size"}, settings={"max_block_size": 1234}) == [
        ("1234",)
    ]
    assert list(ch.iter_rows(sql, {"name": "max_threads"}, settings={"max_threads": 1})) == [("1",)]


def test_supports_setting(ch):
    assert ch.supports_setting("max_block_size")
    assert not ch.supports_setting("no_such_setting_anywhere")
    expected = ch.server_version >= (19, 14)
    assert ch.supports_setting("optimize_aggregation_in_order") is expected


def test_version_and_ping(ch):
    assert len(ch.server_version) >= 3
    assert ch.server_version >= (18, 16)
    assert ch.ping() is True


def test_sql_errors_keep_their_own_type(ch):
    with pytest.raises(Exception) as raised:  # noqa: B017 - the backend's own error type
        ch.execute("SELEC 1")
    assert not isinstance(raised.value, ClickHouseUnavailable)


# --- availability ------------------------------------------------------------------------


def test_closed_port_is_unavailable_fast():
    started = time.monotonic()
    with pytest.raises(ClickHouseUnavailable):
        connect("clickhouse://default@127.0.0.1:1/fhir_test")
    assert time.monotonic() - started < 5


def test_closed_client_is_unavailable(url):
    client = connect(url)
    client.close()
    with pytest.raises(ClickHouseUnavailable):
        client.execute("SELECT 1")
    assert client.ping() is False
    client.close()  # closing twice is harmless


@pytest.mark.parametrize(
    "bad",
    [
        "mysql://x/y",
        "chdb://relative/path",
        "chdb:///tmp/x?opt=1",
        "clickhouse://h/db-with-dash",
        "clickhouse://h/db?timeout=1",
        "clickhouse://h/db?connect_timeout=soon",
    ],
)
def test_malformed_urls_are_refused(bad):
    with pytest.raises(ValueError):
        connect(bad)


def test_url_for_logs_hides_the_password():
    assert url_for_logs("clickhouse://app:s%40cret@db.local:9000/fhir") == (
        "clickhouse://app@db.local:9000/fhir"
    )
    assert url_for_logs("chdb:///var/chdb") == "chdb:///var/chdb"


# --- threads -----------------------------------------------------------------------------


def test_threads_share_one_client(ch, table):
    threads, rounds, batch = 8, 10, 500
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(worker: int) -> None:
        try:
            start.wait()
            roster = f"Group/t{worker}@1"
            for round_ in range(rounds):
                rows = [
                    (
                        roster,
                        f"Patient/{round_}-{i}",
                        round_,
                        i,
                        "add",
                        0,
                        dt.datetime(2024, 1, 1),
                        None,
                        None,
                    )
                    for i in range(batch)
                ]
                assert ch.insert(table, EVENT_COLUMNS, rows) == batch
                counted = ch.execute(
                    f"SELECT count() FROM {table} WHERE roster = %(r)s", {"r": roster}
                )
                assert counted == [((round_ + 1) * batch,)]
                assert (
                    sum(
                        1
                        for _ in ch.iter_rows(
                            f"SELECT member FROM {table} WHERE roster = %(r)s", {"r": roster}
                        )
                    )
                    == (round_ + 1) * batch
                )
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert ch.execute(f"SELECT count() FROM {table}") == [(threads * rounds * batch,)]


# --- migrations --------------------------------------------------------------------------


def _test_migrations(app: str) -> list[Migration]:
    return [
        Migration(
            app,
            "0001_first",
            [
                f"CREATE TABLE IF NOT EXISTS {app}_a{{on_cluster}} (k String) "
                "ENGINE = MergeTree ORDER BY k",
            ],
        ),
        Migration(
            app,
            "0002_second",
            [
                f"CREATE TABLE IF NOT EXISTS {app}_b{{on_cluster}} (k String) "
                "ENGINE = MergeTree ORDER BY k",
                f"INSERT INTO {app}_b SELECT 'seeded'",
            ],
        ),
    ]


def test_migrations_apply_once(ch):
    app = f"mig{uuid.uuid4().hex[:10]}"
    declared = _test_migrations(app)
    try:
        assert ch_migrations.apply(ch, dry_run=True, migrations=declared, cluster="") == declared
        assert not ch.table_exists(f"{app}_a")
        assert ch_migrations.apply(ch, migrations=declared, cluster="") == declared
        assert {m.key for m in declared} <= ch_migrations.applied(ch)
        assert ch_migrations.apply(ch, migrations=declared, cluster="") == []
        assert ch.execute(f"SELECT k FROM {app}_b") == [("seeded",)]
        third = Migration(app, "0003_third", [f"DROP TABLE IF EXISTS {app}_a{{on_cluster}}"])
        assert ch_migrations.apply(ch, migrations=[*declared, third], cluster="") == [third]
        assert not ch.table_exists(f"{app}_a")
    finally:
        ch.command(f"DROP TABLE IF EXISTS {app}_a")
        ch.command(f"DROP TABLE IF EXISTS {app}_b")


def test_on_cluster_placeholder():
    migration = Migration("groups", "0001", ["CREATE TABLE t{on_cluster} (j String DEFAULT '{}')"])
    assert migration.sql(None) == ["CREATE TABLE t (j String DEFAULT '{}')"]
    assert migration.sql("main-cluster") == [
        "CREATE TABLE t ON CLUSTER `main-cluster` (j String DEFAULT '{}')"
    ]
    with pytest.raises(ValueError):
        migration.sql("x` (evil")


def test_migration_needs_statements():
    with pytest.raises(ValueError):
        Migration("groups", "0001", [])


def test_collect_reads_app_modules(django_ready, monkeypatch):
    from django.core.exceptions import ImproperlyConfigured

    module_name = "fhirservice.clickhouse_migrations"
    module = types.ModuleType(module_name)
    module.__spec__ = importlib.machinery.ModuleSpec(module_name, None)
    module.MIGRATIONS = _test_migrations("fhirservice")
    monkeypatch.setitem(sys.modules, module_name, module)
    keys = [m.key for m in ch_migrations.collect()]
    assert keys.index(("fhirservice", "0001_first")) + 1 == keys.index(
        ("fhirservice", "0002_second")
    )
    module.MIGRATIONS = [*module.MIGRATIONS, module.MIGRATIONS[0]]
    with pytest.raises(ImproperlyConfigured):
        ch_migrations.collect()


# --- process-wide client and the management command ----------------------------------------


def test_get_clickhouse_is_one_client_per_process(django_ready, url):
    from django.test import override_settings

    from fhirservice import clickhouse

    with override_settings(CLICKHOUSE_URL=url):
        seen: list[object] = []
        threads = [
            threading.Thread(target=lambda: seen.append(clickhouse.get_clickhouse()))
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(seen) == 8 and all(client is seen[0] for client in seen)
        assert seen[0].url == url and seen[0].ping()
        if _is_chdb(url):  # chdb migrates itself on first use
            assert seen[0].table_exists(ch_migrations.RECORD_TABLE)
        clickhouse.reset_clickhouse()
        assert clickhouse.get_clickhouse() is not seen[0]
    # Leaving override_settings changed CLICKHOUSE_URL back, which closed the client.
    assert clickhouse._client is None


def test_migrate_clickhouse_command(django_ready, url):
    from io import StringIO

    from django.core.management import call_command
    from django.test import override_settings

    from fhirservice.management.commands.migrate_clickhouse import MSG_NOTHING

    with override_settings(CLICKHOUSE_URL=url):
        out = StringIO()
        call_command("migrate_clickhouse", "--dry-run", stdout=out)
        assert url_for_logs(url) in out.getvalue()
        call_command("migrate_clickhouse", stdout=out)
        out = StringIO()
        call_command("migrate_clickhouse", stdout=out)
        assert MSG_NOTHING in out.getvalue()
        call_command("migrate_clickhouse", "--list", stdout=StringIO())


def test_migrate_clickhouse_command_without_server(django_ready):
    from django.core.management import call_command
    from django.core.management.base import CommandError
    from django.test import override_settings

    with override_settings(CLICKHOUSE_URL="clickhouse://app:secret@127.0.0.1:1/fhir"):
        with pytest.raises(CommandError) as raised:
            call_command("migrate_clickhouse")
    assert "secret" not in str(raised.value)
    assert "127.0.0.1:1" in str(raised.value)


# --- chdb only ---------------------------------------------------------------------------


def test_chdb_store_of_its_own(tmp_path):
    if backends.open_chdb_path() is not None:
        pytest.skip("chdb allows one open path per process, and the test backend holds one")
    first = connect(f"chdb://{tmp_path / 'a'}")
    try:
        assert first.server_version >= (24,)
        first.command("CREATE TABLE t (k String, at DateTime) ENGINE = MergeTree ORDER BY k")
        assert first.insert("t", ["k", "at"], [("x'", dt.datetime(2024, 1, 1))]) == 1
        assert first.execute("SELECT k, at FROM t") == [
            ("x'", dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
        ]
        with pytest.raises(RuntimeError, match="one|open"):
            connect(f"chdb://{tmp_path / 'b'}")
        # Other clients on the same path are fine and see the same data.
        with connect(f"chdb://{tmp_path / 'a'}") as second:
            assert second.execute("SELECT count() FROM t") == [(1,)]
    finally:
        first.close()
    assert backends.open_chdb_path() is None
    with connect(f"chdb://{tmp_path / 'b'}") as other:
        assert other.execute("SELECT 1") == [(1,)]


def test_chdb_path_held_by_another_process_is_unavailable(ch, url):
    if not _is_chdb(url):
        pytest.skip("chdb only")
    probe = (
        "import sys\n"
        "from fhirservice.clickhouse import ClickHouseUnavailable, connect\n"
        "try:\n"
        "    connect(sys.argv[1])\n"
        "except ClickHouseUnavailable:\n"
        "    sys.exit(3)\n"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", probe, url], capture_output=True, timeout=60, cwd=root
    )
    assert done.returncode == 3, done.stderr.decode()[-2000:]


def test_served_tables_are_plain_on_one_node():
    from groups.clickhouse_migrations import MIGRATIONS

    statements = MIGRATIONS[0].sql(None)
    assert len(statements) == 5
    assert not any("Replicated" in s or "Distributed" in s or "_local" in s for s in statements)
    assert "ENGINE = ReplacingMergeTree ORDER BY (roster_key, version, seq)" in statements[0]
    assert statements[2].startswith(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS Group_4_0_0_MemberState_mv "
        "TO Group_4_0_0_MemberState AS SELECT"
    )
    assert statements[2].endswith("FROM Group_4_0_0_MemberEvents GROUP BY roster_key, member_ref")


def test_served_tables_are_replicated_behind_distributed_tables_on_a_cluster():
    from groups.clickhouse_migrations import MIGRATIONS

    layout = ch_migrations.Layout("main", "fhir")
    statements = MIGRATIONS[0].sql(layout)
    # Each of the three tables twice (replicated, distributed), each view once.
    assert len(statements) == 8
    assert all(" ON CLUSTER `main` " in s for s in statements)
    events_local, events = statements[0], statements[1]
    assert events_local.startswith(
        "CREATE TABLE IF NOT EXISTS `fhir`.`Group_4_0_0_MemberEvents_local` ON CLUSTER `main` ("
    )
    assert (
        "ENGINE = ReplicatedReplacingMergeTree("
        "'/clickhouse/tables/{shard}/fhir/Group_4_0_0_MemberEvents', '{replica}') "
        "ORDER BY (roster_key, version, seq)"
    ) in events_local
    assert events == (
        "CREATE TABLE IF NOT EXISTS `fhir`.`Group_4_0_0_MemberEvents` ON CLUSTER `main` "
        "AS `fhir`.`Group_4_0_0_MemberEvents_local` ENGINE = Distributed(`main`, `fhir`, "
        "`Group_4_0_0_MemberEvents_local`, cityHash64(roster_key))"
    )
    assert "ENGINE = ReplicatedAggregatingMergeTree(" in statements[2]
    # A view reads the local log and writes the local states, names qualified: a distributed
    # DDL runs in each node's default database otherwise.
    view = statements[4]
    assert view.startswith(
        "CREATE MATERIALIZED VIEW IF NOT EXISTS `fhir`.`Group_4_0_0_MemberState_mv` "
        "ON CLUSTER `main` TO `fhir`.`Group_4_0_0_MemberState_local` AS SELECT"
    )
    assert view.endswith(
        "FROM `fhir`.`Group_4_0_0_MemberEvents_local` GROUP BY roster_key, member_ref"
    )
    with pytest.raises(ValueError):
        ch_migrations.Layout("main", "fhir`; DROP")


def test_local_table_names_the_replicated_table_on_a_cluster():
    assert ch_migrations.local_table("t", "main") == "t_local"
    assert ch_migrations.local_table("t", "") == "t"


def test_cluster_setting_is_checked(django_ready):
    from django.test import override_settings

    from fhirservice.checks import check_clickhouse_cluster

    server = "clickhouse://default@127.0.0.1:9000/fhir"
    with override_settings(CLICKHOUSE_URL=server, CLICKHOUSE_CLUSTER=None):
        assert check_clickhouse_cluster() == []
    with override_settings(CLICKHOUSE_URL=server, CLICKHOUSE_CLUSTER="main"):
        assert check_clickhouse_cluster() == []
    with override_settings(CLICKHOUSE_URL=server, CLICKHOUSE_CLUSTER="a b"):
        assert [e.id for e in check_clickhouse_cluster()] == ["fhirservice.E004"]
    with override_settings(CLICKHOUSE_URL="chdb:///tmp/x", CLICKHOUSE_CLUSTER="main"):
        assert [e.msg for e in check_clickhouse_cluster()] == [ch_migrations.MSG_CHDB_CLUSTER]


def test_alt_hosts_must_be_host_port_pairs():
    with pytest.raises(ValueError, match="alt_hosts"):
        connect("clickhouse://default@127.0.0.1:9/db?alt_hosts=127.0.0.1")

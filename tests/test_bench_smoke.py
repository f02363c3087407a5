"""The benchmark runs end to end on a tiny roster and prints its table (no timing asserted):
in-process, and as served (gunicorn started by the benchmark, requests over HTTP)."""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

import bench
from bench.runner import main, merges_settle
from fhirservice.clickhouse import get_clickhouse
from fhirservice.clickhouse import migrations as ch_migrations


@pytest.mark.slow
@pytest.mark.parametrize(
    ("served", "auth"),
    [(False, False), (False, True), (True, True)],
    ids=["in-process-auth-off", "in-process-auth-on", "served-auth-on"],
)
def test_bench_quick_mode_prints_the_budget_table(
    served: bool, auth: bool, settings, transactional_db: None, capsys
) -> None:
    # With access control on (the production default) the bench takes a token of its own.
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": auth}
    # The test database is migrated by pytest-django; a ClickHouse server needs its schema
    # (chdb migrates itself), so the bench's own migrate step is skipped.
    ch_migrations.apply(get_clickhouse())
    status = main(
        [
            "--quick",
            "--sizes",
            "100",
            "--repeat",
            "2",
            "--get-repeat",
            "1",
            "--ops",
            "50",
            "--member-rows",
            "2000",
            "--inline-max",
            "100",
            "--patients",
            "3",
            *("--load-groups 2 --load-members 10 --load-users 4 --load-seconds 5".split()),
            *("--load-requests", "150"),
            "--no-migrate",
            *([] if served else ["--in-process"]),
        ]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    assert bench.main is main
    assert "FHIR Group roster benchmarks" in out
    assert "metadata store" in out and "member events" in out
    assert ("access control : on: bearer token" in out) is auth, out
    for row in ("1 | PATCH +1 member", "2 | PATCH 50 member ops", "3 | create Group"):
        assert row in out, out
    for row in ("4 | GET Group of", "5 | $members page", "5 | quantity", "6 | Group?member="):
        assert row in out, out
    assert "inline/clickhouse" in out
    assert "7 | create plain Patient" in out and "7 | read plain Patient" in out
    # As served: gunicorn started by the bench, a row right after a restart, the worker's RSS.
    assert ("driven         : over HTTP" in out) is served, out
    assert ("first 20 after restart" in out) is served, out
    assert ("server RSS, peak" in out) is served, out
    # Row 8, the load test with mixed traffic, runs as served only.
    assert ("8 | load: member writes/s" in out) is served, out
    assert ("8 | load: all requests" in out) is served, out
    # ... and says where the machine's CPU went during it, the service's share included.
    assert ("row 8 CPU during the run: machine" in out) is served, out
    service_share = re.search(
        r"service \d+\.\d s \(\d+\.\d\d ms/member write, \d+\.\d\d ms/request\)", out
    )
    assert (service_share is not None) is served, out
    # On a ClickHouse server row 8 waits for the merges of its set-up before the load.
    server = settings.CLICKHOUSE_URL.startswith("clickhouse://")
    assert ("between the set-up and the load" in out) is (served and server), out
    assert "budgets:" in out


@pytest.mark.slow
def test_row_8_takes_the_mix_apart_and_paces_it(settings, transactional_db: None, capsys):
    # One kind alone, paced: here the floor (GET /healthz), which has no member writes and so
    # no budget lines; its CPU per request is what any request costs before the FHIR API.
    ch_migrations.apply(get_clickhouse())
    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": False}
    rows = "--rows 8 --load-groups 1 --load-members 10 --load-users 4 --load-seconds 4"
    options = "--load-profile floor --load-rate 40 --load-requests 1000 --no-migrate"
    status = main(["--quick", *rows.split(), *options.split()])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "8 | load: GET /healthz" in out, out
    assert "load: member writes/s" not in out, out
    assert "profile floor, not the budget's mixed traffic: no verdicts" in out, out
    assert "paced to 40 requests/s in all" in out, out
    served = int(re.search(r"8 \| load: GET /healthz +\| ([\d,]+)", out)[1].replace(",", ""))
    assert 80 <= served <= 240, out  # ~40/s for 4 s: paced, not as fast as answered
    assert re.search(r"service \d+\.\d s \(\d+\.\d\d ms/request\)", out), out


def test_a_pace_in_member_writes_sets_the_task_rate() -> None:
    from bench.load import task_rate

    assert task_rate("mix", 500) == 800  # member writes are 10 of the mix's 16 weights
    assert task_rate("patch", 500) == 500
    assert task_rate("floor", 500) == 500  # no member writes: requests


def test_merges_settle_waits_for_a_quiet_spell(db: None) -> None:
    # A moment without a merge may be the gap before the next one: row 8 waits for a spell.
    started = time.perf_counter()
    note = merges_settle(get_clickhouse(), 30.0, quiet=0.6)
    assert time.perf_counter() - started >= 0.6
    assert note.startswith("Timed after background merges finished"), note


@pytest.mark.slow
def test_compare_runs_the_scenario_against_a_base_url(
    transactional_db: None, tmp_path, capsys
) -> None:
    # bench.compare only needs a base URL: here our own service, served as make run does.
    from bench import compare, env
    from bench.server import Server
    from fhirservice.conf import fhir_settings

    url = env.database_url()  # the test database
    server = Server(
        {"FHIR_AUTH": "off", **({"DATABASE_URL": url} if url else {})},
        base_path="/" + fhir_settings.BASE_PATH,
        log_path=tmp_path / "server.log",
    )
    server.start()
    try:
        pid = str(server.worker_pid())
        status = compare.main(
            [server.base_url, "--sizes", "10,100", "--repeat", "2", "--patients", "2"]
            + ["--server-pid", pid, "--name", "this service"]
        )
    finally:
        server.stop()
    out = capsys.readouterr().out
    assert status == 0, out
    assert "as a client sees them: this service" in out
    for row in ("1 | PATCH +1 member, Group of 100", "3 | create Group, 100 members"):
        assert row in out, out
    for row in ("4 | GET Group of 104 members", "4 |   server RSS, peak", "7 | read plain"):
        assert row in out, out
    assert "members received" not in out, out


@pytest.mark.slow
@pytest.mark.parametrize("auth", [False, True], ids=["auth-off", "auth-on"])
def test_export_bench_runs_as_a_client_would(
    auth: bool, settings, transactional_db: None, capsys
) -> None:
    # With access control on (the default) the bench registers a key-set client with
    # create_fhir_client and takes its token with a signed assertion, as a client would.
    from bench.export import main as export_main

    settings.FHIR_SERVICE = {**settings.FHIR_SERVICE, "AUTH": auth}
    ch_migrations.apply(get_clickhouse())
    assert export_main(["--members", "5", "--no-migrate"]) == 0
    captured = capsys.readouterr()
    assert "| 5 | 55 |" in captured.out, captured
    assert ("SMART Backend Services client" in captured.err) is auth, captured.err


def test_store_cpu_leaves_out_a_server_restarted_since_it_started(tmp_path):
    """Row 8's CPU split under ``--load-outage``: ClickHouse killed and started again is a new
    process, whose CPU cannot be set against the old one's (it came out negative)."""
    from bench.server import StoreCpu

    (tmp_path / "pg" / "data").mkdir(parents=True)
    (tmp_path / "clickhouse").mkdir()
    first, second = (subprocess.Popen(["sleep", "30"]) for _ in range(2))
    try:
        (tmp_path / "pg" / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n/data\n")
        (tmp_path / "clickhouse" / "server.pid").write_text(f"{first.pid}\n")
        stores = StoreCpu(str(tmp_path))
        assert set(stores.sample()) == {"postgresql", "clickhouse"}
        (tmp_path / "clickhouse" / "server.pid").write_text(f"{second.pid}\n")  # restarted
        assert set(stores.sample()) == {"postgresql"}
    finally:
        for process in (first, second):
            process.kill()
            process.wait()

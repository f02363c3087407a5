"""The operator commands: ``backfill_group_members``, ``repair_group_members`` and
``ship_member_events``, run through ``call_command`` as an operator would run them.

Each command is checked for its help text, bad arguments (``CommandError`` with the exact
message), confirmation before it writes, ``--dry-run``, its progress bar and closing summary,
and its exit status. The backfill is interrupted twice (``--limit``, and an exception from
inside its loop) and resumed from its checkpoint; the repair finds and fixes damage written
straight into the stores.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from io import StringIO
from pathlib import Path

import orjson
import pytest
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError
from django.test import override_settings

import groups.maintenance.backfill
from fhirservice.models import ResourceVersion, StoredResource
from groups.maintenance.backfill import BACKFILL_CHECKPOINT, MSG_INLINE_MODE, backfill_checkpoint
from groups.management.cli import MSG_EMBEDDED_IN_USE
from groups.management.commands.repair_group_members import EXIT_PROBLEMS_REMAIN
from groups.management.commands.ship_member_events import MSG_BAD_ARGUMENTS as MSG_SHIP_ARGUMENTS
from groups.models import BackfillCheckpoint, MemberOutbox
from tests.groups.conftest import (
    add,
    clickhouse_roster,
    create_group,
    current_key,
    patched,
    read,
    refs_of,
    stored_version,
)
from tests.groups.test_maintenance import (
    INLINE,
    bogus_state,
    corrupt_quantity,
    inline_group,
    lose_version,
    roster_group,
    stray_event,
)

pytestmark = pytest.mark.django_db(transaction=True)


def run(name: str, *args: str, answer: str | None = None, monkeypatch=None) -> tuple[str, str]:
    """Run a command; (stdout, stderr). ``answer`` is typed at its confirmation prompt."""
    out, err = StringIO(), StringIO()
    if answer is not None:
        monkeypatch.setattr("builtins.input", lambda prompt: answer)
    call_command(name, *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def failing(name: str, *args: str, **kwargs) -> CommandError:
    """Run a command that must end in CommandError; the error."""
    with pytest.raises(CommandError) as caught:
        run(name, *args, **kwargs)
    return caught.value


def help_text(name: str) -> str:
    """The ``--help`` output of a command."""
    return load_command_class("groups", name).create_parser("manage.py", name).format_help()


def inline_groups(api, n: int) -> list[str]:
    """``n`` inline Groups of 3 members each, in key order."""
    tag = uuid.uuid4().hex[:6]
    gids = [inline_group(api, [f"Patient/{tag}{i}{m}" for m in "abc"]) for i in range(n)]
    return sorted(gids)


def versions(gids: list[str]) -> list[int]:
    """Current version of each Group."""
    return [stored_version(gid) for gid in gids]


# --- backfill_group_members ----------------------------------------------------------------


def test_backfill_help_names_every_option():
    text = help_text("backfill_group_members")
    for option in ("--group", "--batch-size", "--limit", "--dry-run", "--restart", "--no-input"):
        assert option in text
    assert "checkpoint" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be a positive whole number, not 0"),
        (["--limit", "-3"], "--limit must be a positive whole number, not -3"),
        (["--group", "nope"], "No Group with id 'nope'"),
        (["--group", "x", "--restart"], "--restart concerns the checkpoint"),
    ],
)
def test_backfill_rejects_bad_arguments(live_api, args, message):
    assert message in str(failing("backfill_group_members", *args, "--no-input"))


def test_backfill_refuses_inline_mode(live_api):
    with override_settings(FHIR_SERVICE=INLINE):
        assert str(failing("backfill_group_members", "--no-input")) == MSG_INLINE_MODE


def test_backfill_dry_run_counts_and_changes_nothing(live_api):
    gids = inline_groups(live_api, 3)
    out, _ = run("backfill_group_members", "--dry-run")
    assert "Dry run: 3 Groups with inline rosters (9 members) would move" in out
    assert versions(gids) == [1, 1, 1]
    assert backfill_checkpoint() is None


def test_backfill_asks_first_and_a_no_changes_nothing(live_api, monkeypatch):
    gids = inline_groups(live_api, 2)
    error = failing("backfill_group_members", answer="n", monkeypatch=monkeypatch)
    assert str(error) == "Backfill cancelled; nothing changed."
    assert versions(gids) == [1, 1]
    out, _ = run("backfill_group_members", answer="yes", monkeypatch=monkeypatch)
    assert "Moved 2 Groups (6 members)" in out
    assert versions(gids) == [2, 2]


def test_backfill_moves_everything_with_progress_and_summary(live_api):
    gids = inline_groups(live_api, 5)
    plain = create_group(live_api, ["Patient/plain"])  # already in ClickHouse: skipped
    out, err = run("backfill_group_members", "--no-input", "--batch-size", "2")
    assert "Moved 5 Groups (15 members)" in out
    assert "skipped 1 without an inline roster" in out
    assert "Checkpoint: finished" in out
    assert "6/6" in err and "group" in err  # the progress bar's last state
    assert versions(gids) == [2] * 5 and stored_version(plain) == 1
    for gid in gids:
        assert len(refs_of(read(live_api, gid))) == 3
        assert clickhouse_roster(current_key(gid)) == refs_of(read(live_api, gid))
        history = ResourceVersion.objects.get(key=f"Group/{gid}/_history/2")
        assert (history.method, history.actor) == ("PUT", "backfill_group_members")
    checkpoint = backfill_checkpoint()
    assert (checkpoint.groups_done, checkpoint.members_done) == (5, 15)
    assert checkpoint.finished_at is not None
    # Idempotent: a second run finds nothing to move.
    out, _ = run("backfill_group_members", "--no-input")
    assert "Moved 0 Groups (0 members)" in out and "skipped 6" in out
    assert versions(gids) == [2] * 5


def test_backfill_stopped_by_limit_resumes_from_its_checkpoint(live_api):
    gids = inline_groups(live_api, 5)
    out, _ = run("backfill_group_members", "--no-input", "--limit", "2", "--batch-size", "10")
    assert "Moved 2 Groups (6 members)" in out
    assert f"Checkpoint: stopped after Group/{gids[1]}; run again to continue." in out
    assert versions(gids) == [2, 2, 1, 1, 1]
    checkpoint = BackfillCheckpoint.objects.get(name=BACKFILL_CHECKPOINT)
    assert (checkpoint.last_key, checkpoint.groups_done) == (f"Group/{gids[1]}", 2)
    out, _ = run("backfill_group_members", "--no-input")
    assert f"Resumed after Group/{gids[1]}." in out
    assert "Moved 3 Groups (9 members)" in out and "skipped 0" in out
    assert versions(gids) == [2] * 5
    assert backfill_checkpoint().groups_done == 5


def test_backfill_interrupted_by_a_crash_resumes_where_it_stopped(live_api, monkeypatch):
    gids = inline_groups(live_api, 6)
    real = groups.maintenance.backfill.group_roster_backfill
    calls = []

    def crash_on_the_fourth(**kwargs):
        calls.append(kwargs["group_id"])
        if len(calls) == 4:
            raise RuntimeError("the process was killed")
        return real(**kwargs)

    monkeypatch.setattr(groups.maintenance.backfill, "group_roster_backfill", crash_on_the_fourth)
    with pytest.raises(RuntimeError, match="killed"):
        run("backfill_group_members", "--no-input", "--batch-size", "2")
    assert versions(gids) == [2, 2, 2, 1, 1, 1]
    # Saved when the exception left the loop, mid-batch: after the last Group moved.
    assert backfill_checkpoint().last_key == f"Group/{gids[2]}"
    monkeypatch.setattr(groups.maintenance.backfill, "group_roster_backfill", real)
    out, _ = run("backfill_group_members", "--no-input")
    assert f"Resumed after Group/{gids[2]}." in out
    assert "Moved 3 Groups (9 members)" in out
    assert versions(gids) == [2] * 6  # one new version each, none twice
    assert backfill_checkpoint().groups_done == 6


def test_backfill_restart_rescans_from_the_first_group(live_api):
    gids = inline_groups(live_api, 3)
    run("backfill_group_members", "--no-input", "--limit", "1")
    out, _ = run("backfill_group_members", "--no-input", "--restart")
    assert "Resumed" not in out
    assert "Moved 2 Groups (6 members)" in out and "skipped 1" in out
    assert versions(gids) == [2, 2, 2]


def test_backfill_of_named_groups_leaves_the_checkpoint_alone(live_api):
    gids = inline_groups(live_api, 3)
    out, _ = run("backfill_group_members", "--no-input", "--group", gids[2], "--group", gids[0])
    assert "Moved 2 Groups (6 members)" in out
    assert "Checkpoint" not in out
    assert versions(gids) == [2, 1, 2]
    assert backfill_checkpoint() is None


def test_backfill_reports_groups_it_cannot_move(live_api):
    good, bad = inline_groups(live_api, 2)
    row = StoredResource.objects.get(key=f"Group/{bad}")
    body = orjson.loads(row.body)
    body["member"][0]["entity"]["reference"] = "Observation/x"
    StoredResource.objects.filter(key=row.key).update(body=orjson.dumps(body).decode())
    error = failing("backfill_group_members", "--no-input")
    assert "1 Groups could not be moved" in str(error)
    assert versions([good, bad]) == [2, 1]


def test_backfill_stops_cleanly_when_clickhouse_is_down(live_api, clickhouse_down):
    gids = inline_groups(live_api, 2)
    with clickhouse_down():
        error = failing("backfill_group_members", "--no-input")
    assert "Backfill stopped: The member store (ClickHouse) is unavailable" in str(error)
    assert versions(gids) == [1, 1]
    out, _ = run("backfill_group_members", "--no-input")
    assert "Moved 2 Groups" in out


# --- repair_group_members ------------------------------------------------------------------


def test_repair_help_names_every_option():
    text = help_text("repair_group_members")
    for option in ("--fix", "--dry-run", "--group", "--batch-size", "--timeout", "--no-input"):
        assert option in text
    assert f"Exit status {EXIT_PROBLEMS_REMAIN} when problems remain" in " ".join(text.split())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be a positive whole number, not 0"),
        (["--show", "-1"], "--show must be a positive whole number, not -1"),
        (["--timeout", "0"], "--timeout must be positive, not 0.0"),
        (["--group", "missing"], "No Group with id 'missing'"),
    ],
)
def test_repair_rejects_bad_arguments(live_api, args, message):
    error = failing("repair_group_members", *args)
    assert message in str(error)
    assert error.returncode == 1


def test_repair_of_a_healthy_group_reports_no_problems(live_api):
    gid = roster_group(live_api)
    out, _ = run("repair_group_members", "--group", gid, "--fix", "--no-input")
    assert "Found: no problems in 1 rosters." in out


def test_repair_dry_run_reports_and_exits_non_zero(live_api, no_shipping):
    gid = create_group(live_api, ["Patient/dr1"])
    error = failing("repair_group_members", "--group", gid, "--dry-run", "--fix")
    assert error.returncode == EXIT_PROBLEMS_REMAIN
    assert str(error) == "1 problems remain."
    assert MemberOutbox.objects.filter(group_id=gid, shipped_at__isnull=True).count() == 1


def test_repair_without_fix_ships_and_reports_the_rest(live_api):
    gid = roster_group(live_api)
    corrupt_quantity(gid, 3)
    MemberOutbox.objects.filter(group_id=gid, version=2).update(shipped_at=None)
    out = StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("repair_group_members", "--group", gid, stdout=out, stderr=StringIO())
    assert caught.value.returncode == EXIT_PROBLEMS_REMAIN
    text = out.getvalue()
    assert "  pending: 1 — " in text
    assert "Shipped 1 batches" in text
    assert "Remaining: 1 problems in 1 rosters." in text
    assert "quantity is 3; the roster has 29 active members" in text
    assert "Run again with --fix to repair." in text
    assert not MemberOutbox.objects.filter(group_id=gid, shipped_at__isnull=True).exists()


def test_repair_fix_finds_and_fixes_every_kind_of_damage(live_api, monkeypatch):
    gids = [roster_group(live_api) for _ in range(6)]
    refs = {gid: refs_of(read(live_api, gid)) for gid in gids}
    stray_event(current_key(gids[0]), 3, 0, "Patient/ghost")  # newer than the Group
    stray_event(current_key(gids[1]), 2, 40, "Patient/ghost")  # beyond version 2's events
    lose_version(current_key(gids[2]), 1)  # committed events lost
    bogus_state(current_key(gids[3]), "Patient/ghost", present=1)  # state without events
    corrupt_quantity(gids[4], 7)
    stray_event(f"{gids[5]}/9", 9, 0, "Patient/ghost")  # a roster key of no incarnation
    MemberOutbox.objects.filter(group_id=gids[5], version=2).update(shipped_at=None)
    args = ["repair_group_members", "--fix", *[f"--group={gid}" for gid in gids]]
    error = failing(*args, answer="n", monkeypatch=monkeypatch)
    assert error.returncode == EXIT_PROBLEMS_REMAIN
    out, err = run(*args, answer="y", monkeypatch=monkeypatch)
    for kind in (
        "pending: 1",
        "stray-roster: 1",
        "stray-version: 1",
        "stray-events: 1",
        "missing-events: 1",
        "state: 2",
        "quantity: 4",
    ):
        assert f"  {kind} — " in out, out
    assert "Repaired: no problems remain." in out
    assert "checking: 100%" in err and "repairing: 100%" in err  # progress bars
    for gid in gids:
        assert refs_of(read(live_api, gid)) == refs[gid]
        assert read(live_api, gid)["quantity"] == 29
    out, _ = run(*args, "--no-input")
    assert "Found: no problems in 6 rosters." in out


def test_repair_scans_every_roster_without_group(live_api):
    gid = roster_group(live_api)
    corrupt_quantity(gid, 3)
    error = failing("repair_group_members", "--dry-run", "--show", "1000000")
    assert error.returncode == EXIT_PROBLEMS_REMAIN


# --- ship_member_events --------------------------------------------------------------------


def test_ship_ships_what_is_pending(live_api, no_shipping):
    gid = create_group(live_api, ["Patient/sh1", "Patient/sh2"])
    patched(live_api, gid, [add("Patient/sh3")])
    no_shipping.clear()
    MemberOutbox.objects.filter(group_id=gid).update(recorded_at="2020-01-01T00:00:00Z")
    out, _ = run("ship_member_events")
    assert "shipped" in out
    assert not MemberOutbox.objects.filter(group_id=gid, shipped_at__isnull=True).exists()
    assert clickhouse_roster(current_key(gid)) == ["Patient/sh1", "Patient/sh2", "Patient/sh3"]


def test_ship_loop_runs_its_rounds(live_api):
    out, _ = run("ship_member_events", "--loop", "--rounds", "2", "--interval", "0.01")
    assert out == "" or "shipped" in out


def test_ship_rejects_bad_arguments():
    for args in (("--interval", "0"), ("--batch-limit", "0"), ("--max-interval", "0.5")):
        assert str(failing("ship_member_events", *args)) == MSG_SHIP_ARGUMENTS


# --- beside a running service on the embedded store ------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
# What the service does on its first roster read: open the process-wide client (chdb, with
# its schema). Then it holds the path until it exits.
HOLD_THE_STORE = (
    "from fhirservice.clickhouse import get_clickhouse; get_clickhouse(); "
    "print('holding', flush=True); import sys; sys.stdin.read()"
)


@pytest.fixture(scope="module")
def embedded_store_in_use(tmp_path_factory) -> Iterator[dict[str, str]]:
    """The environment of a ``make run`` service on the embedded defaults, and a second
    process (``manage.py shell``, as the service opens it) holding its chdb path."""
    tmp_path = tmp_path_factory.mktemp("embedded")
    # An embedded store is one node: no MongoDB, no ClickHouse cluster (the cluster pass).
    env = {k: v for k, v in os.environ.items() if k not in ("MONGODB_URI", "CLICKHOUSE_CLUSTER")}
    env.update(
        DATABASE_URL=f"sqlite:///{tmp_path / 'fhirservice.sqlite3'}",
        CLICKHOUSE_URL=f"chdb://{tmp_path / 'chdb'}",
        FHIR_VAR_DIR=str(tmp_path / "var"),
    )
    manage = [sys.executable, "manage.py"]
    subprocess.run(
        [*manage, "migrate", "--noinput"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    holder = subprocess.Popen(
        [*manage, "shell", "--no-imports", "-c", HOLD_THE_STORE],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield env
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


@pytest.mark.parametrize(
    "args",
    [
        ["repair_group_members", "--dry-run"],
        ["repair_group_members", "--fix", "--no-input"],
        ["backfill_group_members", "--no-input"],
        ["ship_member_events"],
    ],
)
def test_commands_refuse_in_one_sentence_while_the_service_holds_the_store(
    embedded_store_in_use, args
):
    env = embedded_store_in_use
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    path = env["CLICKHOUSE_URL"].removeprefix("chdb://")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"CommandError: {MSG_EMBEDDED_IN_USE.format(path=path)}"
    assert result.stdout == ""


def test_ship_drains_more_than_one_batch_limit(live_api, no_shipping):
    """D3: one run shipped at most --batch-limit batches and exited 0 with the rest left."""
    gid = create_group(live_api, ["Patient/dr1"])
    for ref in ("Patient/dr2", "Patient/dr3", "Patient/dr4"):
        patched(live_api, gid, [add(ref)])
    MemberOutbox.objects.filter(group_id=gid).update(recorded_at="2020-01-01T00:00:00Z")
    out, _ = run("ship_member_events", "--batch-limit", "1")
    assert "shipped 4 batches (4 events)" in out
    assert not MemberOutbox.objects.filter(shipped_at__isnull=True).exists()
    assert clickhouse_roster(current_key(gid)) == [f"Patient/dr{n}" for n in range(1, 5)]


def test_ship_exits_non_zero_saying_what_is_left(live_api, no_shipping, clickhouse_down):
    gid = create_group(live_api, ["Patient/left1"])
    patched(live_api, gid, [add("Patient/left2")])
    MemberOutbox.objects.filter(group_id=gid).update(recorded_at="2020-01-01T00:00:00Z")
    with clickhouse_down():
        error = str(failing("ship_member_events"))
    assert error.startswith("2 batches still pending (the oldest committed "), error
    assert "cannot be reached" in error
    fresh = create_group(live_api, ["Patient/fresh"])  # its writer ships it: left alone
    out, _ = run("ship_member_events", "--min-age", "3600")
    assert "shipped 2 batches" in out
    assert "1 batches younger than --min-age left to the writes that made them" in out
    assert MemberOutbox.objects.filter(group_id=fresh, shipped_at__isnull=True).exists()


def test_ship_loop_backs_off_while_clickhouse_is_down(live_api, no_shipping, clickhouse_down):
    gid = create_group(live_api, ["Patient/lp1"])
    MemberOutbox.objects.filter(group_id=gid).update(recorded_at="2020-01-01T00:00:00Z")
    with clickhouse_down():
        started = time.monotonic()
        out, _ = run(
            "ship_member_events",
            "--loop",
            "--rounds",
            "3",
            "--interval",
            "0.1",
            "--max-interval",
            "0.2",
        )
        waited = time.monotonic() - started
    assert out.count("error:") == 3
    assert waited >= 0.4  # 0.2 + 0.2 (doubled, capped); the third round ends the run
    out, _ = run("ship_member_events", "--loop", "--rounds", "1", "--interval", "0.1")
    assert "shipped 1 batches" in out

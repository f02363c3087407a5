"""What the fault tests share: the stack they drive, seeds and replay, failure messages.

Each case runs several rounds (timings), each with a seed of its own; the seed fixes the fault
schedule and the writes, so a failing round is replayed with ``FHIR_FAULTS_REPLAY=case:seed``
(the failure message prints it): then only that round of that case runs. ``FHIR_FAULTS_SEED``
(default 16) picks another set of rounds, ``FHIR_FAULTS_ROUNDS`` multiplies how many run.

The recovery after each fault is the documented one (docs/operators.md): start the server
again, ``manage.py ship_member_events``; then ``manage.py repair_group_members --dry-run``
must find nothing, and everything a client reads must agree with the answers it got.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tests.faults.processes import App, Servers
from tests.faults.roster import Api, Roster, roster_problems

SERVERS_DIR = os.environ.get("FHIR_FAULT_SERVERS", "")
BASE_SEED = int(os.environ.get("FHIR_FAULTS_SEED", "16"))
ROUNDS_FACTOR = int(os.environ.get("FHIR_FAULTS_ROUNDS", "1"))
REPLAY = os.environ.get("FHIR_FAULTS_REPLAY", "")
# Every round's timing and result, printed at the end of the run (conftest.py).
TRIED: list[str] = []


def seeds(case: str, rounds: int) -> list[int]:
    """The seeds of a case's rounds (test parameters): one per round, or the replayed one."""
    if REPLAY:
        name, _, seed = REPLAY.partition(":")
        return [int(seed)] if name == case else []
    return [BASE_SEED * 1000 + index for index in range(rounds * ROUNDS_FACTOR)]


def replay_hint(case: str, seed: int) -> str:
    """How to run one failed round again."""
    return (
        f"replay: FHIR_FAULTS_REPLAY={case}:{seed} (faults pass of scripts/run-tests.sh, or "
        f"pytest -m faults tests/faults with FHIR_FAULT_SERVERS and the server ports set)"
    )


@dataclass
class Stack:
    """The servers, the app on a database of its own, and an HTTP client for it."""

    servers: Servers
    app: App
    api: Api
    database: str

    def ship(self) -> str:
        """The documented relay run after an outage; returns its output."""
        result = self.app.manage("ship_member_events", "--min-age", "0")
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"ship_member_events exit {result.returncode}: {output}"
        return output

    def repair_dry_run(self, rosters: list[Roster]) -> list[str]:
        """``repair_group_members --dry-run`` on these Groups: its report unless clean."""
        if not rosters:
            return []  # without --group it would check the rosters of every earlier round
        groups = [arg for roster in rosters for arg in ("--group", roster.id)]
        result = self.app.manage("repair_group_members", "--dry-run", *groups)
        if result.returncode == 0 and "Found: no problems" in result.stdout:
            return []
        report = f"{result.stdout.strip()} {result.stderr.strip()[-2000:]}"
        return [f"repair: --dry-run exit {result.returncode}: {report}"]

    def problems(self, rosters: list[Roster], *, searches: int | None = None) -> list[str]:
        """The repair check and the full comparison of every roster."""
        found = self.repair_dry_run(rosters)
        for roster in rosters:
            found.extend(roster_problems(self.api, roster, searches=searches))
        return found

    def ch_counts(self, roster_key: str) -> str:
        """Rows of a roster in the event log and both state tables (to describe a timing)."""
        counts = [
            self.servers.clickhouse(
                f"SELECT count() FROM {self.database}.{table} WHERE roster_key = '{roster_key}'"
            ).strip()
            for table in (
                "Group_4_0_0_MemberEvents",
                "Group_4_0_0_MemberState",
                "Group_4_0_0_MemberGroups",
            )
        ]
        return "log {}, state {}, reverse {}".format(*counts)


def verdict(case: str, seed: int, timing: str, counts: str, problems: list[str]) -> None:
    """Fail the round if anything disagreed."""
    TRIED.append(f"{case}:{seed} {'ok' if not problems else 'FAILED'}: {timing}")
    assert not problems, failure(case, seed, timing, counts, problems)


def failure(case: str, seed: int, timing: str, counts: str, problems: list[str]) -> str:
    """The message of a failed round: what was done, what disagreed, how to replay it."""
    kinds: dict[str, list[str]] = {}
    for problem in problems:
        kind, _, text = problem.partition(": ")
        kinds.setdefault(kind, []).append(text)
    lines = []
    for kind, texts in kinds.items():
        lines.append(f"{kind}: {len(texts)}")
        lines.extend(f"    {text}" for text in texts[:5])
    shown = "\n  ".join(lines)
    return (
        f"{case} seed {seed}: {timing}\nwrites: {counts}\n"
        f"{len(problems)} problems by kind:\n  {shown}\n{replay_hint(case, seed)}"
    )

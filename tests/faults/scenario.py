"""The two workloads faults hit: small concurrent roster writes, and a 200k-member create.

Timings are seeded: ``Outage`` lists say when a server goes down during the small writes and
for how long; a ``BigCreate`` is killed at a fraction of a phase measured on an undisturbed
create (``CreateProfile``): before its events reach ClickHouse, or while they are inserted,
where the insert is seen in ClickHouse's ``system.processes``.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from tests.faults.roster import ACKED, Roster, create, find_by_token
from tests.faults.stack import Stack

BIG = 200_000
SMALL_GROUPS = 3
SMALL_INITIAL = 24
WRITERS = 4
# The INSERT of member events, as system.processes shows it (the polling query itself starts
# with SELECT, so it never matches).
INSERT_SEEN = "SELECT count() FROM system.processes WHERE query LIKE 'INSERT INTO%MemberEvents%'"


def small_rosters(stack: Stack, seed: int) -> list[Roster]:
    """A few Groups of a few members each, created without faults."""
    rosters = []
    tag = uuid.uuid4().hex[:6]  # rounds of several cases share seeds, never members
    for index in range(SMALL_GROUPS):
        refs = [f"Patient/s{seed}-{tag}-g{index}-{n:03d}" for n in range(SMALL_INITIAL)]
        outcome, _, answer, group_id = create(stack.api, refs, f"{seed}-{index}-{uuid.uuid4()}")
        assert outcome == ACKED and group_id, f"creating a small Group: {answer}"
        rosters.append(Roster(group_id, refs))
    return rosters


@dataclass(frozen=True)
class Outage:
    """A server goes down ``after`` seconds (since the writes started or the last restart)
    and stays down ``down`` seconds."""

    after: float
    down: float

    def __str__(self) -> str:
        return f"after {self.after:.2f} s, down {self.down:.2f} s"


def outages(rng: random.Random, count: int) -> list[Outage]:
    """A seeded outage schedule."""
    return [
        Outage(round(rng.uniform(0.3, 1.5), 2), round(rng.uniform(0.2, 2.5), 2))
        for _ in range(count)
    ]


def run_outages(schedule: list[Outage], down: Callable[[], None], up: Callable[[], None]) -> None:
    """Take the server down and up again as the schedule says."""
    for outage in schedule:
        time.sleep(outage.after)
        down()
        time.sleep(outage.down)
        up()


@dataclass
class CreateProfile:
    """When, after sending an undisturbed 200k create, its insert started and ended, and
    when the answer came (seconds)."""

    insert_start: float
    insert_end: float
    answer: float


class BigCreate:
    """A 200k-member POST in a thread, watched from ClickHouse."""

    def __init__(self, stack: Stack, seed: int) -> None:
        self.stack = stack
        self.token = f"big-{seed}-{uuid.uuid4()}"
        tag = uuid.uuid4().hex[:6]  # rounds of several cases share seeds, never members
        self.refs = [f"Patient/b{seed}-{tag}-{n:06d}" for n in range(BIG)]
        self.result: tuple | None = None
        self.sent = 0.0
        self._thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        self.result = create(self.stack.api, self.refs, self.token)

    def start(self) -> None:
        """Send the create."""
        self.sent = time.monotonic()
        self._thread.start()

    @property
    def answered(self) -> bool:
        """True once the answer (or the failure) came."""
        return not self._thread.is_alive()

    def inserting(self) -> bool:
        """True while ClickHouse runs an insert of member events (False when it is down)."""
        try:
            return self.stack.servers.clickhouse(INSERT_SEEN, timeout=2).strip() != "0"
        except OSError:
            return False

    def wait_for_insert(self, poll: float = 0.01) -> float | None:
        """Seconds after sending when the insert was first seen; None if the answer came
        first (or ClickHouse stopped answering)."""
        while not self.answered:
            if self.inserting():
                return time.monotonic() - self.sent
            time.sleep(poll)
        return None

    def join(self) -> tuple:
        """The create's (outcome, version, answer, id)."""
        self._thread.join(timeout=600)
        assert self.result is not None, "the create did not finish"
        return self.result

    def roster(self) -> Roster | None:
        """The Group the create made, found by its answer or, without one, its identifier;
        None when it does not exist (allowed only when no 2xx answer came)."""
        outcome, _, answer, group_id = self.join()
        if group_id is None:
            found = find_by_token(self.stack.api, self.token)
            assert len(found) <= 1, f"one create made {len(found)} Groups"
            assert not (found and outcome != "unknown"), f"answered {answer}, yet Group made"
            group_id = found[0] if found else None
        return Roster(group_id, self.refs) if group_id else None


def profile_create(stack: Stack) -> CreateProfile:
    """Time one undisturbed create (the fractions of the kill timings apply to it)."""
    create_ = BigCreate(stack, seed=0)
    create_.start()
    start = create_.wait_for_insert()
    assert start is not None, "the undisturbed create's insert was never seen"
    while create_.inserting() and not create_.answered:
        time.sleep(0.01)
    end = time.monotonic() - create_.sent
    outcome, _, answer, _ = create_.join()
    assert outcome == ACKED, f"the undisturbed create answered {answer}"
    return CreateProfile(start, end, time.monotonic() - create_.sent)


def kill_during_create(
    create_: BigCreate, profile: CreateProfile, rng: random.Random, kill: Callable[[], None]
) -> str:
    """Kill at a seeded point of the create: before its insert (a fifth of the timings) or
    during it; returns what happened, for the failure message."""
    create_.start()
    if rng.random() < 0.2:
        delay = rng.uniform(0.3, 1.0) * profile.insert_start
        time.sleep(delay)
        planned = f"{delay:.2f} s after sending (insert starts ~{profile.insert_start:.2f} s)"
    else:
        fraction = rng.uniform(0.0, 1.1)
        delay = fraction * (profile.insert_end - profile.insert_start)
        seen = create_.wait_for_insert()
        if seen is not None:
            time.sleep(max(0.0, delay - 0.01))
        planned = (
            f"{delay:.2f} s into the insert ({fraction:.0%} of "
            f"{profile.insert_end - profile.insert_start:.2f} s; insert seen at "
            + (f"{seen:.2f} s)" if seen is not None else "never: the answer came first)")
        )
    answered = create_.answered
    kill()
    return f"killed {planned}{', after the answer' if answered else ''}"

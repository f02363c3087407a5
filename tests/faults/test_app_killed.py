"""The app killed (kill -9 of gunicorn, master and worker) mid-write.

Writes it acknowledged must survive; writes it never answered may or may not have happened,
but as a whole (a create made the whole roster or nothing). Recovery is the documented one:
start the service again and run ``ship_member_events`` for what the dead process left
unshipped.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.faults.roster import Writers, outcome_counts
from tests.faults.scenario import (
    WRITERS,
    BigCreate,
    CreateProfile,
    kill_during_create,
    outages,
    run_outages,
    small_rosters,
)
from tests.faults.stack import Stack, seeds, verdict

pytestmark = pytest.mark.faults

WRITES = "app-writes"
CREATE = "app-create"


@pytest.mark.parametrize("seed", seeds(WRITES, 2))
def test_small_writes(faults: Stack, seed: int) -> None:
    """Two kills per round under four writers; the app is started again after each."""
    rng = random.Random(seed)
    rosters = small_rosters(faults, seed)
    schedule = outages(rng, 2)
    with Writers(faults.api, rosters, count=WRITERS, seed=seed):
        run_outages(schedule, faults.app.kill, faults.app.start)
        time.sleep(rng.uniform(0.5, 1.5))
    faults.ship()
    problems = faults.problems(rosters, searches=40)
    timing = "app killed " + "; ".join(str(o) for o in schedule)
    verdict(WRITES, seed, timing, outcome_counts(rosters), problems)


@pytest.mark.parametrize("seed", seeds(CREATE, 3))
def test_big_create(faults: Stack, create_profile: CreateProfile, seed: int) -> None:
    """A 200k-member POST with the app killed before or during its insert into ClickHouse."""
    rng = random.Random(seed)
    create = BigCreate(faults, seed)
    timing = kill_during_create(create, create_profile, rng, faults.app.kill)
    _, _, answer, _ = create.join()
    faults.app.start()
    roster = create.roster()
    timing += f"; answered {answer}; " + (
        f"Group made, in ClickHouse after the kill: {faults.ch_counts(f'{roster.id}/1')}"
        if roster is not None
        else "no Group made"
    )
    faults.ship()
    rosters = [roster] if roster is not None else []
    problems = faults.problems(rosters, searches=100)
    verdict(CREATE, seed, timing, answer, problems)

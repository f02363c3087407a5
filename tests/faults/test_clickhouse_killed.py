"""ClickHouse killed (kill -9) mid-write: small concurrent writes, and a 200k-member create.

Recovery is the documented one: start ClickHouse again, run ``ship_member_events``. Then no
acknowledged member may be missing, no unacknowledged one may appear, and every read agrees.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.faults.roster import ACKED, Writers, outcome_counts
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

WRITES = "clickhouse-writes"
CREATE = "clickhouse-create"


@pytest.mark.parametrize("seed", seeds(WRITES, 4))
def test_small_writes(faults: Stack, seed: int) -> None:
    """Three kills per round under four writers adding and removing members of 3 Groups."""
    rng = random.Random(seed)
    rosters = small_rosters(faults, seed)
    schedule = outages(rng, 3)
    with Writers(faults.api, rosters, count=WRITERS, seed=seed):
        run_outages(schedule, faults.servers.kill_clickhouse, faults.servers.start_clickhouse)
        # Writes against the restarted server: they ship what the outage left behind.
        time.sleep(rng.uniform(0.5, 1.5))
    faults.ship()
    problems = faults.problems(rosters, searches=40)
    timing = "ClickHouse killed " + "; ".join(str(o) for o in schedule)
    verdict(WRITES, seed, timing, outcome_counts(rosters), problems)


@pytest.mark.parametrize("seed", seeds(CREATE, 6))
def test_big_create(faults: Stack, create_profile: CreateProfile, seed: int) -> None:
    """A 200k-member POST with ClickHouse killed before or during its insert."""
    rng = random.Random(seed)
    create = BigCreate(faults, seed)
    timing = kill_during_create(create, create_profile, rng, faults.servers.kill_clickhouse)
    outcome, _, answer, _ = create.join()
    faults.servers.start_clickhouse()
    roster = create.roster()
    timing += f"; answered {answer}"
    if roster is not None:
        timing += f"; in ClickHouse after restart: {faults.ch_counts(f'{roster.id}/1')}"
    faults.ship()
    rosters = [roster] if roster is not None else []
    problems = faults.problems(rosters, searches=100)
    if outcome != ACKED:
        # The create needs nothing from ClickHouse before it commits.
        problems.insert(0, f"create: not acknowledged: {answer}")
    verdict(CREATE, seed, timing, answer, problems)

"""PostgreSQL stopped and started again under small concurrent writes.

``fast`` is a clean shutdown (open sessions rolled back); ``immediate`` is a crash (the next
start replays the WAL). Writes answered 2xx must survive either; writes answered 5xx or not
at all may or may not have happened. Recovery: PostgreSQL started again (the service
reconnects by itself), then ``ship_member_events``.
"""

from __future__ import annotations

import random
import time

import pytest

from tests.faults.roster import Writers, outcome_counts
from tests.faults.scenario import WRITERS, outages, run_outages, small_rosters
from tests.faults.stack import Stack, seeds, verdict

pytestmark = pytest.mark.faults

WRITES = "postgres-writes"
MODES = ("fast", "immediate")


@pytest.mark.parametrize("seed", seeds(WRITES, 2))
def test_small_writes(faults: Stack, seed: int) -> None:
    """One restart per round, alternately clean and as a crash."""
    rng = random.Random(seed)
    mode = MODES[seed % 2]
    rosters = small_rosters(faults, seed)
    schedule = outages(rng, 1)
    with Writers(faults.api, rosters, count=WRITERS, seed=seed):
        run_outages(schedule, lambda: faults.servers.stop_postgres(mode), faults.servers.start)
        time.sleep(rng.uniform(0.5, 1.5))
    faults.ship()
    problems = faults.problems(rosters, searches=40)
    timing = f"PostgreSQL stopped ({mode}) " + "; ".join(str(o) for o in schedule)
    verdict(WRITES, seed, timing, outcome_counts(rosters), problems)

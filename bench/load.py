"""Row 8: a load test over HTTP with mixed traffic (``locust --headless``, loopback only).

Set-up through the API: ``groups`` Groups of ``members`` members each and up to 300
Patients with identifiers of this run's own system. Then ``bench/locustfile.py`` runs with
``users`` simulated clients for at most ``seconds`` and ``max_requests`` requests, and its
CSV statistics come back as one ``KindStats`` per request kind: count, failures,
throughput, p50 and p99 (locust's own percentiles, in ms buckets). ``during``, when given,
runs in this process while locust runs (``bench.outage``: ClickHouse down under the load).

``settle``, when given, runs between the set-up and locust: the set-up writes 10^7 member
events (100 Groups of 10^5) in a few minutes, and ClickHouse merges their parts for a while
afterwards (the load average went from ~2 to 9 right after it). Timed at once, the load
shared the 2 CPUs with the tail of the set-up's merges rather than with the merges its own
writes cause; the runner waits until no merge has run for a few seconds
(``bench.runner.merges_settle``) and reports how long that took.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.data import group_body, patient_body

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
PATIENTS = 300  # created for reads, $add-member and searches (fewer for small runs)
MEMBER_WRITES = ("PATCH Group (+1 member)", "POST Group/$add-member")  # locustfile's names

# Weights of the locustfile's tasks per profile (--load-profile). "mix" is the mixed
# traffic, the one the budget is on; the others take it apart: one kind alone tells its cost
# per request, and "floor" (GET /healthz: gunicorn, Django and the middleware, no store) what
# any request costs before it reaches the FHIR API.
PROFILES: dict[str, dict[str, int]] = {
    "mix": {"patch": 8, "add-member": 2, "quantity": 2, "read": 2, "search": 1, "crud": 1},
    "patch": {"patch": 1},
    "add-member": {"add-member": 1},
    "reads": {"quantity": 1, "read": 1, "search": 1},
    "crud": {"crud": 1},
    "floor": {"healthz": 1},
}
MEMBER_TASKS = ("patch", "add-member")


def task_rate(profile: str, rate: float) -> float:
    """Task runs per second across all clients for a pace of ``rate``: member writes per
    second for a profile that writes members, else task runs per second (a "crud" run is a
    create, an update and a delete)."""
    weights = PROFILES[profile]
    member = sum(weight for name, weight in weights.items() if name in MEMBER_TASKS)
    return rate * sum(weights.values()) / member if member else rate


@dataclass
class KindStats:
    """Locust's statistics of one request kind."""

    name: str
    count: int
    failures: int
    rate: float  # requests per second over the run
    p50: float | None  # seconds (None: no request completed)
    p99: float | None


@dataclass
class LoadResult:
    """What the load run measured."""

    kinds: list[KindStats]
    total: KindStats
    seconds: float  # how long locust ran
    setup_seconds: float
    during: Any = None  # what ``during`` returned
    # CPU seconds spent during the locust run, by process: "locust" and whatever ``cpu``
    # sampled (the service, PostgreSQL, ClickHouse), plus "machine" (all CPUs, /proc/stat).
    cpu: dict[str, float] = field(default_factory=dict)
    settled: str = ""  # what ``settle`` returned (a sentence for the report's notes)

    @property
    def member_writes(self) -> list[KindStats]:
        """The kinds that write members."""
        return [kind for kind in self.kinds if kind.name in MEMBER_WRITES]


def run_load(
    api: Any,
    host: str,
    base_path: str,
    *,
    tag: str,
    groups: int,
    members: int,
    users: int,
    seconds: float,
    max_requests: int,
    workdir: Path,
    progress: Any,
    profile: str = "mix",
    rate: float | None = None,
    during: Callable[[], Any] | None = None,
    cpu: Callable[[], dict[str, float]] | None = None,
    settle: Callable[[], str] | None = None,
) -> LoadResult:
    """Create the load's Groups and Patients through ``api``, wait for ``settle``, run
    locust against ``host`` (and ``during`` beside it); ``cpu`` samples CPU seconds so far by
    process, read before and after the locust run. ``profile`` names the traffic
    (``PROFILES``); ``rate`` paces the clients (``task_rate``) instead of letting each send
    its next request 0-10 ms after the last answer."""
    started = time.perf_counter()
    count = min(PATIENTS, max(20, max_requests // 20))
    progress(f"load test set-up: {groups} Groups of {members:,} members, {count} Patients")
    group_ids = [
        api.create_group(group_body(f"load {tag} {index}", f"{tag}L{index}", members))
        for index in range(groups)
    ]
    system = f"urn:bench:load:{tag}:mrn"
    patients = [api.create_patient(patient_body(index, system)) for index in range(count)]
    setup = time.perf_counter() - started
    settled = ""
    if settle is not None:
        progress("load test: waiting for ClickHouse's merges of the set-up's parts")
        settled = settle()
        progress(f"load test: {settled}")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "load.json"
    config.write_text(
        json.dumps(
            {
                "base_path": base_path,
                "groups": group_ids,
                "patients": patients,
                "mrn_system": system,
                "tag": tag,
                "token": getattr(api, "token", None),
                "max_requests": max_requests,
                "weights": PROFILES[profile],
                "user_rate": None if rate is None else task_rate(profile, rate) / users,
            }
        )
    )
    prefix = workdir / "locust"
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{max(1, round(seconds))}s",
        "--host",
        host,
        "--csv",
        str(prefix),
        "--only-summary",
        "--stop-timeout",
        "5",
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
    ]
    paced = "as fast as answered" if rate is None else f"paced to {rate:g}/s"
    progress(
        f"locust: {profile} traffic, {users} clients {paced}, at most {seconds:.0f} s and "
        f"{max_requests:,} requests (log {workdir / 'locust.log'})"
    )
    env = {**os.environ, "FHIR_LOAD_CONFIG": str(config), "PYTHONPATH": str(ROOT)}
    ran = time.perf_counter()
    before, reaped = _cpu_now(cpu), _reaped_cpu()
    with open(workdir / "locust.log", "wb") as log:
        locust = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            outcome = during() if during is not None else None
            returncode = locust.wait(timeout=seconds + 300)
        finally:
            if locust.poll() is None:
                locust.kill()
                locust.wait()
    after = _cpu_now(cpu)
    # A process sampled before but not after (a server restarted during the run) is NaN;
    # locust's own CPU is that of the child this process reaped (now in our cutime).
    used = {
        name: after[name] - spent if name in after else math.nan for name, spent in before.items()
    }
    used["locust"] = _reaped_cpu() - reaped
    if returncode:
        raise subprocess.CalledProcessError(returncode, command)
    elapsed = time.perf_counter() - ran
    kinds, total = read_stats(Path(f"{prefix}_stats.csv"))
    return LoadResult(kinds, total, elapsed, setup, outcome, used, settled)


def _cpu_now(cpu: Callable[[], dict[str, float]] | None) -> dict[str, float]:
    """CPU seconds so far: what ``cpu`` samples, and the whole machine's."""
    sample = dict(cpu()) if cpu is not None else {}
    sample["machine"] = _machine_cpu()
    return sample


def _reaped_cpu() -> float:
    """CPU seconds of this process's children that it has waited for."""
    times = os.times()
    return times.children_user + times.children_system


def _machine_cpu() -> float:
    """CPU seconds every CPU has spent busy (not idle or waiting on I/O), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def read_stats(path: Path) -> tuple[list[KindStats], KindStats]:
    """Locust's ``*_stats.csv``: one KindStats per request name, and the aggregate."""
    kinds = []
    total = None
    with open(path, newline="") as stats:
        for row in csv.DictReader(stats):
            kind = KindStats(
                name=row["Name"] if row["Name"] != "Aggregated" else "all requests",
                count=int(row["Request Count"]),
                failures=int(row["Failure Count"]),
                rate=float(row["Requests/s"]),
                p50=_ms(row["50%"]),
                p99=_ms(row["99%"]),
            )
            if row["Name"] == "Aggregated":
                total = kind
            else:
                kinds.append(kind)
    if total is None:
        raise RuntimeError(f"no aggregate line in {path}")
    return kinds, total


def _ms(value: str) -> float | None:
    try:
        milliseconds = float(value)
    except ValueError:  # "N/A"
        return None
    return None if milliseconds != milliseconds else milliseconds / 1000  # NaN

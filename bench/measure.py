"""Timing, order statistics and resident-memory sampling."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"

# Whose CPU time the cpu column shows: this process (in-process runs) or, as served, the
# server's worker (set_cpu_clock).
_cpu_clock: Callable[[], float] = time.process_time


def set_cpu_clock(clock: Callable[[], float]) -> None:
    """Measure CPU time with ``clock`` (seconds, monotonic) from now on."""
    global _cpu_clock
    _cpu_clock = clock


@dataclass
class Series:
    """Wall-clock samples of one measurement, in seconds, with the CPU time it cost.

    CPU time (user + system, all threads: chdb's query threads included) of the process
    that serves (this one in-process, the gunicorn worker as served) is far less sensitive
    than wall time to other jobs on a shared machine; a ClickHouse or PostgreSQL server's CPU
    is not in it.
    """

    samples: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    note: str = ""

    def add(self, seconds: float, cpu: float | None = None) -> None:
        """Record one sample (and its CPU time, when measured)."""
        self.samples.append(seconds)
        if cpu is not None:
            self.cpu.append(cpu)

    def add_timed(self, fn: Callable[[], object]) -> float:
        """Run ``fn`` once, record its wall and CPU time; the wall time."""
        cpu = _cpu_clock()
        wall = timed(fn)
        self.add(wall, _cpu_clock() - cpu)
        return wall

    @property
    def cpu_median(self) -> float | None:
        """Median CPU time, or None when not measured."""
        return statistics.median(self.cpu) if self.cpu else None

    @property
    def n(self) -> int:
        """Number of samples."""
        return len(self.samples)

    @property
    def median(self) -> float | None:
        """The median, or None without samples."""
        return statistics.median(self.samples) if self.samples else None

    @property
    def p90(self) -> float | None:
        """The 90th percentile (nearest rank), or None with fewer than 3 samples."""
        if len(self.samples) < 3:
            return None
        ordered = sorted(self.samples)
        rank = max(1, -(-9 * len(ordered) // 10))  # ceil(0.9 n)
        return ordered[rank - 1]


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def repeat(
    fn: Callable[[], object],
    *,
    times: int,
    warmup: int = 1,
    max_seconds: float | None = None,
    min_samples: int = 3,
) -> Series:
    """Run ``fn`` ``warmup`` times untimed, then up to ``times`` timed runs.

    With ``max_seconds`` the timed runs stop early once that much time has gone by and at
    least ``min_samples`` runs are in (the series' note says so).
    """
    for _ in range(warmup):
        fn()
    series = Series()
    started = time.perf_counter()
    for _ in range(times):
        series.add_timed(fn)
        if (
            max_seconds is not None
            and series.n >= min_samples
            and series.n < times
            and time.perf_counter() - started > max_seconds
        ):
            series.note = f"stopped after {series.n} of {times} runs ({max_seconds:.0f} s cap)"
            break
    return series


def _status_kb(name: str) -> int | None:
    try:
        with open(STATUS) as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Current resident set size of this process (VmRSS), or None off Linux."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb * 1024


def peak_rss_bytes() -> int | None:
    """Peak resident set size since start or the last ``reset_peak_rss`` (VmHWM)."""
    kb = _status_kb("VmHWM")
    return None if kb is None else kb * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs); False if not."""
    try:
        with open(CLEAR_REFS, "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


class RssWatch:
    """Growth of resident memory over a block of work: peak minus the RSS at the start.

    The peak is the larger of VmHWM (reset at the start when the kernel allows) and the
    samples taken by ``sample()``, which the caller invokes now and then during the work.
    """

    def __init__(self) -> None:
        gc.collect()
        self.hwm_reset = reset_peak_rss()
        self.start = rss_bytes() or 0
        self.peak = self.start

    def sample(self) -> None:
        """Take one RSS sample."""
        now = rss_bytes()
        if now is not None and now > self.peak:
            self.peak = now

    def growth(self) -> int:
        """Bytes the RSS rose above its starting value at its highest."""
        self.sample()
        if self.hwm_reset:
            hwm = peak_rss_bytes()
            if hwm is not None and hwm > self.peak:
                self.peak = hwm
        return max(0, self.peak - self.start)


class ServerRssWatch(RssWatch):
    """``RssWatch`` of a served service's worker (``bench.server.Server``), read from /proc."""

    def __init__(self, server: Any) -> None:
        self.server = server
        server.record_peak()  # the peak so far counts before it is reset
        self.hwm_reset = server.reset_peak()
        self.start = server.rss() or 0
        self.peak = self.start

    def sample(self) -> None:
        """Take one RSS sample of the worker."""
        now = self.server.rss()
        if now is not None and now > self.peak:
            self.peak = now

    def growth(self) -> int:
        """Bytes the worker's RSS rose above its starting value at its highest."""
        self.sample()
        if self.hwm_reset:
            hwm = self.server.peak_rss()
            if hwm is not None and hwm > self.peak:
                self.peak = hwm
        self.server.record_peak()
        return max(0, self.peak - self.start)

"""Row 8's ClickHouse outage (``--load-outage S``, servers pair only): while the load runs,
ClickHouse is killed (``kill -9``, as a crash), left down ``S`` seconds, started again, and
the member event backlog is watched until it has drained.

The ClickHouse server is the one ``scripts/test-servers.sh start DIR`` runs (``--servers-dir
DIR``, as ``make bench`` starts them): its pid file and config are under ``DIR/clickhouse``,
and it is started again from that config as a child of the bench (its pid written back, so
``test-servers.sh stop`` still stops it).

Drained: no batch committed before ClickHouse came back is pending and no version written
blind waits for its quantity (``/readyz``'s ``member_backlog``: ``oldest_age_seconds`` below
the time since the return, ``recounts`` 0). The load goes on meanwhile, so new batches keep
arriving and leaving; the backlog is never simply empty. Polled every ``POLL`` seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POLL = 0.5
TIMELINE_STEP = 10.0  # seconds between the backlog samples the note shows
START_SECONDS = 60  # longest wait for the restarted server to answer


@dataclass
class OutageResult:
    """What the outage did to the backlog."""

    down_seconds: float  # from the kill until ClickHouse answered /readyz again
    peak_batches: int  # the largest backlog seen (batches, and their events)
    peak_events: int
    drained_after: float | None  # seconds from the return until drained (None: not in time)
    timeline: list[tuple[float, int, int]]  # (seconds since the return, batches, recounts)


class ClickHouseOutage:
    """Kill and restart the servers pair's ClickHouse; watch the backlog through /readyz."""

    def __init__(self, servers_dir: Path, root_url: str) -> None:
        self.home = servers_dir / "clickhouse"
        self.readyz = f"{root_url}/readyz"
        self.peak_batches = 0
        self.peak_events = 0
        if not (self.home / "server.pid").is_file():
            raise RuntimeError(f"no ClickHouse pid file under {self.home}")

    def run(
        self, *, after: float, seconds: float, drain_wait: float, progress: Callable[[str], Any]
    ) -> OutageResult:
        """Wait ``after`` seconds, kill ClickHouse, start it ``seconds`` later, and wait at
        most ``drain_wait`` seconds for the backlog to drain."""
        time.sleep(after)
        killed = time.monotonic()
        self._kill()
        progress(f"ClickHouse killed under load; down for {seconds:.0f} s")
        while time.monotonic() - killed < seconds:
            self._backlog()
            time.sleep(POLL)
        self._start()
        while not self._clickhouse_answers():
            if time.monotonic() - killed > seconds + START_SECONDS:
                raise RuntimeError("the restarted ClickHouse does not answer /readyz")
            time.sleep(POLL)
        back = time.monotonic()
        progress(f"ClickHouse back after {back - killed:.0f} s; watching the backlog drain")
        drained = None
        timeline: list[tuple[float, int, int]] = []
        while time.monotonic() - back < drain_wait:
            backlog = self._backlog()
            since = time.monotonic() - back
            if not timeline or since - timeline[-1][0] >= TIMELINE_STEP:
                timeline.append((since, backlog["batches"], backlog["recounts"]))
            if backlog["recounts"] == 0 and (
                backlog["batches"] == 0 or backlog["oldest_age_seconds"] < since
            ):
                drained = since
                break
            time.sleep(POLL)
        return OutageResult(back - killed, self.peak_batches, self.peak_events, drained, timeline)

    def _kill(self) -> None:
        pid = int((self.home / "server.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        # Started by test-servers.sh, so init's child: gone once init reaped it.
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _start(self) -> None:
        with (self.home / "stdout.log").open("ab") as log:
            server = subprocess.Popen(
                ["clickhouse-server", f"--config-file={self.home / 'config.xml'}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.home / "server.pid").write_text(f"{server.pid}\n")

    def _readiness(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(self.readyz, timeout=10) as answer:  # noqa: S310
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:  # 503: the metadata store did not answer
            return json.loads(error.read())

    def _clickhouse_answers(self) -> bool:
        return self._readiness()["checks"]["clickhouse"]["status"] == "ok"

    def _backlog(self) -> dict[str, Any]:
        backlog = self._readiness().get("member_backlog") or {}
        self.peak_batches = max(self.peak_batches, backlog.get("batches", 0))
        self.peak_events = max(self.peak_events, backlog.get("events", 0))
        return {
            "batches": backlog.get("batches", 0),
            "recounts": backlog.get("recounts", 0),
            "oldest_age_seconds": backlog.get("oldest_age_seconds", 0.0),
        }

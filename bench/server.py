"""The service as ``make run`` serves it, started, restarted and stopped by the benchmark.

``Server`` runs ``scripts/serve.sh`` (gunicorn, one worker, 8 threads: exactly the command
``make run`` ends in) on a free loopback port, with the benchmark's own environment (the same
``DATABASE_URL``, ``CLICKHOUSE_URL`` and ``FHIR_VAR_DIR``), and waits until the API answers.
It also reads the gunicorn worker's resident memory from ``/proc`` (the server's RSS budget).

chdb allows one process per data path: while the server runs, the benchmark process must not
open the embedded ClickHouse (``Server.start`` closes the benchmark's own client first).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVE = ROOT / "scripts" / "serve.sh"
READY_PATH = "/metadata"  # public with access control on; answers once Django is loaded
START_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0

ERROR_NOT_READY = "the service did not answer on port {port} within {seconds:.0f} s; log: {log}"


class ServerError(RuntimeError):
    """The service could not be started."""


def free_port() -> int:
    """A TCP port free on loopback now (not the default ports other jobs use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command (state, ppid, …, utime at index
    11), or None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command (which may hold spaces) start after the last ")".
    return stat.rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds of process ``pid`` and its children (live ones, and those it reaped)."""
    fields = stat_fields(pid)
    if fields is None:
        return 0.0
    total = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    for child in children(pid):
        fields = stat_fields(child)
        if fields is not None:  # else ended meanwhile: its time is in the parent's cutime
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


class StoreCpu:
    """CPU of the PostgreSQL and ClickHouse servers of a ``scripts/test-servers.sh`` directory."""

    def __init__(self, servers_dir: str | None) -> None:
        self.pid_files: dict[str, Path] = {}
        if servers_dir is not None:
            home = Path(servers_dir)
            self.pid_files = {
                "postgresql": home / "pg" / "data" / "postmaster.pid",
                "clickhouse": home / "clickhouse" / "server.pid",
            }
        self.pids = {name: pid for name in self.pid_files if (pid := self._pid(name))}

    def _pid(self, name: str) -> int | None:
        try:
            return int(self.pid_files[name].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def sample(self) -> dict[str, float]:
        """CPU seconds of each server so far; a server restarted since this object was made
        (a new process: ``--load-outage`` kills ClickHouse) is left out, as its time cannot
        be told from the old process's."""
        return {name: tree_cpu(pid) for name, pid in self.pids.items() if self._pid(name) == pid}


def _status_bytes(pid: int, name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Server:
    """``scripts/serve.sh`` on a free port, with environment overrides."""

    def __init__(self, env: dict[str, str], *, base_path: str, log_path: Path) -> None:
        self.env = env
        self.base_path = base_path
        self.log_path = log_path
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.starts = 0
        self._max_peak = 0
        self._worker: int | None = None

    @classmethod
    def from_settings(cls) -> Server:
        """The service as the benchmark's own settings describe it: access control as
        ``FHIR_SERVICE`` has it, the benchmark's ``DATABASE_URL``, the log beside its data
        (``VAR_DIR/bench-server.log``)."""
        from django.conf import settings

        from bench import env
        from fhirservice.conf import fhir_settings

        server_env = {"FHIR_AUTH": "on" if fhir_settings.AUTH else "off"}
        if url := env.database_url():
            server_env["DATABASE_URL"] = url
        return cls(
            server_env,
            base_path="/" + fhir_settings.BASE_PATH,
            log_path=Path(settings.VAR_DIR) / "bench-server.log",
        )

    @property
    def base_url(self) -> str:
        """The FHIR base URL of the running service."""
        return f"http://127.0.0.1:{self.port}{self.base_path}"

    def start(self, **overrides: str) -> float:
        """Start the service (environment ``overrides`` on top); seconds until it answered."""
        from fhirservice.clickhouse import reset_clickhouse

        reset_clickhouse()  # chdb: one process per data path
        self.port = self.port or free_port()  # kept across restarts: clients keep the URL
        env = {**os.environ, **self.env, **overrides, "PORT": str(self.port)}
        env["VENV"] = env.get("VENV", str(ROOT / ".venv"))
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes it until it stops
        started = time.perf_counter()
        self.process = subprocess.Popen(
            ["bash", str(SERVE)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.starts += 1
        while time.perf_counter() - started < START_TIMEOUT:
            if self.process.poll() is not None:
                break
            if self._answers():
                return time.perf_counter() - started
            time.sleep(0.05)
        self.stop()
        raise ServerError(
            ERROR_NOT_READY.format(port=self.port, seconds=START_TIMEOUT, log=self.log_path)
        )

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", self.base_path + READY_PATH)
            response = connection.getresponse()
            response.read()
            return response.status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        """Stop the service gracefully (gunicorn drains its worker on SIGTERM)."""
        if self.process is not None:
            self.record_peak()
        process, self.process, self._worker = self.process, None, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def restart(self, **overrides: str) -> float:
        """Stop and start again; seconds until the new process answered."""
        self.stop()
        return self.start(**overrides)

    def worker_pid(self) -> int | None:
        """The gunicorn worker serving requests (serve.sh execs the gunicorn master)."""
        if self.process is None:
            return None
        if self._worker is None or not os.path.exists(f"/proc/{self._worker}"):
            workers = children(self.process.pid)
            self._worker = workers[0] if workers else None
        return self._worker

    def rss(self) -> int | None:
        """The worker's resident memory now (bytes)."""
        pid = self.worker_pid()
        return None if pid is None else _status_bytes(pid, "VmRSS")

    def peak_rss(self) -> int | None:
        """The worker's peak resident memory since it started or ``reset_peak`` (VmHWM)."""
        pid = self.worker_pid()
        return None if pid is None else _status_bytes(pid, "VmHWM")

    def record_peak(self) -> None:
        """Remember the worker's VmHWM (before a reset or a restart loses it)."""
        peak = self.peak_rss()
        if peak is not None:
            self._max_peak = max(self._max_peak, peak)

    def max_peak_rss(self) -> int | None:
        """The highest VmHWM of every worker started so far (None if never read)."""
        self.record_peak()
        return self._max_peak or None

    def cpu_seconds(self) -> float:
        """CPU time the worker's threads have run so far (ns precision, from schedstat)."""
        pid = self.worker_pid()
        if pid is None:
            return 0.0
        total = 0
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return 0.0
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/schedstat") as stat:
                    total += int(stat.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
        return total / 1e9

    def reset_peak(self) -> bool:
        """Reset the worker's VmHWM to its current RSS (Linux ≥ 4.0); False if not allowed."""
        pid = self.worker_pid()
        if pid is None:
            return False
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as refs:
                refs.write("5")
        except OSError:
            return False
        return True

"""The processes the fault tests kill: the pass's PostgreSQL and ClickHouse, and the app.

The servers are those ``scripts/test-servers.sh`` started for the faults pass (its directory
is ``FHIR_FAULT_SERVERS``, its ports the usual ``PG_PORT``/``CH_*_PORT`` variables); they are
killed or stopped here and started again by the same script, on the same data. The app is
``scripts/serve.sh`` (gunicorn, as ``make run`` serves it) in a session of its own, so that
``kill -9`` of the session takes the master and its worker down at once.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import psycopg
import requests

ROOT = Path(__file__).resolve().parents[2]
TEST_SERVERS = ROOT / "scripts" / "test-servers.sh"
SERVE = ROOT / "scripts" / "serve.sh"
PYTHON = ROOT / ".venv" / "bin" / "python"
# The environment variables test-servers.sh reads, with its defaults.
# PostgreSQL as run-tests.sh starts it for the faults pass: no fsync (the machine does not
# crash, only the server), but synchronous commits, so that a crashed server keeps every
# commit it acknowledged.
PG_OPTS = "-c fsync=off -c full_page_writes=off"
PORT_DEFAULTS = {
    "PG_PORT": "25432",
    "CH_TCP_PORT": "19000",
    "CH_HTTP_PORT": "18123",
    "CH_INTERSERVER_PORT": "19009",
}


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


class Servers:
    """The faults pass's PostgreSQL and ClickHouse, as test-servers.sh runs them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ports = {
            name: os.environ.get(name, default) for name, default in PORT_DEFAULTS.items()
        }
        self.pg_port = int(self.ports["PG_PORT"])
        self.ch_tcp_port = int(self.ports["CH_TCP_PORT"])
        self.ch_http = f"http://127.0.0.1:{self.ports['CH_HTTP_PORT']}/"
        self._clickhouse: subprocess.Popen | None = None

    def start(self) -> None:
        """Start whichever server is not running (test-servers.sh leaves running ones be)."""
        result = subprocess.run(
            ["bash", str(TEST_SERVERS), "start", str(self.directory)],
            env={**os.environ, **self.ports, "PG_OPTS": PG_OPTS},
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert result.returncode == 0, f"test-servers.sh start failed:\n{result.stderr[-3000:]}"

    def ensure_up(self) -> None:
        """Start whichever server a failed round left down."""
        if self.clickhouse_pid() is None:
            self.start_clickhouse()
        try:
            self.pg_connect().close()
        except psycopg.OperationalError:
            self.start()

    # -- ClickHouse ------------------------------------------------------------------------

    def clickhouse_pid(self) -> int | None:
        """The running ClickHouse server's pid, or None."""
        try:
            pid = int((self.directory / "clickhouse" / "server.pid").read_text())
        except (OSError, ValueError):
            return None
        return None if _gone(pid) else pid

    def kill_clickhouse(self) -> None:
        """``kill -9`` the ClickHouse server and wait until it is gone."""
        pid = self.clickhouse_pid()
        assert pid is not None, "ClickHouse is not running"
        os.kill(pid, signal.SIGKILL)
        if self._clickhouse is not None and self._clickhouse.pid == pid:
            self._clickhouse.wait(timeout=30)
            return
        # Started by test-servers.sh, so init's child: wait until init reaped it (a second or
        # two here), else the pid would still look alive.
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, f"ClickHouse {pid} was not reaped after kill -9"
            time.sleep(0.01)

    def start_clickhouse(self) -> None:
        """Start ClickHouse again on its data, with the config test-servers.sh wrote.

        It runs as this process's child (so a kill is reaped at once) and its pid goes to
        the file test-servers.sh reads, so that ``test-servers.sh stop`` still stops it.
        """
        assert self.clickhouse_pid() is None, "ClickHouse is already running"
        home = self.directory / "clickhouse"
        with (home / "stdout.log").open("ab") as log:
            self._clickhouse = subprocess.Popen(
                ["clickhouse-server", f"--config-file={home / 'config.xml'}"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (home / "server.pid").write_text(f"{self._clickhouse.pid}\n")
        deadline = time.monotonic() + 60
        while True:
            assert self._clickhouse.poll() is None, f"ClickHouse exited:\n{_tail(home / 'err.log')}"
            try:
                if self.clickhouse("SELECT 1", timeout=2).strip() == "1":
                    with socket.create_connection(("127.0.0.1", self.ch_tcp_port), timeout=2):
                        return
            except (OSError, requests.RequestException):
                pass
            assert time.monotonic() < deadline, (
                f"ClickHouse did not start:\n{_tail(home / 'err.log')}"
            )
            time.sleep(0.05)

    def clickhouse(self, sql: str, timeout: float = 30) -> str:
        """Run ``sql`` over ClickHouse's HTTP port (test bookkeeping, never a check)."""
        answer = requests.post(self.ch_http, data=sql.encode(), timeout=timeout)
        answer.raise_for_status()
        return answer.text

    # -- PostgreSQL --------------------------------------------------------------------------

    def _pg_ctl(self, *args: str) -> None:
        bins = sorted(
            Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3])
        )
        assert bins, "pg_ctl not found under /usr/lib/postgresql"
        command = [str(bins[-1]), "-D", str(self.directory / "pg" / "data"), *args]
        if os.getuid() == 0:  # as test-servers.sh does: the server refuses to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, f"pg_ctl {args} failed: {result.stderr}"

    def stop_postgres(self, mode: str) -> None:
        """Stop PostgreSQL: ``fast`` (clean shutdown) or ``immediate`` (as a crash: no
        checkpoint, the next start replays the WAL)."""
        self._pg_ctl("-m", mode, "-w", "-t", "60", "stop")

    def pg_connect(self, database: str = "postgres") -> psycopg.Connection:
        """An autocommit connection as the superuser."""
        return psycopg.connect(
            host="127.0.0.1", port=self.pg_port, user="postgres", dbname=database, autocommit=True
        )


class App:
    """The service as ``scripts/serve.sh`` runs it, on a port of its own."""

    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.port = free_port()
        self.env = {**env, "PORT": str(self.port), "FHIR_AUTH": "off"}
        self.base = f"http://127.0.0.1:{self.port}/4_0_0"
        self.log = workdir / "app.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start serving and wait until ``metadata`` answers."""
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["bash", str(SERVE)],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, f"the app exited:\n{_tail(self.log)}"
            try:
                if requests.get(f"{self.base}/metadata", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"the app did not answer:\n{_tail(self.log)}"
            time.sleep(0.1)

    @property
    def alive(self) -> bool:
        """True while the gunicorn master runs."""
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """``kill -9`` the master and its worker (the whole session)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop politely (end of the session); kill when that takes too long."""
        if not self.alive:
            return
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def manage(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """``manage.py`` with the app's settings (the operator's documented tools)."""
        return subprocess.run(
            [str(PYTHON), "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log_tail(self, lines: int = 40) -> str:
        """The end of the app's log, for failure messages."""
        return _tail(self.log, lines)

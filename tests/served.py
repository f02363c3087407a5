"""A live server for tests, started the way ``make run`` serves.

``make run`` migrates both stores and then runs ``scripts/serve.sh`` (gunicorn, one worker,
access control off unless FHIR_AUTH says otherwise). :func:`serve` does the same on the
embedded defaults (SQLite + chdb under a var dir of its own, whatever backend pair the test
pass uses), on a free loopback port, and stops the server (SIGTERM to its process group)
when the block ends, unless the test stopped it (:meth:`Served.stop`). The server's output
is kept in ``server.log`` beside its var dir.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START_SECONDS = 90
# The pass's backend choice and test switches: the served process takes the make run defaults.
NOT_INHERITED = (
    "DATABASE_URL",
    "CLICKHOUSE_URL",
    "CLICKHOUSE_CLUSTER",
    "MONGODB_URI",
    "FHIR_AUTH",
    "FHIR_BASE_PATH",
    "FHIR_REQUEST_LOG",
    "LOG_LEVEL",
    "PROMETHEUS_MULTIPROC_DIR",
)


@dataclass
class Served:
    """A running server: its URLs and its log."""

    root: str
    log_path: Path
    process: subprocess.Popen
    # The environment of the server's commands (for more commands against its stores).
    environment: dict[str, str]

    @property
    def base(self) -> str:
        """The FHIR base URL."""
        return f"{self.root}/4_0_0"

    def log(self) -> str:
        """Everything the server wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """Stop the server as an orchestrator does (SIGTERM to gunicorn's master and worker)
        and wait for it to exit; its exit status."""
        os.killpg(self.process.pid, signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(var_dir: Path, port: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(FHIR_VAR_DIR=str(var_dir), PORT=str(port), VENV=sys.prefix, **extra)
    return env


def _wait_until_up(served: Served) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            raise AssertionError(
                f"the server exited ({served.process.returncode}):\n{served.log()}"
            )
        try:
            with urllib.request.urlopen(f"{served.root}/healthz", timeout=5) as answer:  # noqa: S310
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"the server did not answer within {START_SECONDS}s:\n{served.log()}")


@contextmanager
def serve(
    directory: Path,
    *,
    migrate: bool = True,
    setup: Sequence[tuple[str, ...]] = (),
    **extra_env: str,
) -> Iterator[Served]:
    """Migrate a fresh var dir under ``directory`` (as ``make migrate``), run the ``setup``
    management commands (e.g. ``createsuperuser``), serve it, and stop the server after.
    ``extra_env`` is added to the environment of the commands and the server."""
    var_dir = directory / "var"
    var_dir.mkdir(parents=True)
    port = free_port()
    env = _environment(var_dir, port, extra_env)
    steps = (("migrate", "--noinput"), ("createcachetable",), ("migrate_clickhouse",))
    for command in [*(steps if migrate else ()), *setup]:
        subprocess.run(
            [sys.executable, "manage.py", *command],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
    log_path = directory / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["bash", "scripts/serve.sh"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Served(
        root=f"http://127.0.0.1:{port}", log_path=log_path, process=process, environment=env
    )
    try:
        _wait_until_up(served)
        yield served
    finally:
        if process.poll() is None:  # not stopped by the test already
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

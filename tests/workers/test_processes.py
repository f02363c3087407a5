"""Several app processes on one pair of servers: two gunicorn instances and a separate
shipper (``ship_member_events --loop``) over the same PostgreSQL and ClickHouse.

Each process keeps its own roster digests, background shipper and connections; what they
share is the metadata store, ClickHouse and the Django cache (``CACHE_URL``). Writes to the
same Groups interleaved through both instances must give exactly the roster and the
``quantity`` of every version that applying them one by one in version order gives, and the
token endpoint's failure throttle must count the failures seen by both.

Needs a ClickHouse server (chdb allows one process per data path): skipped on the embedded
pair.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from django.conf import settings
from django.db import connection

from tests.groups.conftest import add, member, remove_ref
from tests.groups.test_concurrency import ops_for, replay
from tests.support import run_threads

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(
    settings.CLICKHOUSE_URL.startswith("chdb:"),
    reason="several processes need a ClickHouse server (chdb: one process per path)",
)

THREADS_PER_PROCESS = 3
WRITES = 20
TOKEN_FAILURES = 5
CACHE_TABLE = "fhir_test_cache"


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(base: str, method: str, path: str, body: Any = None, **headers: str) -> tuple:
    """(status, headers, decoded JSON body or None) of one HTTP request to an instance."""
    data = body if isinstance(body, bytes) else orjson.dumps(body) if body is not None else None
    request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, answer, content = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, answer, content = error.code, error.headers, error.read()
    return status, answer, orjson.loads(content) if content else None


def database_url() -> str:
    """The test database (the one this process's tests use) as a DATABASE_URL."""
    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{db['USER']}{password}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


@pytest.fixture
def app_env(transactional_db: None, tmp_path: Path) -> dict[str, str]:
    """The environment of the app processes: this test's databases, a shared cache."""
    if connection.vendor != "postgresql":
        pytest.skip("the app processes share the test database over PostgreSQL")
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "CACHE_URL": f"dbcache://{CACHE_TABLE}",
        "FHIR_AUTH": "off",
        "FHIR_VAR_DIR": str(tmp_path),
        "FHIR_TOKEN_FAILURES_PER_MINUTE": str(TOKEN_FAILURES),
        "WEB_CONCURRENCY": "2",
    }
    subprocess.run([sys.executable, "manage.py", "createcachetable"], cwd=ROOT, env=env, check=True)
    return env


@pytest.fixture
def instances(app_env: dict[str, str], tmp_path: Path) -> Iterator[list[str]]:
    """Two gunicorn instances (one worker, several threads each) and a shipper process."""
    processes: list[subprocess.Popen] = []
    bases = []
    try:
        for n in range(2):
            port = free_port()
            processes.append(
                subprocess.Popen(
                    [
                        str(BIN / "gunicorn"),
                        "fhirservice.wsgi:application",
                        "--bind",
                        f"127.0.0.1:{port}",
                        "--workers",
                        "1",
                        "--threads",
                        str(THREADS_PER_PROCESS + 1),
                    ],
                    cwd=ROOT,
                    env=app_env,
                    stdout=(tmp_path / f"app{n}.log").open("wb"),
                    stderr=subprocess.STDOUT,
                )
            )
            bases.append(f"http://127.0.0.1:{port}")
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "manage.py",
                    "ship_member_events",
                    "--loop",
                    "--interval",
                    "0.2",
                    "--min-age",
                    "0",
                ],
                cwd=ROOT,
                env=app_env,
                stdout=(tmp_path / "shipper.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        deadline = time.monotonic() + 60
        for base in bases:
            while True:
                try:
                    if call(base, "GET", "/4_0_0/metadata")[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "app0.log").read_text()[-3000:]
                time.sleep(0.2)
        yield bases
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_interleaved_writes_through_two_processes_keep_every_version_exact(instances):
    initial = [f"Patient/i{i}" for i in range(5)]
    status, headers, _ = call(
        instances[0],
        "POST",
        "/4_0_0/Group",
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "member": [member(ref) for ref in initial],
        },
        **{"Content-Type": "application/fhir+json", "Prefer": "return=minimal"},
    )
    assert status == 201
    gid = headers["Location"].split("/Group/")[1].split("/")[0]

    def work(t: int) -> list[tuple[int, list[dict]]]:
        # Thread t writes through instance t % 2: consecutive versions come from both.
        base = instances[t % 2]
        done = []
        for i in range(WRITES):
            ops = ops_for(t, i)
            if i % 4 == 3:
                # A member another process added and may hold in its digest.
                ops.append(remove_ref(f"Patient/t{(t + 1) % (2 * THREADS_PER_PROCESS):02d}-00"))
                ops.append(add(f"Patient/i{i % 5}"))
            status, answer, body = call(
                base,
                "PATCH",
                f"/4_0_0/Group/{gid}",
                ops,
                **{"Content-Type": "application/json-patch+json", "Prefer": "return=minimal"},
            )
            assert status == 200, (status, body)
            done.append((int(answer["ETag"].split('"')[1]), ops))
        return done

    patches = [p for done in run_threads(work, 2 * THREADS_PER_PROCESS) for p in done]
    versions = sorted(v for v, _ in patches)
    assert versions == list(range(2, 2 + len(patches)))

    expected = replay(initial, patches)
    for base in instances:
        status, _, body = call(base, "GET", f"/4_0_0/Group/{gid}")
        assert status == 200
        assert body["member"] == expected
        assert body["quantity"] == sum(1 for m in expected if not m.get("inactive"))
    # Each version's quantity, whichever process wrote it, counts its members exactly: the
    # digests of both processes caught up with the other's writes.
    for version in versions:
        at = replay(initial, [p for p in patches if p[0] <= version])
        status, _, body = call(
            instances[version % 2], "GET", f"/4_0_0/Group/{gid}/_history/{version}"
        )
        assert status == 200
        assert body["quantity"] == sum(1 for m in at if not m.get("inactive")), version
        assert body["member"] == at, version


def test_the_token_failure_throttle_counts_across_processes(instances):
    statuses = []
    for i in range(TOKEN_FAILURES + 3):
        status, _, _ = call(
            instances[i % 2],
            "POST",
            "/oauth/token/",
            b"grant_type=client_credentials&client_id=nobody&client_secret=wrong",
            **{"Content-Type": "application/x-www-form-urlencoded"},
        )
        statuses.append(status)
    # Each process alone has seen at most half the failures: only a shared count throttles.
    assert statuses[:TOKEN_FAILURES] == [401] * TOKEN_FAILURES
    assert statuses[TOKEN_FAILURES:] == [429] * 3

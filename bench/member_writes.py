"""Worker CPU per member write as served: ``python -m bench.member_writes`` (by hand).

The service as ``make run`` serves it (``bench.server``: ``scripts/serve.sh``, gunicorn), with
the environment's stores. Set-up through the API: ``--groups`` Groups of ``--members``
members and ``--patients`` Patients with identifiers. Then, for each kind in turn, member
writes from ``--clients`` threads, each over its own keep-alive connection:

- ``patch``: ``PATCH /Group/{id}`` adding one new member (``add /member/-``), with
  ``If-Match`` naming the version the previous answer gave and ``Prefer: return=minimal``
  (row 1's request, and row 8's with a version check);
- ``add-member``: ``POST /Group/{id}/$add-member`` of an existing Patient by identifier, each
  (Group, Patient) pair once, so every request adds a member.

Printed per kind: requests, median and p90 wall time from the client, and the gunicorn
worker's CPU per write over the whole series (its threads' run time from
``/proc/PID/task/*/schedstat``, read after the background shipping of the series has
drained): the request, the shipping thread's ClickHouse inserts and outbox updates, and the
relay; not PostgreSQL's or ClickHouse's own CPU. Each series is run ``--rounds`` times,
kinds interleaved, and the median of the rounds printed with the load average.

``--servers-dir DIR`` (a ``scripts/test-servers.sh`` directory: the servers pair) adds the
CPU the PostgreSQL server (postmaster and every backend) and the ClickHouse server spent per
write over the same series, from ``/proc``: a member write's whole cost on the machine is the
worker's, PostgreSQL's and ClickHouse's (the shipping inserts and their views).

On PostgreSQL it also prints, per write, the transactions that rolled back (a serializable
``$add-member`` that lost a race rolls back and runs again: attempts per request = 1 + that)
and the share of the current rows' updates that were HOT (no index entry written), from
``pg_stat_database`` and ``pg_stat_user_tables``, read ``STATS_FLUSH`` seconds after the
series (a backend reports its counters at most every 10 s when it goes idle).

``--py-spy DIR`` records the worker with py-spy (``--rate 1000``, all threads, idle samples
left out) during each series into ``DIR/<kind>-<round>.txt`` (collapsed stacks).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson

from bench import env
from bench.data import group_body, patient_body
from bench.server import StoreCpu

PATCH_JSON = "application/json-patch+json"
FHIR_JSON = "application/fhir+json"
# Seconds to wait after a series for the background shipping to drain before reading CPU.
SETTLE = 1.5
# Seconds until every PostgreSQL backend has reported its counters (PGSTAT_IDLE_INTERVAL 10 s).
STATS_FLUSH = 11.0
PG_COUNTERS = (
    "SELECT d.xact_rollback, t.n_tup_upd, t.n_tup_hot_upd FROM pg_stat_database d, "
    "pg_stat_user_tables t WHERE d.datname = current_database() "
    "AND t.relname = 'fhirservice_storedresource'"
)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.member_writes", description=__doc__)
    parser.add_argument("--groups", type=int, default=4, help="Groups, at least (default 4)")
    parser.add_argument("--members", type=int, default=1000, help="members each (default 1000)")
    parser.add_argument("--patients", type=int, default=200, help="Patients (default 200)")
    parser.add_argument("--requests", type=int, default=400, help="writes per series")
    parser.add_argument("--clients", type=int, default=1, help="client threads (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="series per kind (default 3)")
    parser.add_argument("--kinds", default="patch,add-member", help="patch,add-member")
    parser.add_argument("--py-spy", dest="py_spy", help="record the worker into this directory")
    parser.add_argument("--no-migrate", action="store_true", help="skip the migrations")
    parser.add_argument(
        "--servers-dir",
        help="scripts/test-servers.sh directory: also PostgreSQL's and ClickHouse's CPU",
    )
    return parser.parse_args(argv)


def pg_counters() -> tuple[int, int, int] | None:
    """(rolled back transactions, current-row updates, HOT ones) so far on PostgreSQL."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return None
    time.sleep(STATS_FLUSH)
    with connection.cursor() as cursor:
        cursor.execute(PG_COUNTERS)
        return cursor.fetchone()


class Writer:
    """One client thread's connection and the requests it sends."""

    def __init__(self, api_factory, groups: list[str], patients: int, tag: str) -> None:
        self.api = api_factory()
        self.groups = groups
        self.tag = tag
        self.patients = patients
        self.versions: dict[str, str] = {}
        self.walls: list[float] = []

    def _exchange(self, method: str, path: str, body: bytes, headers: dict[str, str]):
        api = self.api
        if api.credentials:
            api._authorize()
        headers = {"Accept": FHIR_JSON, "Prefer": "return=minimal", **headers}
        if api.token:
            headers["Authorization"] = f"Bearer {api.token}"
        started = time.perf_counter()
        status, content, answer = api._exchange(method, api.base + path, body, headers)
        self.walls.append(time.perf_counter() - started)
        return status, content, answer

    def patch(self, index: int) -> None:
        """PATCH +1 new member with If-Match (the version the last answer named)."""
        group = self.groups[index % len(self.groups)]
        ref = f"Patient/{self.tag}-w-{index}"
        body = orjson.dumps(
            [{"op": "add", "path": "/member/-", "value": {"entity": {"reference": ref}}}]
        )
        headers = {"Content-Type": PATCH_JSON}
        if group in self.versions:
            headers["If-Match"] = self.versions[group]
        status, content, answer = self._exchange("PATCH", f"/Group/{group}", body, headers)
        if status == 412:  # another client moved the Group on: once more without the check
            self.versions.pop(group)
            return self.patch(index)
        if status != 200:
            raise RuntimeError(f"PATCH: HTTP {status}: {content[:300]!r}")
        self.versions[group] = answer["ETag"]

    def add_member(self, index: int) -> None:
        """$add-member of Patient ``index`` (by identifier) to one of the Groups."""
        group = self.groups[index % len(self.groups)]
        body = orjson.dumps(
            {
                "resourceType": "Parameters",
                "parameter": [
                    {
                        "name": "identifier",
                        "valueIdentifier": {
                            "system": f"urn:bench:mw:{self.tag}",
                            "value": f"mrn-{index // len(self.groups) % self.patients}",
                        },
                    }
                ],
            }
        )
        path = f"/Group/{group}/$add-member"
        status, content, _ = self._exchange("POST", path, body, {"Content-Type": FHIR_JSON})
        if status != 200:
            raise RuntimeError(f"$add-member: HTTP {status}: {content[:300]!r}")


def main(argv: list[str] | None = None) -> None:
    """Set up, run the series, print the table."""
    args = _parse(argv)
    env.setup(migrate=not args.no_migrate)

    from bench.api import access_credentials
    from bench.http_api import HttpApi
    from bench.server import Server

    server = Server.from_settings()
    stores = StoreCpu(args.servers_dir)
    header = f"{env.machine()}\nmetadata: {env.metadata_backend()}; members: {env.member_backend()}"
    server.start()
    credentials = access_credentials()

    setup = HttpApi(
        server.base_url,
        credentials=credentials,
        token_url=f"http://127.0.0.1:{server.port}/oauth/token/",
    )

    def api_factory() -> HttpApi:
        # One token for every client: taking one is a PBKDF2 check of the client's secret
        # (~0.3 s of worker CPU), which is no part of a member write.
        return HttpApi(server.base_url, token=setup.token)

    try:
        tag = uuid.uuid4().hex[:8]
        kinds = args.kinds.split(",")
        rounds_needed = args.rounds * args.requests
        # add-member adds each (Group, Patient) pair once: enough Groups for every request;
        # PATCH: at least one Group per client.
        group_count = max(args.groups, args.clients, -(-rounds_needed // args.patients) + 1)
        groups = [
            setup.create_group(group_body(f"mw {tag} {i}", f"{tag}m{i}", args.members))
            for i in range(group_count)
        ]
        system = f"urn:bench:mw:{tag}"
        if "add-member" in kinds:
            for i in range(args.patients):
                setup.create_patient(patient_body(i, system))
        print(header)
        print(
            f"{len(groups)} Groups of {args.members:,}, {args.clients} clients, "
            f"{args.requests} writes per series"
        )
        # warm-up: every code path once per Group
        warm = Writer(api_factory, groups, args.patients, tag)
        for i in range(20):
            warm.patch(10**9 + i)
        results: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
        offsets = dict.fromkeys(kinds, 0)
        for round_ in range(args.rounds):
            for kind in kinds:
                load_before = env.load_average()
                start_index = offsets[kind]
                offsets[kind] += args.requests
                # PATCH: each client its own Groups (its If-Match then always holds);
                # $add-member: every Group, each (Group, Patient) pair once.
                writers = [
                    Writer(
                        api_factory,
                        groups if kind == "add-member" else groups[k :: args.clients],
                        args.patients,
                        tag,
                    )
                    for k in range(args.clients)
                ]
                spy = None
                if args.py_spy:
                    Path(args.py_spy).mkdir(parents=True, exist_ok=True)
                    spy = subprocess.Popen(
                        [
                            shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")),
                            "record",
                            "--pid",
                            str(server.worker_pid()),
                            "--rate",
                            "1000",
                            "--format",
                            "raw",
                            "--threads",
                            "--nonblocking",
                            "--gil",
                            "--output",
                            f"{args.py_spy}/{kind}-{round_}.txt",
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    time.sleep(1.0)
                counters = pg_counters()
                cpu = server.cpu_seconds()
                store_cpu = stores.sample()
                indexes = iter(range(start_index, start_index + args.requests))
                lock = threading.Lock()

                def run(writer: Writer, kind: str = kind, indexes=indexes, lock=lock) -> None:
                    send = writer.patch if kind == "patch" else writer.add_member
                    while True:
                        with lock:
                            index = next(indexes, None)
                        if index is None:
                            return
                        send(index)

                started = time.perf_counter()
                threads = [threading.Thread(target=run, args=(w,)) for w in writers]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                elapsed = time.perf_counter() - started
                time.sleep(SETTLE)
                used = server.cpu_seconds() - cpu - SETTLE * _idle_cpu_rate(server)
                store_used = {
                    name: (after - store_cpu[name]) / args.requests
                    for name, after in stores.sample().items()
                }
                if spy is not None:
                    spy.send_signal(signal.SIGINT)
                    spy.wait()
                walls = sorted(w for writer in writers for w in writer.walls)
                results[kind].append(
                    (
                        used / args.requests,
                        statistics.median(walls),
                        args.requests / elapsed,
                        store_used,
                    )
                )
                servers = "".join(
                    f", {name} {value * 1e3:.2f}" for name, value in store_used.items()
                )
                if counters is not None:
                    ended = pg_counters()
                    rollbacks, updates, hot = (b - a for a, b in zip(counters, ended, strict=True))
                    servers += (
                        f"; {rollbacks / args.requests:.2f} rollbacks/write, "
                        f"{hot}/{updates} updates HOT"
                    )
                print(
                    f"  {kind:10s} round {round_}: worker cpu {used / args.requests * 1e3:.2f} "
                    f"ms/write{servers}, wall median {statistics.median(walls) * 1e3:.1f} ms, p90 "
                    f"{walls[int(len(walls) * 0.9)] * 1e3:.1f} ms, {args.requests / elapsed:.0f} "
                    f"writes/s, load {load_before:.1f}-{env.load_average():.1f}"
                )
        for kind, rows in results.items():
            cpu = statistics.median(r[0] for r in rows)
            servers = "".join(
                f", {name} {statistics.median(r[3][name] for r in rows) * 1e3:.2f}"
                for name in stores.pids
            )
            print(
                f"{kind:10s}: worker cpu per write {cpu * 1e3:.2f}{servers}"
                f" ms (median of {len(rows)} series), wall median "
                f"{statistics.median(r[1] for r in rows) * 1e3:.1f} ms, "
                f"{statistics.median(r[2] for r in rows):.0f} writes/s"
            )
    finally:
        server.stop()


def _idle_cpu_rate(server) -> float:
    """The worker's CPU per second when nothing is asked of it (its relay, its heartbeat)."""
    before = server.cpu_seconds()
    time.sleep(0.5)
    return (server.cpu_seconds() - before) / 0.5


if __name__ == "__main__":
    main()

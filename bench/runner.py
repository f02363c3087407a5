"""``python -m bench``: the command line and the order of the measurements.

As served (the default): the service runs as ``make run`` serves it (``scripts/serve.sh``:
gunicorn, one worker, 8 threads; ``bench.server``) and the rows are HTTP requests from this
separate process over one keep-alive connection (``bench.http_api``), timed here.
``--in-process`` drives the Django stack through ``django.test.Client`` instead (profiling).

Rows (the budget table of docs/design.md, "Performance budgets"):

1. PATCH +1 member on Groups of each size, ClickHouse rosters, and the same PATCH on an
   ``inline`` Group of the same size in the same run (ratio inline / clickhouse);
2. PATCH with 10,000 member ops on the largest Group;
3. POST of the largest Group (create with all its members);
4. GET of the largest Group, streamed, with RSS growth;
5. ``$members`` page of 1,000 at random cursors, and ``_elements=quantity``;
6. ``Group?member=`` over a reverse table of 10^7 rows (synthetic events, see bench.data);
7. plain Patient create and read;
8. as served only: a load test with mixed traffic (locust; bench.load, bench/locustfile.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import env
from bench.load import PROFILES
from bench.measure import RssWatch, Series, ServerRssWatch, repeat, set_cpu_clock, timed
from bench.report import FAIL, INFO, PASS, Line, Report, megabytes, seconds, size_label

ROOT = Path(__file__).resolve().parent.parent  # the project (python -m bench.rss_probe)
MILLION = 1_000_000
FULL_SIZES = (1000, 100_000, MILLION)
QUICK_SIZES = (1000, 10_000)

# docs/design.md, "Performance budgets" (medians, 2-core machine, as a client sees them).
PATCH_ONE = 0.015  # PATCH +1 member on a Group of 10^6 (also the first 20 after a restart)
PATCH_SCALING = 1.5  # ... and at most 1.5x the same at 10^3
AFTER_RESTART = 20  # PATCHes timed right after a restart
PATCH_MANY = 0.3  # PATCH with 10,000 member ops
CREATE = 10.0  # create a Group of 10^6 members
GET_ALL = 1.5  # GET a Group of 10^6 members, streamed
GET_RSS = 200e6  # ... with RSS growth at most this
SERVER_RSS = 1e9  # the server process with a 10^6 roster in use
PATIENT_CREATE = 0.004  # POST a plain Patient
PATIENT_READ = 0.0015  # GET a plain Patient
# Issue 16, "Performance": member writes across 100 Groups of 10^5 under mixed traffic.
LOAD_WRITES = 500.0  # per second, sustained
LOAD_P99 = 0.100  # p99 of member writes
LOAD_DRAIN = 60.0  # backlog drained after a ClickHouse outage, from its return (issue 16)
# Row 8: seconds without a ClickHouse merge before the load counts as settled (merges_settle).
LOAD_QUIET = 3.0
OUTAGE_AFTER = 20.0  # seconds of load before ClickHouse is killed (--load-outage)
OUTAGE_DRAIN_WAIT = 120.0  # longest wait for the drain, twice its budget
PAGE = 0.030  # $members page of 1,000
QUANTITY = 0.005  # quantity
MEMBER_SEARCH = 0.030  # Group?member= over 10^7 rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks of the Group roster budgets on the backends named by "
        "DATABASE_URL and CLICKHOUSE_URL (see bench/README.md).",
    )
    parser.add_argument(
        "--sizes",
        help="comma-separated roster sizes (default 1000,100000,1000000; --quick: 1000,10000)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: sizes 10^3/10^4, 10^5 reverse-table rows, fewer repetitions",
    )
    parser.add_argument(
        "--repeat", type=int, help="timed runs per small measurement (default 15, quick 5)"
    )
    parser.add_argument(
        "--create-repeat",
        type=int,
        help="creates of the largest Group to time (default 2; the second one takes row 2)",
    )
    parser.add_argument(
        "--get-repeat", type=int, help="streamed GETs of the largest Group (default 3, quick 1)"
    )
    parser.add_argument(
        "--ops", type=int, default=10_000, help="member ops in the big PATCH (default 10000)"
    )
    parser.add_argument(
        "--member-rows",
        type=int,
        help="reverse-table rows for Group?member= (default 10^7, quick 10^5)",
    )
    parser.add_argument(
        "--member-seconds",
        type=float,
        default=150.0,
        help="time cap for writing the synthetic member events (default 150 s)",
    )
    parser.add_argument(
        "--merge-seconds",
        type=float,
        default=120.0,
        help="longest wait for ClickHouse's background merges of the synthetic events before "
        "row 6 is timed (default 120 s; 0: time at once)",
    )
    parser.add_argument(
        "--inline-max",
        type=int,
        default=MILLION,
        help="largest size also measured with inline rosters (default 10^6)",
    )
    parser.add_argument(
        "--inline-seconds",
        type=float,
        default=60.0,
        help="time cap per inline PATCH series, after 3 runs (default 60 s)",
    )
    parser.add_argument(
        "--restarts",
        type=int,
        help="as served: restarts, each followed by the PATCH +1 series right after a restart "
        "(default 3, quick 1)",
    )
    parser.add_argument(
        "--rows",
        default="1,2,3,4,5,6,7,8",
        help="which rows to run (default all: 1,2,3,4,5,6,7,8)",
    )
    parser.add_argument(
        "--load-groups", type=int, help="row 8: Groups written to (default 100, quick 5)"
    )
    parser.add_argument(
        "--load-members",
        type=int,
        help="row 8: members of each of those Groups (default 100000, quick 1000)",
    )
    parser.add_argument(
        "--load-users", type=int, default=32, help="row 8: simulated clients (default 32)"
    )
    parser.add_argument(
        "--load-workers",
        type=int,
        default=1,
        help="row 8: gunicorn worker processes (WEB_CONCURRENCY) during the load, on a "
        "ClickHouse server pair only (chdb allows one process); default 1, as make run",
    )
    parser.add_argument(
        "--load-seconds", type=float, help="row 8: longest run (default 60 s, quick 10 s)"
    )
    parser.add_argument(
        "--load-requests",
        type=int,
        help="row 8: most requests (default 200000, quick 2000)",
    )
    parser.add_argument(
        "--load-profile",
        default="mix",
        choices=list(PROFILES),
        help="row 8: the traffic (bench.load.PROFILES); the budget is on 'mix', the others "
        "take it apart (one kind alone; 'floor': GET /healthz, no store)",
    )
    parser.add_argument(
        "--load-rate",
        type=float,
        metavar="R",
        help="row 8: pace the clients to R member writes/s in all (R requests/s for a "
        "profile without member writes) instead of as fast as answered",
    )
    parser.add_argument(
        "--load-outage",
        type=float,
        default=0.0,
        metavar="S",
        help="row 8: kill ClickHouse for S seconds under the load and time the backlog's "
        "drain after it is back (a server started by scripts/test-servers.sh: --servers-dir)",
    )
    parser.add_argument(
        "--servers-dir",
        default=os.environ.get("FHIR_BENCH_SERVERS_DIR"),
        help="the scripts/test-servers.sh directory of the servers pair (make bench sets "
        "FHIR_BENCH_SERVERS_DIR)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="drive the Django stack in this process (django.test.Client) instead of a "
        "served gunicorn over HTTP (for profiling)",
    )
    parser.add_argument(
        "--patients", type=int, help="Patients created and read in row 7 (default 50, quick 10)"
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="also profile one extra run of each row with pyinstrument into DIR/*.txt "
        "(with --in-process)",
    )
    parser.add_argument(
        "--no-migrate", action="store_true", help="skip migrate / migrate_clickhouse"
    )
    parser.add_argument(
        "--fail-on-budget",
        action="store_true",
        help="exit with status 3 when a budget fails (default: report only)",
    )
    parser.add_argument("--seed", type=int, default=20240601, help="random seed for cursors")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.sizes:
        try:
            args.sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s})
        except ValueError:
            parser.error("--sizes takes comma-separated integers")
        if not args.sizes or min(args.sizes) < 1:
            parser.error("--sizes must name positive sizes")
    else:
        args.sizes = list(QUICK_SIZES if quick else FULL_SIZES)
    args.repeat = args.repeat or (5 if quick else 15)
    args.create_repeat = args.create_repeat or 2
    args.get_repeat = args.get_repeat or (1 if quick else 3)
    args.restarts = args.restarts or (1 if quick else 3)
    args.member_rows = args.member_rows or (100_000 if quick else 10_000_000)
    args.patients = args.patients or (10 if quick else 50)
    args.load_groups = args.load_groups or (5 if quick else 100)
    args.load_members = args.load_members or (1000 if quick else 100_000)
    args.load_seconds = args.load_seconds or (10.0 if quick else 60.0)
    args.load_requests = args.load_requests or (2000 if quick else 200_000)
    if args.profile and not args.in_process:
        parser.error("--profile profiles this process: use it with --in-process")
    try:
        args.rows = {int(r) for r in args.rows.split(",") if r}
    except ValueError:
        parser.error("--rows takes comma-separated row numbers")
    return args


def progress(text: str) -> None:
    """A progress line on stderr (the table goes to stdout at the end)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def verdict(value: float | None, limit: float) -> str:
    """PASS when value ≤ limit."""
    if value is None:
        return INFO
    return PASS if value <= limit else FAIL


class Profiler:
    """``--profile DIR``: one extra run of a row under pyinstrument, written as text."""

    def __init__(self, directory: str | None) -> None:
        self.directory = Path(directory) if directory else None
        if self.directory is not None:
            try:
                import pyinstrument  # noqa: F401
            except ImportError:
                progress("--profile needs pyinstrument (pip install pyinstrument); skipped")
                self.directory = None
            else:
                self.directory.mkdir(parents=True, exist_ok=True)

    def run(self, name: str, fn: Callable[[], object]) -> None:
        """Profile one call of ``fn`` into DIR/<name>.txt (nothing without --profile)."""
        if self.directory is None:
            return
        from pyinstrument import Profiler as Pyinstrument

        profiler = Pyinstrument(interval=0.0005)
        profiler.start()
        try:
            fn()
        finally:
            profiler.stop()
        path = self.directory / f"{name}.txt"
        path.write_text(profiler.output_text(unicode=True, color=False))
        progress(f"profile of {name} written to {path}")


class Bench:
    """State shared by the rows: the client, the Groups built, the report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server: Any = None  # bench.server.Server when served
        self.api: Any = None
        self.report = Report()
        self.tag = secrets.token_hex(3)
        self.random = random.Random(args.seed)
        self.profiler = Profiler(args.profile)
        self.member_backend = ""
        self.groups: dict[int, str] = {}  # size -> Group id (clickhouse rosters)
        self.spare: str | None = None  # a second Group of the largest size (row 2 grows it)
        self.quantity: dict[int, int] = {}  # size -> members now
        self.inline: dict[int, str] = {}  # size -> Group id (inline rosters)
        self.added = 0
        self.largest = max(args.sizes)
        self.scale = self.largest / MILLION

    # -- the service ----------------------------------------------------------------

    def start(self) -> None:
        """The client: in-process, or a served service and an HTTP client of it."""
        from bench.api import Api, access_credentials

        if self.args.in_process:
            self.api = Api()
            return

        from bench.http_api import HttpApi
        from bench.server import Server

        self.server = Server.from_settings()
        progress(f"starting the service (scripts/serve.sh; log {self.server.log_path})")
        took = self.server.start()
        progress(f"  ... answering after {seconds(took)} at {self.server.base_url}")
        set_cpu_clock(self.server.cpu_seconds)
        credentials = access_credentials()
        self.api = HttpApi(
            self.server.base_url,
            credentials=credentials,
            token_url=f"http://127.0.0.1:{self.server.port}/oauth/token/",
        )

    def stop(self) -> None:
        """Stop the served service, if any."""
        if self.api is not None and self.server is not None:
            self.api.close()
        if self.server is not None:
            self.server.stop()

    @contextmanager
    def clickhouse_here(self) -> Iterator[None]:
        """This process uses ClickHouse directly in the block: with chdb (one process per
        data path) the served service stops meanwhile and starts again afterwards."""
        from django.conf import settings

        embedded = self.server is not None and settings.CLICKHOUSE_URL.startswith("chdb:")
        if embedded:
            self.api.close()
            self.server.stop()
        try:
            yield
        finally:
            if embedded:
                self.server.start()

    # -- helpers ----------------------------------------------------------------------

    def prefix(self, size: int, kind: str = "c") -> str:
        """Member reference prefix of the Group of ``size`` (unique per run)."""
        return f"{self.tag}{kind}{size}"

    def new_refs(self, count: int) -> list[str]:
        """References never used before in this run."""
        from bench.data import member_ref

        first = self.added
        self.added += count
        return [member_ref(f"{self.tag}new", first + i) for i in range(count)]

    def patch_one(self, size: int) -> Callable[[], None]:
        """A PATCH adding one new member to the Group of ``size``."""
        from bench.data import add_ops

        def run() -> None:
            self.api.patch(self.groups[size], add_ops(self.new_refs(1)))
            self.quantity[size] += 1

        return run

    def scaled(self, budget: float) -> tuple[float, str]:
        """A size-proportional budget for the largest size run (budgets are set at 10^6)."""
        if self.largest == MILLION:
            return budget, ""
        return budget * self.scale, f" (scaled from {seconds(budget)} at 10^6)"

    # -- set-up: Groups of each size (row 3 times the largest) -------------------------

    def create_groups(self) -> None:
        """POST one Group per size; the largest is created ``--create-repeat`` times."""
        from bench.data import group_body

        report = self.report
        for size in self.args.sizes:
            runs = self.args.create_repeat if size == self.largest else 1
            series = Series()
            for run in range(runs):
                # The first Group of each size is the one the other rows use.
                body = (
                    group_body(f"{self.tag} {size}", self.prefix(size), size)
                    if run == 0
                    else group_body(f"{self.tag} {size} #{run}", self.prefix(size, f"r{run}"), size)
                )
                holder: dict[str, str] = {}
                progress(f"POST Group with {size_label(size)} members ({len(body) / 1e6:.1f} MB)")
                series.add_timed(lambda b=body, h=holder: h.update(id=self.api.create_group(b)))
                progress(f"  ... {seconds(series.samples[-1])}")
                if run == 0:
                    self.groups[size] = holder["id"]
                    self.quantity[size] = size
                elif run == 1:
                    self.spare = holder["id"]
                del body
            if size == self.largest and 3 in self.args.rows:
                limit, why = self.scaled(CREATE)
                report.add(
                    Line(
                        "3",
                        f"create Group, {size_label(size)} members (POST)",
                        str(series.n),
                        seconds(series.median),
                        seconds(series.p90),
                        seconds(series.cpu_median),
                        f"≤ {seconds(limit)}{why}",
                        verdict(series.median, limit),
                    )
                )
            elif 3 in self.args.rows:
                report.add(
                    Line(
                        "3",
                        f"create Group, {size_label(size)} members (POST)",
                        str(series.n),
                        seconds(series.median),
                        "-",
                        seconds(series.cpu_median),
                    )
                )
        if 3 in self.args.rows:
            self.profiler.run(
                "row3-create",
                lambda: self.api.create_group(
                    group_body(f"{self.tag} profile", self.prefix(self.largest, "p"), self.largest)
                ),
            )

    # -- row 1 ----------------------------------------------------------------------------

    def row_patch_one(self) -> None:
        """PATCH +1 member per size, ClickHouse rosters then inline, sizes interleaved."""
        from bench.data import add_ops, group_body

        args = self.args
        progress(f"PATCH +1 member, {args.repeat} runs per size (sizes interleaved)")
        clickhouse = {size: Series() for size in args.sizes}
        for size in args.sizes:  # warm-up
            for _ in range(2):
                self.patch_one(size)()
        if self.server is None:
            self.digest_line()
        for _ in range(args.repeat):
            for size in args.sizes:
                clickhouse[size].add_timed(self.patch_one(size))
        smallest = clickhouse[args.sizes[0]]
        for size in args.sizes:
            series = clickhouse[size]
            self.report.add(
                Line(
                    "1",
                    f"PATCH +1 member, Group of {size_label(size)}",
                    str(series.n),
                    seconds(series.median),
                    seconds(series.p90),
                    seconds(series.cpu_median),
                    f"≤ {seconds(PATCH_ONE)}",
                    verdict(series.median, PATCH_ONE),
                )
            )
        if len(args.sizes) > 1:
            big = clickhouse[self.largest]
            ratio = big.median / smallest.median
            self.report.add(
                Line(
                    "1",
                    f"PATCH +1: {size_label(self.largest)} / {size_label(args.sizes[0])}, medians",
                    "",
                    f"{ratio:.2f}x",
                    "",
                    "",
                    f"≤ {PATCH_SCALING}x",
                    PASS if ratio <= PATCH_SCALING else FAIL,
                )
            )
        if self.server is not None:
            self.after_restart(smallest)
        self.profiler.run("row1-patch-one", self.patch_one(self.largest))

        # The inline baseline after every ClickHouse-roster run: an inline PATCH writes the
        # whole roster (50 MB at 10^6) into the metadata store, and the next request paid for
        # its write-ahead-log checkpoint (SQLite) when the series were interleaved.
        inline_sizes = [s for s in args.sizes if s <= args.inline_max]
        if not inline_sizes:
            self.report.note(f"inline rosters not measured (--inline-max {args.inline_max:,})")
            return

        def inline_patch(size: int) -> Callable[[], None]:
            return lambda: self.api.patch(self.inline[size], add_ops(self.new_refs(1)))

        inline = {size: Series() for size in inline_sizes}
        inline_time = dict.fromkeys(inline_sizes, 0.0)
        with self.inline_rosters():
            for size in inline_sizes:
                body = group_body(f"{self.tag} inline {size}", self.prefix(size, "i"), size)
                progress(f"POST inline Group with {size_label(size)} members")
                elapsed = timed(
                    lambda b=body, s=size: self.inline.update({s: self.api.create_group(b)})
                )
                progress(f"  ... {seconds(elapsed)}")
                del body
            for size in inline_sizes:  # warm-up
                inline_patch(size)()
            for _ in range(args.repeat):
                for size in inline_sizes:
                    if inline[size].n < 3 or inline_time[size] <= args.inline_seconds:
                        spent = inline[size].add_timed(inline_patch(size))
                        inline_time[size] += spent
            self.profiler.run("row1-patch-one-inline", inline_patch(self.largest))
        for size, other in inline.items():
            if other.n < args.repeat:
                other.note = f"{other.n} runs: stopped at the {args.inline_seconds:.0f} s cap"
            ratio = other.median / clickhouse[size].median
            self.report.add(
                Line(
                    "1",
                    f"  same PATCH, inline roster, {size_label(size)}",
                    str(other.n),
                    seconds(other.median),
                    seconds(other.p90),
                    seconds(other.cpu_median),
                    "(baseline)",
                    INFO,
                    f"inline/clickhouse = {ratio:.2f}x" + (f"; {other.note}" if other.note else ""),
                )
            )
        skipped = [s for s in args.sizes if s not in inline]
        if skipped:
            self.report.note(
                "inline rosters not measured at "
                + ", ".join(size_label(s) for s in skipped)
                + f" (--inline-max {args.inline_max:,})"
            )

    @contextmanager
    def inline_rosters(self) -> Iterator[None]:
        """New Groups keep their rosters inline: in-process through ``override_settings``;
        as served, the service restarts with ``FHIR_GROUP_ROSTER_STORAGE=inline`` (and again
        without it afterwards)."""
        if self.server is None:
            from bench.api import roster_storage

            with roster_storage("inline"):
                yield
            return
        progress("restarting the service with FHIR_GROUP_ROSTER_STORAGE=inline")
        self.server.restart(FHIR_GROUP_ROSTER_STORAGE="inline")
        try:
            yield
        finally:
            progress("restarting the service with the default roster storage")
            self.server.restart()

    def after_restart(self, smallest: Series) -> None:
        """Restart the service ``--restarts`` times, each time PATCH +1 on the largest Group
        right away, ``AFTER_RESTART`` times (no warm-up, nothing waited for), as a client
        meets a freshly deployed or restarted service: the median of the first requests,
        and the median of all the first ``AFTER_RESTART``. One restart's first request is a
        single sample, at the mercy of whatever else the machine runs at that moment."""
        assert self.server is not None
        first, series, answered = Series(), Series(), []
        for restart in range(self.args.restarts):
            progress(
                f"restart {restart + 1} of {self.args.restarts}, then {AFTER_RESTART} x "
                "PATCH +1 on the largest Group"
            )
            answered.append(self.server.restart())
            for request in range(AFTER_RESTART):
                series.add_timed(self.patch_one(self.largest))
                if request == 0:
                    first.add(series.samples[-1], series.cpu[-1] if series.cpu else None)
        label = size_label(self.largest)
        self.report.add(
            Line(
                "1",
                f"PATCH +1, Group of {label}, first request after restart",
                str(first.n),
                seconds(first.median),
                seconds(first.p90),
                seconds(first.cpu_median),
                f"≤ {seconds(PATCH_ONE)}",
                verdict(first.median, PATCH_ONE),
                "one per restart: "
                + ", ".join(seconds(sample) for sample in first.samples)
                + f"; the service answered {seconds(statistics.median(answered))} after start",
            )
        )
        self.report.add(
            Line(
                "1",
                f"PATCH +1, Group of {label}, first {AFTER_RESTART} after restart",
                str(series.n),
                seconds(series.median),
                seconds(series.p90),
                seconds(series.cpu_median),
                f"≤ {seconds(PATCH_ONE)}",
                verdict(series.median, PATCH_ONE),
            )
        )
        if len(self.args.sizes) > 1:
            ratio = series.median / smallest.median
            self.report.add(
                Line(
                    "1",
                    f"  first {AFTER_RESTART} after restart / {size_label(self.args.sizes[0])}",
                    "",
                    f"{ratio:.2f}x",
                    "",
                    "",
                    f"≤ {PATCH_SCALING}x",
                    PASS if ratio <= PATCH_SCALING else FAIL,
                )
            )

    def digest_line(self) -> None:
        """Time one digest build of the largest roster, then let the warm-up's builds finish.

        The first write of a roster in a process builds its digest (ADR 0006): larger
        rosters in a background thread, while writes keep asking ClickHouse. The timed
        PATCHes measure the steady state after it; the build is reported on its own line.
        """
        from fhirservice.models import StoredResource
        from groups.digest import digest_build, digests
        from groups.selectors import roster_key

        row = StoredResource.objects.get(key=f"Group/{self.groups[self.largest]}")
        key = roster_key(row.resource_id, row.incarnation)
        elapsed = timed(lambda: digest_build(key, row.version_id))
        waited = timed(digests.wait_idle)
        self.report.add(
            Line(
                "1",
                f"  roster digest of the {size_label(self.largest)} Group, built once",
                "1",
                seconds(elapsed),
                note=f"once per process and roster, in the background; waited {seconds(waited)}",
            )
        )

    # -- row 2 ----------------------------------------------------------------------------

    def row_patch_many(self) -> None:
        """PATCH with ``--ops`` member adds on the largest Group."""
        from bench.data import add_ops

        ops = self.args.ops
        size = self.largest

        body_bytes: list[int] = []

        # The second Group of the largest size when there is one, so the Group the later
        # rows read keeps its size.
        group_id = self.spare or self.groups[size]

        def run() -> None:
            body = add_ops(self.new_refs(ops))
            body_bytes.append(len(body))
            self.api.patch(group_id, body)
            if group_id == self.groups[size]:
                self.quantity[size] += ops

        progress(f"PATCH with {ops:,} member ops on the Group of {size_label(size)}")
        # A first write builds the roster's digest (in the background at this size); in
        # process the timed runs start once it is built, as served after a warm-up run.
        self.api.patch(group_id, add_ops(self.new_refs(1)))
        if group_id == self.groups[size]:
            self.quantity[size] += 1
        if self.server is None:
            from groups.digest import digests

            digests.wait_idle()
        series = repeat(run, times=min(self.args.repeat, 5), warmup=1)
        limit = PATCH_MANY * ops / 10_000
        why = "" if ops == 10_000 else " (scaled from 0.3 s at 10,000 ops)"
        self.report.add(
            Line(
                "2",
                f"PATCH {ops:,} member ops, Group of {size_label(size)}",
                str(series.n),
                seconds(series.median),
                seconds(series.p90),
                seconds(series.cpu_median),
                f"≤ {seconds(limit)}{why}",
                verdict(series.median, limit),
            )
        )
        self.report.note(
            f"row 2 adds {ops:,} new members per PATCH (body {body_bytes[-1] / 1e6:.2f} MB of "
            "JSON Patch); the timing includes building that body (a few ms)"
        )
        self.profiler.run("row2-patch-many", run)

    # -- row 4 ----------------------------------------------------------------------------

    def row_get(self) -> None:
        """GET the largest Group, streamed, chunk by chunk; time and RSS growth."""
        size = self.largest
        group_id = self.groups[size]
        series = Series()
        growth: list[int] = []
        expected = self.quantity[size]
        for run in range(self.args.get_repeat):
            progress(f"GET Group of {expected:,} members, streamed (run {run + 1})")
            watch = RssWatch() if self.server is None else ServerRssWatch(self.server)
            received: dict[str, int] = {}
            series.add_timed(
                lambda w=watch, r=received: r.update(n=self.api.read_streamed(group_id, w.sample))
            )
            growth.append(watch.growth())
            progress(f"  ... {seconds(series.samples[-1])}, RSS +{megabytes(growth[-1])}")
            if received["n"] != expected:
                raise RuntimeError(f"GET returned {received['n']} members, expected {expected}")
        limit, why = self.scaled(GET_ALL)
        self.report.add(
            Line(
                "4",
                f"GET Group of {expected:,} members, streamed",
                str(series.n),
                seconds(series.median),
                seconds(series.p90),
                seconds(series.cpu_median),
                f"≤ {seconds(limit)}{why}",
                verdict(series.median, limit),
            )
        )
        if self.server is not None:
            self.served_rss(growth)
            self.profiler.run("row4-get", lambda: self.api.read_streamed(group_id))
            return
        probe = self.fresh_process_get(group_id)
        if probe is not None and probe["members"] != expected:
            raise RuntimeError(f"GET returned {probe['members']} members, expected {expected}")
        worst = probe["growth"] if probe is not None else max(growth)
        self.report.add(
            Line(
                "4",
                "  RSS growth during that GET"
                + (", fresh process" if probe is not None else " (max over runs)"),
                "1" if probe is not None else str(len(growth)),
                megabytes(worst),
                "",
                "",
                f"≤ {megabytes(GET_RSS)}",
                PASS if worst <= GET_RSS else FAIL,
            )
        )
        self.report.note(
            "row 4 RSS growth = peak RSS during the GET (VmHWM, reset through "
            "/proc/self/clear_refs, and VmRSS sampled every 10,000 chunks) minus RSS before "
            "it, measured in a fresh process (python -m bench.rss_probe, after one warm-up "
            "read of the 10^3 Group): this process has built million-member bodies by then and "
            "reuses freed memory without growing. chdb runs in-process, so its query memory "
            "counts; a ClickHouse server's does not. In this process the growth was "
            + ", ".join(megabytes(g) for g in growth)
            + (
                f"; the fresh process's GET took {seconds(probe['seconds'])}"
                if probe is not None
                else ""
            )
        )
        self.profiler.run("row4-get", lambda: self.api.read_streamed(group_id))

    def served_rss(self, growth: list[int]) -> None:
        """Row 4 as served: the worker's RSS growth during the GETs, and its peak RSS."""
        assert self.server is not None
        worst = max(growth)
        self.report.add(
            Line(
                "4",
                "  server RSS growth during that GET (max over runs)",
                str(len(growth)),
                megabytes(worst),
                "",
                "",
                f"≤ {megabytes(GET_RSS)}",
                PASS if worst <= GET_RSS else FAIL,
            )
        )
        peak = self.server.max_peak_rss()
        self.report.add(
            Line(
                "4",
                f"  server RSS, peak with a {size_label(self.largest)} roster in use",
                "1",
                megabytes(peak),
                "",
                "",
                f"≤ {megabytes(SERVER_RSS)}",
                verdict(peak, SERVER_RSS) if peak is not None else INFO,
            )
        )
        self.report.note(
            "row 4 as served: RSS of the gunicorn worker (/proc/PID/status); growth = its peak "
            "during the GET (VmHWM reset through /proc/PID/clear_refs, and VmRSS sampled every "
            "100 chunks of 64 KiB) minus its RSS before; the peak is the highest VmHWM of "
            "every worker this run started (read before each restart), so it includes the "
            "creates of the largest Groups. chdb runs in the worker, so its memory counts; a "
            "ClickHouse server's does not"
        )

    def fresh_process_get(self, group_id: str) -> dict[str, Any] | None:
        """Run bench.rss_probe on ``group_id`` in a child process; its JSON, or None."""
        from fhirservice.clickhouse import reset_clickhouse

        # chdb allows one process per data path: close ours while the child reads.
        reset_clickhouse()
        warm = self.groups[min(self.args.sizes)]
        progress("GET of the same Group in a fresh process (RSS)")
        command = [sys.executable, "-m", "bench.rss_probe", group_id, warm]
        from django.db import connection

        # The database this process really uses (under pytest: the test database).
        child_env = {**os.environ, "FHIR_BENCH_DB_NAME": str(connection.settings_dict["NAME"])}
        try:
            done = subprocess.run(
                command,
                cwd=ROOT,
                env=child_env,
                capture_output=True,
                text=True,
                timeout=1800,
                check=False,
            )
        except subprocess.TimeoutExpired:
            self.report.note("row 4: the fresh-process GET timed out (30 min)")
            return None
        if done.returncode != 0:
            self.report.note(
                f"row 4: the fresh-process GET failed ({done.returncode}): {done.stderr[-300:]}"
            )
            return None
        result = json.loads(done.stdout.strip().splitlines()[-1])
        progress(
            f"  ... {seconds(result['seconds'])}, RSS +{megabytes(result['growth'])} "
            f"(fresh process, from {megabytes(result['start_rss'])})"
        )
        return result

    # -- row 5 ----------------------------------------------------------------------------

    def row_page_and_quantity(self) -> None:
        """``$members`` pages of 1,000 at random cursors; ``_elements=quantity``."""
        from bench.data import member_ref

        size = self.largest
        group_id = self.groups[size]
        prefix = self.prefix(size)
        # Cursors at random places of the roster's order (references sort as text).
        ordered = sorted(member_ref(prefix, i) for i in range(size))
        last_start = max(0, len(ordered) - 1001)
        pages: list[int] = []

        def page() -> None:
            start = self.random.randint(0, last_start)
            pages.append(self.api.members_page(group_id, after=ordered[start], count=1000))

        progress(f"$members pages of 1,000 on the Group of {size_label(size)}")
        series = repeat(page, times=self.args.repeat, warmup=2)
        self.report.add(
            Line(
                "5",
                f"$members page of 1,000, Group of {size_label(size)}",
                str(series.n),
                seconds(series.median),
                seconds(series.p90),
                seconds(series.cpu_median),
                f"≤ {seconds(PAGE)}",
                verdict(series.median, PAGE),
            )
        )
        if size > 1000 and min(pages) != 1000:
            self.report.note(f"row 5: a page held {min(pages)} members, not 1,000")
        expected = self.quantity[size]
        got: list[int] = []
        series = repeat(lambda: got.append(self.api.quantity(group_id)), times=self.args.repeat * 2)
        self.report.add(
            Line(
                "5",
                f"quantity (GET ?_elements=quantity), {size_label(size)}",
                str(series.n),
                seconds(series.median),
                seconds(series.p90),
                seconds(series.cpu_median),
                f"≤ {seconds(QUANTITY)}",
                verdict(series.median, QUANTITY),
            )
        )
        if set(got) != {expected}:
            self.report.note(f"row 5: quantity answered {sorted(set(got))}, expected {expected}")
        self.profiler.run("row5-page", page)
        self.profiler.run("row5-quantity", lambda: self.api.quantity(group_id))

    # -- row 6 ----------------------------------------------------------------------------

    def row_member_search(self) -> None:
        """``Group?member=`` over a reverse table of ``--member-rows`` rows."""
        from bench.data import create_synthetic_groups, fill_synthetic, plan_synthetic
        from groups.clickhouse_migrations import REVERSE
        from groups.repository import MemberEventRepository
        from groups.selectors import roster_key

        with self.clickhouse_here():
            repository = MemberEventRepository()
            existing = int(repository.client.execute(f"SELECT count() FROM {REVERSE}")[0][0])
        plan = plan_synthetic(f"{self.tag}syn", self.args.member_rows, existing)
        progress(
            f"synthetic member events: {plan.layers} layer(s) of {plan.patients:,} "
            f"(reverse table holds {existing:,} rows)"
        )
        create_synthetic_groups(plan, self.api.create_group)
        with self.clickhouse_here():
            repository = MemberEventRepository()
            fill_synthetic(
                plan,
                insert_events=repository.insert_events,
                roster_key=roster_key,
                max_seconds=self.args.member_seconds,
            )
            merging = merges_settle(repository.client, self.args.merge_seconds)
            rows = int(repository.client.execute(f"SELECT count() FROM {REVERSE}")[0][0])
            parts = repository.client.execute(
                "SELECT count() FROM system.parts WHERE database = currentDatabase() "
                "AND table = %(t)s AND active",
                {"t": REVERSE},
            )[0][0]
        progress(
            f"  ... {plan.rows:,} events in {seconds(plan.seconds)}; reverse table {rows:,} rows"
        )
        totals: list[int] = []

        def search() -> None:
            patient = self.random.randrange(plan.patients)
            totals.append(self.api.search_member(plan.ref(patient)))

        series = repeat(search, times=self.args.repeat * 2, warmup=2)
        self.report.add(
            Line(
                "6",
                f"Group?member= over {rows:,} reverse-table rows",
                str(series.n),
                seconds(series.median),
                seconds(series.p90),
                seconds(series.cpu_median),
                f"≤ {seconds(MEMBER_SEARCH)}",
                verdict(series.median, MEMBER_SEARCH),
                f"{plan.layers_done} Groups per answer",
            )
        )
        how = (
            f"row 6 data: {plan.layers * plan.groups_per_layer} Groups created through "
            f"POST with empty rosters, then {plan.rows:,} 'added' events written with "
            f"MemberEventRepository.insert_events in batches of 50,000 ({seconds(plan.seconds)}): "
            f"{plan.patients:,} patients, each in {plan.layers_done} of the Groups "
            f"({plan.per_group:,} members per Group); with the other rows' Groups the reverse "
            f"table holds {rows:,} rows in {parts} active parts (no OPTIMIZE). {merging}"
        )
        if plan.capped or plan.layers_done < plan.layers:
            how += (
                f". Stopped after {plan.layers_done} of {plan.layers} layers at the "
                f"--member-seconds cap ({self.args.member_seconds:.0f} s): the table has fewer "
                f"than the {self.args.member_rows:,} rows the budget names"
            )
        self.report.note(how)
        if set(totals) != {plan.layers_done}:
            self.report.note(
                f"row 6: searches answered totals {sorted(set(totals))}, "
                f"expected {plan.layers_done}"
            )
        self.profiler.run("row6-member-search", search)

    # -- row 8 ----------------------------------------------------------------------------

    def row_load(self) -> None:
        """Mixed traffic from many clients (locust), as served; per kind p50/p99, rates."""
        if self.server is None:
            self.report.note("row 8 (load test) runs as served only, not --in-process")
            return
        from django.conf import settings

        from bench.outage import ClickHouseOutage

        args = self.args
        outage = None
        load_seconds = args.load_seconds
        if args.load_outage:
            if not settings.CLICKHOUSE_URL.startswith("clickhouse://") or not args.servers_dir:
                self.report.note(
                    "row 8: --load-outage needs a ClickHouse server started by "
                    "scripts/test-servers.sh (--servers-dir); no outage on this pair"
                )
            else:
                outage = ClickHouseOutage(
                    Path(args.servers_dir), f"http://127.0.0.1:{self.server.port}"
                )
                load_seconds = max(
                    load_seconds, OUTAGE_AFTER + args.load_outage + OUTAGE_DRAIN_WAIT
                )
        workers = args.load_workers
        if workers > 1 and not settings.CLICKHOUSE_URL.startswith("clickhouse://"):
            self.report.note("row 8: --load-workers needs a ClickHouse server; one worker here")
            workers = 1
        if workers > 1:
            progress(f"restarting the service with {workers} gunicorn workers for row 8")
            self.server.restart(WEB_CONCURRENCY=str(workers))
        try:
            result = self._load(args, outage, load_seconds)
        finally:
            if workers > 1:
                self.server.restart()
        self.load_lines(args, result, load_seconds, workers)

    def _load(self, args: argparse.Namespace, outage: Any, load_seconds: float) -> Any:
        """Row 8's locust run (and the outage during it, if any)."""
        from django.conf import settings

        from bench.load import run_load
        from bench.server import StoreCpu, tree_cpu

        stores = StoreCpu(args.servers_dir)
        server = self.server

        def cpu() -> dict[str, float]:
            return {"service": tree_cpu(server.process.pid), **stores.sample()}

        return run_load(
            self.api,
            f"http://127.0.0.1:{self.server.port}",
            self.server.base_path,
            tag=self.tag,
            groups=args.load_groups,
            members=args.load_members,
            users=args.load_users,
            seconds=load_seconds,
            max_requests=args.load_requests,
            workdir=Path(settings.VAR_DIR) / "bench-load",
            progress=progress,
            profile=args.load_profile,
            rate=args.load_rate,
            settle=self._load_settle(),
            during=None
            if outage is None
            else lambda: outage.run(
                after=OUTAGE_AFTER,
                seconds=args.load_outage,
                drain_wait=OUTAGE_DRAIN_WAIT,
                progress=progress,
            ),
            cpu=cpu,
        )

    def _load_settle(self) -> Any:
        """Row 8's wait for the merges of its set-up (``bench.load``): with a ClickHouse
        server only (chdb merges inside the service process, which the bench cannot ask
        without stopping it)."""
        from django.conf import settings

        if not settings.CLICKHOUSE_URL.startswith("clickhouse://"):
            return None

        def settle() -> str:
            from fhirservice.clickhouse import get_clickhouse

            return merges_settle(get_clickhouse(), self.args.merge_seconds, quiet=LOAD_QUIET)

        return settle

    def load_lines(
        self, args: argparse.Namespace, result: Any, load_seconds: float, workers: int
    ) -> None:
        """Row 8's report lines."""
        for kind in [*result.kinds, result.total]:
            self.report.add(
                Line(
                    "8",
                    f"load: {kind.name}",
                    f"{kind.count:,}",
                    seconds(kind.p50),
                    note=f"p99 {seconds(kind.p99)}, {kind.rate:.0f}/s"
                    + (f", {kind.failures} failed" if kind.failures else ""),
                )
            )
        writes = result.member_writes
        rate = sum(kind.rate for kind in writes)
        self.load_budget_lines(args, result, rate)
        weights = ", ".join(
            f"{name} {weight}" for name, weight in PROFILES[args.load_profile].items()
        )
        paced = (
            "0-10 ms think time"
            if args.load_rate is None
            else f"paced to {args.load_rate:g} "
            + ("member writes/s" if writes else "requests/s")
            + " in all (Poisson starts per client, bench.locustfile.poisson_pace)"
        )
        self.report.note(
            f"row 8: locust --headless, {args.load_users} clients (FastHttpUser, keep-alive, "
            f"{paced}) for {seconds(result.seconds)} (cap {load_seconds:.0f} s "
            f"or {args.load_requests:,} requests) on loopback; profile {args.load_profile}, "
            f"weights {weights} (quantity: Group?_elements=quantity, read: Patient, search: "
            "Group?member=, crud: Patient create+update+delete, $add-member: an existing "
            f"Patient by identifier). Set-up through the API took "
            f"{seconds(result.setup_seconds)}; {workers} gunicorn worker(s) of 8 threads. "
            "The load generator shares the machine's "
            f"{os.cpu_count()} CPUs with the service; p50/p99 are locust's (ms buckets)"
        )
        self.report.note(self.load_cpu_note(result, rate))
        if result.settled:
            self.report.note(f"row 8: {result.settled} between the set-up and the load")
        if result.during is not None:
            self.outage_lines(result.during)

    def load_budget_lines(self, args: argparse.Namespace, result: Any, rate: float) -> None:
        """Row 8's budget lines: on the issue's mix only; another profile's member writes are
        reported without a verdict."""
        writes = result.member_writes
        worst = max((kind.p99 for kind in writes if kind.p99 is not None), default=None)
        failures = result.total.failures
        where = f"{args.load_groups} Groups of {size_label(args.load_members)}"
        on_mix = args.load_profile == "mix"
        if not on_mix:
            self.report.note(
                f"row 8: profile {args.load_profile}, not the budget's mixed traffic: no verdicts"
            )
            if not writes:
                return

        def judged(budget: str, outcome: str) -> dict[str, str]:
            """A line's budget and verdict on the mix; none (info) on another profile."""
            return {"budget": budget, "verdict": outcome} if on_mix else {}

        self.report.add(
            Line(
                "8",
                f"load: member writes/s across {where}",
                "",
                f"{rate:.0f}/s",
                **judged(f"≥ {LOAD_WRITES:.0f}/s", PASS if rate >= LOAD_WRITES else FAIL),
            )
        )
        self.report.add(
            Line(
                "8",
                "load: p99 of member writes (worse of PATCH, $add-member)",
                "",
                seconds(worst),
                **judged(f"≤ {seconds(LOAD_P99)}", verdict(worst, LOAD_P99)),
            )
        )
        self.report.add(
            Line(
                "8",
                "load: failed requests",
                "",
                f"{failures:,}",
                **judged("0", PASS if failures == 0 else FAIL),
            )
        )

    @staticmethod
    def load_cpu_note(result: Any, member_writes_per_second: float) -> str:
        """Where the machine's CPU went during row 8's run, per process, per member write and
        per request (every process's CPU over the run divided by the member writes, and by
        the requests, it completed)."""
        used = dict(result.cpu)
        machine = used.pop("machine", 0.0)
        capacity = result.seconds * (os.cpu_count() or 1)
        per = {
            "member write": member_writes_per_second * result.seconds,
            "request": result.total.rate * result.seconds,
        }
        restarted = sorted(name for name, spent in used.items() if math.isnan(spent))
        counted = {name: spent for name, spent in used.items() if name not in restarted}
        parts = []
        for name, spent in sorted(counted.items(), key=lambda item: -item[1]):
            shares = [
                f"{spent / count * 1000:.2f} ms/{unit}" for unit, count in per.items() if count
            ]
            parts.append(f"{name} {spent:.1f} s" + (f" ({', '.join(shares)})" if shares else ""))
        parts += [f"{name} restarted during the run, not counted" for name in restarted]
        other = machine - sum(counted.values())
        return (
            f"row 8 CPU during the run: machine {machine:.1f} s of {capacity:.1f} s available "
            f"({machine / capacity:.0%} busy); " + ", ".join(parts) + f", other {other:.1f} s"
        )

    def outage_lines(self, outage: Any) -> None:
        """Row 8 with ``--load-outage``: how long the backlog took to drain."""
        drained = outage.drained_after
        self.report.add(
            Line(
                "8",
                f"load: backlog drained after ClickHouse was down {outage.down_seconds:.0f} s "
                "(from its return, load going on)",
                "",
                seconds(drained) if drained is not None else f"> {OUTAGE_DRAIN_WAIT:.0f} s",
                budget=f"≤ {seconds(LOAD_DRAIN)}",
                verdict=verdict(drained, LOAD_DRAIN) if drained is not None else FAIL,
            )
        )
        self.report.note(
            f"row 8 outage: ClickHouse killed (kill -9) {OUTAGE_AFTER:.0f} s into the load and "
            f"started again; largest backlog {outage.peak_batches:,} batches "
            f"({outage.peak_events:,} events); after its return (s: batches pending, versions "
            "to recount) "
            + ", ".join(
                f"{at:.0f}: {batches:,}/{recounts:,}" for at, batches, recounts in outage.timeline
            )
            + ". Drained: no batch from before its return "
            "pending and no quantity left to recount (/readyz). The load's figures above "
            "include the outage: roster reads and Group?member= answer 503 while it lasts"
        )

    # -- row 7 ----------------------------------------------------------------------------

    def row_patient(self) -> None:
        """Plain Patient create (POST) and read (GET), one new Patient per create."""
        from bench.data import patient_body

        count = self.args.patients
        bodies = [patient_body(i) for i in range(count + 2)]
        ids: list[str] = []
        progress(f"plain Patient: {count} creates, then {count} reads")
        creates = repeat(
            lambda: ids.append(self.api.create_patient(bodies[len(ids)])), times=count, warmup=2
        )
        reads = Series()
        for patient_id in ids[:2]:  # warm-up
            self.api.read_patient(patient_id)
        for patient_id in ids[2:]:
            reads.add_timed(lambda p=patient_id: self.api.read_patient(p))
        for work, series, limit in (
            ("create plain Patient (POST)", creates, PATIENT_CREATE),
            ("read plain Patient (GET)", reads, PATIENT_READ),
        ):
            self.report.add(
                Line(
                    "7",
                    work,
                    str(series.n),
                    seconds(series.median),
                    seconds(series.p90),
                    seconds(series.cpu_median),
                    f"≤ {seconds(limit)}",
                    verdict(series.median, limit),
                )
            )
        self.profiler.run("row7-patient-create", lambda: self.api.create_patient(bodies[0]))
        self.profiler.run("row7-patient-read", lambda: self.api.read_patient(ids[0]))


def merges_settle(client: Any, max_seconds: float, *, quiet: float = 0.0) -> str:
    """Wait until no background merge runs in our database (at most ``max_seconds``), and
    none has for ``quiet`` seconds.

    A bulk load of 10^7 events leaves parts that ClickHouse merges for a while afterwards;
    timing searches during those merges measures the load, not the steady state a search
    meets in service (chdb merges in this very process, so its merges also count as our CPU).
    ``quiet``: a moment without a merge may only be the gap before the next level's merge.
    Returns a sentence for the report's notes.
    """
    query = "SELECT count() FROM system.merges WHERE database = currentDatabase()"
    started = time.perf_counter()
    idle_since: float | None = None
    while True:
        running = int(client.execute(query)[0][0])
        now = time.perf_counter()
        waited = now - started
        if running:
            idle_since = None
        elif idle_since is None:
            idle_since = now
        if idle_since is not None and now - idle_since >= quiet:
            return f"Timed after background merges finished (waited {seconds(waited)})"
        if waited >= max_seconds:
            return (
                f"Timed with {running} background merge(s) still running "
                f"(--merge-seconds cap {max_seconds:.0f} s reached)"
            )
        time.sleep(0.5)


def header(args: argparse.Namespace, bench: Bench) -> list[str]:
    """Lines printed above the table."""
    from bench.api import access_control

    name = os.environ.get("FHIR_BENCH_PASS", "")
    if bench.server is None:
        driven = (
            "in-process through django.test.Client (full middleware, DRF views, services, "
            "both stores; no HTTP server, no network)"
        )
    else:
        driven = (
            f"over HTTP from a separate process (one keep-alive connection, timed by the "
            f"client) against scripts/serve.sh as make run starts it (gunicorn, 1 worker, "
            f"8 threads) at {bench.server.base_url}"
        )
    return [
        "FHIR Group roster benchmarks" + (f": {name}" if name else ""),
        f"  metadata store : {env.metadata_backend()}",
        f"  member events  : {bench.member_backend}",
        f"  driven         : {driven}",
        f"  access control : {access_control()}",
        "  writes         : Prefer: return=minimal (return=representation, the default, "
        "would stream the whole roster back: not what the PATCH budget measures)",
        f"  machine        : {env.machine()}; shared with other jobs, so timings are noisy",
        f"  sizes          : {', '.join(size_label(s) for s in args.sizes)}; "
        f"{args.repeat} timed runs per small measurement (after warm-up), medians and p90",
    ]


def run(args: argparse.Namespace) -> Report:
    """Run the selected rows; the report."""
    bench = Bench(args)
    bench.member_backend = env.member_backend()  # before a served chdb takes the data path
    try:
        bench.start()
        bench.report.header = header(args, bench)
        rows(bench)
    finally:
        bench.stop()
    return bench.report


def rows(bench: Bench) -> None:
    """The selected rows, in an order where each leaves the next a known state."""
    args = bench.args
    started = time.perf_counter()
    needs_groups = bool(args.rows & {1, 2, 3, 4, 5})
    if needs_groups:
        bench.create_groups()
    if 1 in args.rows:
        bench.row_patch_one()
    if 2 in args.rows:
        bench.row_patch_many()
    if 4 in args.rows:
        bench.row_get()
    if 5 in args.rows:
        bench.row_page_and_quantity()
    if 7 in args.rows:
        bench.row_patient()
    if 8 in args.rows:
        bench.row_load()
    if 6 in args.rows:
        bench.row_member_search()
    bench.report.lines.sort(key=lambda line: line.row[:1])
    whose = (
        "this Python process"
        if bench.server is None
        else "the gunicorn worker (sum of its threads' run time from /proc/PID/task/*/schedstat)"
    )
    bench.report.note(
        f"cpu = median CPU time of {whose} per request (all threads, so chdb's query threads "
        "count; a ClickHouse or PostgreSQL server's CPU does not). Far less sensitive than "
        "wall time to other jobs on the machine"
    )
    bench.report.note(
        f"run took {seconds(time.perf_counter() - started)}; 1-minute load average at the "
        f"end {env.load_average():.1f} on {os.cpu_count()} CPUs"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench``; 0 when the run completed."""
    args = parse_args(argv)
    env.setup(migrate=not args.no_migrate)
    from bench.api import BenchError
    from bench.server import ServerError

    try:
        report = run(args)
    except BenchError as exc:
        print(f"bench: the service answered unexpectedly: {exc}", file=sys.stderr)
        return 1
    except ServerError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(report.render(), flush=True)
    if args.fail_on_budget and report.failed:
        return 3
    return 0

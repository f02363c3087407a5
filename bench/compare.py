"""``python -m bench.compare BASE_URL``: the as-served scenario against any FHIR server.

The same HTTP requests, client and table as ``python -m bench`` as served (``bench.http_api``,
``bench.report``), against a FHIR R4 base URL you name: this service started by hand, or
another server (HAPI FHIR, Medplum, ...), so anyone can compare on their own machine. Nothing
here needs Django or this service's stores; the server must accept JSON Patch on Group
(``application/json-patch+json``, ``add /member/-``) for rows 1 and 2.

Rows, numbered as in the main benchmark:

3. ``POST /Group`` with all members, one Group per size;
1. ``PATCH /Group/{id}`` adding one member, sizes interleaved after two warm-ups each, and the
   largest / smallest ratio;
4. ``GET /Group/{id}`` of the largest, read to the last byte (members counted);
7. plain ``POST /Patient`` and ``GET /Patient/{id}``;
plus, with ``--server-pid``, the server process's peak resident memory (VmHWM, this machine).

Writes send ``Prefer: return=minimal``. Access: ``--token`` (a bearer token), or
``--client-id``/``--client-secret`` with ``--token-url`` (client-credentials grant), or none.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time

from bench.data import add_ops, group_body, patient_body
from bench.http_api import BenchError, HttpApi
from bench.measure import Series, repeat, timed
from bench.report import FAIL, INFO, PASS, Line, Report, megabytes, seconds, size_label
from bench.runner import (
    CREATE,
    GET_ALL,
    MILLION,
    PATCH_ONE,
    PATCH_SCALING,
    PATIENT_CREATE,
    PATIENT_READ,
    SERVER_RSS,
    progress,
    verdict,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="The as-served benchmark scenario against any FHIR R4 base URL.",
    )
    parser.add_argument("base_url", help="FHIR base URL, e.g. http://127.0.0.1:8080/fhir")
    parser.add_argument(
        "--sizes", default="1000,10000,100000", help="roster sizes (default 1000,10000,100000)"
    )
    parser.add_argument("--repeat", type=int, default=15, help="timed PATCHes per size")
    parser.add_argument("--patients", type=int, default=50, help="Patients created and read")
    parser.add_argument("--token", help="bearer token sent as is")
    parser.add_argument("--client-id", help="client-credentials grant: client id")
    parser.add_argument("--client-secret", help="client-credentials grant: secret")
    parser.add_argument("--token-url", help="client-credentials grant: the token endpoint")
    parser.add_argument(
        "--server-pid", type=int, help="the server's process id on this machine (peak RSS)"
    )
    parser.add_argument(
        "--name", default="", help="what the server is, for the header (default: the URL)"
    )
    args = parser.parse_args(argv)
    try:
        args.sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s})
    except ValueError:
        parser.error("--sizes takes comma-separated integers")
    if not args.sizes or min(args.sizes) < 1:
        parser.error("--sizes must name positive sizes")
    if bool(args.client_id) != bool(args.client_secret) or (args.client_id and not args.token_url):
        parser.error("--client-id needs --client-secret and --token-url")
    return args


def peak_rss(pid: int | None) -> int | None:
    """VmHWM of process ``pid`` (bytes), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run(args: argparse.Namespace) -> Report:
    """The scenario; the report."""
    credentials = (args.client_id, args.client_secret) if args.client_id else None
    api = HttpApi(
        args.base_url, credentials=credentials, token_url=args.token_url, token=args.token
    )
    report = Report()
    report.header = [
        f"FHIR Group roster benchmarks, as a client sees them: {args.name or args.base_url}",
        f"  base URL       : {args.base_url} (one keep-alive HTTP connection, timed here)",
        "  writes         : Prefer: return=minimal",
        f"  machine        : {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the start",
        f"  sizes          : {', '.join(size_label(s) for s in args.sizes)}; "
        f"{args.repeat} timed PATCHes per size, medians and p90",
    ]
    tag = secrets.token_hex(3)
    largest = max(args.sizes)
    scale = largest / MILLION
    groups: dict[int, str] = {}
    for size in args.sizes:
        body = group_body(f"compare {tag} {size}", f"{tag}c{size}", size)
        progress(f"POST Group with {size_label(size)} members ({len(body) / 1e6:.1f} MB)")
        holder: dict[str, str] = {}
        elapsed = timed(lambda b=body, h=holder: h.update(id=api.create_group(b)))
        groups[size] = holder["id"]
        limit = CREATE * scale
        report.add(
            Line(
                "3",
                f"create Group, {size_label(size)} members (POST)",
                "1",
                seconds(elapsed),
                budget=f"≤ {seconds(limit)}" if size == largest else "",
                verdict=verdict(elapsed, limit) if size == largest else INFO,
            )
        )
    added = 0

    def patch_one(size: int) -> None:
        nonlocal added
        added += 1
        api.patch(groups[size], add_ops([f"Patient/{tag}new-{added}"]))

    progress(f"PATCH +1 member, {args.repeat} runs per size")
    series = {size: Series() for size in args.sizes}
    for size in args.sizes:
        patch_one(size)
        patch_one(size)
    for _ in range(args.repeat):
        for size in args.sizes:
            series[size].add(timed(lambda s=size: patch_one(s)))
    for size in args.sizes:
        report.add(
            Line(
                "1",
                f"PATCH +1 member, Group of {size_label(size)}",
                str(series[size].n),
                seconds(series[size].median),
                seconds(series[size].p90),
                budget=f"≤ {seconds(PATCH_ONE)}",
                verdict=verdict(series[size].median, PATCH_ONE),
            )
        )
    if len(args.sizes) > 1:
        ratio = series[largest].median / series[args.sizes[0]].median
        report.add(
            Line(
                "1",
                f"PATCH +1: {size_label(largest)} / {size_label(args.sizes[0])}, medians",
                median=f"{ratio:.2f}x",
                budget=f"≤ {PATCH_SCALING}x",
                verdict=PASS if ratio <= PATCH_SCALING else FAIL,
            )
        )
    progress(f"GET Group of {size_label(largest)} members")
    got: dict[str, int] = {}
    elapsed = timed(lambda: got.update(n=api.read_streamed(groups[largest])))
    expected = largest + 2 + args.repeat
    limit = GET_ALL * scale
    report.add(
        Line(
            "4",
            f"GET Group of {expected:,} members",
            "1",
            seconds(elapsed),
            budget=f"≤ {seconds(limit)}",
            verdict=verdict(elapsed, limit),
            note="" if got["n"] == expected else f"{got['n']:,} members received",
        )
    )
    progress(f"plain Patient: {args.patients} creates, then {args.patients} reads")
    ids: list[str] = []
    bodies = [patient_body(i) for i in range(args.patients + 2)]
    creates = repeat(
        lambda: ids.append(api.create_patient(bodies[len(ids)])), times=args.patients, warmup=2
    )
    reads = Series()
    for patient_id in ids[2:]:  # the warm-up's two are not read
        reads.add(timed(lambda p=patient_id: api.read_patient(p)))
    for work, values, limit in (
        ("create plain Patient (POST)", creates, PATIENT_CREATE),
        ("read plain Patient (GET)", reads, PATIENT_READ),
    ):
        report.add(
            Line(
                "7",
                work,
                str(values.n),
                seconds(values.median),
                seconds(values.p90),
                budget=f"≤ {seconds(limit)}",
                verdict=verdict(values.median, limit),
            )
        )
    peak = peak_rss(args.server_pid)
    if peak is not None:
        report.add(
            Line(
                "4",
                f"  server RSS, peak (pid {args.server_pid})",
                "1",
                megabytes(peak),
                budget=f"≤ {megabytes(SERVER_RSS)}",
                verdict=verdict(peak, SERVER_RSS),
            )
        )
    api.close()
    report.lines.sort(key=lambda line: line.row[:1])
    report.note(
        "budgets are this service's (issue 17), scaled linearly from 10^6 where the largest "
        f"size is smaller; load average at the end {os.getloadavg()[0]:.1f}"
    )
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 when the scenario completed."""
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        report = run(args)
    except (BenchError, OSError) as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 1
    report.note(f"run took {seconds(time.perf_counter() - started)}")
    print(report.render(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

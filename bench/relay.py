"""How fast the outbox relay drains a backlog left by a ClickHouse outage (issue 16), by hand.

Not part of ``make bench``. In-process (``django.test.Client``) on the stores the environment
names (the servers pair is the one that matters)::

    DATABASE_URL=postgres://postgres@127.0.0.1:PORT/fhirservice \\
      CLICKHOUSE_URL=clickhouse://default@127.0.0.1:PORT/fhir_bench \\
      .venv/bin/python -m bench.relay --groups 20 --batches 1000

``--groups`` Groups of ``--members`` members are created, then ClickHouse is made unreachable
(the client pointed at a loopback port where nothing listens, as when the server is down) and
``--batches`` PATCHes, each adding one new member to a Group in turn, commit blind: each
leaves one outbox batch pending and one version whose quantity waits for its recount, as
writes during an outage do. With ClickHouse back, one relay run (``ship_member_events``'s
``member_batches_relay``) is timed until nothing is pending: the seconds, batches per second,
and the load average (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import orjson

from bench.env import load_average, setup


def closed_port() -> int:
    """A loopback port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; prints one line of results."""
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__)
    parser.add_argument("--groups", type=int, default=20)
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument(
        "--existing",
        action="store_true",
        help="each PATCH re-adds a member the Group already has: with digests off "
        "(FHIR_MEMBER_DIGEST_ENTRIES=0) every blind guess (+1) is wrong, so the recount "
        "corrects every version written during the outage",
    )
    args = parser.parse_args(argv)
    setup()
    from django.conf import settings
    from django.test import override_settings

    from bench.api import Api
    from groups.models import MemberOutbox
    from groups.outbox import background
    from groups.outbox.ship import member_batches_relay

    api = Api()
    run = os.urandom(3).hex()
    groups = []
    for index in range(args.groups):
        members = [
            {"entity": {"reference": f"Patient/r{run}-{index}-{n}"}} for n in range(args.members)
        ]
        body = {"resourceType": "Group", "type": "person", "actual": True, "member": members}
        groups.append(api.create_group(orjson.dumps(body)))
    background.flush()
    down = settings.CLICKHOUSE_URL.split("://")[0] + f"://default@127.0.0.1:{closed_port()}/x"
    started = time.monotonic()
    with override_settings(CLICKHOUSE_URL=f"{down}?connect_timeout=1"):
        for index in range(args.batches):
            group = index % len(groups)
            ref = (
                f"Patient/r{run}-{group}-{index % args.members}"
                if args.existing
                else f"Patient/r{run}-new-{index}"
            )
            ops = [{"op": "add", "path": "/member/-", "value": {"entity": {"reference": ref}}}]
            api.patch(groups[group], orjson.dumps(ops))
        background.flush()
    written = time.monotonic() - started
    pending = MemberOutbox.objects.filter(shipped_at__isnull=True).count()
    load = load_average()
    started = time.monotonic()
    report = member_batches_relay(min_age=0)
    drained = time.monotonic() - started
    # The bench's own check: every Group's quantity is its true member count afterwards.
    wrong = sum(
        api.quantity(group_id)
        != args.members + (0 if args.existing else len(range(index, args.batches, len(groups))))
        for index, group_id in enumerate(groups)
    )
    print(
        f"relay drain: {pending} pending batches ({args.batches} blind PATCHes on "
        f"{args.groups} Groups of {args.members}, written in {written:.1f} s) -> "
        f"{drained:.2f} s ({report.batches / drained:.0f} batches/s), shipped {report.batches}, "
        f"already in ClickHouse {report.skipped}, groups recounted {len(report.recounted)}, "
        f"quantity wrong afterwards on {wrong} of {args.groups} Groups, "
        f"left {report.left}, error {report.error or '-'}; load average {load:.1f} before, "
        f"{load_average():.1f} after"
    )
    return 0 if not report.left and not report.error and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())

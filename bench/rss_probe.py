"""``python -m bench.rss_probe GROUP_ID [WARMUP_GROUP_ID]``: one streamed GET in a fresh process.

Row 4 runs this in a child process for its memory figure: the benchmark process has by then
built million-member bodies, and memory freed by that work is reused by the GET without
raising the RSS, which would hide growth. The child sets Django up, reads a small Group once
(imports, connections, caches), then streams the big one and prints one JSON line:
``{"members": …, "seconds": …, "growth": bytes, "start_rss": bytes}``.
With chdb the parent must have closed its client first (one process per data path).
``FHIR_BENCH_DB_NAME`` names the metadata database when it is not the one DATABASE_URL
names (the parent runs under pytest on the test database).
"""

from __future__ import annotations

import json
import os
import sys
import time

from bench import env
from bench.measure import RssWatch


def main(argv: list[str] | None = None) -> int:
    """Measure one streamed GET; print the JSON line."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m bench.rss_probe GROUP_ID [WARMUP_GROUP_ID]", file=sys.stderr)
        return 2
    env.setup(migrate=False)
    name = os.environ.get("FHIR_BENCH_DB_NAME")
    if name:
        from django.db import connection

        connection.settings_dict["NAME"] = name  # before the first query
    from bench.api import Api

    api = Api()
    if len(args) == 2:
        api.read_streamed(args[1])
    watch = RssWatch()
    start = time.perf_counter()
    members = api.read_streamed(args[0], watch.sample)
    seconds = time.perf_counter() - start
    result = {
        "members": members,
        "seconds": seconds,
        "growth": watch.growth(),
        "start_rss": watch.start,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

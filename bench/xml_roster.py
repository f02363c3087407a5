"""A Group roster written as FHIR JSON and as FHIR XML, in-process: time, size and memory.

Renders the read body of a Group of N members the way a read does (``render_member`` per
member, chunks of ``RENDER_BATCH``, the stored Group spliced in front), once as JSON and once
through the XML conversion of ``fhirservice.rest.rendering.reformat``, reading every chunk.
No server and no store: this isolates what XML costs on top of JSON (ADR 0009).

    .venv/bin/python -m bench.xml_roster [--members 1000000]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from collections.abc import Iterator


def _chunks(members: int, batch_size: int) -> Iterator[bytes]:
    from groups.members import render_member

    batch: list[str] = []
    for index in range(members):
        batch.append(
            render_member(f"Patient/{index:08d}", "2024-01-01", "", index % 7 == 0, "").decode()
        )
        if len(batch) == batch_size:
            yield ",".join(batch).encode()
            batch = []
    if batch:
        yield ",".join(batch).encode()


def main() -> None:
    """Print one row per format."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=1_000_000)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fhirservice.settings")
    import django

    django.setup()
    from fhirservice.rest.negotiation import FHIR_XML, OutputFormat
    from fhirservice.rest.rendering import Spliced, reformat
    from groups.storage import RENDER_BATCH

    group = (
        b'{"resourceType":"Group","id":"bench","meta":{"versionId":"1","lastUpdated":'
        b'"2026-01-01T00:00:00Z"},"type":"person","actual":true,"quantity":%d}' % args.members
    )
    print("| format | members | seconds | µs/member | MB | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for name in ("json", "xml"):
        body = Spliced(group, "member", _chunks(args.members, RENDER_BATCH))
        stream = iter(body) if name == "json" else reformat(body, OutputFormat(FHIR_XML))
        started = time.perf_counter()
        size = sum(len(chunk) for chunk in stream)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(
            f"| {name} | {args.members:,} | {seconds:.2f} | {seconds / args.members * 1e6:.1f} "
            f"| {size / 1e6:.0f} | {peak} |"
        )


if __name__ == "__main__":
    main()

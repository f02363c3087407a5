"""Cost of ``_include``/``_revinclude``, chains and ``_has`` as served (``fhirservice.search``).

    .venv/bin/python -m bench.include [--patients N] [--observations N] [--repeat N] [--reuse]

Against empty stores (the environment picks them, as for ``python -m bench``): stores
``--patients`` Patients and ``--observations`` Observations of one code, each referring to a
Patient (round robin), through batch Bundles; starts ``scripts/serve.sh`` and times each
search below over one keep-alive connection, interleaved, printing median and p90 in ms. The
budget (issue 13): ``_include`` of the subject adds at most 20 ms to a first page of 50.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid

import orjson

from bench import env

BATCH = 500
CODE = "urn:bench:include|bench-code"
INCLUDE_BUDGET_MS = 20.0
SCOPES = "system/Patient.cruds system/Observation.cruds"


def _batch(entries: list[dict]) -> bytes:
    return orjson.dumps({"resourceType": "Bundle", "type": "batch", "entry": entries})


def load(api, patients: int, observations: int) -> list[str]:  # noqa: ANN001 - HttpApi
    """Store the Patients and Observations; the Patient ids."""
    ids = [str(uuid.uuid4()) for _ in range(patients)]
    for start in range(0, patients, BATCH):
        api.post_bundle(
            _batch(
                [
                    {
                        "resource": {
                            "resourceType": "Patient",
                            "id": pid,
                            "name": [{"family": f"F{n}"}],
                        },
                        "request": {"method": "PUT", "url": f"Patient/{pid}"},
                    }
                    for n, pid in enumerate(ids[start : start + BATCH], start)
                ]
            )
        )
    system, code = CODE.split("|")
    for start in range(0, observations, BATCH):
        api.post_bundle(
            _batch(
                [
                    {
                        "resource": {
                            "resourceType": "Observation",
                            "status": "final",
                            "code": {"coding": [{"system": system, "code": code}]},
                            "subject": {"reference": f"Patient/{ids[n % patients]}"},
                        },
                        "request": {"method": "POST", "url": "Observation"},
                    }
                    for n in range(start, min(start + BATCH, observations))
                ]
            )
        )
    return ids


def main() -> None:
    """Load, serve, measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--observations", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument(
        "--reuse", action="store_true", help="the stores hold an earlier run's data: time only"
    )
    args = parser.parse_args()
    env.setup()

    from bench.api import BENCH_ORGANIZATION
    from bench.http_api import HttpApi
    from bench.server import Server
    from fhirservice.access.clients import fhir_client_create
    from fhirservice.conf import fhir_settings

    server = Server.from_settings()
    # Before the server starts: chdb serves one process per data path.
    header = f"{env.machine()}\nmetadata: {env.metadata_backend()}; members: {env.member_backend()}"
    server.start()
    credentials = None
    if fhir_settings.AUTH:  # a client of the bench's organization that may write both types
        credentials = fhir_client_create(
            name=f"bench-include-{uuid.uuid4().hex[:8]}",
            organization=BENCH_ORGANIZATION,
            all_organizations=False,
            scopes=SCOPES.split(),
        )
    api = HttpApi(
        server.base_url,
        credentials=credentials,
        token_url=f"http://127.0.0.1:{server.port}/oauth/token/",
    )
    try:
        if args.reuse:
            first = orjson.loads(api.search("/Patient?_count=1&_total=none"))
            ids = [first["entry"][0]["resource"]["id"]]
        else:
            started = time.perf_counter()
            ids = load(api, args.patients, args.observations)
            print(
                f"loaded {args.patients} Patients and {args.observations} Observations in "
                f"{time.perf_counter() - started:.0f} s",
                file=sys.stderr,
            )
        page = f"/Observation?code={CODE}&_count=50&_total=none"
        searches = [
            ("first page of 50 Observations", page),
            ("... + _include=Observation:subject", page + "&_include=Observation:subject"),
            ("... + _include=*", page + "&_include=*"),
            (
                "chain subject:Patient.family=F7 (exact-ish)",
                page.replace(f"code={CODE}", "subject:Patient.family=F7"),
            ),
            (
                "_has:Observation:subject:code, page of 50",
                f"/Patient?_has:Observation:subject:code={CODE}&_count=50&_total=none",
            ),
            (
                "one Patient + _revinclude=Observation:subject",
                f"/Patient?_id={ids[0]}&_revinclude=Observation:subject",
            ),
        ]
        for _, path in searches:  # warm-up
            api.search(path)
        samples: dict[str, list[float]] = {path: [] for _, path in searches}
        for _ in range(args.repeat):
            for _, path in searches:
                start = time.perf_counter()
                api.search(path)
                samples[path].append((time.perf_counter() - start) * 1000)
        print(header)
        print(f"{'search':<48} {'median ms':>10} {'p90 ms':>10}")
        medians = {}
        for label, path in searches:
            ordered = sorted(samples[path])
            medians[path] = statistics.median(ordered)
            p90 = ordered[int(len(ordered) * 0.9)]
            print(f"{label:<48} {medians[path]:>10.1f} {p90:>10.1f}")
        added = medians[searches[1][1]] - medians[searches[0][1]]
        verdict = "PASS" if added <= INCLUDE_BUDGET_MS else "FAIL"
        print(
            f"{'_include of the subject adds':<48} {added:>10.1f} {'':>10} budget 20 ms {verdict}"
        )
    finally:
        api.close()
        server.stop()


if __name__ == "__main__":
    main()

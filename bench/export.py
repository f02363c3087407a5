"""Bulk Data export benchmark: a Group of N members, each with 1 Patient and M Observations.

Run by hand (not part of ``make bench``: seeding and exporting 1.1·10^5 resources takes
longer than the default run's minute), on whichever backend pair the environment names, as
``python -m bench``::

    FHIR_VAR_DIR=/tmp/bx DATABASE_URL=sqlite:////tmp/bx/db.sqlite3 \\
      CLICKHOUSE_URL=chdb:////tmp/bx/chdb .venv/bin/python -m bench.export --members 10000

It seeds the Patients and Observations (``--observations``, default 10) straight into the
metadata store (rows as the store writes them, compartment index included: the write path is
not what is measured; COPY on PostgreSQL, one ``executemany`` per batch on SQLite), creates
the Group through the API, then times the kick-off (``GET Group/{id}/$export``) and one
worker round in this process (``operations.export.worker.run_once``), and prints
resources/s (wall clock, and per CPU second of this process: on a loaded machine the wall
clock says more about the neighbours; with embedded stores the CPU includes SQLite's and
chdb's work, with servers it does not) and the worker's RSS growth. ``--members 100000``
is the issue's full size; ``--members 1000000 --observations 1`` its million-member Group.
``--seed-only`` seeds and creates the Group, prints its id and stops; ``--group ID`` then
exports that Group in a fresh process (whose RSS did not just hold the 10^6-member POST).

With access control on (``FHIR_AUTH``, the default) the bench is a SMART Backend Services
client as the README describes one: it makes an EC P-384 key pair, registers its public key
with ``manage.py create_fhir_client --public-key`` (organization ``bench``), signs an ES384
client assertion and takes a token at the token endpoint (``client_credentials``); the
seeded rows belong to that organization, and the export runs within its boundary. With
``FHIR_AUTH=off`` it sends no token.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import re
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.env import load_average, member_backend, metadata_backend, setup
from bench.measure import RssWatch
from bench.seed import store_rows

OBSERVATIONS = 10
BATCH = 20_000
HEADERS = {"Accept": "application/fhir+json", "Prefer": "respond-async"}
ORGANIZATION = "bench"
# What the bench does: read every type (the export) and create its Group.
SCOPES = "system/*.rs system/Group.c"
# The site root as django.test.Client reaches it: the assertion's audience is its token URL.
SITE_ROOT = "http://testserver"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--members", type=int, default=10_000, help="Group size (10^4)")
    parser.add_argument(
        "--observations",
        type=int,
        default=OBSERVATIONS,
        help=f"Observations per member ({OBSERVATIONS})",
    )
    parser.add_argument("--no-migrate", action="store_true", help="skip both migrations")
    parser.add_argument(
        "--seed-only",
        action="store_true",
        help="seed and create the Group, print its id, do not export",
    )
    parser.add_argument(
        "--group",
        metavar="ID",
        help="export this Group (seeded by an earlier --seed-only run) instead of seeding",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile the worker (cProfile, top 30 to stderr)"
    )
    return parser.parse_args(argv)


def authorize(client: Any) -> str:
    """With access control on: register a key-set client with ``create_fhir_client``, take a
    token with a signed assertion and send it on every request of ``client``; the
    organization the seeded rows belong to ("" with access control off)."""
    from django.core.management import call_command

    from fhirservice.access.assertions import JWT_BEARER
    from fhirservice.access.smart import token_url
    from fhirservice.conf import fhir_settings

    if not fhir_settings.AUTH:
        return ""
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    out = io.StringIO()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.pem"
        path.write_bytes(pem)
        call_command(
            "create_fhir_client",
            "--name",
            f"bench-export-{uuid.uuid4().hex[:8]}",
            "--organization",
            ORGANIZATION,
            "--scopes",
            SCOPES,
            "--public-key",
            str(path),
            "--base-url",
            SITE_ROOT,
            stdout=out,
        )
    printed = out.getvalue()
    client_id = re.search(r"client_id:\s+(\S+)", printed).group(1)
    kid = re.search(r"kid=(\S+)", printed).group(1)
    audience = token_url(SITE_ROOT)
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "exp": int(time.time()) + 240,
        "jti": uuid.uuid4().hex,
    }
    assertion = jwt.encode(claims, key, algorithm="ES384", headers={"kid": kid})
    response = client.post(
        audience.removeprefix(SITE_ROOT),
        {
            "grant_type": "client_credentials",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": assertion,
        },
    )
    assert response.status_code == 200, response.content[:300]
    token = orjson.loads(response.content)["access_token"]
    client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return ORGANIZATION


def _meta(moment: str, organization: str) -> dict[str, Any]:
    from fhirservice.access.boundaries import with_organization

    return with_organization({"versionId": "1", "lastUpdated": moment}, organization)


RESOURCE_COLUMNS = (
    "key",
    "resource_type",
    "resource_id",
    "version_id",
    "incarnation",
    "last_updated",
    "deleted",
    "body",
    "organization",
)
VERSION_COLUMNS = (*RESOURCE_COLUMNS, "method", "request_id", "actor")
# The current rows also keep the minute of last_updated (StoredResource.updated_minute).
CURRENT_COLUMNS = (*RESOURCE_COLUMNS, "updated_minute")
LINK_COLUMNS = ("key", "resource_key", "resource_type", "patient_id", "shared")


def seed(members: int, observations: int, run: str, organization: str) -> list[str]:
    """Patients and their Observations as stored rows of ``organization`` (current row,
    history row, compartment links: what the write path leaves); the Patient references."""
    from django.db import connection

    from fhirservice.models import ResourceVersion, StoredResource
    from operations.export.models import CompartmentLink

    now = datetime.now(UTC)
    stamp = now.isoformat().replace("+00:00", "Z")
    moment = connection.ops.adapt_datetimefield_value(now)
    minute = connection.ops.adapt_datetimefield_value(now.replace(second=0, microsecond=0))
    created = ("POST", "", "")  # method, request_id, actor of a history row
    refs: list[str] = []
    rows: list[tuple[str, str, str]] = []

    def flush() -> None:
        store_rows(
            StoredResource,
            CURRENT_COLUMNS,
            [
                (f"{t}/{i}", t, i, 1, 1, moment, False, body, organization, minute)
                for t, i, body in rows
            ],
        )
        store_rows(
            ResourceVersion,
            VERSION_COLUMNS,
            [
                (f"{t}/{i}/_history/1", t, i, 1, 1, moment, False, body, organization, *created)
                for t, i, body in rows
            ],
        )
        store_rows(
            CompartmentLink,
            LINK_COLUMNS,
            [
                (f"{t}/{i}>{i.split('-o')[0]}", f"{t}/{i}", t, i.split("-o")[0], False)
                for t, i, _ in rows
                if t == "Observation"
            ],
        )
        rows.clear()

    meta = _meta(stamp, organization)
    for index in range(members):
        patient_id = f"{run}-{index:07d}"
        refs.append(f"Patient/{patient_id}")
        body = {
            "resourceType": "Patient",
            "id": patient_id,
            "meta": meta,
            "name": [{"family": f"Bench{index}", "given": ["Export"]}],
            "gender": "unknown",
        }
        rows.append(("Patient", patient_id, orjson.dumps(body).decode()))
        for number in range(observations):
            observation_id = f"{patient_id}-o{number}"
            body = {
                "resourceType": "Observation",
                "id": observation_id,
                "meta": meta,
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": f"Patient/{patient_id}"},
                "valueQuantity": {"value": 60 + number, "unit": "/min"},
            }
            rows.append(("Observation", observation_id, orjson.dumps(body).decode()))
        if len(rows) >= BATCH:
            flush()
    flush()
    return refs


def access_control(organization: str) -> str:
    """How the bench authenticates, for its header."""
    if not organization:
        return "off (FHIR_AUTH=off): no token"
    return f"SMART Backend Services client of organization {organization!r} ({SCOPES})"


def seed_group(client: Any, args: argparse.Namespace, organization: str) -> str:
    """Seed the members' rows, create their Group through the API; its id."""
    from groups.outbox import background

    run = f"bx{uuid.uuid4().hex[:8]}"
    started = time.perf_counter()
    refs = seed(args.members, args.observations, run, organization)
    seeded = time.perf_counter() - started
    group = {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "member": [{"entity": {"reference": ref}} for ref in refs],
    }
    del refs
    started = time.perf_counter()
    response = client.post(
        "/4_0_0/Group",
        orjson.dumps(group),
        content_type="application/fhir+json",
        headers={"Prefer": "return=minimal"},
    )
    assert response.status_code == 201, response.content[:300]
    background.flush()
    created = time.perf_counter() - started
    group_id = response["Location"].split("/Group/")[1].split("/")[0]
    resources = args.members * (1 + args.observations)
    print(
        f"seeded {resources:,} resources in {seeded:.1f} s; Group/{group_id} of "
        f"{args.members:,} members created (POST, events shipped) in {created:.1f} s",
        file=sys.stderr,
    )
    return group_id


def main(argv: list[str] | None = None) -> int:
    """Seed, kick off, run the worker, print the table."""
    args = parse_args(argv)
    setup(migrate=not args.no_migrate)
    from django.test import Client

    from operations.export.models import ExportFile, ExportJob
    from operations.export.worker import run_once

    print(f"metadata store: {metadata_backend()}", file=sys.stderr)
    print(f"member store:   {member_backend()}", file=sys.stderr)
    client = Client()
    organization = authorize(client)
    print(f"access control: {access_control(organization)}", file=sys.stderr)
    group_id = args.group or seed_group(client, args, organization)
    if args.seed_only:
        print(group_id)
        return 0
    members = args.members
    if args.group:
        from fhirservice.models import StoredResource
        from fhirservice.store.json import loads

        members = loads(StoredResource.objects.get(key=f"Group/{group_id}").body)["quantity"]

    began = time.perf_counter()
    response = client.get(f"/4_0_0/Group/{group_id}/$export", headers=HEADERS)
    kick_off = time.perf_counter() - began
    assert response.status_code == 202, response.content[:300]
    job_id = response["Content-Location"].rsplit("=", 1)[1]

    watch = RssWatch()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            watch.sample()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    load_before = load_average()
    began, cpu = time.perf_counter(), time.process_time()
    while ExportJob.objects.get(pk=job_id).state != ExportJob.State.COMPLETED:
        if not run_once(worker="bench"):
            raise SystemExit(
                f"export {job_id} did not complete: {ExportJob.objects.get(pk=job_id).error}"
            )
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
    done.set()
    growth = watch.growth()
    job = ExportJob.objects.get(pk=job_id)
    files = ExportFile.objects.filter(job=job, attempt=job.attempt)
    size = sum(f.size for f in files)
    print(
        "| members | resources | kick-off | export | resources/s | worker CPU | resources/CPU-s "
        "| files | MB | RSS growth | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {members:,} | {job.resources:,} | {kick_off * 1000:.0f} ms | {elapsed:.1f} s "
        f"| {job.resources / elapsed:,.0f} | {cpu:.1f} s | {job.resources / cpu:,.0f} "
        f"| {files.count()} | {size / 1e6:.0f} "
        f"| {growth / 2**20:.0f} MB | {load_before:.1f}-{load_average():.1f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Mixed traffic for the load test (row 8, ``bench.load``), run by ``locust --headless``.

Each simulated client sends, by the weights of the run's profile (``bench.load.PROFILES``):
member PATCHes adding one new member to one of the load Groups, ``$add-member`` of an
existing Patient (by identifier), Group quantity reads, Patient reads, ``Group?member=``
searches, plain Patient CRUD (create, update, delete), or liveness probes (``/healthz``).
Request names group the statistics by kind. ``bench.load`` writes the set-up (base path,
Group ids, Patient ids and identifiers, bearer token, request cap, weights, pace) as JSON to
the file named by ``FHIR_LOAD_CONFIG``; after ``max_requests`` requests the run stops
(bounded in requests as well as in time).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Callable

from locust import FastHttpUser, between, events

CONFIG = json.loads(open(os.environ["FHIR_LOAD_CONFIG"]).read())  # noqa: SIM115
BASE = CONFIG["base_path"]
GROUPS: list[str] = CONFIG["groups"]
PATIENTS: list[str] = CONFIG["patients"]  # ids of Patients created for the run
MRN_SYSTEM = CONFIG["mrn_system"]
TAG = CONFIG["tag"]
FHIR = "application/fhir+json"
HEADERS = {"Accept": FHIR, "Content-Type": FHIR, "Prefer": "return=minimal"}
if CONFIG.get("token"):
    HEADERS["Authorization"] = f"Bearer {CONFIG['token']}"
PATCH_HEADERS = {**HEADERS, "Content-Type": "application/json-patch+json"}
READ_HEADERS = {k: v for k, v in HEADERS.items() if k != "Content-Type"}

# Names of the request kinds (the report's rows); member writes are the first two.
PATCH = "PATCH Group (+1 member)"
ADD_MEMBER = "POST Group/$add-member"
QUANTITY = "GET Group?_elements=quantity"
READ_PATIENT = "GET Patient/{id}"
SEARCH = "GET Group?member="
CREATE = "POST Patient"
UPDATE = "PUT Patient/{id}"
DELETE = "DELETE Patient/{id}"
HEALTHZ = "GET /healthz"
MEMBER_WRITES = (PATCH, ADD_MEMBER)

_counter = itertools.count()
_sent = 0


@events.request.add_listener
def _bounded(**_: object) -> None:
    """Stop the run once ``max_requests`` requests have completed."""
    global _sent
    _sent += 1
    if _sent == CONFIG["max_requests"]:
        runner = _environment.runner if _environment is not None else None
        if runner is not None:
            runner.quit()


_environment = None


@events.init.add_listener
def _keep(environment, **_: object) -> None:
    global _environment
    _environment = environment


def _patient(index: int) -> bytes:
    return json.dumps(
        {
            "resourceType": "Patient",
            "identifier": [{"system": f"urn:bench:load:{TAG}", "value": f"crud-{index}"}],
            "name": [{"family": f"Load{index}", "given": ["Crud"]}],
            "gender": "other",
        }
    ).encode()


def patch_member(user: FastHttpUser) -> None:
    """PATCH one of the Groups, adding one new member."""
    group = random.choice(GROUPS)
    ref = f"Patient/{TAG}-load-{next(_counter)}"
    body = json.dumps([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": ref}}}])
    user.client.patch(f"{BASE}/Group/{group}", data=body, headers=PATCH_HEADERS, name=PATCH)


def add_member(user: FastHttpUser) -> None:
    """``$add-member`` of an existing Patient, by identifier."""
    group = random.choice(GROUPS)
    index = random.randrange(len(PATIENTS))
    body = json.dumps(
        {
            "resourceType": "Parameters",
            "parameter": [
                {
                    "name": "identifier",
                    "valueIdentifier": {"system": MRN_SYSTEM, "value": f"mrn-{index}"},
                }
            ],
        }
    )
    user.client.post(
        f"{BASE}/Group/{group}/$add-member", data=body, headers=HEADERS, name=ADD_MEMBER
    )


def read_quantity(user: FastHttpUser) -> None:
    """A Group's quantity (the Group without its roster)."""
    group = random.choice(GROUPS)
    user.client.get(f"{BASE}/Group/{group}?_elements=quantity", headers=READ_HEADERS, name=QUANTITY)


def read_patient(user: FastHttpUser) -> None:
    """A Patient by id."""
    patient = random.choice(PATIENTS)
    user.client.get(f"{BASE}/Patient/{patient}", headers=READ_HEADERS, name=READ_PATIENT)


def search_member(user: FastHttpUser) -> None:
    """The Groups a Patient is a member of."""
    patient = random.choice(PATIENTS)
    user.client.get(f"{BASE}/Group?member=Patient/{patient}", headers=READ_HEADERS, name=SEARCH)


def patient_crud(user: FastHttpUser) -> None:
    """Create a Patient, update it, delete it."""
    index = next(_counter)
    with user.client.post(
        f"{BASE}/Patient",
        data=_patient(index),
        headers=HEADERS,
        name=CREATE,
        catch_response=True,
    ) as response:
        location = response.headers.get("Location", "")
        if response.status_code != 201 or "/Patient/" not in location:
            response.failure(f"HTTP {response.status_code}, Location {location!r}")
            return
    patient = location.split("/Patient/")[1].split("/")[0]
    body = json.loads(_patient(index))
    body["id"] = patient
    body["active"] = True
    user.client.put(
        f"{BASE}/Patient/{patient}", data=json.dumps(body), headers=HEADERS, name=UPDATE
    )
    user.client.delete(f"{BASE}/Patient/{patient}", headers=READ_HEADERS, name=DELETE)


def healthz(user: FastHttpUser) -> None:
    """Liveness: a request through gunicorn, Django and the middleware, no store."""
    user.client.get("/healthz", name=HEALTHZ)


TASKS = {
    "patch": patch_member,
    "add-member": add_member,
    "quantity": read_quantity,
    "read": read_patient,
    "search": search_member,
    "crud": patient_crud,
    "healthz": healthz,
}


def poisson_pace(rate: float) -> Callable[[FastHttpUser], float]:
    """Waits that start a client's tasks as a Poisson process of ``rate`` per second: each
    start due an exponential interval after the last one, at once when the client is
    behind (no burst to catch up).

    Locust's ``constant_throughput`` kept a constant interval, and its clients fell into
    step: Patient reads paced to 100/s from 32 clients measured p50 19-36 ms with it, 3 ms
    with random waits, while the service's own log had ~2-6 ms.
    """

    def wait(user: FastHttpUser) -> float:
        now = time.monotonic()
        due = max(getattr(user, "_due", now) + random.expovariate(rate), now)
        user._due = due
        return due - now

    return wait


class FhirClient(FastHttpUser):
    """One client of the service; keep-alive connections (geventhttpclient). A paced client
    starts ``user_rate`` tasks per second on average (``poisson_pace``)."""

    tasks = {TASKS[name]: weight for name, weight in CONFIG["weights"].items()}
    wait_time = (
        between(0, 0.01) if CONFIG["user_rate"] is None else poisson_pace(CONFIG["user_rate"])
    )

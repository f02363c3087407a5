"""Request bodies and synthetic member events.

Bodies are built as bytes directly (a 10^6-member Group is ~45 MB of JSON; building it from
dicts first would cost seconds and half a gigabyte before the request even starts).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

GROUP_HEAD = b'{"resourceType":"Group","type":"person","actual":true,"name":"bench %s"'
BATCH_ROWS = 50_000  # per insert: the shipper's batch size (MEMBER_BATCH_SIZE)


def member_ref(prefix: str, index: int) -> str:
    """The reference of member ``index`` of a roster built with ``prefix``."""
    return f"Patient/{prefix}-{index}"


def group_body(name: str, prefix: str = "", size: int = 0) -> bytes:
    """A Group with ``size`` members ``Patient/<prefix>-<i>`` (no member element when 0)."""
    head = GROUP_HEAD % name.encode()
    if not size:
        return head + b"}"
    stem = f'{{"entity":{{"reference":"Patient/{prefix}-'.encode()
    members = b",".join(stem + str(i).encode() + b'"}}' for i in range(size))
    return head + b',"member":[' + members + b"]}"


def patient_body(index: int, system: str = "urn:bench:mrn") -> bytes:
    """A plain Patient of the size clients typically send (identifier, name, contacts)."""
    return orjson.dumps(
        {
            "resourceType": "Patient",
            "identifier": [{"system": system, "value": f"mrn-{index}"}],
            "active": True,
            "name": [{"family": f"Family{index}", "given": ["Given", f"G{index % 97}"]}],
            "telecom": [{"system": "phone", "value": f"+1-555-{index % 10_000:04d}"}],
            "gender": "female" if index % 2 else "male",
            "birthDate": f"19{50 + index % 50}-0{1 + index % 9}-1{index % 10}",
            "address": [{"line": [f"{index} Main St"], "city": "Springfield", "country": "US"}],
        }
    )


def add_ops(refs: list[str]) -> bytes:
    """A JSON Patch adding each reference as a member."""
    return orjson.dumps(
        [{"op": "add", "path": "/member/-", "value": {"entity": {"reference": r}}} for r in refs]
    )


@dataclass
class Synthetic:
    """Member events written straight into ClickHouse for ``Group?member=``.

    Layout: ``patients`` patients and ``layers`` layers; each layer is ``groups_per_layer``
    Groups that split the patients between them, so every patient is in exactly one Group
    per layer, i.e. in ``layers_done`` Groups in all.
    """

    prefix: str
    patients: int
    groups_per_layer: int
    layers: int
    group_ids: list[list[str]] = field(default_factory=list)
    layers_done: int = 0
    rows: int = 0
    seconds: float = 0.0
    capped: bool = False

    @property
    def per_group(self) -> int:
        """Members of each synthetic Group."""
        return self.patients // self.groups_per_layer

    def ref(self, patient: int) -> str:
        """The reference of synthetic patient ``patient``."""
        return member_ref(self.prefix, patient)


def plan_synthetic(prefix: str, target_rows: int, existing_rows: int) -> Synthetic:
    """Enough layers of events that the reverse table reaches ``target_rows`` rows.

    A tenth of the target are patients (each ends up in ~10 Groups, as in a care network
    where a patient is in a handful of cohorts), split over 10 Groups per layer; at least
    one layer is written, at most ten.
    """
    patients = max(10, target_rows // 10)
    groups_per_layer = 10
    patients -= patients % groups_per_layer
    missing = max(target_rows - existing_rows, patients)
    layers = min(10, math.ceil(missing / patients))
    return Synthetic(prefix, patients, groups_per_layer, layers)


def create_synthetic_groups(plan: Synthetic, create_group: Callable[[bytes], str]) -> None:
    """Create the Groups of every planned layer through the API, with empty rosters.

    All before any event is written: with chdb the service stops while this process writes
    into ClickHouse. A layer the time cap leaves out keeps empty Groups, which no
    ``Group?member=`` answer names.
    """
    for layer in range(plan.layers):
        plan.group_ids.append(
            [
                create_group(group_body(f"synthetic {plan.prefix} layer {layer} group {index}"))
                for index in range(plan.groups_per_layer)
            ]
        )


def fill_synthetic(
    plan: Synthetic,
    *,
    insert_events: Callable[[list[tuple]], object],
    roster_key: Callable[[str, int], str],
    max_seconds: float,
) -> Synthetic:
    """Insert the events of each layer's Groups (``create_synthetic_groups`` made them).

    Events go through ``MemberEventRepository.insert_events`` in batches of 50,000 rows
    (EVENT_COLUMNS order): version 1 (the create), seq = position in the roster. Layers stop
    early once another layer would end after ``max_seconds``.
    """
    recorded = dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None)
    started = time.perf_counter()
    last_layer = 0.0
    for layer in range(plan.layers):
        elapsed = time.perf_counter() - started
        if layer and elapsed + last_layer > max_seconds:
            plan.capped = True
            break
        layer_start = time.perf_counter()
        for index, group_id in enumerate(plan.group_ids[layer]):
            key = roster_key(group_id, 1)
            first = index * plan.per_group
            batch: list[tuple] = []
            for seq in range(plan.per_group):
                batch.append(
                    (
                        key,
                        plan.ref(first + seq),
                        "Patient",
                        "added",
                        1,
                        seq,
                        "",
                        "",
                        0,
                        "",
                        recorded,
                        "bench",
                        "bench",
                        "",
                    )
                )
                if len(batch) == BATCH_ROWS:
                    insert_events(batch)
                    plan.rows += len(batch)
                    batch = []
            if batch:
                insert_events(batch)
                plan.rows += len(batch)
        plan.layers_done += 1
        last_layer = time.perf_counter() - layer_start
    plan.seconds = time.perf_counter() - started
    return plan

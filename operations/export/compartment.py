"""The R4 Patient compartment: which resources belong to a Patient, and their index.

Membership follows the official R4 Patient CompartmentDefinition (``hl7.fhir.r4.examples``
4.0.1, generated into ``fhirservice.fhir.definitions``): a resource of a listed type is in
Patient/x's compartment when one of the type's listed search parameters references
Patient/x. Each parameter's element paths come from its official SearchParameter expression.
:func:`patient_compartment` is the one lookup; :func:`patient_links` applies it to a body.

``Patient`` is in the definition through ``link`` (``Patient.link.other``): a Patient whose
``link`` names Patient/x (another record of the same person: ``replaces``, ``replaced-by``,
``refer``, ``seealso``) is in x's compartment, and is indexed like any other member of it;
the export writes such linked Patients beside the Patients it exports (not the resources of
their own compartments: membership is not transitive). ``Group`` is left out of the walk
(:data:`EXCLUDED_TYPES`): a roster is not a member's data, and rosters of millions are what
this service keeps outside the resource body.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from typing import Any

from fhirservice.fhir.definitions import compartments, search_parameters
from fhirservice.store.handlers import VersionWrite
from operations.export.models import CompartmentLink

EXCLUDED_TYPES = frozenset({"Group"})
PATH_RE = re.compile(r"[a-z][A-Za-z0-9]*(\.[a-z][A-Za-z0-9]*)*")
PATIENT_REF_RE = re.compile(r"(?:^|/)Patient/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")


@cache
def patient_compartment() -> dict[str, tuple[tuple[str, ...], ...]]:
    """Resource type → the element paths whose Patient references make a resource of that
    type a member of the Patient's compartment (``Observation`` → ``subject``,
    ``performer``; ``Patient`` → ``link.other``). Types in :data:`EXCLUDED_TYPES` are left
    out."""
    definitions = search_parameters()
    common = definitions.get("Resource", {})
    out: dict[str, tuple[tuple[str, ...], ...]] = {}
    for resource_type, names in compartments()["Patient"].items():
        if resource_type in EXCLUDED_TYPES:
            continue
        paths: set[tuple[str, ...]] = set()
        for name in names:
            definition = definitions.get(resource_type, {}).get(name) or common[name]
            for part in definition["parts"]:
                head, _, rest = part["expression"].partition(".")
                # Every Patient-compartment expression of R4 is a plain path (checked by
                # tests/operations/test_export_compartment.py); anything else would be skipped.
                if head == resource_type and PATH_RE.fullmatch(rest):
                    paths.add(tuple(rest.split(".")))
        out[resource_type] = tuple(sorted(paths))
    return out


def warm_up(**_: Any) -> None:
    """Build :func:`patient_compartment` before the first write needs it (~0.3 ms of the
    first write of a server process). A ``service_starting`` receiver."""
    patient_compartment()


def _walk(value: Any, path: tuple[str, ...]) -> Iterator[Any]:
    if isinstance(value, list):
        for item in value:
            yield from _walk(item, path)
    elif not path:
        yield value
    elif isinstance(value, dict) and path[0] in value:
        yield from _walk(value[path[0]], path[1:])


def patient_links(resource_type: str, body: dict[str, Any]) -> set[str]:
    """Ids of the Patients whose compartment a resource is in (empty: in none)."""
    found: set[str] = set()
    for path in patient_compartment().get(resource_type, ()):
        for reference in _walk(body, path):
            if isinstance(reference, dict) and isinstance(reference.get("reference"), str):
                match = PATIENT_REF_RE.search(reference["reference"])
                if match:
                    found.add(match.group(1))
    return found


def link_rows(key: str, resource_type: str, patients: set[str]) -> list[CompartmentLink]:
    """The index rows of one resource."""
    shared = len(patients) > 1
    return [
        CompartmentLink(
            key=f"{key}>{patient}",
            resource_key=key,
            resource_type=resource_type,
            patient_id=patient,
            shared=shared,
        )
        for patient in sorted(patients)
    ]


def on_resource_saved(sender: Any, write: VersionWrite, **kwargs: Any) -> None:
    """resource_saved receiver: keep a compartment type's index rows in step with the body,
    in the write's transaction. A delete keeps the last live version's rows."""
    if write.deleted or write.body is None or write.resource_type not in patient_compartment():
        return
    patients = patient_links(write.resource_type, write.body)
    if not patients and write.resource_type == "Patient" and not _had_links(write):
        return  # nearly every Patient write: no link before or now, so no index rows to read
    existing = set(
        CompartmentLink.objects.filter(resource_key=write.key).values_list("patient_id", flat=True)
    )
    if existing == patients:
        return
    # Rewritten whole: every row's shared flag depends on how many rows there are.
    CompartmentLink.objects.filter(resource_key=write.key).delete()
    CompartmentLink.objects.bulk_create(link_rows(write.key, write.resource_type, patients))


def _had_links(write: VersionWrite) -> bool:
    """Whether the version a Patient write replaces may have index rows: its body names
    ``link``, or it is a tombstone (a delete keeps the last live version's rows)."""
    previous = write.previous
    return previous is not None and (previous.deleted or '"link"' in previous.body)

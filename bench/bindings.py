"""Cost of the required-binding check per write (``fhirservice.fhir.bindings``).

    .venv/bin/python -m bench.bindings [--repeat N]

Times ``binding_issues`` and the whole ``validate_resource`` (with and without the check) on
a typical Patient and Observation, in this process (no server), and prints median and p90
in microseconds. The first call of a type compiles its table; that one-off cost is printed
separately.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "identifier": [{"use": "usual", "system": "urn:oid:1.2.36.146.595.217.0.1", "value": "123"}],
    "active": True,
    "name": [
        {"use": "official", "family": "Chalmers", "given": ["Peter", "James"]},
        {"use": "usual", "given": ["Jim"]},
    ],
    "telecom": [
        {"system": "phone", "value": "(03) 5555 6473", "use": "work", "rank": 1},
        {"system": "email", "value": "p@example.org", "use": "home"},
    ],
    "gender": "male",
    "birthDate": "1974-12-25",
    "address": [{"use": "home", "type": "both", "line": ["534 Erewhon St"], "city": "Pleasant"}],
    "contact": [
        {
            "relationship": [{"coding": [{"system": "urn:rel", "code": "N"}]}],
            "name": {"family": "du Marché", "given": ["Bénédicte"]},
            "telecom": [{"system": "phone", "value": "+33 (237) 998327"}],
            "gender": "female",
        }
    ],
    "managingOrganization": {"reference": "Organization/1"},
}

OBSERVATION: dict[str, Any] = {
    "resourceType": "Observation",
    "status": "final",
    "category": [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": "vital-signs",
                }
            ]
        }
    ],
    "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}], "text": "Weight"},
    "subject": {"reference": "Patient/example"},
    "effectiveDateTime": "2016-03-28",
    "valueQuantity": {
        "value": 67.5,
        "unit": "kg",
        "system": "http://unitsofmeasure.org",
        "code": "kg",
    },
}


def _time(work: Callable[[], Any], repeat: int) -> tuple[float, float]:
    """Median and p90 of ``repeat`` calls, in microseconds."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.9)]


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=5000)
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "fhirservice.settings")
    import django
    from django.test import override_settings

    django.setup()
    from fhirservice.fhir.bindings import binding_issues
    from fhirservice.fhir.validation import validate_resource

    print(f"{'resource':<12} {'measure':<34} {'median µs':>10} {'p90 µs':>10}")
    for resource in (PATIENT, OBSERVATION):
        name = resource["resourceType"]
        start = time.perf_counter()
        binding_issues(resource)
        first = (time.perf_counter() - start) * 1e6
        print(f"{name:<12} {'first call (compiles the table)':<34} {first:>10.0f}")
        rows: list[tuple[str, Callable[[], Any]]] = [
            ("binding_issues", lambda r=resource: binding_issues(r)),
            ("validate_resource (bindings on)", lambda r=resource: validate_resource(r)),
        ]
        for label, work in rows:
            median, p90 = _time(work, args.repeat)
            print(f"{name:<12} {label:<34} {median:>10.1f} {p90:>10.1f}")
        with override_settings(FHIR_SERVICE={"REQUIRED_BINDINGS": False}):
            median, p90 = _time(lambda r=resource: validate_resource(r), args.repeat)
        print(f"{name:<12} {'validate_resource (bindings off)':<34} {median:>10.1f} {p90:>10.1f}")


if __name__ == "__main__":
    main()

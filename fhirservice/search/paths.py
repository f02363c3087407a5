"""Plain FHIRPath member paths (``Observation.subject``, ``Patient.name.family``,
``Observation.value.ofType(Quantity)``) evaluated without the FHIRPath engine.

Most search parameter expressions are such paths; walking the JSON with the R4 model's
element types (the same tables ``fhirpathpy`` uses: ``path2Type``, ``choiceTypePaths``,
``pathsDefinedElsewhere``) gives what the engine gives, at a tenth of its cost, which keeps
extraction within its write budget. Anything else (``where``, ``|``, ``exists()``…) goes to
the engine (``fhirservice.search.extract``). tests/fhirservice/test_search_extract.py checks
the two agree on every HL7 R4 example.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from fhirpathpy.models import models as fhirpath_models

_MODEL = fhirpath_models["r4"]
_PATH_TYPES: dict[str, str] = _MODEL["path2Type"]
_CHOICES: dict[str, list[str]] = _MODEL["choiceTypePaths"]
_ELSEWHERE: dict[str, str] = _MODEL["pathsDefinedElsewhere"]
_PARENTS: dict[str, str] = _MODEL["type2Parent"]
_PRIMITIVES = {t for t in _PATH_TYPES.values() if t[:1].islower()}
_BACKBONE = {"BackboneElement", "Element"}
# Backbone elements (``Observation.component``) have no entry of their own, only children.
_PARENT_PATHS = {path.rsplit(".", 1)[0] for path in (*_PATH_TYPES, *_CHOICES)}
_PLAIN = re.compile(
    r"^(?:(?P<type>[A-Z][A-Za-z]*)\.)?(?P<steps>[a-z][A-Za-z0-9]*(?:\.[a-z][A-Za-z0-9]*)*)"
    r"(?:\.ofType\((?P<of>[A-Za-z]+)\))?$"
)


@dataclass(frozen=True, slots=True)
class Found:
    """One value a path selects: its type as the engine names it, its JSON, its model path."""

    path: str  # "CodeableConcept", "dateTime", "Observation.component" (backbone elements)
    data: Any
    model: str  # where a relative path continues from: a type or a backbone element's path


@dataclass(frozen=True, slots=True)
class Plan:
    """A plain path: the resource type it starts from (None: relative), steps, final type."""

    start: str | None
    steps: tuple[str, ...]
    of_type: str | None


@cache
def plan(expression: str) -> tuple[Plan, ...] | None:
    """The plans of a plain member path or a union (``a | b``) of them; None when the engine
    must evaluate it."""
    plans = []
    for branch in expression.split(" | "):
        branch = branch.strip()
        if branch.startswith("(") and branch.endswith(")"):
            branch = branch[1:-1].strip()
        match = _PLAIN.match(branch)
        if match is not None:
            steps = tuple(match.group("steps").split("."))
            plans.append(Plan(match.group("type"), steps, match.group("of")))
        elif re.fullmatch(r"[A-Z][A-Za-z]*", branch):
            plans.append(Plan(start=branch, steps=(), of_type=None))
        else:
            return None
    return tuple(plans)


def _engine_type(kind: str) -> str:
    lowered = kind[:1].lower() + kind[1:]
    return lowered if lowered in _PRIMITIVES else kind


def _is_a(kind: str, wanted: str) -> bool:
    wanted = _engine_type(wanted)
    if wanted in _PRIMITIVES:  # as the engine: canonical is not taken for uri
        return kind == wanted
    while kind:
        if kind == wanted:
            return True
        kind = _PARENTS.get(kind, "")
    return False


def _items(value: Any) -> list[Any]:
    if isinstance(value, list):
        return [v for v in value if v is not None]
    return [] if value is None else [value]


def walk(found: Found, plans: tuple[Plan, ...]) -> list[Found] | None:
    """What ``plans`` select from ``found`` (in order, as a union); None when the model does
    not know a step (the engine then decides)."""
    selected: list[Found] = []
    for plan_ in plans:
        walked = _walk(found, plan_)
        if walked is None:
            return None
        selected.extend(walked)
    return selected


def _walk(found: Found, plan_: Plan) -> list[Found] | None:
    if plan_.start is not None and plan_.start != found.model:
        return []
    current = [found]
    for step in plan_.steps:
        selected: list[Found] = []
        for item in current:
            data = item.data
            if not isinstance(data, dict):
                continue
            full = f"{item.model}.{step}"
            full = _ELSEWHERE.get(full, full)
            choices = _CHOICES.get(full)
            if choices:
                for choice in choices:
                    value = data.get(step + choice[:1].upper() + choice[1:])
                    kind = _engine_type(choice)
                    selected.extend(Found(kind, v, kind) for v in _items(value))
                continue
            kind = _PATH_TYPES.get(full)
            if kind is None and full not in _PARENT_PATHS:
                return None
            if kind is None or kind in _BACKBONE:
                selected.extend(Found(full, v, full) for v in _items(data.get(step)))
            else:
                selected.extend(Found(kind, v, kind) for v in _items(data.get(step)))
        current = selected
    if plan_.of_type is not None:
        current = [f for f in current if _is_a(f.path, plan_.of_type)]
    return current

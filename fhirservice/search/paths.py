"""FHIRPath member paths (``Observation.subject``, ``Patient.name.family``,
``Observation.value.ofType(Quantity).code``, ``Patient.telecom.where(system='email')``,
unions of them) evaluated without the FHIRPath engine.

Nearly all search parameter expressions are such paths (all but 3 of the 2,295 of R4's
resource types: ``Bundle.entry[0].resource`` twice and ``Patient.deceased.exists() and …``;
and all but MolecularSequence's two ``%resource`` composite components). Each is compiled
once per starting type into a walker: for every step, the JSON keys to read and
the type of what they hold, from the R4 model's element types (the tables ``fhirpathpy``
uses: ``path2Type``, ``choiceTypePaths``, ``pathsDefinedElsewhere``, ``type2Parent``).
Walking the JSON with it gives what the engine gives at a small fraction of its cost, which
keeps extraction within its write budget. Anything else (``exists()``, indexers, ``%``
variables) and any step the model does not know goes to the engine
(``fhirservice.search.extract``); tests/fhirservice/test_search_extract.py checks the two
agree on every HL7 R4 example.

A value found is a pair ``(type, json)``: its type as the engine names it (``HumanName``,
``dateTime``; a backbone element's path, ``Observation.component``), which is also where a
relative path continues from.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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
_START = re.compile(r"([A-Z][A-Za-z]*)(?=\.|$)")
_STEP = re.compile(
    r"ofType\((?P<of>[A-Za-z]+)\)"
    r"|where\((?P<field>[a-z][A-Za-z0-9]*)\s*=\s*'(?P<literal>[^'\\]*)'\)"
    r"|(?P<member>[a-z][A-Za-z0-9]*)(?![(\w])"
)

Value = tuple[str, Any]  # (type as the engine names it, JSON)
Walker = Callable[[Any], list[Value]]
Entries = tuple[tuple[str, str], ...]  # (JSON key, type) pairs of one element
# A parsed step: ("member", name), ("of", type) or ("where", (field, literal)).
Step = tuple[str, Any]


@cache
def walker(start: str, expression: str) -> Walker | None:
    """A function giving what ``expression`` selects from a value of type ``start`` (its
    JSON), in the engine's order; None when the engine must evaluate it."""
    branches = []
    for text in expression.split(" | "):
        parsed = _parse(text.strip())
        if parsed is None:
            return None
        branch_start, steps = parsed
        if branch_start is not None and branch_start != start:
            continue  # ``Observation.code`` selects nothing from a Condition
        compiled = _compile(start, steps)
        if compiled is None:
            return None
        branches.append(compiled)
    return _union(branches)


def _parse(text: str) -> tuple[str | None, list[Step]] | None:
    """The starting type (None: relative) and steps of one branch, None if not a path."""
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    start = None
    match = _START.match(text)
    if match:
        start, text = match.group(1), text[match.end() + 1 :]
    steps: list[Step] = []
    position = 0
    while position < len(text):
        step = _STEP.match(text, position)
        if step is None:
            return None
        if step.group("member"):
            steps.append(("member", step.group("member")))
        elif step.group("of"):
            steps.append(("of", step.group("of")))
        else:
            steps.append(("where", (step.group("field"), step.group("literal"))))
        position = step.end()
        if position < len(text):
            if text[position] != ".":
                return None
            position += 1
    if steps and steps[0][0] != "member":
        return None
    return start, steps


def _member(model: str, name: str) -> Entries | None:
    """The (JSON key, type) pairs element ``name`` of ``model`` is stored under (several
    for a choice element: ``effectiveDateTime``, ``effectivePeriod``…); None if unknown."""
    full = f"{model}.{name}"
    full = _ELSEWHERE.get(full, full)
    choices = _CHOICES.get(full)
    if choices:
        return tuple(
            (name + choice[:1].upper() + choice[1:], _engine_type(choice)) for choice in choices
        )
    kind = _PATH_TYPES.get(full)
    if kind is None and full not in _PARENT_PATHS:
        return None
    return ((name, full if kind is None or kind in _BACKBONE else kind),)


Operation = Callable[[list[Value]], list[Value]]


def _compile(start: str, steps: list[Step]) -> Walker | None:
    """The walker of one branch; the types each step can meet are known here, so each
    step's table is looked up once per value."""
    if not steps:
        return lambda data: [(start, data)]
    first = _member(start, steps[0][1])
    if first is None:
        return None
    models = {model for _, model in first}
    operations: list[Operation] = []
    for kind, argument in steps[1:]:
        if kind == "member":
            table = {}
            for model in models:
                found = _member(model, argument)
                if found is None:
                    return None
                table[model] = found
            operations.append(_member_operation(table))
            models = {model for found in table.values() for _, model in found}
        elif kind == "of":
            kept = frozenset(model for model in models if _is_a(model, argument))
            operations.append(_of_type_operation(kept))
            models = set(kept)
        else:
            field, literal = argument
            for model in models:
                found = _member(model, field)
                if found is None or len(found) != 1 or found[0][1] not in _PRIMITIVES:
                    return None
            operations.append(_where_operation(field, literal))
    if not operations:
        return lambda data: _select(first, data)

    def run(data: Any) -> list[Value]:
        values = _select(first, data)
        for operation in operations:
            if not values:
                break
            values = operation(values)
        return values

    return run


def _select(entries: Entries, data: Any) -> list[Value]:
    """The values of one element of ``data`` (a JSON object; anything else has none)."""
    selected: list[Value] = []
    if isinstance(data, dict):
        for key, kind in entries:
            value = data.get(key)
            if value is None:
                continue
            if isinstance(value, list):
                selected.extend([(kind, item) for item in value if item is not None])
            else:
                selected.append((kind, value))
    return selected


def _member_operation(table: dict[str, Entries]) -> Operation:
    def member(values: list[Value]) -> list[Value]:
        selected: list[Value] = []
        for model, data in values:
            selected.extend(_select(table[model], data))
        return selected

    return member


def _of_type_operation(kept: frozenset[str]) -> Operation:
    def of_type(values: list[Value]) -> list[Value]:
        return [value for value in values if value[0] in kept]

    return of_type


def _where_operation(field: str, literal: str) -> Operation:
    def where(values: list[Value]) -> list[Value]:
        return [
            value
            for value in values
            if isinstance(value[1], dict) and value[1].get(field) == literal
        ]

    return where


def _union(branches: list[Walker]) -> Walker:
    if len(branches) == 1:
        return branches[0]

    def walk(data: Any) -> list[Value]:
        selected: list[Value] = []
        for branch in branches:
            selected.extend(branch(data))
        return selected

    return walk


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

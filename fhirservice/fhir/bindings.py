"""Required value-set bindings of FHIR R4, checked on every write.

R4 binds some coded elements *required* (http://hl7.org/fhir/R4/terminologies.html#required):
"to be conformant, the concept in this element SHALL be from the specified value set".
``binding_issues`` reports every coded value of a resource that is not, as OperationOutcome
issues with code ``code-invalid``; ``fhirservice.fhir.validation.validate_resource`` calls it
after the structural walk, unless ``FHIR_SERVICE["REQUIRED_BINDINGS"]`` is off.

What is checked, per element kind:

- a primitive (``code``; also ``uri``/``string`` where R4 binds one): its value must be one of
  the value set's codes, in any of the set's systems;
- a ``CodeableConcept``: at least one of its codings must have a ``system`` and ``code`` pair
  of the value set. A concept with only ``text`` (or only extensions) carries no code from
  the set, so it is refused too: R4 allows text instead of a code for *extensible* bindings
  only. (R4 binds no element of type ``Coding`` required.)

The bindings and value sets come from the generated R4 definitions (``bindings()`` and
``value_sets()`` of ``fhirservice.fhir.definitions``). Four of the 224 value sets that
required bindings name cannot be enumerated from the R4 package (currencies, MIME types,
UCUM units, a LOINC answer list): elements bound to them are not checked.

The check walks the JSON along a per-type table compiled once from those definitions and from
the validator's element tables (which know each element's JSON name, type and the groups that
``contentReference`` reuses, such as ``Questionnaire.item.item``): only elements that hold a
bound code or can lead to one are visited. It descends into datatypes (``HumanName.use``,
``ContactPoint.system``, ``Extension.value[x]``), backbone elements, choice types and nested
resources (``contained``, ``Bundle.entry.resource``, ``Parameters.parameter.resource``).
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

# validation imports this module too: names of it are looked up when used, not imported.
from fhirservice.fhir import validation
from fhirservice.fhir.definitions import bindings, value_sets
from fhirservice.fhir.resource_types import R4_RESOURCE_TYPES

__all__ = [
    "MSG_CODE_NOT_IN_VALUE_SET",
    "MSG_CODING_NOT_IN_VALUE_SET",
    "MSG_NO_CODING",
    "binding_issues",
    "warm_up",
]

# Diagnostics, after "<expression>: ".
MSG_CODE_NOT_IN_VALUE_SET = "the code {value} is not in the required value set {value_set}"
MSG_CODING_NOT_IN_VALUE_SET = "no coding is from the required value set {value_set} (found {found})"
MSG_NO_CODING = "a code from the required value set {value_set} is needed, but there is no coding"

# How an element's value is checked against its value set.
_CODE, _CONCEPT = 0, 1
_NESTED_RESOURCE = object()  # the child of an element that holds a resource


class _Check:
    """A required binding of one element: the kind of value and what the set allows."""

    __slots__ = ("allowed", "kind", "value_set")

    def __init__(self, kind: int, value_set: str, allowed: frozenset[Any]) -> None:
        self.kind = kind
        self.value_set = value_set
        self.allowed = allowed  # codes (_CODE) or (system, code) pairs (_CONCEPT)


class _Node:
    """The compiled table of a structure: JSON key → (binding check, child node)."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: dict[str, tuple[_Check | None, Any]] = {}


@cache
def _codes(url: str) -> frozenset[str] | None:
    """The codes of a value set in all its systems, or None if it cannot be enumerated."""
    systems = value_sets().get(url)
    if systems is None:
        return None
    return frozenset(code for codes in systems.values() for code in codes)


@cache
def _pairs(url: str) -> frozenset[tuple[str, str]] | None:
    """The (system, code) pairs of a value set, or None if it cannot be enumerated."""
    systems = value_sets().get(url)
    if systems is None:
        return None
    return frozenset((system, code) for system, codes in systems.items() for code in codes)


def _check_for(type_code: str, url: str) -> _Check | None:
    """The check of an element of ``type_code`` bound to ``url``; None when not checkable."""
    if type_code == "CodeableConcept":
        pairs = _pairs(url)
        return None if pairs is None else _Check(_CONCEPT, url, pairs)
    if type_code[:1].isupper():
        return None  # R4 binds no other complex type required to an enumerable value set
    codes = _codes(url)
    return None if codes is None else _Check(_CODE, url, codes)


class _Compiler:
    """Builds the nodes of all types once; nodes refer to each other (recursion included)."""

    def __init__(self) -> None:
        self.by_type: dict[str, _Node] = {}
        self.by_group: dict[tuple[str, int], _Node] = {}

    def type_node(self, type_name: str) -> _Node:
        """The node of a resource type or complex datatype."""
        node = self.by_type.get(type_name)
        if node is None:
            node = self.by_type[type_name] = _Node()
            structure = validation.structure_of_type(type_name)
            self._fill(node, type_name, structure, "", self._group_paths(type_name, structure))
        return node

    @staticmethod
    def _group_paths(type_name: str, root: validation.Structure) -> dict[int, str]:
        """Each backbone group's table (by identity) → its path in the R4 definition.

        A group reused by ``contentReference`` (``Questionnaire.item.item``) is one table
        reached from two paths; the definitions key its bindings by the defining path only.
        """
        entry = bindings().get(type_name, {})
        defining: set[str] = set()
        for path in (*entry.get("required", ()), *entry.get("types", ())):
            parts = path.split(".")
            defining.update(".".join(parts[:i]) for i in range(1, len(parts)))
        found: dict[int, str] = {}
        for path in sorted(defining, key=lambda p: p.count(".")):
            structure: validation.Structure | None = root
            for name in path.split("."):
                element = structure.elements.get(name) if structure is not None else None
                structure = element.structure() if element is not None else None
            if structure is not None:
                found.setdefault(id(structure), path)
        return found

    def _fill(
        self,
        node: _Node,
        type_name: str,
        structure: validation.Structure,
        prefix: str,
        group_paths: dict[int, str],
    ) -> None:
        required = bindings().get(type_name, {}).get("required", {})
        for element in structure.elements.values():
            name = f"{element.choice}[x]" if element.choice is not None else element.name
            path = f"{prefix}.{name}" if prefix else name
            url = required.get(path)
            check = _check_for(element.type, url) if url else None
            child: Any = None
            if element.kind == validation.RESOURCE:
                child = _NESTED_RESOURCE
            elif element.kind == validation.COMPLEX:
                if element.type in ("BackboneElement", "Element"):
                    target = element.structure()
                    key = (type_name, id(target))
                    child = self.by_group.get(key)
                    if child is None:
                        child = self.by_group[key] = _Node()
                        self._fill(
                            child, type_name, target, group_paths.get(id(target), path), group_paths
                        )
                else:
                    child = self.type_node(element.type)
            if check is not None or child is not None:
                node.entries[element.name] = (check, child)


@cache
def _compiler() -> _Compiler:
    return _Compiler()


# Nodes are registered before they are filled (types refer to themselves), so a walk must
# not start from a node another thread is still compiling: roots are published here only
# once complete, and compiling holds a lock.
_COMPILED: dict[str, _Node] = {}
_COMPILING = threading.Lock()


def warm_up(**_: Any) -> None:
    """Compile the tables of all datatypes (``Extension.value[x]`` reaches every one).

    That is ~0.7 s, which the first write of a server process would pay otherwise; each
    resource type's own table is still built on its first write, next to the validator's
    table of that type. A ``service_starting`` receiver (``fhirservice.serving``).
    """
    _resource_node("Extension")


def _resource_node(type_name: str) -> _Node:
    """The complete node of a resource type or datatype (compiled on first use)."""
    node = _COMPILED.get(type_name)
    if node is None:
        with _COMPILING:
            node = _COMPILED[type_name] = _compiler().type_node(type_name)
    return node


class _Found(Exception):
    """Raised when the issue limit is reached."""


def _issue(path: Any, message: str) -> dict[str, Any]:
    expression = validation.render_path(path)
    return {
        "severity": "error",
        "code": "code-invalid",
        "diagnostics": f"{expression}: {message}",
        "expression": [expression],
    }


def _coding_text(coding: Any) -> str:
    if type(coding) is not dict:
        return repr(coding)
    return f"{coding.get('system', '(no system)')}|{coding.get('code', '(no code)')}"


def _check_value(value: Any, check: _Check, path: Any, out: list[dict[str, Any]]) -> None:
    """Check one value of a bound element."""
    if check.kind == _CODE:
        if type(value) is str and value not in check.allowed:
            out.append(
                _issue(
                    path,
                    MSG_CODE_NOT_IN_VALUE_SET.format(value=repr(value), value_set=check.value_set),
                )
            )
        return
    if type(value) is not dict:
        return
    codings = value.get("coding")
    if type(codings) is not list or not codings:
        out.append(_issue(path, MSG_NO_CODING.format(value_set=check.value_set)))
        return
    for coding in codings:
        if type(coding) is dict and (coding.get("system"), coding.get("code")) in check.allowed:
            return
    found = ", ".join(_coding_text(coding) for coding in codings[:5])
    out.append(
        _issue(path, MSG_CODING_NOT_IN_VALUE_SET.format(value_set=check.value_set, found=found))
    )


def _walk(
    obj: dict[str, Any],
    node: _Node,
    path: Any,
    out: list[dict[str, Any]],
    limit: int,
    skip: frozenset[str] = frozenset(),
) -> None:
    """Check the bound elements of one JSON object and of everything below it."""
    entries = node.entries
    for key, value in obj.items():
        entry = entries.get(key)
        if entry is None or key in skip:
            continue
        check, child = entry
        items = enumerate(value) if type(value) is list else ((None, value),)
        for index, item in items:
            if item is None:
                continue  # an array slot held by the _key sibling (extensions only)
            item_path = (path, key) if index is None else (path, key, index)
            if check is not None:
                _check_value(item, check, item_path, out)
                if len(out) >= limit:
                    raise _Found
            if type(item) is not dict:
                continue
            if child is _NESTED_RESOURCE:
                resource_type = item.get("resourceType")
                if resource_type in R4_RESOURCE_TYPES:
                    _walk(item, _resource_node(resource_type), item_path, out, limit)
            elif child is not None:
                _walk(item, child, item_path, out, limit)


def binding_issues(
    body: dict[str, Any], *, skip_elements: frozenset[str] = frozenset(), limit: int = 20
) -> list[dict[str, Any]]:
    """The required-binding violations of a structurally valid resource (at most ``limit``).

    Each is an OperationOutcome issue: code ``code-invalid``, the element's FHIRPath-like
    ``expression`` with indexes (``Patient.contact[0].gender``) and a diagnostics sentence
    naming the value and the value set. ``skip_elements`` names top-level elements that
    are not checked (the Group roster, validated on its own path). An empty list: no
    violation.
    """
    resource_type = body.get("resourceType")
    if resource_type not in R4_RESOURCE_TYPES:
        return []
    out: list[dict[str, Any]] = []
    try:
        _walk(body, _resource_node(resource_type), resource_type, out, limit, skip_elements)
    except _Found:
        pass
    return out

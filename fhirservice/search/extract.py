"""Index extraction: the search values of a resource, as SearchToken rows.

Each supported search parameter is one row of ``PARAMS``: its type and the elements it reads.
Adding a parameter is adding a row here and in the CapabilityStatement (which is built from
this table).

String values are indexed twice in one row: ``value`` holds the normalised form that plain
string search matches, ``system`` (which strings have no use for) the text as written, which
``:exact`` must match case and accents included.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fhirservice.models import SearchToken
from fhirservice.search.values import MAX_VALUE, date_range, normalize_string


@dataclass(frozen=True)
class Param:
    """A search parameter: name, FHIR type, the elements it reads, its definition URL."""

    name: str
    type: str  # string | token | uri | date | reference
    paths: tuple[str, ...]
    documentation: str


def _r(name: str, type_: str, paths: tuple[str, ...], doc: str) -> Param:
    return Param(name, type_, paths, doc)


PARAMS: dict[str, dict[str, Param]] = {
    "Patient": {
        p.name: p
        for p in (
            _r("identifier", "token", ("identifier",), "A patient identifier"),
            _r(
                "name",
                "string",
                ("name",),
                "Any part of a name (family, given, prefix, suffix, text)",
            ),
            _r("family", "string", ("name.family",), "A family name"),
            _r("given", "string", ("name.given",), "A given name"),
            _r("birthdate", "date", ("birthDate",), "The date of birth"),
            _r("gender", "token", ("gender",), "Administrative gender"),
        )
    },
    "Group": {
        p.name: p
        for p in (
            _r("identifier", "token", ("identifier",), "A group identifier"),
            _r("name", "string", ("name",), "The group's name"),
            _r("type", "token", ("type",), "The kind of members"),
            _r("actual", "token", ("actual",), "Descriptive or actual"),
            _r("code", "token", ("code",), "The kind of group"),
            _r("managing-entity", "reference", ("managingEntity",), "Who manages the group"),
        )
    },
    # Stored definitions; the built-in ones (fhirservice.rest.operations) match the same way.
    "OperationDefinition": {
        p.name: p
        for p in (
            _r("url", "uri", ("url",), "The canonical URL of the definition"),
            _r("code", "token", ("code",), "The name used to invoke the operation"),
            _r("name", "string", ("name",), "The computer-friendly name of the definition"),
        )
    },
}


def _walk(value: Any, path: list[str]) -> Iterator[Any]:
    if not path:
        if isinstance(value, list):
            yield from value
        elif value is not None:
            yield value
        return
    if isinstance(value, list):
        for item in value:
            yield from _walk(item, path)
    elif isinstance(value, dict):
        yield from _walk(value.get(path[0]), path[1:])


def _string_values(value: Any, whole_name: bool) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict) and whole_name:
        for part in ("text", "family"):
            if isinstance(value.get(part), str):
                yield value[part]
        for part in ("given", "prefix", "suffix"):
            for item in value.get(part) or []:
                if isinstance(item, str):
                    yield item


def _token_values(value: Any) -> Iterator[tuple[str, str]]:
    if isinstance(value, bool):
        yield "", "true" if value else "false"
    elif isinstance(value, str):
        yield "", value
    elif isinstance(value, dict):
        if "coding" in value or "text" in value:
            for coding in value.get("coding") or []:
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    yield coding.get("system") or "", coding["code"]
        elif isinstance(value.get("value"), str):
            yield value.get("system") or "", value["value"]
        elif isinstance(value.get("code"), str):
            yield value.get("system") or "", value["code"]


def extract_tokens(resource_key: str, body: dict[str, Any]) -> list[SearchToken]:
    """The SearchToken rows of one resource version."""
    resource_type = body["resourceType"]
    rows: list[SearchToken] = []

    def add(param: str, *, system: str = "", value: str = "", low=None, high=None) -> None:
        rows.append(
            SearchToken(
                key=f"{resource_key}#{len(rows)}",
                resource_key=resource_key,
                resource_type=resource_type,
                param=param,
                system=system[:MAX_VALUE],
                value=value[:MAX_VALUE],
                low=low,
                high=high,
            )
        )

    for param in PARAMS.get(resource_type, {}).values():
        for path in param.paths:
            for value in _walk(body, path.split(".")):
                if param.type == "string":
                    for text in _string_values(
                        value, whole_name=param.name == "name" and resource_type == "Patient"
                    ):
                        add(param.name, system=text, value=normalize_string(text))
                elif param.type == "token":
                    for system, code in _token_values(value):
                        add(param.name, system=system, value=code)
                elif param.type == "uri" and isinstance(value, str):
                    add(param.name, value=value)
                elif param.type == "date" and isinstance(value, str):
                    covered = date_range(value)
                    if covered:
                        add(param.name, low=covered[0], high=covered[1])
                elif param.type == "reference" and isinstance(value, dict):
                    reference = value.get("reference")
                    if isinstance(reference, str):
                        add(param.name, value=reference)
    return rows

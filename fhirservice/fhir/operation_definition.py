"""OperationDefinitions as data: what each $operation accepts and returns.

An app's operation declares one :class:`OperationDef` and registers it
(``fhirservice.plugins.register_operation``); the same object checks incoming Parameters
(``fhirservice.rest.parameters``), is served as an OperationDefinition resource, and is listed
in the CapabilityStatement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CANONICAL_BASE = "urn:fhirservice:OperationDefinition"

PRIMITIVE_TYPES = {"string", "code", "integer", "boolean", "uri", "id", "dateTime"}
COMPLEX_TYPES = {"Identifier", "Reference", "Period"}


@dataclass(frozen=True)
class ParamDef:
    """One parameter of an operation (in or out)."""

    name: str
    use: str  # "in" | "out"
    min: int
    max: str  # "1" | "*" | a number
    type: str
    documentation: str
    target: tuple[str, ...] = ()

    @property
    def max_count(self) -> int | None:
        """The upper bound as a number (None: unbounded)."""
        return None if self.max == "*" else int(self.max)

    @property
    def is_resource(self) -> bool:
        """Whether the value is a whole resource (``Parameters.parameter.resource``)."""
        return self.type not in PRIMITIVE_TYPES and self.type not in COMPLEX_TYPES

    def to_json(self) -> dict[str, Any]:
        """The OperationDefinition.parameter element."""
        out: dict[str, Any] = {
            "name": self.name,
            "use": self.use,
            "min": self.min,
            "max": self.max,
            "documentation": self.documentation,
            "type": self.type,
        }
        if self.target:
            out["targetProfile"] = [
                f"http://hl7.org/fhir/StructureDefinition/{t}" for t in self.target
            ]
        return out


@dataclass(frozen=True)
class OperationDef:
    """An operation: where it applies, whether it changes state, its parameters."""

    code: str
    resource: str | None  # None: system level
    title: str
    description: str
    affects_state: bool
    system: bool = False
    type: bool = False
    instance: bool = False
    parameters: tuple[ParamDef, ...] = field(default_factory=tuple)
    # A published definition's canonical URL (the Bulk Data IG's $export); "" for our own.
    canonical: str = ""

    @property
    def id(self) -> str:
        """Resource id of the served OperationDefinition, e.g. ``Group-add-member``."""
        return f"{self.resource or 'System'}-{self.code}"

    @property
    def url(self) -> str:
        """Canonical URL of the definition."""
        return self.canonical or f"{CANONICAL_BASE}:{self.id}"

    def inputs(self) -> dict[str, ParamDef]:
        """Input parameters by name."""
        return {p.name: p for p in self.parameters if p.use == "in"}

    @property
    def get_allowed(self) -> bool:
        """GET is allowed for operations without side effects and primitive inputs only."""
        return not self.affects_state and all(
            p.type in PRIMITIVE_TYPES for p in self.inputs().values()
        )

    def to_resource(self) -> dict[str, Any]:
        """The OperationDefinition resource."""
        body: dict[str, Any] = {
            "resourceType": "OperationDefinition",
            "id": self.id,
            "url": self.url,
            "name": self.title.replace(" ", "").replace("-", ""),
            "title": self.title,
            "status": "active",
            "kind": "operation",
            "affectsState": self.affects_state,
            "description": self.description,
            "code": self.code,
            "system": self.system,
            "type": self.type,
            "instance": self.instance,
            "parameter": [p.to_json() for p in self.parameters],
        }
        if self.resource:
            body["resource"] = [self.resource]
        return body

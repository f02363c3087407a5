"""The CapabilityStatement: built from what is registered, so it lists exactly what works."""

from __future__ import annotations

from typing import Any

from fhirservice.access.audit import capability_entry
from fhirservice.access.smart import token_url
from fhirservice.conf import fhir_settings
from fhirservice.fhir.resource_types import R4_RESOURCE_TYPES
from fhirservice.plugins import operation_definitions, search_params
from fhirservice.search.extract import COLUMN_PARAMS, UNSUPPORTED_PARAMS
from fhirservice.search.extract import search_params as definition_params
from fhirservice.search.include import search_includes, search_revincludes
from fhirservice.search.system import common_params

INTERACTIONS = [
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
]
# R4 has no element for conditional patch (R5 added ``conditionalPatch``); the R5 element
# travels as its cross-version extension.
CONDITIONAL_PATCH = {
    "url": "http://hl7.org/fhir/5.0/StructureDefinition/"
    "extension-CapabilityStatement.rest.resource.conditionalPatch",
    "valueBoolean": True,
}
COMMON_SEARCH = [
    {
        "name": "_id",
        "type": "token",
        "definition": "http://hl7.org/fhir/SearchParameter/Resource-id",
    },
    {
        "name": "_lastUpdated",
        "type": "date",
        "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
    },
]


def _search_params(resource_type: str) -> list[dict[str, Any]]:
    """Every parameter search answers for the type: ``_id`` and ``_lastUpdated`` first, then
    the official definitions' (less the ones answered 400 not-supported), then the apps'."""
    params = list(COMMON_SEARCH)
    custom = {p.name: p for p in search_params(resource_type)}
    for param in definition_params(resource_type).values():
        if (
            param.name in COLUMN_PARAMS
            or param.name in UNSUPPORTED_PARAMS
            or param.name in custom
            or param.type == "special"
        ):
            continue
        params.append({"name": param.name, "type": param.type, "definition": param.url})
    for extra in custom.values():
        params.append(
            {
                "name": extra.name,
                "type": "reference",
                "documentation": extra.documentation,
                "definition": f"http://hl7.org/fhir/SearchParameter/{resource_type}-{extra.name}",
            }
        )
    return params


def _security(base: str) -> dict[str, Any]:
    """SMART backend services: where to get a client-credentials token."""
    root = base[: -len(fhir_settings.BASE_PATH)].rstrip("/")
    return {
        "service": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                        "code": "SMART-on-FHIR",
                    }
                ]
            }
        ],
        "description": "OAuth2 client-credentials bearer tokens with SMART v2 system scopes "
        "(system/Type.cruds, system/Type.$operation); each client sees its organization's data.",
        "extension": [
            {
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": [{"url": "token", "valueUri": token_url(root)}],
            }
        ],
    }


def capability_statement(base: str, date: str) -> dict[str, Any]:
    """The server's CapabilityStatement (kind instance, FHIR 4.0.1)."""
    definitions = operation_definitions()
    resources = []
    for resource_type in sorted(R4_RESOURCE_TYPES):
        if resource_type == "AuditEvent":
            resources.append(capability_entry())  # the read-only audit trail
            continue
        entry: dict[str, Any] = {
            "type": resource_type,
            "extension": [CONDITIONAL_PATCH],
            "interaction": [{"code": code} for code in INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": fhir_settings.UPDATE_CREATE,
            "conditionalCreate": True,
            "conditionalUpdate": True,
            "conditionalDelete": fhir_settings.CONDITIONAL_DELETE,
            "searchInclude": search_includes(resource_type),
            "searchParam": _search_params(resource_type),
        }
        if revincludes := search_revincludes(resource_type):
            entry["searchRevInclude"] = revincludes
        operations = [
            {"name": definition.code, "definition": definition.url}
            for definition in definitions
            if definition.resource == resource_type
        ]
        if operations:
            entry["operation"] = operations
        resources.append(entry)
    rest: dict[str, Any] = {
        "mode": "server",
        "resource": resources,
        "interaction": [
            {"code": "transaction"},
            {"code": "batch"},
            {"code": "search-system"},
            {"code": "history-system"},
        ],
        # Without _type a system search takes the common parameters of Resource (with
        # _type, those every listed type defines: fhirservice.search.system).
        "searchParam": [
            {"name": name, "definition": param.url, "type": param.type}
            for name, param in definition_params("Resource").items()
            if name in common_params()
        ],
    }
    system_ops = [
        {"name": definition.code, "definition": definition.url}
        for definition in definitions
        if definition.resource is None
    ]
    if system_ops:
        rest["operation"] = system_ops
    if fhir_settings.AUTH:
        rest["security"] = _security(base)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "fhirservice",
        "kind": "instance",
        "software": {"name": "fhirservice", "version": "0.1.0"},
        "implementation": {"description": "FHIR R4 data service", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json", "application/fhir+xml", "xml"],
        "patchFormat": ["application/json-patch+json"],
        "rest": [rest],
    }

"""App config of the Operation API: lists every operation in the CapabilityStatement."""

from django.apps import AppConfig


class OperationsConfig(AppConfig):
    """Business $operations (OperationDefinition registry, Parameters, transactions)."""

    name = "operations"
    verbose_name = "FHIR operations"

    def ready(self) -> None:
        """Register each operation's definition with the CapabilityStatement."""
        from fhirservice.capability import register_operation
        from operations.registry import DEFINITIONS

        for definition in DEFINITIONS.values():
            register_operation(definition.resource, definition.code, definition.url)

"""App config of the Operation API: registers every operation with the core."""

from django.apps import AppConfig


class OperationsConfig(AppConfig):
    """Business $operations (definitions and handlers, Patient matching, regions)."""

    name = "operations"
    verbose_name = "FHIR operations"

    def ready(self) -> None:
        """Register each operation (definition and handler) with the core's plug-in registry."""
        # Imported here, not at the top: the operation modules import models, which Django
        # loads only after every app's config (importing them earlier raises
        # AppRegistryNotReady).
        from operations.registry import register

        register()

"""App config of the shared FHIR core: validates settings and registers system checks."""

from django.apps import AppConfig


class FhirServiceConfig(AppConfig):
    """The FHIR core: resource store, REST plumbing, errors, CapabilityStatement."""

    name = "fhirservice"
    verbose_name = "FHIR resources"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Register system checks and fail fast on bad FHIR_SERVICE values."""
        from fhirservice import checks  # noqa: F401  (registers the system checks)
        from fhirservice.conf import fhir_settings

        fhir_settings.validate_all()

"""App config of the Operation API."""

from django.apps import AppConfig


class OperationsConfig(AppConfig):
    """Business $operations (OperationDefinition registry, Parameters, transactions)."""

    name = "operations"
    verbose_name = "FHIR operations"

"""Django app of access control: OAuth2 client profiles, the token endpoint's policies."""

from django.apps import AppConfig


class AccessConfig(AppConfig):
    """Access control: client profiles and the create_fhir_client command."""

    name = "fhirservice.access"
    label = "fhir_access"
    verbose_name = "Access control"

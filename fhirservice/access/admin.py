"""Admin of FHIR clients: the organization and scope allowance of each OAuth2 Application."""

from __future__ import annotations

from django.contrib import admin

from fhirservice.access.models import ClientProfile


@admin.register(ClientProfile)
class ClientProfileAdmin(admin.ModelAdmin):
    """FHIR clients; create new ones with ``manage.py create_fhir_client``."""

    list_display = ("application", "client_id", "organization", "all_organizations", "scopes")
    list_filter = ("all_organizations", "organization")
    search_fields = ("application__name", "application__client_id", "organization")
    raw_id_fields = ("application",)

    @admin.display(description="client id")
    def client_id(self, obj: ClientProfile) -> str:
        """The OAuth2 client id."""
        return obj.application.client_id

    @admin.display(description="allowed scopes")
    def scopes(self, obj: ClientProfile) -> str:
        """The scope allowance."""
        return obj.allowed_scopes

"""Admin of FHIR clients: the organization, scope allowance and key set of each Application."""

from __future__ import annotations

from django.contrib import admin
from django.db import models

from fhirservice.access.models import ClientProfile


@admin.register(ClientProfile)
class ClientProfileAdmin(admin.ModelAdmin):
    """FHIR clients; create new ones with ``manage.py create_fhir_client``.

    A JWK Set or JWKS URL entered here makes the client a SMART Backend Services client
    (``private_key_jwt``): from then on its secret is refused. Both are checked on save
    (``ClientProfile.clean``).
    """

    list_display = (
        "application",
        "client_id",
        "organization",
        "all_organizations",
        "scopes",
        "authentication",
    )
    list_filter = ("all_organizations", "organization")
    search_fields = ("application__name", "application__client_id", "organization")
    raw_id_fields = ("application",)
    # A JWKS URL typed without a scheme is an https one (and Django 6's default).
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    fieldsets = (
        (None, {"fields": ("application", "organization", "all_organizations")}),
        ("Scopes", {"fields": ("allowed_scopes",)}),
        (
            "SMART Backend Services keys (private_key_jwt)",
            {"fields": ("jwks", "jwks_url"), "description": "One of the two, or neither."},
        ),
    )

    @admin.display(description="client id")
    def client_id(self, obj: ClientProfile) -> str:
        """The OAuth2 client id."""
        return obj.application.client_id

    @admin.display(description="allowed scopes")
    def scopes(self, obj: ClientProfile) -> str:
        """The scope allowance."""
        return obj.allowed_scopes

    @admin.display(description="authentication")
    def authentication(self, obj: ClientProfile) -> str:
        """client_secret, or private_key_jwt for a client with a key set."""
        return obj.authentication

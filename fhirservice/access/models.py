"""The FHIR side of an OAuth2 client: its organization and the scopes it may be given.

django-oauth-toolkit's ``Application`` is the OAuth2 client (id, hashed secret, grant type);
a :class:`ClientProfile` says which organization's data boundary it works in and which SMART
system scopes its tokens may carry. An Application without a profile is not a FHIR client:
its tokens answer 401.
"""

from __future__ import annotations

from django.core.validators import RegexValidator
from django.db import models
from oauth2_provider.settings import oauth2_settings

ORGANIZATION_RE = r"[A-Za-z0-9\-_.]{1,64}"


class ClientProfile(models.Model):
    """One FHIR client: an OAuth2 Application bound to an organization and a scope allowance."""

    application = models.OneToOneField(
        oauth2_settings.APPLICATION_MODEL,
        on_delete=models.CASCADE,
        related_name="fhir_profile",
    )
    organization = models.CharField(
        max_length=64,
        blank=True,
        default="",
        validators=[RegexValidator(rf"^{ORGANIZATION_RE}$")],
        help_text="The data boundary: the client sees and changes this organization's data "
        "(and shared data). Blank only for cross-organization operator clients.",
    )
    all_organizations = models.BooleanField(
        default=False,
        help_text="An operator client without a boundary: sees every organization's data.",
    )
    allowed_scopes = models.TextField(
        help_text="Space-separated SMART system scopes its tokens may carry, e.g. "
        "'system/Group.rs system/Patient.r'."
    )

    class Meta:
        verbose_name = "FHIR client"

    def __str__(self) -> str:
        scope = "all organizations" if self.all_organizations else self.organization
        return f"{self.application} ({scope})"

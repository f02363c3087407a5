"""The FHIR side of an OAuth2 client: its organization and the scopes it may be given.

django-oauth-toolkit's ``Application`` is the OAuth2 client (id, hashed secret, grant type);
a :class:`ClientProfile` says which organization's data boundary it works in and which SMART
system scopes its tokens may carry. An Application without a profile is not a FHIR client:
its tokens answer 401.

A profile with a JWK Set (inline ``jwks`` or ``jwks_url``) is a SMART Backend Services
client: it authenticates at the token endpoint with a signed assertion (``private_key_jwt``)
and never with its secret. :class:`AssertionJti` remembers the ``jti`` of every accepted
assertion until it expires, so that an assertion is used once (in the metadata store, so the
refusal holds across worker processes).
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from oauth2_provider.settings import oauth2_settings

from fhirservice.access.jwks import JwksError, check_jwks_url, parse_jwks

ORGANIZATION_RE = r"[A-Za-z0-9\-_.]{1,64}"
MSG_BOTH_KEY_SOURCES = "Register a JWK Set or a JWKS URL, not both"


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
    jwks = models.TextField(
        blank=True,
        default="",
        help_text="SMART Backend Services: the client's public keys as a JWK Set (JSON). "
        "With a key set the client authenticates with a signed assertion, never its secret.",
    )
    jwks_url = models.URLField(
        max_length=500,
        blank=True,
        default="",
        help_text="SMART Backend Services: where the client publishes its JWK Set (https; "
        "fetched when needed and cached). Instead of an inline JWK Set.",
    )

    class Meta:
        verbose_name = "FHIR client"

    def __str__(self) -> str:
        scope = "all organizations" if self.all_organizations else self.organization
        return f"{self.application} ({scope})"

    @property
    def uses_keys(self) -> bool:
        """Whether the client authenticates with ``private_key_jwt`` (it has a key set)."""
        return bool(self.jwks or self.jwks_url)

    @property
    def authentication(self) -> str:
        """The token endpoint authentication method the client uses."""
        return "private_key_jwt" if self.uses_keys else "client_secret"

    def clean(self) -> None:
        """At most one of ``jwks`` and ``jwks_url``, and that one usable."""
        if self.jwks and self.jwks_url:
            raise ValidationError(MSG_BOTH_KEY_SOURCES)
        try:
            if self.jwks:
                parse_jwks(self.jwks)
            if self.jwks_url:
                check_jwks_url(self.jwks_url)
        except JwksError as exc:
            raise ValidationError({"jwks_url" if self.jwks_url else "jwks": str(exc)}) from exc


class AssertionJti(models.Model):
    """The ``jti`` of an accepted client assertion, kept until the assertion expires.

    The key is a hash of client id and jti: its uniqueness is what refuses a replay, on every
    backend, without a unique index on arbitrary-length strings.
    """

    key = models.CharField(primary_key=True, max_length=64, help_text="sha256(client_id, jti)")
    client_id = models.CharField(max_length=100)
    expires = models.DateTimeField(db_index=True)

    class Meta:
        verbose_name = "client assertion id"

    def __str__(self) -> str:
        return f"{self.client_id} until {self.expires:%Y-%m-%dT%H:%M:%SZ}"

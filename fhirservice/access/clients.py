"""Registering FHIR clients: an OAuth2 Application and its ClientProfile, in one transaction."""

from __future__ import annotations

import secrets

from django.db import transaction
from oauth2_provider.models import get_application_model

from fhirservice.access.models import ClientProfile


def fhir_client_create(
    *,
    name: str,
    organization: str,
    all_organizations: bool,
    scopes: list[str],
    jwks: str = "",
    jwks_url: str = "",
) -> tuple[str, str]:
    """Create a confidential client-credentials client; its (client_id, secret).

    The secret is returned once: only its hash is stored. A client registered with a key set
    (``jwks``, a JWK Set document, or ``jwks_url``) authenticates with signed assertions
    only: it gets an unusable random secret and "" is returned in its place. Input is checked
    by the caller (``manage.py create_fhir_client`` says what is wrong with it).
    """
    application_model = get_application_model()
    secret = secrets.token_urlsafe(32)
    with transaction.atomic():
        application = application_model(
            name=name,
            client_type=application_model.CLIENT_CONFIDENTIAL,
            authorization_grant_type=application_model.GRANT_CLIENT_CREDENTIALS,
            client_secret=secret,
            hash_client_secret=True,
        )
        application.save()
        ClientProfile.objects.create(
            application=application,
            organization=organization,
            all_organizations=all_organizations,
            allowed_scopes=" ".join(scopes),
            jwks=jwks,
            jwks_url=jwks_url,
        )
    return application.client_id, "" if jwks or jwks_url else secret

"""``manage.py create_fhir_client``: register an OAuth2 client of one organization.

Creates a django-oauth-toolkit Application (confidential, client-credentials grant) and its
ClientProfile, then prints the client id, the secret (shown once: only its hash is stored)
and the curl line that gets a token.
"""

from __future__ import annotations

import re
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from oauth2_provider.models import get_application_model

from fhirservice.access.clients import fhir_client_create
from fhirservice.access.models import ORGANIZATION_RE
from fhirservice.access.scopes import parse_scope


class Command(BaseCommand):
    """Create an OAuth2 client-credentials client bound to an organization."""

    help = (
        "Create an OAuth2 client (client-credentials grant) for a primary system of one "
        "organization, with the SMART system scopes its tokens may carry; prints the client "
        "id and secret once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """--name, --organization / --all-organizations, --scopes, --base-url, --dry-run."""
        parser.add_argument("--name", required=True, help="A name for the client (unique)")
        boundary = parser.add_mutually_exclusive_group(required=True)
        boundary.add_argument(
            "--organization", help="The organization whose data the client sees and changes"
        )
        boundary.add_argument(
            "--all-organizations",
            action="store_true",
            help="An operator client without a data boundary (sees every organization)",
        )
        parser.add_argument(
            "--scopes",
            default="system/*.*",
            help='Space-separated SMART system scopes, e.g. "system/Group.rs system/Patient.r" '
            '(default "system/*.*"; add "system/AuditEvent.rs" for the audit trail)',
        )
        parser.add_argument(
            "--base-url",
            default="http://127.0.0.1:8000",
            help="Where the server runs, for the printed curl line",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Check the input, create nothing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Validate, create the Application and its profile, print the credentials."""
        name = options["name"].strip()
        organization = options["organization"] or ""
        scopes = options["scopes"].split()
        if not name:
            raise CommandError("--name must not be empty")
        if organization and not re.fullmatch(ORGANIZATION_RE, organization):
            raise CommandError(f"--organization must match {ORGANIZATION_RE}: {organization!r}")
        if not scopes:
            raise CommandError("--scopes must name at least one scope")
        bad = [scope for scope in scopes if parse_scope(scope) is None]
        if bad:
            raise CommandError(
                f"Not supported SMART system scopes: {', '.join(bad)} "
                "(expected e.g. system/Group.rs, system/*.*, system/Group.$add-member)"
            )
        application_model = get_application_model()
        if application_model.objects.filter(name=name).exists():
            raise CommandError(f"A client named {name!r} exists already")
        if options["dry_run"]:
            self.stdout.write("Dry run: the input is valid; nothing was created.")
            return
        client_id, secret = fhir_client_create(
            name=name,
            organization=organization,
            all_organizations=options["all_organizations"],
            scopes=scopes,
        )
        boundary = "all organizations" if options["all_organizations"] else organization
        self.stdout.write(self.style.SUCCESS(f"Created client {name!r} ({boundary})"))
        self.stdout.write(f"client_id:     {client_id}")
        self.stdout.write(f"client_secret: {secret}")
        self.stdout.write(f"scopes:        {' '.join(scopes)}")
        self.stdout.write("The secret is shown only now (only its hash is stored). Get a token:")
        self.stdout.write(
            f"  curl -s -X POST {options['base_url'].rstrip('/')}/oauth/token/ "
            f"-u '{client_id}:{secret}' -d grant_type=client_credentials"
        )
        self.stdout.write(
            "then send it as 'Authorization: Bearer <access_token>' on every FHIR request."
        )

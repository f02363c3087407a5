"""``manage.py create_fhir_client``: register an OAuth2 client of one organization.

Creates a django-oauth-toolkit Application (confidential, client-credentials grant) and its
ClientProfile, then prints the client id, the secret (shown once: only its hash is stored)
and the curl line that gets a token. With ``--jwks-file``, ``--jwks-url`` or ``--public-key``
the client is a SMART Backend Services client: it authenticates with assertions signed by
its private key (``private_key_jwt``), so no secret is printed, only what its assertions
must say (the ``kid`` of a ``--public-key`` is the key's RFC 7638 thumbprint).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
from django.core.management.base import BaseCommand, CommandError, CommandParser
from oauth2_provider.models import get_application_model

from fhirservice.access.clients import fhir_client_create
from fhirservice.access.jwks import JwksError, check_jwks_url, jwk_of_pem, parse_jwks
from fhirservice.access.models import ORGANIZATION_RE
from fhirservice.access.scopes import parse_scope
from fhirservice.access.smart import token_url


class Command(BaseCommand):
    """Create an OAuth2 client-credentials client bound to an organization."""

    help = (
        "Create an OAuth2 client (client-credentials grant) for a primary system of one "
        "organization, with the SMART system scopes its tokens may carry; prints the client "
        "id and secret once. With --jwks-file, --jwks-url or --public-key it authenticates "
        "with signed assertions (SMART Backend Services, private_key_jwt) instead of a secret."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        """--name, --organization / --all-organizations, --scopes, --jwks-file / --jwks-url /
        --public-key, --base-url, --dry-run."""
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
        keys = parser.add_mutually_exclusive_group()
        keys.add_argument(
            "--jwks-file",
            help="A JSON file holding the client's public keys as a JWK Set (RS384: RSA keys, "
            "ES384: EC P-384 keys, each with a kid): the client signs its token requests",
        )
        keys.add_argument(
            "--jwks-url",
            help="The https URL where the client publishes its JWK Set (fetched when needed)",
        )
        keys.add_argument(
            "--public-key",
            action="append",
            metavar="PEM_FILE",
            help="A PEM public key (openssl pkey -pubout): RSA of 2048+ bits or EC P-384; "
            "repeat for several keys. Its kid is its RFC 7638 thumbprint (printed)",
        )
        parser.add_argument(
            "--base-url",
            default="http://127.0.0.1:8000",
            help="Where the server runs (its site root as clients reach it), for the printed "
            "curl line and, for key-set clients, the audience their assertions must name",
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
        jwks, jwks_url = self._key_set(options)
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
            jwks=jwks,
            jwks_url=jwks_url,
        )
        boundary = "all organizations" if options["all_organizations"] else organization
        self.stdout.write(self.style.SUCCESS(f"Created client {name!r} ({boundary})"))
        self.stdout.write(f"client_id:     {client_id}")
        if jwks or jwks_url:
            self._print_assertion_help(client_id, scopes, options["base_url"], jwks, jwks_url)
            return
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

    def _key_set(self, options: dict[str, Any]) -> tuple[str, str]:
        """The (JWK Set document, JWKS URL) of the options, checked; ("", "") for neither."""
        try:
            if options["jwks_file"]:
                try:
                    text = Path(options["jwks_file"]).read_text(encoding="utf-8").strip()
                except (OSError, UnicodeDecodeError) as exc:
                    raise CommandError(f"--jwks-file cannot be read: {exc}") from exc
                parse_jwks(text)
                return text, ""
            if options["jwks_url"]:
                return "", check_jwks_url(options["jwks_url"])
            if options["public_key"]:
                return self._jwks_of_pem_files(options["public_key"]), ""
        except JwksError as exc:
            raise CommandError(str(exc)) from exc
        return "", ""

    def _jwks_of_pem_files(self, paths: list[str]) -> str:
        """The JWK Set document of PEM public key files."""
        keys = []
        for path in paths:
            try:
                pem = Path(path).read_bytes()
            except OSError as exc:
                raise CommandError(f"--public-key cannot be read: {exc}") from exc
            keys.append(jwk_of_pem(pem))
        return orjson.dumps({"keys": keys}).decode("utf-8")

    def _print_assertion_help(
        self, client_id: str, scopes: list[str], base_url: str, jwks: str, jwks_url: str
    ) -> None:
        """What a backend client's token requests must carry (it has no secret)."""
        endpoint = token_url(base_url)
        if jwks_url:
            self.stdout.write(f"keys:          {jwks_url}")
        for key in orjson.loads(jwks)["keys"] if jwks else []:
            self.stdout.write(f"key:           kid={key.get('kid', '')} kty={key.get('kty', '')}")
        self.stdout.write(f"scopes:        {' '.join(scopes)}")
        self.stdout.write(
            "No secret: the client authenticates with a JWT signed by its private key "
            "(RS384 or ES384) with header kid=<a kid of its key set> and claims "
            f"iss=sub={client_id}, aud={endpoint}, exp=<at most 5 minutes ahead>, "
            "jti=<new for every request>. Get a token:"
        )
        self.stdout.write(
            f"  curl -s -X POST {endpoint} -d grant_type=client_credentials "
            "-d client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer "
            "-d client_assertion=<the signed JWT>"
        )

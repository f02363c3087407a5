"""DRF authentication of FHIR requests: OAuth2 bearer tokens, and staff sessions.

- :class:`BearerTokenAuthentication` reads ``Authorization: Bearer <token>`` and looks the
  token up in django-oauth-toolkit's ``AccessToken`` table (by its SHA-256 checksum, as the
  library does). Unknown, revoked and expired tokens, and tokens of an Application that has
  no :class:`~fhirservice.access.models.ClientProfile`, answer 401 ``invalid_token``.
- :class:`StaffSessionAuthentication` lets a staff user logged in to the admin call the API
  from the same browser (CSRF-checked for writes): unrestricted, actor ``staff:<username>``.

Both return ``(user, Access)``: DRF puts the :class:`~fhirservice.access.Access` into
``request.auth``.

A read of one resource names the row it will read before authenticating
(:data:`READ_KEY_ATTR` on the Django request, set by the FHIR view): the token's lookup then
reads that row in the same statement, one round trip to the store instead of two, and leaves
it at :data:`READ_ROW_ATTR` (a ``store.rows.ReadAhead``) only once the token proved good. The
row is checked against the caller's boundary where it is used, as a row read later would be.
"""

from __future__ import annotations

import hashlib
from datetime import UTC
from functools import cache, lru_cache
from typing import Any

from django.db import connections, router
from django.db.models import QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from oauth2_provider.models import get_access_token_model
from rest_framework.authentication import BaseAuthentication, SessionAuthentication
from rest_framework.request import Request

from fhirservice.access import Access
from fhirservice.access.scopes import ScopeSet
from fhirservice.errors import MSG_TOKEN_INVALID, Unauthorized
from fhirservice.models import StoredResource
from fhirservice.store.rows import SQL_VENDORS, ReadAhead, prepared_cursor, row_by_key_with

CHALLENGE = 'Bearer realm="fhir"'
# Attributes of the Django request: the store key of the current row a read will use, and
# that row once read with the token (see the module docstring).
READ_KEY_ATTR = "fhir_read_key"
READ_ROW_ATTR = "fhir_read_ahead"
# Compiles the token lookup once; any value but a real checksum (64 hex digits) would do.
CHECKSUM_SLOT = "checksum"
MSG_LOOKUP_COMPILED = "The token lookup compiled with parameters {params!r}, not one checksum"
# What access_of_token reads of a token, its Application and the Application's ClientProfile.
TOKEN_FIELDS = (
    "expires",
    "scope",
    "application__client_id",
    "application__fhir_profile__pk",
    "application__fhir_profile__organization",
    "application__fhir_profile__all_organizations",
    "application__fhir_profile__allowed_scopes",
)


def bearer_token(request: Any) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None when there is none."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    token = token.strip()
    return token or ""


def _token_row(checksum: str) -> tuple[Any, ...] | None:
    """The ``TOKEN_FIELDS`` of the token with this checksum, or None.

    The values the answer needs, not three whole model rows: compiling and converting the
    ~30 columns of a select_related() row, ordered by first(), was ~40% of a plain read's
    Python time as served. On SQL backends the ORM compiles the statement once per process
    and each lookup binds its checksum: building and compiling the three-table query per
    request still cost more than running it (on PostgreSQL a quarter of a read). On
    PostgreSQL the statement is prepared per connection (``rows.prepared_cursor``): planning
    its three-table join took ~0.3-0.5 ms of the server's time per request.
    """
    connection = connections[router.db_for_read(_token_model())]
    if connection.vendor not in SQL_VENDORS:
        found = list(_token_values().filter(token_checksum=checksum)[:1])
        return found[0] if found else None
    with prepared_cursor(connection) as cursor:
        cursor.execute(_token_statement(connection.alias), [checksum])
        return _converted(cursor.fetchone())


def _token_and_row(checksum: str, key: str) -> tuple[tuple[Any, ...] | None, ReadAhead | None]:
    """The token's ``TOKEN_FIELDS`` (or None) and the current row of ``key``, read in one
    statement where the token and the store share a SQL database (else the row is not read:
    None)."""
    connection = connections[router.db_for_read(_token_model())]
    store = router.db_for_read(StoredResource)
    if connection.vendor not in SQL_VENDORS or connection.alias != store:
        return _token_row(checksum), None
    found, row = row_by_key_with(
        StoredResource, key, _token_statement(connection.alias), [checksum]
    )
    return _converted(found), ReadAhead(key, row)


def _converted(row: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
    """A token row with ``expires`` an aware datetime (SQLite keeps text in UTC)."""
    if row is None:
        return None
    expires = row[0]
    if isinstance(expires, str):
        expires = parse_datetime(expires)
    if expires is not None and timezone.is_naive(expires):
        expires = timezone.make_aware(expires, UTC)  # SQLite keeps UTC without an offset
    return (expires, *row[1:])


def warm_up(**_: Any) -> None:
    """Look up a checksum no token has, once on this thread's connection: the statement is
    compiled for the process, and a new PostgreSQL session reads the three tables' catalog
    entries now rather than in a request (~1.1 ms of its first lookup). A
    ``request_thread_starting`` receiver (``fhirservice.serving``). On PostgreSQL this
    also prepares both statements on the connection (``pgbackend.base``): a read's
    lookup of token and row together is a statement of its own."""
    _token_row("0" * 64)
    _token_and_row("0" * 64, "")


@cache
def _token_statement(alias: str) -> str:
    """The lookup's SQL on database ``alias``, ``%s`` standing for the checksum (no ORDER BY:
    the checksum is unique)."""
    query = _token_values().filter(token_checksum=CHECKSUM_SLOT)[:1].query
    sql, params = query.get_compiler(using=alias).as_sql()
    if params != (CHECKSUM_SLOT,):
        raise ValueError(MSG_LOOKUP_COMPILED.format(params=params))
    return sql


@cache
def _token_model() -> type:
    """django-oauth-toolkit's AccessToken model (looked up once per process, as the lookup's
    statement is compiled once: its settings and the app registry read per request were ~15%
    of a token check's Python time)."""
    return get_access_token_model()


@cache
def _token_values() -> QuerySet:
    """The token table's ``TOKEN_FIELDS`` (joins resolved once per process; every use
    clones it with its filter, and this one is never evaluated)."""
    return _token_model().objects.values_list(*TOKEN_FIELDS)


@lru_cache(maxsize=1024)
def _scopes(granted: str, allowed: str) -> ScopeSet:
    """A token's scopes within its client's allowance (parsed once per pair of strings:
    ScopeSet is immutable, and a client's tokens repeat the same few strings)."""
    return ScopeSet.parse(granted).within(ScopeSet.parse(allowed))


def access_of_token(token: str) -> Access:
    """The caller a bearer token stands for; 401 ``invalid_token`` when it stands for none."""
    return _access(_token_row(_checksum(token)))


def access_and_read_ahead(token: str, key: str) -> tuple[Access, ReadAhead | None]:
    """As :func:`access_of_token`, and the current row of ``key`` read with the token (None
    where the two cannot be read together). Nothing of the row comes back for a bad token."""
    found, read_ahead = _token_and_row(_checksum(token), key)
    return _access(found), read_ahead


def _checksum(token: str) -> str:
    """The token's SHA-256 checksum (401 for an empty token)."""
    if not token:
        raise Unauthorized(
            MSG_TOKEN_INVALID, error="invalid_token", detail_code="MSG_TOKEN_INVALID"
        )
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _access(found: tuple[Any, ...] | None) -> Access:
    """The caller of a token row; 401 ``invalid_token`` for none, an expired token, or one of
    an Application without a ClientProfile."""
    if found is None:
        raise Unauthorized(
            MSG_TOKEN_INVALID, error="invalid_token", detail_code="MSG_TOKEN_INVALID"
        )
    expires, scope, client_id, profile_id, organization, all_organizations, allowed = found
    # As AccessToken.is_expired(); a token without a profile'd Application stands for no one.
    if profile_id is None or not expires or timezone.now() >= expires:
        raise Unauthorized(
            MSG_TOKEN_INVALID, error="invalid_token", detail_code="MSG_TOKEN_INVALID"
        )
    return Access(
        client_id=client_id,
        organization=None if all_organizations else organization,
        scopes=_scopes(scope, allowed),
        actor=f"client:{client_id}",
    )


def staff_access(user: Any) -> Access:
    """The unrestricted access of a staff user."""
    return Access(actor=f"staff:{user.get_username()}")


class BearerTokenAuthentication(BaseAuthentication):
    """OAuth2 bearer tokens issued by ``/oauth/token/`` (client-credentials grant)."""

    def authenticate(self, request: Request) -> tuple[Any, Access] | None:
        """``(None, Access)`` for a good token; None without a bearer header; 401 otherwise."""
        django_request = request._request
        token = bearer_token(django_request)
        if token is None:
            return None
        key = getattr(django_request, READ_KEY_ATTR, None)
        if key is None:
            return None, access_of_token(token)
        access, read_ahead = access_and_read_ahead(token, key)
        if read_ahead is not None:
            setattr(django_request, READ_ROW_ATTR, read_ahead)
        return None, access

    def authenticate_header(self, request: Request) -> str:
        """The ``WWW-Authenticate`` challenge of a 401."""
        return CHALLENGE


class StaffSessionAuthentication(SessionAuthentication):
    """An admin session of a staff user (CSRF-checked like any session-authenticated write)."""

    def authenticate(self, request: Request) -> tuple[Any, Access] | None:
        """``(user, Access)`` for an active staff session, else None."""
        user = getattr(request._request, "user", None)
        if user is None or not user.is_active or not user.is_staff:
            return None
        self.enforce_csrf(request)
        return user, staff_access(user)

    def enforce_csrf(self, request: Request) -> None:
        """Django's CSRF check, on the Django request beneath DRF's.

        The check looks for the token among a POST's form fields before the header. On DRF's
        request that parses the body with DRF's parsers, of which this API has none (bodies
        are read by ``fhirservice.rest``): a FHIR POST answered 415. Django's own request only
        parses form bodies, and FHIR bodies are not forms.
        """
        super().enforce_csrf(request._request)

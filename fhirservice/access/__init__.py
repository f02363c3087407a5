"""Who is calling: the request-scoped access of every FHIR request, and where code finds it.

Every FHIR request resolves to an :class:`Access` (``request.access``): the OAuth2 client or
staff user behind it, its organization (the data boundary) and its scopes. The store, search
and operations read it through :func:`current`, a context variable the FHIR views set for the
duration of a request. Code outside a request (management commands, the admin, tests calling
services) runs as :data:`SYSTEM`: unrestricted, with no boundary.

See ``fhirservice.access.scopes`` for the scope syntax, ``fhirservice.access.boundaries``
for organization boundaries and ``docs/access.md`` for the whole picture.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from fhirservice.access.scopes import ScopeSet


@dataclass(frozen=True)
class Access:
    """The caller of one request.

    ``organization`` is the caller's data boundary; None means unrestricted (staff users,
    cross-organization operator clients, ``FHIR_AUTH=off`` and server-side code).
    ``actor`` is what versions and member events record: ``client:<client_id>``,
    ``staff:<username>``, or "" for anonymous callers when authentication is off.
    """

    client_id: str = ""
    organization: str | None = None
    scopes: ScopeSet = field(default_factory=lambda: ScopeSet(unlimited=True))
    actor: str = ""

    @property
    def restricted(self) -> bool:
        """Whether a data boundary applies to this caller."""
        return self.organization is not None

    def sees(self, organization: str) -> bool:
        """Whether a resource recorded under ``organization`` is inside this caller's boundary.

        Resources with no organization ("", created by staff, commands or before access
        control) are shared: every caller sees them.
        """
        return self.organization is None or organization in ("", self.organization)

    @property
    def owner(self) -> str:
        """The organization new resources created by this caller are recorded under."""
        return self.organization or ""


SYSTEM = Access()

_current: contextvars.ContextVar[Access] = contextvars.ContextVar("fhir_access", default=SYSTEM)


def current() -> Access:
    """The access of the request being served (:data:`SYSTEM` outside requests)."""
    return _current.get()


def activate(access: Access) -> contextvars.Token[Access]:
    """Make ``access`` current; pass the returned token to :func:`deactivate`."""
    return _current.set(access)


def deactivate(token: contextvars.Token[Access]) -> None:
    """Restore the access that was current before :func:`activate`."""
    _current.reset(token)


@contextmanager
def acting_as(access: Access) -> Iterator[Access]:
    """Run a block as ``access`` (server code acting for a caller, and tests)."""
    token = activate(access)
    try:
        yield access
    finally:
        deactivate(token)

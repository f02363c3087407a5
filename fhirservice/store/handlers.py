"""Per-type behaviour hooks of the store, and the post-save signal.

The store is generic. A resource type that needs more (Group: its roster lives in ClickHouse)
registers a :class:`ResourceHandler` (``fhirservice.plugins.register_resource_handler``)
and/or listens to :data:`resource_saved`:

- ``ResourceHandler.prepare`` splits an incoming body into what the metadata store keeps and a
  payload handled elsewhere (the Group roster), and validates both;
- ``resource_saved`` is sent inside the write transaction for every new version, once its
  number is known and before its rows are persisted. Receivers may write rows of their own in
  the same transaction, set server-computed elements on ``write.body`` (Group.quantity),
  set ``write.changed`` when they changed state that the body does not show, set
  ``write.same_search_values`` when the write left every searchable element as it was, and
  hand rows of their own to ``write.rows`` to have them stored with the version's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.dispatch import Signal

from fhirservice.fhir.validation import validate_resource
from fhirservice.plugins import resource_handler
from fhirservice.store.content import apply_json_patch, without_server_meta
from fhirservice.store.json import loads

if TYPE_CHECKING:
    from django.http import HttpRequest

    from fhirservice.models import StoredResource

resource_saved = Signal()


@dataclass
class WriteContext:
    """Who asks for a write and through which HTTP request (None for server-side callers:
    commands, the relay, code calling the services). Apps keep per-request state as request
    attributes; a server-side caller makes a context per call, which then holds that state."""

    request: HttpRequest | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    actor: str = ""
    source: str = "rest"

    @classmethod
    def from_request(cls, request: HttpRequest, *, source: str = "rest") -> WriteContext:
        """The context of an HTTP request (request id set by RequestIdMiddleware).

        The actor is the caller the FHIR view resolved (``request.access``): ``client:<id>``
        or ``staff:<username>``; "" for anonymous callers when authentication is off.
        """
        access = getattr(request, "access", None)
        if access is not None:
            actor = access.actor
        else:
            user = getattr(request, "user", None)
            actor = (
                f"staff:{user.get_username()}" if user is not None and user.is_authenticated else ""
            )
        return cls(
            request=request,
            request_id=getattr(request, "request_id", uuid.uuid4().hex),
            actor=actor,
            source=source,
        )


@dataclass
class VersionWrite:
    """A new version on its way into the store; what resource_saved receivers see."""

    resource_type: str
    resource_id: str
    version_id: int
    incarnation: int
    method: str
    context: WriteContext
    previous: StoredResource | None
    body: dict[str, Any] | None
    payload: Any = None
    deleted: bool = False
    changed: bool = False
    # Set by a type's write path that knows no element a search parameter reads changed
    # from ``previous`` (a Group roster write changes only ``quantity``): the stored search
    # values are kept without extracting them twice to compare.
    same_search_values: bool = False
    # Rows of other tables that belong to this version, ``(model, instances)`` (a roster
    # write's outbox row): stored with the version's own rows, in their statement where the
    # backend sends several as one (``rows.insert_all``, ``rows.update_row``), so a member
    # PATCH on PostgreSQL is one statement after its locking read instead of three.
    rows: list[tuple[type, list]] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The resource's store key, ``Type/id``."""
        return f"{self.resource_type}/{self.resource_id}"


class ResourceHandler:
    """Default behaviour: the whole body is stored and validated with the R4 models."""

    # A top-level element kept outside the metadata store and streamed into reads (the Group
    # roster), or None.
    external_element: str | None = None

    def external_chunks(self, row: Any, *, current: bool, in_bundle: bool) -> Any:
        """JSON-encoded items of ``external_element`` for a stored version, or None.

        Each chunk holds one or more items, comma-joined (the caller puts commas between
        chunks).

        Called before the response starts, so it may raise (e.g. 503) before any byte is sent.
        """
        return None

    def decode(self, data: bytes) -> Any:
        """The JSON body of a create or update of this type, decoded (400 when malformed)."""
        return loads(data)

    def prepare(self, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Validate ``body`` and split it into (stored body, payload)."""
        validate_resource(body)
        return body, None

    def patch(self, draft: VersionWrite, ops: list[dict[str, Any]]) -> None:
        """Apply JSON Patch ops to the current content and set the draft's body."""
        document = loads(draft.previous.body)
        draft.body, draft.payload = self.prepare(
            without_server_meta(apply_json_patch(document, ops))
        )


_DEFAULT = ResourceHandler()


def handler_for(resource_type: str) -> ResourceHandler:
    """The handler an app registered for a type, or the default one."""
    return resource_handler(resource_type) or _DEFAULT

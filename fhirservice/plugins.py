"""Where apps plug into the core: the one registry the core reads.

The core (``fhirservice``) knows no app. An app (``groups``, ``operations``) registers what it
adds from its ``AppConfig.ready``:

- a **resource-type handler** (:func:`register_resource_handler`): a
  ``fhirservice.store.handlers.ResourceHandler`` for a type that needs more than the generic
  store (the Group roster kept outside the metadata store);
- a **search parameter answered outside the metadata store** (:func:`register_search_param`):
  a function from the parameter's values and modifier to a filter on ``StoredResource``
  (``Group?member=``), and optionally one listing the references it holds, for ``_include``
  (``Group:member``; ``_revinclude`` goes through the filter);
- an **admin page of its own** for a resource type (:func:`register_admin_page`): the
  generic store admin (``fhirservice.admin``) leaves the type out and links to that page;
- an **$operation** (:func:`register_operation`) at system, type or instance level: its
  OperationDefinition and either a *handler* (the core's operation view checks the
  Parameters, GET or POST, and renders what the handler returns) or a *view* of its own (it
  reads the request itself, e.g. ``$members``' paged GET).

Readers: the store (:func:`resource_handler`), search (:func:`search_param`), the admin
(:func:`admin_page`), routing and the
operation view (:func:`find_operation`), the OperationDefinition reads and search
(:func:`operation_definitions`), the CapabilityStatement, the access policy and SMART
discovery. The ``resource_saved`` signal (``fhirservice.store.handlers``) is the one other
hook: receivers run inside every write transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.db.models import Q

from fhirservice.fhir.operation_definition import OperationDef

if TYPE_CHECKING:  # annotations only: fhirservice.store imports this module
    from fhirservice.store.handlers import ResourceHandler

MSG_HANDLER_OR_VIEW = "Operation {id}: give a handler or a view, not both"

# build(values, modifier) -> a filter on StoredResource (values split at unescaped commas).
SearchFilter = Callable[[list[str], str], Q]
# references(rows, limit) -> at most ``limit`` references (``Type/id``) the stored rows hold.
SearchReferences = Callable[[list[Any], int], list[str]]
# handler(values=..., resource_id=..., context=WriteContext) -> a resource (dict) or a list of
# stored rows (answered as a searchset Bundle).
OperationHandler = Callable[..., Any]


@dataclass(frozen=True)
class SearchParam:
    """A search parameter of a type that an app answers."""

    resource_type: str
    name: str
    build: SearchFilter
    documentation: str
    references: SearchReferences | None = None


@dataclass(frozen=True)
class Operation:
    """An $operation an app serves: its definition, and a handler or a Django view."""

    definition: OperationDef
    handler: OperationHandler | None = None
    view: Callable[..., Any] | None = None


_HANDLERS: dict[str, ResourceHandler] = {}
_ADMIN_PAGES: dict[str, str] = {}
_SEARCH_PARAMS: dict[tuple[str, str], SearchParam] = {}
# By OperationDefinition id (``Group-add-member``), in registration order.
OPERATIONS: dict[str, Operation] = {}


def register_resource_handler(resource_type: str, handler: ResourceHandler) -> None:
    """Use ``handler`` for ``resource_type`` in the store and in reads."""
    _HANDLERS[resource_type] = handler


def resource_handler(resource_type: str) -> ResourceHandler | None:
    """The handler an app registered for a type, if any."""
    return _HANDLERS.get(resource_type)


def register_admin_page(resource_type: str, url_name: str) -> None:
    """Show ``resource_type`` in an app's own admin; ``url_name`` is its change page's URL
    name (``reverse(url_name, args=[quote("Type/id")])``)."""
    _ADMIN_PAGES[resource_type] = url_name


def admin_page(resource_type: str) -> str | None:
    """The URL name of the change page an app registered for a type, if any."""
    return _ADMIN_PAGES.get(resource_type)


def types_with_admin_pages() -> list[str]:
    """The resource types shown in an app's own admin rather than the generic one."""
    return list(_ADMIN_PAGES)


def register_search_param(
    resource_type: str,
    name: str,
    build: SearchFilter,
    documentation: str,
    *,
    references: SearchReferences | None = None,
) -> None:
    """Answer ``[type]?name=`` with ``build`` (listed in the CapabilityStatement); with
    ``references``, ``_include=[type]:name`` too."""
    _SEARCH_PARAMS[(resource_type, name)] = SearchParam(
        resource_type, name, build, documentation, references
    )


def search_param(resource_type: str, name: str) -> SearchParam | None:
    """The app-answered search parameter ``name`` of a type, if any."""
    return _SEARCH_PARAMS.get((resource_type, name))


def search_params(resource_type: str) -> list[SearchParam]:
    """The app-answered search parameters of a type."""
    return [p for p in _SEARCH_PARAMS.values() if p.resource_type == resource_type]


def register_operation(
    definition: OperationDef,
    *,
    handler: OperationHandler | None = None,
    view: Callable[..., Any] | None = None,
) -> None:
    """Serve ``definition``'s operation with a handler or with a view (exactly one)."""
    if (handler is None) == (view is None):
        raise ValueError(MSG_HANDLER_OR_VIEW.format(id=definition.id))
    OPERATIONS[definition.id] = Operation(definition, handler, view)


def find_operation(code: str, resource_type: str | None, level: str) -> Operation | None:
    """The operation ``$code`` at a level (system, type, instance) of a type, if any."""
    for operation in OPERATIONS.values():
        definition = operation.definition
        if (
            definition.code == code
            and definition.resource == resource_type
            and getattr(definition, level)
        ):
            return operation
    return None


def operation_definitions() -> list[OperationDef]:
    """Every registered operation's definition, in registration order."""
    return [operation.definition for operation in OPERATIONS.values()]


def operation_definition(definition_id: str) -> OperationDef | None:
    """The registered definition with this id (``Group-add-member``), if any."""
    operation = OPERATIONS.get(definition_id)
    return operation.definition if operation is not None else None

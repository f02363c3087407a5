"""Which scope each FHIR interaction needs, and the view mixin that enforces it.

Interactions map to SMART v2 permissions on the resource type of the request:

=========================================  ==========================================
read, vread, instance history              ``r``
search, type history                       ``s``
system history                             ``s`` on some type (only those types are served)
create                                     ``c``
conditional create (``If-None-Exist``)     ``c`` and ``s`` (it searches)
update, patch                              ``u``
conditional update, conditional patch      ``u`` and ``s`` (and ``c`` when the update
                                           creates: checked by the store)
update-as-create (PUT of a new id)         ``u`` and ``c`` (checked by the store, which
                                           knows whether the id exists)
delete                                     ``d``
conditional delete                         ``d`` and ``s``
``$operation`` that does not change state  ``r`` on its type, or ``system/Type.$code``
``$operation`` that changes state          ``u`` on its type, or ``system/Type.$code``
batch / transaction Bundle                 a valid token; every entry is checked as itself
``AuditEvent`` search                      ``s`` on AuditEvent, named explicitly
``metadata``, built-in OperationDefinition  public
=========================================  ==========================================

With ``FHIR_AUTH=off`` every request is served as an unrestricted caller (no boundary); a
staff admin session still names its user as the actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rest_framework.request import Request

from fhirservice.access import Access, activate, deactivate
from fhirservice.access.authentication import (
    READ_KEY_ATTR,
    BearerTokenAuthentication,
    StaffSessionAuthentication,
    staff_access,
)
from fhirservice.access.scopes import ScopeSet
from fhirservice.conf import fhir_settings
from fhirservice.errors import MSG_INSUFFICIENT_SCOPE, Forbidden, Unauthorized
from fhirservice.fhir.resource_types import is_resource_type
from fhirservice.plugins import find_operation, operation_definition

PUBLIC = "public"
AUTHENTICATED = "authenticated"
# Callers of public endpoints without credentials: no scopes, shared data only.
ANONYMOUS = Access(organization="", scopes=ScopeSet())
WRITE_INTERACTIONS = {"POST": ("create", "c"), "PUT": ("update", "u"), "PATCH": ("patch", "u")}
# Type-level writes by search criteria: the plain interaction's permission plus ``s``.
CONDITIONAL_INTERACTIONS = {
    "PUT": ("conditional update", "us"),
    "PATCH": ("conditional patch", "us"),
    "DELETE": ("conditional delete", "ds"),
}


@dataclass(frozen=True)
class Requirement:
    """What one request needs: permissions on a type (every letter of ``permission``, e.g.
    ``"cs"``), or an operation scope as alternative."""

    interaction: str
    resource_type: str | None = None
    permission: str | None = None
    operation: str | None = None

    def allowed(self, access: Access) -> bool:
        """Whether ``access``'s scopes satisfy this requirement."""
        if self.permission is None:
            return True
        return all(
            access.scopes.grants(self.resource_type, permission, self.operation)
            for permission in self.permission
        )

    def scope_text(self) -> str:
        """The scope to name in a 403's ``WWW-Authenticate``."""
        target = self.resource_type or "*"
        if self.operation:
            return f"system/{target}.{self.permission} system/{target}.${self.operation}"
        return f"system/{target}.{self.permission}"


def _operation_requirement(resource_type: str | None, code: str, definition: Any) -> Requirement:
    if definition is None:
        return Requirement(AUTHENTICATED)  # the view answers 404 for an unknown operation
    permission = "u" if definition.affects_state else "r"
    return Requirement(f"${code}", resource_type, permission, code)


def requirement_for(view: Any, request: Request) -> Requirement:
    """The requirement of a request to a FHIR view (see the module docstring's table)."""
    rule = getattr(view, "access_rule", "rest")
    kwargs = view.kwargs
    method = "GET" if request.method == "HEAD" else request.method
    if rule in (PUBLIC, AUTHENTICATED):
        return Requirement(rule)
    resource_type = kwargs.get("resource_type") or getattr(view, "access_resource_type", None)
    if resource_type is not None and not is_resource_type(resource_type):
        return Requirement(AUTHENTICATED)  # the view answers 404 for an unknown type
    if rule == "operation":
        resource_id = kwargs.get("resource_id")
        level = "instance" if resource_id else ("type" if resource_type else "system")
        found = find_operation(kwargs["code"], resource_type, level)
        return _operation_requirement(resource_type, kwargs["code"], found and found.definition)
    if rule == "search":  # POST [type]/_search reads like GET [type]
        return Requirement("search", resource_type, "s")
    if rule == "audit":
        if method == "GET":
            return Requirement("search", "AuditEvent", "s")
        return Requirement(AUTHENTICATED)  # the view answers 405: the trail is read-only
    if rule == "operation-definition" and method == "GET":
        resource_id = kwargs.get("resource_id")
        if resource_id is not None and operation_definition(resource_id) is not None:
            return Requirement(PUBLIC)
    if rule == "history":
        if kwargs.get("resource_id"):
            return Requirement("history-instance", resource_type, "r")
        if resource_type:
            return Requirement("history-type", resource_type, "s")
        return Requirement("history-system", None, "s")
    if kwargs.get("version_id"):
        return Requirement("vread", resource_type, "r")
    if kwargs.get("resource_id"):
        if method == "GET":
            return Requirement("read", resource_type, "r")
        if method == "DELETE":
            return Requirement("delete", resource_type, "d")
        interaction, permission = WRITE_INTERACTIONS.get(method, ("update", "u"))
        return Requirement(interaction, resource_type, permission)
    if method == "GET":
        return Requirement("search", resource_type, "s")
    if method in CONDITIONAL_INTERACTIONS:
        interaction, permission = CONDITIONAL_INTERACTIONS[method]
        return Requirement(interaction, resource_type, permission)
    if "HTTP_IF_NONE_EXIST" in request.META:
        return Requirement("conditional create", resource_type, "cs")
    return Requirement("create", resource_type, "c")


def require_permission(
    access: Access, resource_type: str | None, permission: str, interaction: str | None = None
) -> None:
    """403 unless ``access`` grants ``permission`` (every letter of it) on ``resource_type``,
    for checks that happen inside an interaction (conditional references and conditional
    creates of a transaction, update-as-create)."""
    requirement = Requirement(
        interaction or ("search" if permission == "s" else permission), resource_type, permission
    )
    _check(requirement, access)


def _check(requirement: Requirement, access: Access) -> None:
    if not requirement.allowed(access):
        raise Forbidden(
            MSG_INSUFFICIENT_SCOPE.format(
                interaction=requirement.interaction,
                target=requirement.resource_type or "any type",
                scope=" or ".join(requirement.scope_text().split()),
            ),
            scope=requirement.scope_text(),
        )


class AccessControlledView:
    """Mixin of every FHIR view: resolve the caller, check its scope, make it current.

    ``access_rule`` says how a view's requests map to scopes: ``"rest"`` (the default:
    derived from method and route), ``"history"``, ``"operation"``,
    ``"operation-definition"``, ``"public"`` or ``"authenticated"``.
    """

    access_rule = "rest"
    authentication_classes = [BearerTokenAuthentication, StaffSessionAuthentication]
    _access_token: Any = None

    def dispatch(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the view with the caller's access current; restore the previous one after."""
        try:
            return super().dispatch(request, *args, **kwargs)  # type: ignore[misc]
        finally:
            if self._access_token is not None:
                deactivate(self._access_token)
                self._access_token = None

    def perform_authentication(self, request: Request) -> None:
        """Resolve ``request.access`` (also on the Django request) and make it current."""
        access = self._resolve(request)
        request.access = access
        request._request.access = access
        self._access_token = activate(access)

    def _resolve(self, request: Request) -> Access:
        inherited = getattr(request._request, "fhir_access", None)
        if inherited is not None:
            return inherited  # a Bundle entry: the caller of the Bundle
        if not fhir_settings.AUTH:
            user = getattr(request._request, "user", None)
            if user is not None and user.is_authenticated and user.is_staff:
                return staff_access(user)
            return Access()
        public = requirement_for(self, request).interaction == PUBLIC
        read_key = self.read_ahead_key(request)
        if read_key is not None:
            setattr(request._request, READ_KEY_ATTR, read_key)
        try:
            request.user  # noqa: B018  (runs the authentication classes)
        except Unauthorized:
            if public:
                return ANONYMOUS
            raise
        if request.auth is None:
            if public:
                return ANONYMOUS
            raise Unauthorized()
        return request.auth

    def read_ahead_key(self, request: Request) -> str | None:
        """The store key of the current row this request reads first, if it reads one: the
        bearer token's lookup reads it in the same statement (``access.authentication``).
        None here; a view that reads one row says which."""
        return None

    def check_permissions(self, request: Request) -> None:
        """403 unless the caller's scopes cover the interaction (when ``FHIR_AUTH`` is on)."""
        if not fhir_settings.AUTH:
            return
        requirement = requirement_for(self, request)
        if requirement.interaction in (PUBLIC, AUTHENTICATED):
            return
        _check(requirement, request.access)

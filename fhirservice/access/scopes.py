"""SMART on FHIR *system* scopes: parsing, and what a set of scopes allows.

Accepted forms (``Type`` is an R4 resource type or ``*``):

- SMART v2: ``system/Type.<perms>`` with perms a non-empty subset of ``cruds`` in that order
  (``system/Group.rs``, ``system/Group.cud``, ``system/*.cruds``);
- ``system/Type.*`` (all of ``cruds``; ``system/*.*`` is everything except the audit trail);
- SMART v1 aliases: ``system/Type.read`` (= ``rs``) and ``system/Type.write`` (= ``cud``);
- one operation: ``system/Type.$code`` (``system/Group.$add-member``; ``system/*.$code`` for
  every type) grants that ``$operation`` whatever the type permissions say.

``user/`` and ``patient/`` scopes, and v2 query suffixes (``?category=…``), are not supported:
a token request naming one is refused (``invalid_scope``).

``AuditEvent`` is never covered by the wildcard type: reading the audit trail needs a scope
that names it (``system/AuditEvent.rs``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PERMISSIONS = "cruds"
AUDIT_TYPE = "AuditEvent"
SCOPE_RE = re.compile(r"system/(?P<type>\*|[A-Z][A-Za-z]+)\.(?P<what>[^\s]+)")
V2_PERMS_RE = re.compile(r"c?r?u?d?s?")
OPERATION_RE = re.compile(r"\$[a-z][a-z0-9\-]*")
ALIASES = {"*": PERMISSIONS, "read": "rs", "write": "cud"}


@dataclass(frozen=True)
class Scope:
    """One parsed scope: a resource type (or ``*``) with permissions, or with an operation."""

    resource_type: str
    permissions: frozenset[str] = frozenset()
    operation: str | None = None

    def covers_type(self, resource_type: str | None) -> bool:
        """Whether this scope is about ``resource_type`` (None: any type will do)."""
        if resource_type is None:
            return True
        if self.resource_type == "*":
            return resource_type != AUDIT_TYPE
        return self.resource_type == resource_type


def parse_scope(text: str) -> Scope | None:
    """The parsed scope, or None when ``text`` is not a supported system scope."""
    match = SCOPE_RE.fullmatch(text)
    if match is None:
        return None
    resource_type, what = match.group("type"), match.group("what")
    if OPERATION_RE.fullmatch(what):
        return Scope(resource_type, operation=what[1:])
    perms = ALIASES.get(what, what)
    if not perms or not V2_PERMS_RE.fullmatch(perms):
        return None
    return Scope(resource_type, permissions=frozenset(perms))


@dataclass(frozen=True)
class ScopeSet:
    """The scopes of one token (or one client's allowance), with the questions we ask them.

    ``limit`` cuts a token's scopes down to its client's current allowance: a grant needs
    both (so narrowing a client's profile narrows the tokens it already holds).
    """

    scopes: tuple[Scope, ...] = ()
    unlimited: bool = False
    limit: ScopeSet | None = None

    @classmethod
    def parse(cls, text: str) -> ScopeSet:
        """Parse a space-separated scope string; unsupported scopes are ignored."""
        parsed = (parse_scope(part) for part in text.split())
        return cls(tuple(scope for scope in parsed if scope is not None))

    def within(self, allowance: ScopeSet) -> ScopeSet:
        """These scopes, granting only what ``allowance`` grants as well."""
        return ScopeSet(self.scopes, self.unlimited, allowance)

    def grants(
        self, resource_type: str | None, permission: str, operation: str | None = None
    ) -> bool:
        """Whether ``permission`` on ``resource_type`` is granted, or (for an operation) the
        operation's own scope is. ``resource_type`` None: on at least one type."""
        own = self.unlimited or any(
            (permission in scope.permissions or (operation and scope.operation == operation))
            and scope.covers_type(resource_type)
            for scope in self.scopes
        )
        return own and (
            self.limit is None or self.limit.grants(resource_type, permission, operation)
        )

    def allows(self, resource_type: str | None, permission: str) -> bool:
        """Whether ``permission`` (one of ``cruds``) is granted on ``resource_type``."""
        return self.grants(resource_type, permission)

    def allows_operation(self, resource_type: str | None, code: str) -> bool:
        """Whether an operation scope names ``$code`` for ``resource_type``."""
        own = self.unlimited or any(
            scope.operation == code and scope.covers_type(resource_type or "*")
            for scope in self.scopes
        )
        return own and (self.limit is None or self.limit.allows_operation(resource_type, code))

    def types_with(self, permission: str) -> frozenset[str] | None:
        """The types ``permission`` is granted on; None when it is granted on every type."""
        types: frozenset[str] | None = frozenset()
        if self.unlimited:
            types = None
        else:
            named = set()
            for scope in self.scopes:
                if permission in scope.permissions:
                    if scope.resource_type == "*":
                        named = None
                        break
                    named.add(scope.resource_type)
            types = None if named is None else frozenset(named)
        if self.limit is None:
            return types
        limited = self.limit.types_with(permission)
        if types is None:
            return limited
        return types if limited is None else types & limited

    def describe(self) -> str:
        """The scopes as a space-separated string (for logs and error texts)."""
        if self.unlimited:
            return "(unlimited)"
        return " ".join(
            f"system/{s.resource_type}."
            + (
                f"${s.operation}"
                if s.operation
                else "".join(p for p in PERMISSIONS if p in s.permissions)
            )
            for s in self.scopes
        )

    def covers(self, other: ScopeSet) -> bool:
        """Whether every grant of ``other`` is also a grant of this set (token ⊆ client)."""
        for scope in other.scopes:
            if scope.operation is not None:
                if scope.resource_type == "*":
                    granted = self._wildcard_operation(scope.operation)
                else:
                    granted = self.allows_operation(scope.resource_type, scope.operation)
                if not granted:
                    return False
                continue
            for permission in scope.permissions:
                if scope.resource_type == "*":
                    if not self._wildcard(permission):
                        return False
                elif not self.allows(scope.resource_type, permission):
                    return False
        return True

    def _wildcard(self, permission: str) -> bool:
        return self.unlimited or any(
            s.resource_type == "*" and permission in s.permissions for s in self.scopes
        )

    def _wildcard_operation(self, code: str) -> bool:
        return self.unlimited or any(
            s.resource_type == "*" and s.operation == code for s in self.scopes
        )

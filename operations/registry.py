"""The explicit list of operations: one module each, registered here and nowhere else.

To add an operation see docs/development/adding-an-operation.md.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from groups import views as group_views
from operations import (
    group_add_member,
    group_create_roster,
    group_remove_member,
    group_transfer_member,
    patient_group_memberships,
)
from operations.definitions import OperationDef

MODULES: tuple[ModuleType, ...] = (
    group_add_member,
    group_remove_member,
    group_transfer_member,
    group_create_roster,
    patient_group_memberships,
)

Handler = Callable[..., Any]
HANDLERS: dict[str, tuple[OperationDef, Handler]] = {
    module.OPERATION.id: (module.OPERATION, module.handle) for module in MODULES
}
# Served and listed, routed by the groups app (GET with paging, not Parameters in).
DEFINITIONS: dict[str, OperationDef] = {
    **{op_id: definition for op_id, (definition, _) in HANDLERS.items()},
    group_views.OPERATION.id: group_views.OPERATION,
}


def find(code: str, resource_type: str | None, level: str) -> tuple[OperationDef, Handler] | None:
    """The operation ``$code`` at a level (system, type, instance) of a type, if any."""
    for definition, handler in HANDLERS.values():
        if (
            definition.code == code
            and definition.resource == resource_type
            and getattr(definition, level)
        ):
            return definition, handler
    return None

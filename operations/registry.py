"""The explicit list of operations: one module each, listed here and nowhere else.

Each module declares ``OPERATION`` (its OperationDefinition) and ``handle``; :func:`register`
(called from ``OperationsConfig.ready``) hands them to the core's plug-in registry, which
routes, checks, lists and serves them. To add an operation see
docs/development/adding-an-operation.md.
"""

from __future__ import annotations

from types import ModuleType

from fhirservice.plugins import register_operation
from operations import (
    group_add_member,
    group_create_roster,
    group_remove_member,
    group_transfer_member,
    patient_group_memberships,
)

MODULES: tuple[ModuleType, ...] = (
    group_add_member,
    group_remove_member,
    group_transfer_member,
    group_create_roster,
    patient_group_memberships,
)


def register() -> None:
    """Register every operation module's definition and handler."""
    for module in MODULES:
        register_operation(module.OPERATION, handler=module.handle)

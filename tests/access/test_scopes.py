"""SMART system scope syntax and what each form grants (no database)."""

from __future__ import annotations

import pytest

from fhirservice.access.scopes import Scope, ScopeSet, parse_scope


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("system/Group.rs", Scope("Group", frozenset("rs"))),
        ("system/Group.cud", Scope("Group", frozenset("cud"))),
        ("system/*.cruds", Scope("*", frozenset("cruds"))),
        ("system/*.*", Scope("*", frozenset("cruds"))),
        ("system/Patient.read", Scope("Patient", frozenset("rs"))),
        ("system/Patient.write", Scope("Patient", frozenset("cud"))),
        ("system/Patient.*", Scope("Patient", frozenset("cruds"))),
        ("system/Group.$add-member", Scope("Group", operation="add-member")),
    ],
)
def test_supported_forms(text: str, expected: Scope) -> None:
    assert parse_scope(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "patient/Patient.rs",
        "user/*.*",
        "system/Group.sr",  # v2 permissions come in cruds order
        "system/Group.rr",
        "system/Group.",
        "system/Group.x",
        "system/Group.rs?category=x",
        "system/group.rs",
        "openid",
    ],
)
def test_unsupported_forms(text: str) -> None:
    assert parse_scope(text) is None


def test_what_a_set_allows() -> None:
    scopes = ScopeSet.parse("system/Group.rs system/Patient.c system/Group.$add-member")
    assert scopes.allows("Group", "r") and scopes.allows("Group", "s")
    assert not scopes.allows("Group", "u")
    assert scopes.allows("Patient", "c") and not scopes.allows("Patient", "r")
    assert scopes.allows_operation("Group", "add-member")
    assert not scopes.allows_operation("Group", "remove-member")
    assert scopes.types_with("s") == frozenset({"Group"})
    assert scopes.allows(None, "c") and not scopes.allows(None, "d")


def test_the_wildcard_type_does_not_cover_the_audit_trail() -> None:
    everything = ScopeSet.parse("system/*.*")
    assert everything.allows("Patient", "d")
    assert not everything.allows("AuditEvent", "s")
    assert ScopeSet.parse("system/AuditEvent.rs").allows("AuditEvent", "s")


def test_a_token_is_cut_down_to_its_clients_allowance() -> None:
    token = ScopeSet.parse("system/*.* system/Group.$add-member")
    allowance = ScopeSet.parse("system/Group.rs system/Patient.r")
    cut = token.within(allowance)
    assert cut.allows("Group", "s") and cut.allows("Patient", "r")
    assert not cut.allows("Patient", "s") and not cut.allows("Group", "u")
    assert not cut.allows_operation("Group", "add-member")


def test_covers() -> None:
    allowance = ScopeSet.parse("system/*.rs system/Group.cud")
    assert allowance.covers(ScopeSet.parse("system/Patient.r system/Group.u"))
    assert allowance.covers(ScopeSet.parse("system/*.s"))
    assert not allowance.covers(ScopeSet.parse("system/*.u"))
    assert not allowance.covers(ScopeSet.parse("system/Group.$add-member"))
    assert ScopeSet.parse("system/*.$members").covers(ScopeSet.parse("system/Group.$members"))

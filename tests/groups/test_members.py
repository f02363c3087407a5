"""The member fast path (``groups.members``): validation, the extra JSON, and rendering.

No database and no ClickHouse: these are the checks every member of a million-member roster
goes through, so each rule is pinned here with its exact detail code and text, and the
rendering is checked byte for byte against the element it came from.
"""

from __future__ import annotations

import tracemalloc

import orjson
import pytest

from fhirservice.errors import BadRequest
from groups.members import (
    MEMBER_TYPES,
    MSG_BAD_INACTIVE,
    MSG_BAD_PERIOD,
    MSG_BAD_REFERENCE,
    MSG_ENTITY_MISSING,
    MSG_EXTRA_INVALID,
    MSG_MEMBER_NOT_OBJECT,
    MSG_MEMBER_UNKNOWN,
    MSG_PERIOD_ORDER,
    Member,
    PlainRoster,
    parse_member,
    parse_members,
    render_member,
    split_plain_roster,
)
from tests.fhir_check import assert_strict_r4

WHERE = "Group.member[3]"


def rejected(value, detail_code: str) -> BadRequest:
    """parse_member refuses ``value`` with this detail code, naming WHERE."""
    with pytest.raises(BadRequest) as caught:
        parse_member(value, WHERE)
    error = caught.value
    assert error.detail_code == detail_code, error.diagnostics
    assert error.expression == [WHERE]
    assert error.diagnostics.startswith(f"{WHERE}: ")
    return error


def in_group(*members) -> dict:
    """A Group carrying these member elements, for the independent R4 check."""
    return {"resourceType": "Group", "type": "person", "actual": True, "member": list(members)}


# --- references ----------------------------------------------------------------------------


@pytest.mark.parametrize("member_type", MEMBER_TYPES)
def test_every_allowed_target_type_is_accepted(member_type):
    parsed = parse_member({"entity": {"reference": f"{member_type}/x-1.2"}}, WHERE)
    assert parsed == Member(f"{member_type}/x-1.2", member_type)


@pytest.mark.parametrize(
    ("ref", "member_type"),
    [
        ("Patient/123", "Patient"),
        ("http://example.org/fhir/Patient/123", "Patient"),
        ("https://example.org/Device/d1", "Device"),
        ("Practitioner/abc/_history/2", "Practitioner"),
        ("Group/" + "a" * 64, "Group"),
    ],
)
def test_well_formed_references_keep_their_text(ref, member_type):
    parsed = parse_member({"entity": {"reference": ref}}, WHERE)
    assert (parsed.ref, parsed.member_type, parsed.extra) == (ref, member_type, "")


@pytest.mark.parametrize(
    "ref",
    [
        "Observation/1",  # not a type Group.member may reference
        "patient/1",
        "Patient/",
        "Patient",
        "Patient/a b",
        "Patient/a/b",
        "Patient/" + "a" * 65,
        "#contained",
        "urn:uuid:0b4b3e33-4c56-4e7f-9ef2-8c0c3b0e9f00",
        " Patient/1",
        "",
    ],
)
def test_malformed_or_foreign_references_are_refused(ref):
    error = rejected({"entity": {"reference": ref}}, "MSG_MEMBER_REFERENCE_INVALID")
    assert error.diagnostics == MSG_BAD_REFERENCE.format(where=WHERE, ref=ref)


@pytest.mark.parametrize(
    "value",
    [
        {},
        {"entity": {}},
        {"entity": {"display": "Peter"}},
        {"entity": "Patient/1"},
        {"entity": {"reference": 7}},
        {"entity": {"reference": None}},
        {"period": {"start": "2020"}},
    ],
)
def test_a_member_needs_an_entity_reference(value):
    error = rejected(value, "MSG_MEMBER_INVALID")
    assert error.diagnostics == MSG_ENTITY_MISSING.format(where=WHERE)


@pytest.mark.parametrize("value", [[], "Patient/1", 3, None, True])
def test_a_member_is_an_object(value):
    error = rejected(value, "MSG_MEMBER_INVALID")
    assert error.diagnostics == MSG_MEMBER_NOT_OBJECT.format(where=WHERE)


@pytest.mark.parametrize("name", ["reference", "foo", "_inactive", "Entity"])
def test_unknown_member_elements_are_refused(name):
    error = rejected({"entity": {"reference": "Patient/1"}, name: 1}, "MSG_MEMBER_INVALID")
    assert error.diagnostics == MSG_MEMBER_UNKNOWN.format(where=WHERE, name=name)


# --- period and inactive -----------------------------------------------------------------


@pytest.mark.parametrize(
    "period",
    [
        {"start": "2020-01-01"},
        {"end": "2020-01-01"},
        {"start": "2020-01-01", "end": "2020-01-01"},
        {"start": "2020", "end": "2020-06"},  # overlapping precisions
        {"start": "2020-01-01T10:00:00Z", "end": "2020-01-01T10:00:00Z"},
        {"start": "2020-01-01T10:00:00+02:00", "end": "2020-01-01T09:00:00Z"},
        {"start": "2019-12-31", "end": "2020"},
    ],
)
def test_periods_with_start_not_after_end_are_accepted(period):
    parsed = parse_member({"entity": {"reference": "Patient/1"}, "period": period}, WHERE)
    assert (parsed.period_start, parsed.period_end) == (
        period.get("start", ""),
        period.get("end", ""),
    )
    assert parsed.extra == ""


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("2021", "2020"),
        ("2020-02", "2020-01"),
        ("2020-01-02", "2020-01-01"),  # the next day, not only the next year
        ("2020-01-01T10:00:01Z", "2020-01-01T10:00:00Z"),
        ("2020-01-01T10:00:00Z", "2020-01-01T11:59:59+02:00"),
    ],
)
def test_a_period_that_ends_before_it_starts_is_refused(start, end):
    error = rejected(
        {"entity": {"reference": "Patient/1"}, "period": {"start": start, "end": end}},
        "MSG_MEMBER_PERIOD_INVALID",
    )
    assert error.diagnostics == MSG_PERIOD_ORDER.format(where=WHERE, start=start, end=end)


@pytest.mark.parametrize(
    "period",
    [
        {},
        "2020",
        ["2020"],
        {"start": "2020-13-01"},
        {"start": "20-01-01"},
        {"end": "2020-01-01T10:00:00"},  # a time needs a zone
        {"start": None},
        {"start": 2020},
        {"begin": "2020"},
    ],
)
def test_malformed_periods_are_refused(period):
    error = rejected({"entity": {"reference": "Patient/1"}, "period": period}, "MSG_MEMBER_INVALID")
    assert error.diagnostics == MSG_BAD_PERIOD.format(where=WHERE)


@pytest.mark.parametrize("inactive", ["true", 1, 0, None, "false"])
def test_inactive_must_be_a_boolean(inactive):
    error = rejected(
        {"entity": {"reference": "Patient/1"}, "inactive": inactive}, "MSG_MEMBER_INVALID"
    )
    assert error.diagnostics == MSG_BAD_INACTIVE.format(where=WHERE)


def test_inactive_false_is_the_default_and_not_rendered():
    parsed = parse_member({"entity": {"reference": "Patient/1"}, "inactive": False}, WHERE)
    assert parsed == Member("Patient/1", "Patient")
    assert parsed.to_json() == b'{"entity":{"reference":"Patient/1"}}'


# --- extra content -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        {"id": "m1", "entity": {"reference": "Patient/1"}},
        {"entity": {"reference": "Patient/1", "display": "Peter Chalmers"}},
        {"entity": {"reference": "Patient/1", "type": "Patient"}},
        {
            "extension": [{"url": "http://example.org/x", "valueString": "ü 😀"}],
            "entity": {"reference": "Patient/1"},
            "period": {"id": "p", "start": "2020-01-01", "end": "2021-01-01"},
            "inactive": True,
        },
        {
            "modifierExtension": [{"url": "http://example.org/m", "valueBoolean": True}],
            "entity": {"reference": "Device/d"},
        },
        {
            "entity": {"reference": "Patient/1"},
            "period": {"extension": [{"url": "http://example.org/e", "valueCode": "x"}]},
        },
    ],
)
def test_extra_member_content_comes_back_as_sent(value):
    parsed = parse_member(value, WHERE)
    assert parsed.extra != ""
    assert parsed.to_dict() == value
    assert orjson.loads(parsed.to_json()) == value
    assert_strict_r4(in_group(parsed.to_dict()))


@pytest.mark.parametrize(
    "value",
    [
        {"entity": {"reference": "Patient/1"}, "id": 5},
        {"entity": {"reference": "Patient/1"}, "extension": "nope"},
        {"entity": {"reference": "Patient/1"}, "extension": [{"valueString": "no url"}]},
        {"entity": {"reference": "Patient/1", "foo": "bar"}},
        {"entity": {"reference": "Patient/1", "display": 3}},
        {"entity": {"reference": "Patient/1"}, "period": {"start": "2020", "id": ["x"]}},
    ],
)
def test_extra_member_content_must_be_valid_r4(value):
    """What travels as extra JSON is served back, so it must be valid FHIR as well."""
    rejected(value, "MSG_MEMBER_INVALID")


def test_invalid_extra_content_is_named_below_the_member():
    error = rejected({"entity": {"reference": "Patient/1", "foo": "x"}}, "MSG_MEMBER_INVALID")
    assert error.diagnostics == MSG_EXTRA_INVALID.format(
        where=WHERE, problem="entity.foo: Unknown element 'foo'"
    )


# --- rendering -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("Patient/1", "", "", False, ""), b'{"entity":{"reference":"Patient/1"}}'),
        (
            ("Patient/1", "2020", "", 0, ""),
            b'{"entity":{"reference":"Patient/1"},"period":{"start":"2020"}}',
        ),
        (
            ("Patient/1", "", "2021-02-03", True, ""),
            b'{"entity":{"reference":"Patient/1"},"period":{"end":"2021-02-03"},"inactive":true}',
        ),
        (
            ('Patient/"q"\\', "", "", 1, ""),
            b'{"entity":{"reference":"Patient/\\"q\\"\\\\"},"inactive":true}',
        ),
    ],
)
def test_render_member_without_extra_is_exact_json(args, expected):
    assert render_member(*args) == expected
    assert orjson.loads(expected)  # well-formed


def test_member_to_dict_round_trips_every_field():
    value = {
        "entity": {"reference": "Group/g1"},
        "period": {"start": "2020-01-01T00:00:00Z", "end": "2020-12-31"},
        "inactive": True,
    }
    parsed = parse_member(value, WHERE)
    assert parsed == Member("Group/g1", "Group", "2020-01-01T00:00:00Z", "2020-12-31", True, "")
    assert parsed.to_dict() == value
    assert_strict_r4(in_group(parsed.to_dict()))


# -- a roster of plain members read from the body's text (split_plain_roster) ----------------

GROUP = b'{"resourceType":"Group","type":"person","actual":true'


def plain(*refs: str) -> bytes:
    """Plain members in compact JSON, comma-joined (the text of a member array's inside)."""
    return b",".join(b'{"entity":{"reference":"%s"}}' % ref.encode() for ref in refs)


def test_a_compact_plain_roster_is_read_as_sorted_unique_references():
    refs = ["Patient/b", "Group/g-1", "Patient/a", "Patient/b", "PractitionerRole/r.2"]
    data = GROUP + b',"member":[' + plain(*refs) + b'],"name":"n"}'
    body = split_plain_roster(data)
    roster = body["member"]
    assert isinstance(roster, PlainRoster)
    # The same roster and the same rest of the body as decoding it whole.
    whole = orjson.loads(data)
    assert dict(roster) == parse_members(whole.pop("member"), "Group.member")
    assert {k: v for k, v in body.items() if k != "member"} == whole
    assert list(roster) == ["Group/g-1", "Patient/a", "Patient/b", "PractitionerRole/r.2"]
    assert "Patient/a" in roster and "Patient/c" not in roster and 1 not in roster
    assert roster["PractitionerRole/r.2"] == Member("PractitionerRole/r.2", "PractitionerRole")
    with pytest.raises(KeyError):
        roster["Patient/c"]
    expected = [
        ["Group/g-1", "added", 0, "Group", "", "", False, ""],
        ["Patient/a", "added", 1, "Patient", "", "", False, ""],
        ["Patient/b", "added", 2, "Patient", "", "", False, ""],
        ["PractitionerRole/r.2", "added", 3, "PractitionerRole", "", "", False, ""],
    ]
    events = roster.added_events()
    assert list(events) == expected and len(events) == 4 and events[-1] == expected[3]
    # Slices (the outbox's batches) are views that keep each event's seq.
    assert list(events[1:3]) == expected[1:3] and list(events[1:3][1:]) == expected[2:3]
    assert len(events[3:1]) == 0 and list(events[2:99]) == expected[2:]
    with pytest.raises(IndexError):
        events[4]


def test_only_the_top_level_member_array_is_read_as_text():
    """A member array nested deeper (a contained Group) or a key that only ends in "member"
    is decoded as JSON; the top-level array is the one read."""
    contained = b'{"resourceType":"Group","type":"person","actual":true,"member":['
    contained += plain("Patient/inner") + b"]}"
    data = (
        GROUP
        + b',"contained":['
        + contained
        + b'],"a\\"member":['
        + plain("Patient/odd")
        + b'],"member":['
        + plain("Patient/top")
        + b"]}"
    )
    body = split_plain_roster(data)
    assert list(body["member"]) == ["Patient/top"]
    whole = orjson.loads(data)
    assert body["contained"] == whole["contained"]
    assert body['a"member'] == whole['a"member']
    # No top-level member at all: nothing read as text.
    assert split_plain_roster(GROUP + b',"contained":[' + contained + b"]}") is None


@pytest.mark.parametrize(
    "members",
    [
        b'{"entity": {"reference": "Patient/a"}}',  # not compact
        plain("Patient/a") + b", " + plain("Patient/b"),
        plain("Patient/a") + b',{"entity":{"reference":"Patient/b"},"inactive":true}',
        plain("Patient/a", "Observation/1"),  # not a member type: the full path says why
        plain("Patient/a", "Patient/a b"),
        plain("Patient/a", "http://h/Patient/b"),
        plain("Patient/a") + b",",
        b"",
        plain("Patient/\\u0061"),  # an escape
        plain("Patient/" + "x" * 65),
    ],
)
def test_any_other_roster_is_left_to_the_json_decoder(members):
    assert split_plain_roster(GROUP + b',"member":[' + members + b"]}") is None


def test_a_body_that_is_not_json_is_left_to_the_json_decoder():
    assert split_plain_roster(GROUP + b',"member":[' + plain("Patient/a") + b"]") is None
    assert split_plain_roster(b'["member":[' + plain("Patient/a") + b"]]") is None


def test_duplicate_member_keys_keep_the_last_as_the_decoder_does():
    data = GROUP + b',"member":[' + plain("Patient/a") + b'],"member":[' + plain("Patient/b")
    assert list(split_plain_roster(data + b"]}")["member"]) == ["Patient/b"]


def test_a_plain_roster_is_read_without_objects_per_member():
    """Bounded memory (Python's allocations, traced): a 10^5-member plain roster is read
    from the body at under 5x the body's size (its text, the references and their join;
    decoding it built two dicts and a Member per member, ~22x), and its events are made a
    block at a time (all of them as lists would be ~4x)."""
    data = GROUP + b',"member":[' + plain(*(f"Patient/m-{i}" for i in range(100_000))) + b"]}"
    tracemalloc.start()
    try:
        body = split_plain_roster(data)
        _, read_peak = tracemalloc.get_traced_memory()
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        count = sum(1 for _ in body["member"].added_events())
        _, events_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 100_000
    assert read_peak < 5 * len(data)
    assert events_peak - held < len(data) / 4

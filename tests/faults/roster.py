"""Writes over HTTP, the ledger of their answers, and the full comparison after recovery.

Every write names members so that its effect is recognisable afterwards: an add brings a
reference no other write uses, and a writer removes only members it knows are present (an
initial member it owns, or one it added with a 2xx answer). A write's outcome is then

- ``acked``: a 2xx answer, with the version it made;
- ``rejected``: a 4xx answer, or the connection was refused (nothing was sent): no change;
- ``unknown``: a 5xx answer, or the connection broke after sending: either outcome allowed.

The comparison (``roster_problems``) reads everything a client can read and checks it against
that ledger: the history must be one version per committed write, each version differing from
the previous by exactly that write's member, each acknowledged write in the version its answer
named, each unknown write in at most one version; every version's ``quantity`` must count its
members; ``$members``, GET and ``Group?member=`` must serve the last version's roster.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import requests
import urllib3

FHIR_JSON = "application/fhir+json"
PATCH_JSON = "application/json-patch+json"
IDENTIFIER_SYSTEM = "urn:fhirservice:faults"
ACKED, REJECTED, UNKNOWN = "acked", "rejected", "unknown"
ETAG = re.compile(r'W/"(\d+)"')
LOCATION = re.compile(r"/Group/([^/]+)/_history/")
# Writes ask for no body back: rendering a 200k roster into the answer is not under test.
MINIMAL = {"Prefer": "return=minimal"}
# Seconds to wait for an answer: a 200k-member create takes several on a loaded machine.
WRITE_TIMEOUT = (5, 120)


class Api:
    """HTTP to the app, one keep-alive session per thread."""

    def __init__(self, base: str) -> None:
        self.base = base
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        """This thread's session."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def get(self, path: str) -> Any:
        """GET ``path`` (or an absolute URL) and return its JSON body; must answer 200."""
        url = path if path.startswith("http") else self.base + path
        answer = self.session.get(url, timeout=WRITE_TIMEOUT)
        assert answer.status_code == 200, f"GET {url}: {answer.status_code} {answer.text[:500]}"
        return orjson.loads(answer.content)

    def pages(self, path: str, next_link: Any) -> Iterator[Any]:
        """The JSON bodies of ``path`` and of the pages its ``next`` links lead to."""
        url: str | None = path
        while url:
            body = self.get(url)
            yield body
            url = next_link(body)


# -- the ledger -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    """One roster write and what its answer says."""

    group: str
    op: str  # "add" or "remove"
    ref: str
    outcome: str
    version: int | None
    answer: str  # status code, or the exception

    def __str__(self) -> str:
        made = f" -> v{self.version}" if self.version is not None else ""
        return f"{self.op} {self.ref}: {self.outcome} ({self.answer}){made}"


@dataclass
class Roster:
    """A Group under test: its initial members and the writes sent to it."""

    id: str
    initial: list[str]
    writes: list[Write] = field(default_factory=list)


def classify(send: Any) -> tuple[str, int | None, str]:
    """Send a write (``send()`` returns the response) and classify its outcome."""
    try:
        answer = send()
    except requests.ConnectionError as exc:
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        if isinstance(exc, requests.ConnectTimeout) or isinstance(
            reason, urllib3.exceptions.NewConnectionError
        ):
            return REJECTED, None, "connection refused"
        return UNKNOWN, None, type(exc).__name__
    except requests.Timeout as exc:
        return UNKNOWN, None, type(exc).__name__
    status = answer.status_code
    if 200 <= status < 300:
        match = ETAG.fullmatch(answer.headers.get("ETag", ""))
        assert match, f"a {status} answer without a version ETag: {answer.headers}"
        return ACKED, int(match.group(1)), str(status)
    if 400 <= status < 500:
        return REJECTED, None, str(status)
    return UNKNOWN, None, str(status)


def group_body(refs: Iterable[str], token: str) -> bytes:
    """A Group with these members, findable by ``identifier=IDENTIFIER_SYSTEM|token``."""
    return orjson.dumps(
        {
            "resourceType": "Group",
            "type": "person",
            "actual": True,
            "identifier": [{"system": IDENTIFIER_SYSTEM, "value": token}],
            "member": [{"entity": {"reference": ref}} for ref in refs],
        }
    )


def create(api: Api, refs: list[str], token: str) -> tuple[str, int | None, str, str | None]:
    """POST a Group: (outcome, version, answer, id from the answer)."""
    created: list[str] = []

    def send() -> requests.Response:
        answer = api.session.post(
            f"{api.base}/Group",
            data=group_body(refs, token),
            headers={"Content-Type": FHIR_JSON, **MINIMAL},
            timeout=WRITE_TIMEOUT,
        )
        location = LOCATION.search(answer.headers.get("Location", ""))
        if answer.status_code == 201 and location:
            created.append(location.group(1))
        return answer

    outcome, version, answer = classify(send)
    return outcome, version, answer, created[0] if created else None


def find_by_token(api: Api, token: str) -> list[str]:
    """Ids of the Groups carrying ``token`` (a create whose answer never came)."""
    body = api.get(f"/Group?identifier={IDENTIFIER_SYSTEM}|{token}&_elements=id")
    return [entry["resource"]["id"] for entry in body.get("entry", [])]


def patch(api: Api, group: str, op: str, ref: str) -> Write:
    """Add or remove one member by reference with a JSON Patch."""
    member = {"entity": {"reference": ref}}
    ops = [
        {"op": "add", "path": "/member/-", "value": member}
        if op == "add"
        else {"op": "remove", "path": "/member", "value": member}
    ]
    outcome, version, answer = classify(
        lambda: api.session.patch(
            f"{api.base}/Group/{group}",
            data=orjson.dumps(ops),
            headers={"Content-Type": PATCH_JSON, **MINIMAL},
            timeout=WRITE_TIMEOUT,
        )
    )
    return Write(group, op, ref, outcome, version, answer)


class Writers:
    """Threads adding and removing members of some rosters until stopped.

    Writer ``w`` owns the initial members whose index is ``w`` modulo the writer count and
    the members it adds; it removes only those (so each member has one writer and at most
    one add and one remove). Between writes it pauses up to ``pause`` seconds, and longer
    after a failure, so an outage does not turn into a flood of refused requests.
    """

    def __init__(
        self, api: Api, rosters: list[Roster], *, count: int, seed: int, pause: float = 0.05
    ) -> None:
        self.api = api
        self.rosters = rosters
        self.count = count
        self.seed = seed
        self.pause = pause
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ledgers: list[list[Write]] = [[] for _ in range(count)]
        self._errors: list[BaseException] = []

    def __enter__(self) -> Writers:
        for index in range(self.count):
            thread = threading.Thread(target=self._main, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=300)
        assert not any(t.is_alive() for t in self._threads), "a writer hung"
        if self._errors:
            raise self._errors[0]
        for ledger in self._ledgers:
            for write in ledger:
                next(r for r in self.rosters if r.id == write.group).writes.append(write)

    def _main(self, index: int) -> None:
        try:
            self._write(index)
        except BaseException as exc:  # noqa: BLE001 - re-raised by __exit__
            self._errors.append(exc)

    def _write(self, index: int) -> None:
        rng = random.Random(f"{self.seed}/{index}")
        owned = {
            r.id: [ref for i, ref in enumerate(r.initial) if i % self.count == index]
            for r in self.rosters
        }
        ledger = self._ledgers[index]
        fresh = 0
        while not self.stop.is_set():
            roster = rng.choice(self.rosters)
            mine = owned[roster.id]
            if mine and rng.random() < 0.4:
                ref = mine.pop(rng.randrange(len(mine)))
                write = patch(self.api, roster.id, "remove", ref)
                if write.outcome == REJECTED:
                    mine.append(ref)  # still present: it may be removed later
            else:
                ref = f"Patient/{roster.id[:8]}-w{index}-{fresh}"
                fresh += 1
                write = patch(self.api, roster.id, "add", ref)
                if write.outcome == ACKED:
                    mine.append(ref)
            ledger.append(write)
            time.sleep(rng.uniform(0, self.pause) + (0 if write.outcome == ACKED else 0.1))


# -- the comparison ------------------------------------------------------------------------------


def _members_of(resource: dict[str, Any]) -> list[str]:
    return [m["entity"]["reference"] for m in resource.get("member", [])]


def _bundle_next(body: dict[str, Any]) -> str | None:
    return next((link["url"] for link in body.get("link", []) if link["relation"] == "next"), None)


def _parameters_next(body: dict[str, Any]) -> str | None:
    return next((p["valueUri"] for p in body["parameter"] if p["name"] == "next"), None)


def _served_versions(api: Api, group: str) -> dict[int, dict[str, Any]]:
    """Every version of the Group as ``_history`` serves it (members as of that version)."""
    versions: dict[int, dict[str, Any]] = {}
    for body in api.pages(f"/Group/{group}/_history?_count=100", _bundle_next):
        for entry in body.get("entry", []):
            resource = entry["resource"]
            versions[int(resource["meta"]["versionId"])] = resource
    return versions


def _change(before: set[str], after: set[str]) -> tuple[str, str] | None:
    """The one member a version added or removed, or None when it is not exactly one."""
    added, removed = after - before, before - after
    if len(added) + len(removed) != 1:
        return None
    return ("add", next(iter(added))) if added else ("remove", next(iter(removed)))


def _history_problems(roster: Roster, versions: dict[int, dict[str, Any]]) -> list[str]:
    problems: list[str] = []
    last = max(versions, default=0)
    if sorted(versions) != list(range(1, last + 1)):
        problems.append(f"history: versions are not 1..{last}: {sorted(versions)[:20]}")
    members = {v: _members_of(resource) for v, resource in versions.items()}
    for version, resource in sorted(versions.items()):
        quantity = resource.get("quantity")
        if quantity != len(members[version]):
            problems.append(
                f"quantity: _history/{version} says {quantity}, has {len(members[version])} members"
            )
        if len(set(members[version])) != len(members[version]):
            problems.append(f"history: _history/{version} lists a member twice")
    if 1 in members and set(members[1]) != set(roster.initial):
        problems.append(
            _difference("history: _history/1 vs the created roster", members[1], roster.initial)
        )
    # Each version v >= 2 must make exactly one write's change, a write that was not
    # refused, once; an acknowledged one no later than the version its answer named (a retry
    # of a write whose first commit went through answers with the current version).
    by_change = {(w.op, w.ref): w for w in roster.writes}
    made: set[tuple[str, str]] = set()
    for version in range(2, last + 1):
        if version not in members or version - 1 not in members:
            continue
        change = _change(set(members[version - 1]), set(members[version]))
        write = by_change.get(change) if change is not None else None
        if write is None or write.outcome == REJECTED or change in made:
            why = "no write" if write is None else ("again" if change in made else "refused")
            problems.append(f"history: _history/{version} made {change}: {why} {write or ''}")
            continue
        made.add(change)
        if write.outcome == ACKED and write.version is not None and version > write.version:
            problems.append(f"history: _history/{version} made a change answered earlier: {write}")
    for write in roster.writes:
        if write.outcome == ACKED and (write.op, write.ref) not in made:
            problems.append(f"history: no version made an acknowledged write: {write}")
    return problems


def _difference(label: str, served: Iterable[str], expected: Iterable[str]) -> str:
    served_set, expected_set = set(served), set(expected)
    missing, extra = sorted(expected_set - served_set), sorted(served_set - expected_set)
    return f"{label}: {len(missing)} missing {missing[:5]}, {len(extra)} unexpected {extra[:5]}"


def roster_problems(api: Api, roster: Roster, *, searches: int | None = None) -> list[str]:
    """Everything a client reads of the roster, compared with the writes' answers.

    ``searches``: how many member references to look up with ``Group?member=`` (a sample
    spread over the initial members and the writes, plus those of every write without a
    2xx answer); None looks up every one.
    """
    versions = _served_versions(api, roster.id)
    if not versions:
        return [f"history: Group/{roster.id} has none"]
    problems = [
        p.replace(": ", f": Group/{roster.id} ", 1) for p in _history_problems(roster, versions)
    ]
    last = max(versions)
    final = _members_of(versions[last])

    page_members: list[str] = []
    group_version = quantity = None
    for body in api.pages(f"/Group/{roster.id}/$members?_count=10000", _parameters_next):
        for parameter in body["parameter"]:
            if parameter["name"] == "member":
                page_members.append(parameter["part"][0]["valueReference"]["reference"])
            elif parameter["name"] == "groupVersion":
                group_version = int(parameter["valueString"])
            elif parameter["name"] == "quantity":
                quantity = parameter["valueInteger"]
    if set(page_members) != set(final) or len(page_members) != len(final):
        problems.append(
            _difference(f"$members: Group/{roster.id} vs _history/{last}", page_members, final)
        )
    if (group_version, quantity) != (last, len(final)):
        problems.append(
            f"$members: Group/{roster.id} version {group_version} quantity {quantity}, "
            f"expected {last} and {len(final)}"
        )

    current = api.get(f"/Group/{roster.id}")
    if set(_members_of(current)) != set(final):
        problems.append(
            _difference(f"GET: Group/{roster.id} vs _history/{last}", _members_of(current), final)
        )
    if (int(current["meta"]["versionId"]), current.get("quantity")) != (last, len(final)):
        problems.append(
            f"GET: Group/{roster.id} version {current['meta']['versionId']} quantity "
            f"{current.get('quantity')}, expected {last} and {len(final)}"
        )

    touched = list(dict.fromkeys([*roster.initial, *(w.ref for w in roster.writes)]))
    if searches is not None and len(touched) > searches:
        step = len(touched) / searches
        sample = [touched[int(i * step)] for i in range(searches)] + [touched[-1]]
        unanswered = [w.ref for w in roster.writes if w.outcome != ACKED]
        touched = list(dict.fromkeys([*sample, *unanswered]))
    final_set = set(final)
    for ref in touched:
        body = api.get(f"/Group?member={ref}&_elements=id")
        found = {entry["resource"]["id"] for entry in body.get("entry", [])}
        expected = {roster.id} if ref in final_set else set()
        if found != expected:
            problems.append(
                f"Group?member=: {ref} found in {sorted(found)}, expected {sorted(expected)}"
            )
    return problems


def outcome_counts(rosters: Iterable[Roster]) -> str:
    """The writes by outcome and answer: "310 acked (200 x310), 2 unknown (500 x2)"."""
    writes = [w for r in rosters for w in r.writes]
    parts = []
    for outcome in (ACKED, REJECTED, UNKNOWN):
        answers = Counter(w.answer for w in writes if w.outcome == outcome)
        detail = ", ".join(f"{answer} x{n}" for answer, n in answers.most_common())
        parts.append(f"{sum(answers.values())} {outcome}" + (f" ({detail})" if detail else ""))
    return ", ".join(parts)

"""Turning stored rows into response bodies: single resources and Bundles, possibly streamed.

A resource body is ``bytes`` or, when a type handler streams an external part (the Group
roster), an iterator of byte chunks; Bundles are generated entry by entry, so a history or
search page never needs its resources in memory all at once.

Streamed bodies keep their structure (:class:`Spliced`, :class:`BundleStream`) so that
:func:`reformat` can write them as XML while streaming too: a Group of 10^6 members goes out
member chunk by member chunk in either format.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import orjson

from fhirservice.fhir.xml import (
    bundle_open_xml,
    elements_to_xml,
    entry_to_xml,
    resource_open_xml,
    resource_to_xml,
)
from fhirservice.rest.negotiation import OutputFormat
from fhirservice.rest.subsetting import subset, wants_element
from fhirservice.store.handlers import handler_for

Body = bytes | Iterator[bytes] | Iterable[bytes]


class VersionRow(Protocol):
    """What StoredResource and ResourceVersion have in common."""

    resource_type: str
    resource_id: str
    version_id: int
    incarnation: int
    body: str
    deleted: bool


def render_resource(
    row: VersionRow,
    *,
    current: bool,
    summary: str | None = None,
    elements: list[str] | None = None,
    in_bundle: bool = False,
) -> Body:
    """The body of one version: stored JSON, subsetted if asked, roster spliced in if any."""
    handler = handler_for(row.resource_type)
    text = row.body.encode()
    roster = handler.external_element
    if in_bundle and current and roster is not None and not elements:
        # Search results carry no external part (a page of 50 million-member rosters is
        # not a search answer): the entry is tagged SUBSETTED; read the resource for it.
        elements = [name for name in orjson.loads(text) if name != roster]
    if summary not in (None, "false") or elements:
        body, _ = subset(orjson.loads(text), summary=summary, elements=elements)
        text = orjson.dumps(body)
    if roster is None or not wants_element(
        roster, summary=summary, elements=elements, resource_type=row.resource_type
    ):
        return text
    chunks = handler.external_chunks(row, current=current, in_bundle=in_bundle)
    if chunks is None:
        return text
    return Spliced(text, roster, chunks)


class Spliced:
    """A resource's stored JSON with a streamed array appended (a Group and its roster)."""

    __slots__ = ("chunks", "name", "text")

    def __init__(self, text: bytes, name: str, chunks: Iterator[bytes]) -> None:
        self.text = text
        self.name = name
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return splice_array(self.text, self.name, self.chunks)


def splice_array(text: bytes, name: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Append ``"name": [chunks…]`` to a JSON object's text; nothing when chunks is empty."""
    first = next(chunks, None)
    if first is None:
        yield text
        return
    yield text[:-1] + b',"' + name.encode() + b'":[' + first
    for chunk in chunks:
        yield b"," + chunk
    yield b"]}"


def join(body: Body) -> bytes:
    """A body as one bytes object (for small bodies and tests)."""
    return body if isinstance(body, bytes) else b"".join(body)


def bundle_stream(
    header: dict[str, Any], entries: Iterable[tuple[dict[str, Any], Body | None]]
) -> Iterator[bytes]:
    """Encode a Bundle: ``header`` fields, then each (entry fields, resource body) in turn."""
    head = orjson.dumps(header)
    entries = iter(entries)
    first = True
    for entry, resource in entries:
        prefix = head[:-1] + b',"entry":[' if first else b","
        first = False
        fields = orjson.dumps(entry)
        if resource is None:
            yield prefix + fields
            continue
        resource_prefix = b'"resource":'
        if fields == b"{}":
            yield prefix + b"{" + resource_prefix
        else:
            yield prefix + fields[:-1] + b"," + resource_prefix
        if isinstance(resource, bytes):
            yield resource
        else:
            yield from resource
        yield b"}"
    yield head if first else b"]}"


def bundle_body(
    header: dict[str, Any], entries: Iterable[tuple[dict[str, Any], Body | None]]
) -> Body:
    """A Bundle body: bytes when every entry is small, a stream when any entry streams."""
    entries = list(entries)
    if any(resource is not None and is_streamed(resource) for _, resource in entries):
        return BundleStream(header, entries)
    return b"".join(bundle_stream(header, entries))


class BundleStream:
    """A Bundle with at least one streamed entry: encoded while it is sent."""

    __slots__ = ("entries", "header")

    def __init__(self, header: dict[str, Any], entries: list[tuple[dict[str, Any], Body | None]]):
        self.header = header
        self.entries = entries

    def __iter__(self) -> Iterator[bytes]:
        return bundle_stream(self.header, self.entries)


def is_streamed(body: Body) -> bool:
    """Whether a body is a chunk iterator rather than bytes."""
    return not isinstance(body, bytes)


def reformat(body: Body, chosen: OutputFormat) -> Body:
    """A JSON body in the chosen format: XML, or indented JSON for ``_pretty``.

    Streamed bodies stay streamed, indented too when ``_pretty`` asks: their parts are
    indented by the depth they nest at, so the whole reads as if indented in one piece.
    """
    if not chosen.xml:
        if isinstance(body, bytes):
            return _indented(orjson.loads(body), 0)
        return _pretty_json_stream(body, 0)
    if isinstance(body, bytes):
        return resource_to_xml(orjson.loads(body), pretty=chosen.pretty)
    return _xml_stream(body, chosen.pretty, 0)


def _indented(value: Any, depth: int) -> bytes:
    """``value`` as JSON indented by two spaces a level, nested ``depth`` levels deep (the
    first line is not padded: it follows its key or the array's pad). JSON strings hold no
    raw newline, so every newline of the text is a line break of its structure."""
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2)
    return text.replace(b"\n", b"\n" + b"  " * depth) if depth else text


def _open_object(value: dict[str, Any], depth: int) -> bytes:
    """An indented object without its closing line, ready for more members after a comma."""
    text = _indented(value, depth)
    return text[: text.rfind(b"\n")] + b"," if value else b"{"


def _pretty_json_stream(body: Iterable[bytes], depth: int) -> Iterator[bytes]:
    """A streamed JSON body indented, nested ``depth`` levels deep."""
    if isinstance(body, Spliced):
        yield from _spliced_json(body, depth)
    elif isinstance(body, BundleStream):
        yield from _bundle_json(body)
    else:
        yield _indented(orjson.loads(b"".join(body)), depth)


def _spliced_json(body: Spliced, depth: int) -> Iterator[bytes]:
    """A resource and its streamed array, indented: each chunk of items as it comes."""
    resource = orjson.loads(body.text)
    first = next(body.chunks, None)
    if first is None:
        yield _indented(resource, depth)
        return
    pad = b"\n" + b"  " * (depth + 1)
    item_pad = pad + b"  "
    yield _open_object(resource, depth) + pad + b'"' + body.name.encode() + b'": ['
    separator = b""
    for chunk in itertools.chain((first,), body.chunks):
        parts = []
        for item in orjson.loads(b"[" + chunk + b"]"):
            parts.append(separator + item_pad + _indented(item, depth + 2))
            separator = b","
        yield b"".join(parts)
    yield pad + b"]\n" + b"  " * depth + b"}"


def _bundle_json(body: BundleStream) -> Iterator[bytes]:
    """A Bundle with streamed entries, indented: entries at depth 2, resources at 3."""
    if not body.entries:
        yield _indented(body.header, 0)
        return
    yield _open_object(body.header, 0) + b'\n  "entry": ['
    separator = b""
    for fields, resource in body.entries:
        if resource is None:
            yield separator + b"\n    " + _indented(fields, 2)
        else:
            yield separator + b"\n    " + _open_object(fields, 2) + b'\n      "resource": '
            if isinstance(resource, bytes):
                yield _indented(orjson.loads(resource), 3)
            else:
                yield from _pretty_json_stream(resource, 3)
            yield b"\n    }"
        separator = b","
    yield b"\n  ]\n}"


def _xml_stream(body: Iterable[bytes], pretty: bool, depth: int) -> Iterator[bytes]:
    """A streamed JSON body as streamed XML, nested ``depth`` elements deep."""
    if isinstance(body, Spliced):
        yield from _spliced_xml(body, pretty, depth)
    elif isinstance(body, BundleStream):
        head, end = bundle_open_xml(body.header, pretty=pretty)
        yield head
        for fields, resource in body.entries:
            nested = None
            if resource is not None:
                # Bundle > entry > resource > the resource: three elements deep.
                nested = (
                    iter((resource_to_xml(orjson.loads(resource), pretty=pretty, depth=3),))
                    if isinstance(resource, bytes)
                    else _xml_stream(resource, pretty, 3)
                )
            yield from entry_to_xml(fields, nested, pretty=pretty)
        yield end
    else:
        yield resource_to_xml(orjson.loads(b"".join(body)), pretty=pretty, depth=depth)


def _spliced_xml(body: Spliced, pretty: bool, depth: int) -> Iterator[bytes]:
    """A resource and its streamed array: each chunk of items becomes their XML elements."""
    resource = orjson.loads(body.text)
    try:
        head, end = resource_open_xml(resource, body.name, pretty=pretty, depth=depth)
    except ValueError:
        # An element that follows the array in XML order: the whole resource is needed.
        whole = orjson.loads(b"".join(body))
        yield resource_to_xml(whole, pretty=pretty, depth=depth)
        return
    yield head
    resource_type = resource["resourceType"]
    for chunk in body.chunks:
        items = orjson.loads(b"[" + chunk + b"]")
        yield elements_to_xml(resource_type, body.name, items, pretty=pretty, depth=depth + 1)
    yield end

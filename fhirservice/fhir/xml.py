"""FHIR R4 XML: reading it into the JSON form the service stores, and writing stored JSON as XML.

The mapping follows https://hl7.org/fhir/R4/xml.html:

- a resource is an element named after its type in the namespace ``http://hl7.org/fhir``;
- children appear in the order of the StructureDefinition, repeating elements as repeated
  XML elements;
- a primitive is an element with a ``value`` attribute; its id and extensions (JSON's
  ``_name`` sibling) are the element's ``id`` attribute and ``extension`` children;
- the ``id`` of any element that is not a resource, and ``Extension.url``, are attributes;
- ``Narrative.div`` is XHTML, embedded as it is;
- a resource inside a resource (``contained``, ``Bundle.entry.resource``,
  ``Parameters.parameter.resource``) is wrapped in the element that holds it.

Both directions are driven by the element tables of the validation walk
(``fhirservice.fhir.validation``): names, kinds, repetition and the types of primitives. The
element order comes from the R4B models' ``elements_sequence()`` where the table came from a
model, and from the table itself where it came from the R4 StructureDefinitions;
``tests/fhirservice/test_xml.py`` compares it with every R4 StructureDefinition. Why not the
``fhir.resources`` XML support: docs/adr/0009-fhir-xml.md.

Reading is safe against hostile XML: no DTD is loaded, no entity is resolved, no network is
touched, trees are limited to libxml2's default depth and sizes, and a document that has a
DOCTYPE at all is refused (FHIR forbids them).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from typing import Any

from lxml import etree

from fhirservice.errors import BadRequest, InvalidResource
from fhirservice.fhir import validation
from fhirservice.fhir.resource_types import R4_RESOURCE_TYPES

# The validation walk's tables are the one description of R4's elements in the service (and
# are checked against the StructureDefinitions); the XML mapping reads them, never copies them.
_Structure = validation._Structure
_PRIMITIVE, _COMPLEX = validation._PRIMITIVE, validation._COMPLEX
_structure_of_type = validation._structure_of_type

FHIR_NS = "http://hl7.org/fhir"
XHTML_NS = "http://www.w3.org/1999/xhtml"

MSG_MALFORMED_XML = "The body is not well-formed XML: {error}"
MSG_DOCTYPE = "XML with a DOCTYPE (DTDs, entities) is not accepted in FHIR"
MSG_NOT_FHIR = (
    "The root element must be an R4 resource in the namespace http://hl7.org/fhir, not {tag}"
)
MSG_UNKNOWN_ELEMENT = "Unknown element '{path}'"
MSG_UNKNOWN_ATTRIBUTE = "Unknown attribute '{name}' on '{path}'"
MSG_TEXT_CONTENT = "Element '{path}' must not contain text; FHIR primitives use value attributes"
MSG_NO_VALUE = "Element '{path}' has neither a value nor extensions"
MSG_ONE_RESOURCE = "Element '{path}' must hold exactly one resource"

_PARSER_OPTIONS: dict[str, Any] = dict(
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    dtd_validation=False,
    huge_tree=False,
    # Comments stay: inside a narrative they are part of the div's text; elsewhere they are
    # skipped like the whitespace between elements.
    remove_comments=False,
    remove_pis=True,
    collect_ids=False,
)
_PARSER = etree.XMLParser(**_PARSER_OPTIONS)

# --- element order -----------------------------------------------------------------------------
_ORDER: dict[int, tuple[_Structure, dict[str, float]]] = {}


def _model_of(structure: _Structure) -> Any:
    for model, known in list(validation._BY_MODEL.items()):
        if known is structure:
            return model
    return None


def _order(structure: _Structure) -> dict[str, float]:
    """Each JSON element name of a structure → its rank in the XML element order."""
    cached = _ORDER.get(id(structure))
    if cached is not None:
        return cached[1]
    model = None if structure.spec else _model_of(structure)
    if model is None:
        ranks: dict[str, float] = {name: i for i, name in enumerate(structure.elements)}
    else:
        ranks = {name: i for i, name in enumerate(model.elements_sequence())}
        for name, element in structure.elements.items():
            if name in ranks:
                continue
            # An R4 choice type the R4B model lacks (Extension.valueMeta) sits with its group.
            sibling = [
                ranks[other]
                for other, e in structure.elements.items()
                if other in ranks and element.choice is not None and e.choice == element.choice
            ]
            ranks[name] = (min(sibling) if sibling else len(ranks)) + 0.5
    _ORDER[id(structure)] = (structure, ranks)
    return ranks


def element_order(type_name: str, path: str = "") -> list[str]:
    """The XML order of the elements of a type or of one of its groups (``contact`` in
    Patient), choice types as ``name[x]``: what tests compare with the StructureDefinitions."""
    structure = _structure_of_type(type_name)
    for part in filter(None, path.split(".")):
        structure = structure.elements[part].structure()
    ranks = _order(structure)
    result: list[str] = []
    for name in sorted(structure.elements, key=lambda n: ranks[n]):
        element = structure.elements[name]
        shown = f"{element.choice}[x]" if element.choice else name
        if shown not in result:
            result.append(shown)
    return result


# --- JSON → XML --------------------------------------------------------------------------------
_ATTRIBUTE_ESCAPES = str.maketrans(
    {
        "&": "&amp;",
        "<": "&lt;",
        ">": "&gt;",
        '"': "&quot;",
        "\n": "&#10;",
        "\r": "&#13;",
        "\t": "&#9;",
    }
)


def _text(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is str:
        return value.translate(_ATTRIBUTE_ESCAPES)
    return repr(value) if isinstance(value, float) else str(value)


class _Plan:
    """How to write one structure: its child elements in XML order, and its attributes."""

    __slots__ = ("attributes", "known", "path", "ranks", "steps")

    def __init__(self, structure: _Structure) -> None:
        self.path = structure.path
        self.ranks = _order(structure)
        if structure.resource:
            self.attributes: tuple[str, ...] = ()
        elif structure.path == "Extension":
            self.attributes = ("id", "url")
        else:
            self.attributes = ("id",)
        # (rank, name, "_" + name, kind, repeats, type, element) per element, in XML order.
        self.steps = [
            (self.ranks[name], name, "_" + name, e.kind, e.many, e.type, e)
            for name, e in sorted(structure.elements.items(), key=lambda i: self.ranks[i[0]])
            if name not in self.attributes
        ]
        self.known = frozenset(structure.elements) | {"_" + name for name in structure.elements}
        if structure.resource:
            self.known |= {"resourceType"}


_PLANS: dict[int, tuple[_Structure, _Plan]] = {}


def _plan(structure: _Structure) -> _Plan:
    cached = _PLANS.get(id(structure))
    if cached is None:
        cached = _PLANS[id(structure)] = (structure, _Plan(structure))
    return cached[1]


class _Writer:
    """Appends the XML of JSON values to a list of strings, optionally indented."""

    __slots__ = ("end_pad", "out", "pads")

    def __init__(self, pretty: bool = False) -> None:
        self.out: list[str] = []
        # The indentation before an element at each depth (libxml2 nests at most 256 deep).
        self.pads = [("\n" + "  " * depth) if pretty and depth else "" for depth in range(260)]
        # The root's end tag goes on a line of its own too.
        self.end_pad = "\n" if pretty else ""

    def resource(self, node: dict[str, Any], depth: int, *, root: bool = False) -> str:
        """Write a resource's start tag and children; return its end tag (not yet written)."""
        resource_type = node.get("resourceType")
        if resource_type not in R4_RESOURCE_TYPES:
            raise InvalidResource(f"Not an R4 resource: {resource_type!r}")
        namespace = f' xmlns="{FHIR_NS}"' if root else ""
        self.out.append(f"{self.pads[depth]}<{resource_type}{namespace}>")
        self.children(node, _plan(_structure_of_type(resource_type)), depth + 1)
        return f"{self.pads[depth] or self.end_pad}</{resource_type}>"

    def children(
        self,
        node: dict[str, Any],
        plan: _Plan,
        depth: int,
        *,
        below: float = float("inf"),
        above: float = -1.0,
    ) -> None:
        """Write the child elements of ``node`` in XML order (those ranked between
        ``above`` and ``below`` when a stream writes a structure in parts)."""
        out = self.out
        pad = self.pads[depth]
        for rank, name, sibling_name, kind, many, type_, element in plan.steps:
            value = node.get(name)
            sibling = node.get(sibling_name)
            if (value is None and sibling is None) or not above < rank < below:
                continue
            if kind == _PRIMITIVE:
                if many:
                    values = value or ()
                    siblings = sibling or ()
                    for index in range(max(len(values), len(siblings))):
                        self.primitive(
                            name,
                            type_,
                            values[index] if index < len(values) else None,
                            siblings[index] if index < len(siblings) else None,
                            depth,
                        )
                else:
                    self.primitive(name, type_, value, sibling, depth)
            elif kind == _COMPLEX:
                target = _plan(element.target or element.structure())
                for item in value if many else (value,):
                    self.complex(name, item, target, depth)
            else:
                for item in value if many else (value,):
                    out.append(f"{pad}<{name}>")
                    out.append(self.resource(item, depth + 1))
                    out.append(f"{pad}</{name}>")
        unknown = node.keys() - plan.known
        if unknown:
            key = min(unknown)
            raise InvalidResource(MSG_UNKNOWN_ELEMENT.format(path=f"{plan.path}.{key}"))

    def primitive(self, name: str, type_: str, value: Any, sibling: Any, depth: int) -> None:
        """A primitive element: value and id attributes, extension children."""
        if type_ == "xhtml":
            self.out.append(self.pads[depth] + _xhtml(value))
            return
        attributes = ""
        extensions = None
        if sibling:
            if "id" in sibling:
                attributes += f' id="{_text(sibling["id"])}"'
            extensions = sibling.get("extension")
        if value is not None:
            attributes += f' value="{_text(value)}"'
        if not extensions:
            self.out.append(f"{self.pads[depth]}<{name}{attributes}/>")
            return
        self.out.append(f"{self.pads[depth]}<{name}{attributes}>")
        extension = _plan(_structure_of_type("Extension"))
        for item in extensions:
            self.complex("extension", item, extension, depth + 1)
        self.out.append(f"{self.pads[depth]}</{name}>")

    def complex(self, name: str, node: dict[str, Any], plan: _Plan, depth: int) -> None:
        """A datatype or backbone element: id (and Extension.url) as attributes."""
        present = [key for key in plan.attributes if key in node]
        attributes = "".join(f' {key}="{_text(node[key])}"' for key in present)
        if len(node) == len(present):
            self.out.append(f"{self.pads[depth]}<{name}{attributes}/>")
            return
        self.out.append(f"{self.pads[depth]}<{name}{attributes}>")
        self.children(node, plan, depth + 1)
        self.out.append(f"{self.pads[depth]}</{name}>")

    def text(self) -> str:
        """Everything written so far, and a fresh buffer."""
        text = "".join(self.out)
        self.out = []
        return text


def _xhtml(value: str) -> str:
    """A narrative's div as XML. A div that does not parse (the JSON pass checks only its
    start tag) keeps its text, escaped, so the document stays well-formed."""
    try:
        element = etree.fromstring(value.encode(), _PARSER)
    except etree.XMLSyntaxError:
        element = None
    if element is None or element.tag != f"{{{XHTML_NS}}}div":
        escaped = value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return f'<div xmlns="{XHTML_NS}">{escaped}</div>'
    element.tail = None
    return etree.tostring(element, encoding="unicode")


def resource_to_xml(resource: dict[str, Any], *, pretty: bool = False, depth: int = 0) -> bytes:
    """A resource (parsed FHIR JSON) as an XML document, or as the part of a streamed one
    that nests it ``depth`` elements deep (which ``pretty`` indents by)."""
    writer = _Writer(pretty)
    end = writer.resource(resource, depth, root=True)
    writer.out.append(end)
    return writer.text().encode()


def _last_rank(node: dict[str, Any], plan: _Plan) -> float:
    return max((plan.ranks[k.lstrip("_")] for k in node if k.lstrip("_") in plan.ranks), default=-1)


def resource_open_xml(
    resource: dict[str, Any], tail: str, *, pretty: bool = False, depth: int = 0
) -> tuple[bytes, bytes]:
    """A resource's XML split before the end tag, for streams that append more elements.

    ``tail`` names the element that will be appended: every element of ``resource`` must come
    before it in XML order, else ValueError (the caller then renders the whole resource).
    ``depth`` is where the resource nests in the stream (for ``pretty`` indentation).
    """
    plan = _plan(_structure_of_type(resource["resourceType"]))
    if _last_rank(resource, plan) > plan.ranks[tail]:
        raise ValueError(f"an element of {resource['resourceType']} follows {tail}")
    writer = _Writer(pretty)
    end = writer.resource(resource, depth, root=True)
    return writer.text().encode(), end.encode()


def elements_to_xml(
    resource_type: str,
    name: str,
    items: list[dict[str, Any]],
    *,
    pretty: bool = False,
    depth: int = 0,
) -> bytes:
    """Repeats of a complex element of a resource type (``member`` of Group) as XML, each
    ``depth`` elements deep in the stream."""
    element = _structure_of_type(resource_type).elements[name]
    plan = _plan(element.target or element.structure())
    writer = _Writer(pretty)
    for item in items:
        writer.complex(name, item, plan, depth)
    return writer.text().encode()


def entry_to_xml(
    fields: dict[str, Any], resource: Iterator[bytes] | None, *, pretty: bool = False
) -> Iterator[bytes]:
    """A Bundle entry whose resource is already XML (a stream, nested three elements deep),
    with the entry's own fields."""
    plan = _plan(_structure_of_type("Bundle").elements["entry"].structure())
    at = plan.ranks["resource"]
    writer = _Writer(pretty)
    pads = writer.pads
    attributes = f' id="{_text(fields["id"])}"' if "id" in fields else ""
    writer.out.append(f"{pads[1]}<entry{attributes}>")
    writer.children(fields, plan, 2, below=at)
    if resource is not None:
        writer.out.append(f"{pads[2]}<resource>")
        yield writer.text().encode()
        yield from resource
        writer.out.append(f"{pads[2]}</resource>")
    writer.children(fields, plan, 2, above=at)
    writer.out.append(f"{pads[1]}</entry>")
    yield writer.text().encode()


def bundle_open_xml(header: dict[str, Any], *, pretty: bool = False) -> tuple[bytes, bytes]:
    """A Bundle's XML before and after its entries (``header`` has no ``entry``)."""
    plan = _plan(_structure_of_type("Bundle"))
    at = plan.ranks["entry"]
    writer = _Writer(pretty)
    writer.out.append(f'<Bundle xmlns="{FHIR_NS}">')
    writer.children(header, plan, 1, below=at)
    head = writer.text()
    writer.children(header, plan, 1, above=at)
    writer.out.append(f"{writer.end_pad}</Bundle>")
    return head.encode(), writer.text().encode()


# --- XML → JSON --------------------------------------------------------------------------------
# A DOCTYPE in the prolog (after the XML declaration and comments); one the pattern misses
# (another encoding) is found in the parsed document's docinfo.
_DOCTYPE = re.compile(rb"(?:<\?xml[^>]*\?>)?(?:\s|<!--.*?-->)*<!DOCTYPE", re.DOTALL)
_INTEGER = re.compile(r"-?[0-9]+")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_INTEGER_TYPES = frozenset({"integer", "unsignedInt", "positiveInt"})


def _json_value(text: str, type_: str) -> Any:
    """A value attribute as its JSON value; text that does not fit the type stays a string,
    for the validation walk to reject with its usual message."""
    if type_ == "boolean":
        return {"true": True, "false": False}.get(text, text)
    if type_ in _INTEGER_TYPES:
        return int(text) if _INTEGER.fullmatch(text) else text
    if type_ == "decimal" and _NUMBER.fullmatch(text):
        return int(text) if _INTEGER.fullmatch(text) else float(text)
    return text


def _split(tag: Any) -> tuple[str, str]:
    if not isinstance(tag, str):
        return "", ""
    namespace, _, local = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
    return namespace, local


def parse_resource_xml(data: bytes) -> dict[str, Any]:
    """An XML document as the JSON form of its resource (400 if not FHIR XML).

    Values are converted by their element's type; whether the result is a valid resource is
    left to the same validation as JSON bodies. The document is read incrementally: each
    child of the root is converted and dropped once parsed, so a Group's 10^6 members are
    never all in the XML tree at once.
    """
    if _DOCTYPE.match(data):
        raise BadRequest(MSG_DOCTYPE, detail_code="MSG_XML_DOCTYPE")
    root: Any = None
    result: dict[str, Any] = {}
    repeated: set[str] = set()
    structure = path = None
    try:
        for event, element in etree.iterparse(
            io.BytesIO(data), events=("start", "end"), **_PARSER_OPTIONS
        ):
            if root is None:
                root = element
                docinfo = root.getroottree().docinfo
                if docinfo.doctype or docinfo.internalDTD is not None:
                    raise BadRequest(MSG_DOCTYPE, detail_code="MSG_XML_DOCTYPE")
                namespace, path = _split(root.tag)
                if namespace != FHIR_NS or path not in R4_RESOURCE_TYPES:
                    raise BadRequest(
                        MSG_NOT_FHIR.format(tag=path or root.tag), detail_code="MSG_XML_ROOT"
                    )
                _check_attributes(root, (), path)
                structure = _structure_of_type(path)
                result["resourceType"] = path
            elif event == "end" and element.getparent() is root:
                _read_child(element, structure, result, path, repeated)
                # What is read is dropped (with the comments and whitespace before it).
                element.clear(keep_tail=True)
                while element.getprevious() is not None:
                    if root[0].tail is not None and root[0].tail.strip():
                        raise _fail(MSG_TEXT_CONTENT.format(path=path))
                    del root[0]
    except (etree.XMLSyntaxError, ValueError) as exc:
        raise BadRequest(MSG_MALFORMED_XML.format(error=exc), detail_code="MSG_XML_PARSE") from exc
    if (root.text is not None and root.text.strip()) or any(
        child.tail is not None and child.tail.strip() for child in root
    ):
        raise _fail(MSG_TEXT_CONTENT.format(path=path))
    _drop_null_arrays(result, repeated)
    return result


def _fail(message: str) -> BadRequest:
    return BadRequest(message, detail_code="MSG_XML_STRUCTURE")


def _read_resource(element: Any, path: str) -> dict[str, Any]:
    _, resource_type = _split(element.tag)
    if resource_type not in R4_RESOURCE_TYPES:
        raise InvalidResource(f"Unknown resource type: {resource_type}", expression=[path])
    for name in element.attrib:
        if not name.startswith("{"):
            raise _fail(MSG_UNKNOWN_ATTRIBUTE.format(name=name, path=path))
    result: dict[str, Any] = {"resourceType": resource_type}
    _read_children(element, _structure_of_type(resource_type), result, path)
    return result


def _check_attributes(element: Any, allowed: tuple[str, ...], path: str) -> None:
    for name in element.attrib:
        # Attributes in other namespaces (xsi:schemaLocation, xml:lang) carry no FHIR content.
        if name not in allowed and not name.startswith("{"):
            raise _fail(MSG_UNKNOWN_ATTRIBUTE.format(name=name, path=path))


def _read_children(element: Any, structure: _Structure, result: dict[str, Any], path: str) -> None:
    if element.text is not None and element.text.strip():
        raise _fail(MSG_TEXT_CONTENT.format(path=path))
    repeated: set[str] = set()
    for child in element:
        if child.tail is not None and child.tail.strip():
            raise _fail(MSG_TEXT_CONTENT.format(path=path))
        _read_child(child, structure, result, path, repeated)
    _drop_null_arrays(result, repeated)


def _read_child(
    child: Any, structure: _Structure, result: dict[str, Any], path: str, repeated: set[str]
) -> None:
    """Add one child element to ``result``; ``repeated`` collects the repeating primitives."""
    if not isinstance(child.tag, str):
        return  # a comment
    namespace, name = _split(child.tag)
    child_path = f"{path}.{name}"
    spec = structure.elements.get(name)
    if spec is None or namespace != (XHTML_NS if spec.type == "xhtml" else FHIR_NS):
        raise _fail(MSG_UNKNOWN_ELEMENT.format(path=child_path if name else path))
    if spec.kind == _PRIMITIVE:
        value, sibling = _read_primitive(child, spec.type, child_path)
        if spec.many:
            repeated.add(name)
            values = result.setdefault(name, [])
            siblings = result.get("_" + name)
            if sibling is not None and siblings is None:
                siblings = result["_" + name] = [None] * len(values)
            values.append(value)
            if siblings is not None:
                siblings.append(sibling)
        else:
            if value is not None:
                result[name] = value
            if sibling is not None:
                result["_" + name] = sibling
        return
    if spec.kind == _COMPLEX:
        value = _read_complex(child, spec.target or spec.structure(), child_path)
    else:
        _check_attributes(child, (), child_path)
        inner = [c for c in child if isinstance(c.tag, str)]
        if len(inner) != 1 or (child.text is not None and child.text.strip()):
            raise _fail(MSG_ONE_RESOURCE.format(path=child_path))
        if _split(inner[0].tag)[0] != FHIR_NS:
            raise _fail(MSG_NOT_FHIR.format(tag=inner[0].tag))
        value = _read_resource(inner[0], child_path)
    if spec.many:
        result.setdefault(name, []).append(value)
    else:
        result[name] = value


def _drop_null_arrays(result: dict[str, Any], repeated: set[str]) -> None:
    for name in repeated:
        # JSON leaves out a value array that would hold only nulls (extensions only).
        if all(value is None for value in result[name]):
            del result[name]


def _read_primitive(element: Any, type_: str, path: str) -> tuple[Any, dict[str, Any] | None]:
    """(JSON value, ``_name`` sibling) of a primitive element."""
    if type_ == "xhtml":
        element.tail = None
        return etree.tostring(element, encoding="unicode"), None
    _check_attributes(element, ("value", "id"), path)
    raw = element.get("value")
    value = None if raw is None else _json_value(raw, type_)
    sibling: dict[str, Any] = {}
    if "id" in element.attrib:
        sibling["id"] = element.get("id")
    extension = _structure_of_type("Extension")
    if element.text is not None and element.text.strip():
        raise _fail(MSG_TEXT_CONTENT.format(path=path))
    for child in element:
        if not isinstance(child.tag, str):
            continue  # a comment
        namespace, name = _split(child.tag)
        if namespace != FHIR_NS or name != "extension":
            raise _fail(MSG_UNKNOWN_ELEMENT.format(path=f"{path}.{name}"))
        sibling.setdefault("extension", []).append(
            _read_complex(child, extension, f"{path}.extension")
        )
    if value is None and not sibling:
        raise _fail(MSG_NO_VALUE.format(path=path))
    return value, sibling or None


def _read_complex(element: Any, structure: _Structure, path: str) -> dict[str, Any]:
    is_extension = structure.path == "Extension"
    _check_attributes(element, ("id", "url") if is_extension else ("id",), path)
    result: dict[str, Any] = {}
    if "id" in element.attrib:
        result["id"] = element.get("id")
    if is_extension and "url" in element.attrib:
        result["url"] = element.get("url")
    _read_children(element, structure, result, path)
    return result

"""Generate ``fhirservice/fhir/definitions/*.json`` from the official FHIR R4 definitions.

The source is the npm package ``hl7.fhir.r4.examples@4.0.1`` (HL7 content, CC0), pinned by
its SHA-256 below: the 4.0.1 SearchParameters, CompartmentDefinitions, StructureDefinitions,
ValueSets and CodeSystems. The service reads only the generated files (small, sorted, diffable
JSON), never the package, so it starts without network access.

    .venv/bin/python scripts/generate_definitions.py            # npm pack, verify, write
    .venv/bin/python scripts/generate_definitions.py --package hl7.fhir.r4.examples-4.0.1.tgz

Outputs (see ``fhirservice/fhir/definitions/__init__.py`` for the readers):

- ``search_parameters.json``: resource type → code → the parameter: ``type``, ``url``,
  ``expression`` parts that apply to that type (the shared parameters such as
  ``clinical-code`` list one part per base type), each with the reference types a
  ``.where(resolve() is T)`` restricts it to (FHIRPath engines cannot ``resolve()`` at write
  time, so the restriction is applied to the extracted reference instead), ``target``,
  ``component`` (composite parameters), ``modifier``, ``comparator``, ``chain``,
  ``multipleOr``/``multipleAnd``. Type ``Resource`` holds the parameters of every type.
- ``compartments.json``: compartment type (Patient, Encounter, …) → resource type → the
  search parameters that put a resource into the compartment.
- ``bindings.json``: for every resource and complex datatype, its elements with a
  *required* binding (path → value set URL, without ``|version``) and its elements of a
  complex type (path → type codes), so a validator can walk into datatypes.
- ``value_sets.json``: every value set named by a required binding → ``{system: [codes]}``,
  expanded from its CodeSystems; ``null`` when it cannot be enumerated here (it names a code
  system outside the package, such as BCP-47 or MIME types, or uses a filter).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "hl7.fhir.r4.examples"
VERSION = "4.0.1"
SHA256 = "dce87f1b5b9341867033f7d1f544fa1b5232503f6d62813887ac6b8a8b6cb682"
OUT = Path(__file__).resolve().parent.parent / "fhirservice" / "fhir" / "definitions"
BASE_URL = "http://hl7.org/fhir/SearchParameter/"
# Types whose parameters apply to every resource (``_id``, ``_lastUpdated``, ``_text``, …).
ABSTRACT_BASES = {"Resource", "DomainResource"}
RESOLVE_IS = re.compile(r"^(?P<path>.*)\.where\(resolve\(\) is (?P<type>[A-Za-z]+)\)$")


def fetch(dest: Path) -> Path:
    """``npm pack`` the pinned package into ``dest``; return the tarball's path."""
    out = subprocess.run(
        ["npm", "pack", f"{PACKAGE}@{VERSION}", "--json", "--loglevel=error"],
        cwd=dest,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dest / json.loads(out)[0]["filename"]


def read_package(tgz: Path) -> dict[str, list[dict]]:
    """The package's resources by type, after checking the tarball's checksum."""
    digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
    if digest != SHA256:
        sys.exit(f"{tgz}: SHA-256 {digest}, expected {SHA256} ({PACKAGE}@{VERSION})")
    wanted = (
        "SearchParameter",
        "CompartmentDefinition",
        "StructureDefinition",
        "ValueSet",
        "CodeSystem",
    )
    found: dict[str, list[dict]] = {kind: [] for kind in wanted}
    with tarfile.open(tgz) as tar:
        for member in tar:
            name = member.name.rsplit("/", 1)[-1]
            if not member.isfile() or not name.endswith(".json"):
                continue
            kind = name.split("-", 1)[0]
            if kind in found:
                found[kind].append(json.load(tar.extractfile(member)))
    return found


def split_union(expression: str) -> list[str]:
    """The top-level ``|`` alternatives of a FHIRPath expression (parentheses respected)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(expression):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def _leading_type(part: str) -> str:
    return re.match(r"\(*\s*([A-Za-z]+)", part).group(1)


def expression_parts(expression: str, base: str) -> list[dict]:
    """The alternatives of ``expression`` that apply to resources of type ``base``."""
    parts = []
    for part in split_union(expression):
        if part[:1].islower():  # a path relative to the resource ("name | alias")
            part = f"{base}.{part}"
        if _leading_type(part) not in (base, *ABSTRACT_BASES):
            continue
        entry: dict = {"expression": part}
        match = RESOLVE_IS.match(part)
        if match:
            entry = {"expression": match["path"], "resolve_types": [match["type"]]}
        parts.append(entry)
    return parts


def description(text: str, base: str) -> str:
    """The one line of a parameter's description that is about ``base``.

    Shared parameters describe every base in a list ("* [Condition](condition.html): Code
    for the condition"); the others have one paragraph.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(f"* [{base}]("):
            return line.split("): ", 1)[-1][:300]
    return (lines[0] if lines else "")[:300]


def search_parameters(resources: list[dict], resource_types: set[str]) -> dict:
    """Resource type → code → parameter (see the module docstring)."""
    by_type: dict[str, dict] = {}
    for sp in resources:
        if not sp.get("url", "").startswith(BASE_URL) or not sp.get("base"):
            continue  # not a parameter of the specification
        if sp.get("experimental"):
            continue  # the examples and the extension parameters (Patient-age, …)
        for base in sp["base"]:
            key = "Resource" if base in ABSTRACT_BASES else base
            if key != "Resource" and key not in resource_types:
                continue
            if not sp.get("expression") and key != "Resource":
                continue  # no FHIRPath to evaluate (a few extension parameters)
            param = {
                "url": sp["url"],
                "type": sp["type"],
                "description": description(sp.get("description", ""), base),
            }
            if sp.get("expression"):
                param["parts"] = expression_parts(sp["expression"], base)
                if not param["parts"] and sp["type"] != "composite":
                    continue  # "example-extension": its expression names another type
            for field in ("target", "modifier", "comparator", "chain"):
                if sp.get(field):
                    param[field] = sp[field]
            for field in ("multipleOr", "multipleAnd"):
                if field in sp:
                    param[field] = sp[field]
            if sp.get("component"):
                param["component"] = [
                    {"definition": c["definition"], "expression": c["expression"]}
                    for c in sp["component"]
                ]
            by_type.setdefault(key, {})[sp["code"]] = param
    return by_type


def compartments(resources: list[dict]) -> dict:
    """Compartment type → resource type → the parameters that make a resource a member."""
    out: dict[str, dict] = {}
    for cd in resources:
        if not cd.get("url", "").startswith("http://hl7.org/fhir/CompartmentDefinition/"):
            continue
        out[cd["code"]] = {r["code"]: r["param"] for r in cd.get("resource", []) if r.get("param")}
    return out


def bindings(resources: list[dict]) -> dict:
    """Per resource and complex datatype: required bindings and complex-typed elements."""
    out: dict[str, dict] = {}
    for sd in resources:
        if sd.get("derivation") != "specialization" or sd.get("kind") not in (
            "resource",
            "complex-type",
        ):
            continue
        name = sd["type"]
        required, complex_types = {}, {}
        for element in sd.get("snapshot", {}).get("element", []):
            path = element["path"]
            if "." not in path:
                continue
            path = path.split(".", 1)[1]
            binding = element.get("binding") or {}
            if binding.get("strength") == "required" and binding.get("valueSet"):
                required[path] = binding["valueSet"].split("|", 1)[0]
            codes = [
                t["code"]
                for t in element.get("type", [])
                if t.get("code", "")[:1].isupper()  # complex types are capitalised
                and t["code"] not in ("Element", "BackboneElement")
            ]
            if codes:
                complex_types[path] = codes
        out[name] = {"required": required, "types": complex_types}
    return out


def _codes(concepts: list[dict]) -> list[str]:
    codes = []
    for concept in concepts:
        codes.append(concept["code"])
        codes.extend(_codes(concept.get("concept", [])))
    return codes


def value_sets(
    needed: set[str], vs_resources: list[dict], cs_resources: list[dict]
) -> dict[str, dict | None]:
    """Each needed value set's codes by system, or ``None`` where it cannot be enumerated."""
    code_systems = {
        cs["url"]: _codes(cs.get("concept", []))
        for cs in cs_resources
        if cs.get("content") == "complete"
    }
    by_url = {vs["url"]: vs for vs in vs_resources}

    def expand(url: str, seen: frozenset[str]) -> dict[str, list[str]] | None:
        vs = by_url.get(url)
        if vs is None or url in seen or "exclude" in vs.get("compose", {}):
            return None
        codes: dict[str, list[str]] = {}
        for include in vs.get("compose", {}).get("include", []):
            if include.get("filter"):
                return None
            for nested in include.get("valueSet", []):
                inner = expand(nested.split("|", 1)[0], seen | {url})
                if inner is None:
                    return None
                for system, values in inner.items():
                    codes.setdefault(system, []).extend(values)
            system = include.get("system")
            if not system:
                continue
            if include.get("concept"):
                codes.setdefault(system, []).extend(c["code"] for c in include["concept"])
            elif system in code_systems:
                codes.setdefault(system, []).extend(code_systems[system])
            else:
                return None
        return {system: sorted(set(values)) for system, values in codes.items()} or None

    return {url: expand(url, frozenset()) for url in sorted(needed)}


def write(name: str, data: object) -> None:
    """Write one output file: sorted keys, one line per top-level entry for small diffs."""
    path = OUT / name
    lines = [f"  {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(data.items())]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"{path.relative_to(OUT.parent.parent.parent)}: {len(data)} entries")


def main() -> None:
    """Fetch (or take) the package, verify it, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--package", type=Path, help="the .tgz, instead of npm pack")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        found = read_package(args.package or fetch(Path(tmp)))
    resource_types = {
        sd["type"]
        for sd in found["StructureDefinition"]
        if sd.get("kind") == "resource"
        and sd.get("derivation") == "specialization"
        and not sd.get("abstract")
    }
    OUT.mkdir(parents=True, exist_ok=True)
    write("search_parameters.json", search_parameters(found["SearchParameter"], resource_types))
    write("compartments.json", compartments(found["CompartmentDefinition"]))
    structure = bindings(found["StructureDefinition"])
    write("bindings.json", structure)
    needed = {url for entry in structure.values() for url in entry["required"].values()}
    write("value_sets.json", value_sets(needed, found["ValueSet"], found["CodeSystem"]))
    (OUT / "SOURCE").write_text(f"{PACKAGE}@{VERSION} sha256:{SHA256}\n")


if __name__ == "__main__":
    main()

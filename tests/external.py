"""Independent test data that we did not write, fetched once and cached under ``<repo>/.cache/``.

- :func:`r4_examples`: the official HL7 FHIR R4 (4.0.1) examples, npm package
  ``hl7.fhir.r4.examples`` (``npm pack``; 18.8 MB download, 187 MB unpacked).
- :func:`jsonpatch_cases`: the JSON Patch cases (``tests.js``) shipped in the sdist of the
  ``jsonpatch`` 1.47 package on PyPI (``pip download``).

Both come from package registries through their ordinary clients, so they work on the build
machines. ``FHIR_TEST_CACHE`` moves the cache directory. Several processes (the two test
passes, parallel workers) may ask at once: fetches are serialised by a lock file per artefact,
and each artefact is built in a temporary directory and renamed into place, so a crash never
leaves a half-written entry behind.
"""

from __future__ import annotations

import fcntl
import gc
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = Path(os.environ.get("FHIR_TEST_CACHE") or REPO / ".cache")

R4_EXAMPLES_PACKAGE = "hl7.fhir.r4.examples"
R4_VERSION = "4.0.1"
JSONPATCH_VERSION = "1.47"

FETCH_TIMEOUT = 900  # seconds, per registry client call


class ExternalDataError(RuntimeError):
    """A test data set could not be fetched or is not what we expect."""


@contextmanager
def _lock(name: str) -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _cached_dir(name: str, build: Callable[[Path], None]) -> Path:
    """Return ``CACHE_DIR/name``, building it first with ``build(tmpdir)`` if missing."""
    final = CACHE_DIR / name
    if final.is_dir():
        return final
    with _lock(name):
        if final.is_dir():  # another process finished it while we waited
            return final
        # Left-overs of a fetch that crashed (only the lock holder creates these).
        for stale in CACHE_DIR.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=CACHE_DIR))
        try:
            build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=FETCH_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise ExternalDataError(f"{cmd[0]} is not installed: {exc}") from exc
    if proc.returncode != 0:
        raise ExternalDataError(
            f"{' '.join(cmd)} failed with exit {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


def _extract(tgz: Path, dest: Path) -> None:
    with tarfile.open(tgz) as tf:
        # The "data" filter refuses absolute paths, links out of dest and device files
        # (Python >= 3.11.4; older ones extract as before).
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # pragma: no cover
            tf.extractall(dest)  # noqa: S202


def _build_r4_examples(tmp: Path) -> None:
    spec = f"{R4_EXAMPLES_PACKAGE}@{R4_VERSION}"
    out = _run(["npm", "pack", spec, "--json", "--loglevel=error"], cwd=tmp)
    try:
        filename = json.loads(out)[0]["filename"]
    except (ValueError, LookupError, TypeError):
        found = sorted(tmp.glob("*.tgz"))
        if len(found) != 1:
            raise ExternalDataError(
                f"npm pack {spec}: cannot find the tarball in {out!r}"
            ) from None
        filename = found[0].name
    tgz = tmp / filename
    _extract(tgz, tmp)
    tgz.unlink()  # 18.8 MB we no longer need; the extracted files are the cache
    manifest = json.loads((tmp / "package" / "package.json").read_text("utf-8"))
    if manifest.get("name") != R4_EXAMPLES_PACKAGE or manifest.get("version") != R4_VERSION:
        raise ExternalDataError(
            f"npm pack {spec} gave {manifest.get('name')}@{manifest.get('version')}"
        )


def r4_examples_dir() -> Path:
    """Directory holding the extracted ``package/`` of the official R4 examples."""
    return _cached_dir(f"{R4_EXAMPLES_PACKAGE}-{R4_VERSION}", _build_r4_examples) / "package"


def r4_examples() -> list[tuple[str, dict]]:
    """The official FHIR R4 example resources as ``(filename, resource)``, sorted by filename.

    Every JSON file of the package whose content is a resource (an object with
    ``resourceType``): 5,306 of them, Bundles (some of 35 MB) and conformance resources
    included. Each call parses the files afresh, so callers may mutate what they get.
    """
    pkg = r4_examples_dir()
    manifest = json.loads((pkg / "package.json").read_text("utf-8"))
    if manifest.get("version") != R4_VERSION or R4_VERSION not in manifest.get("fhirVersions", []):
        raise ExternalDataError(f"{pkg}: not FHIR {R4_VERSION}: {manifest}")
    loads = _json_loads()
    result = []
    # Millions of small objects: the cyclic GC would run hundreds of times for nothing
    # (it more than doubles the ~1 s this takes).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for path in sorted(pkg.glob("*.json")):
            data = loads(path.read_bytes())
            if isinstance(data, dict) and "resourceType" in data:
                result.append((path.name, data))
    finally:
        if gc_was_enabled:
            gc.enable()
    return result


def _build_jsonpatch(tmp: Path) -> None:
    spec = f"jsonpatch=={JSONPATCH_VERSION}"
    # --no-binary: the sdist is what carries tests.js (the wheel has only the module).
    options = ["--no-deps", "--no-binary", ":all:", "--disable-pip-version-check", "-q"]
    _run([sys.executable, "-m", "pip", "download", *options, spec, "-d", str(tmp)], cwd=tmp)
    sdist = tmp / f"jsonpatch-{JSONPATCH_VERSION}.tar.gz"
    if not sdist.is_file():
        raise ExternalDataError(f"pip download {spec} gave {sorted(os.listdir(tmp))}")
    with tarfile.open(sdist) as tf:
        member = tf.getmember(f"jsonpatch-{JSONPATCH_VERSION}/tests.js")
        fh = tf.extractfile(member)
        if fh is None:
            raise ExternalDataError(f"{sdist}: tests.js is not a regular file")
        (tmp / "tests.js").write_bytes(fh.read())


def jsonpatch_cases() -> list[dict]:
    """The JSON Patch test cases of the ``jsonpatch`` 1.47 sdist (``tests.js``).

    The file is plain JSON: an array of 80 objects with ``doc``, ``patch`` and either
    ``expected`` (the result), ``error`` (the patch must fail; 22 cases) or neither (the
    patch must apply); ``comment`` is optional, and 3 cases carry ``"disabled": true``
    (their upstream runner skips them). Returned as is, disabled ones included.
    """
    path = _cached_dir(f"jsonpatch-{JSONPATCH_VERSION}", _build_jsonpatch) / "tests.js"
    cases = json.loads(path.read_text("utf-8"))
    if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
        raise ExternalDataError(f"{path}: expected a JSON array of objects")
    return cases


def _json_loads() -> Callable[[bytes], object]:
    try:
        import orjson  # a project dependency; ~4x faster on the 187 MB of examples
    except ImportError:  # pragma: no cover
        return json.loads
    return orjson.loads

# The micropython-lib package index (mip's protocol), both sides: build() makes one from packages'
# manifest.py files (tests, flashing without Internet); fetch() takes packages from one into a
# staging folder on the host, every file checked against its hash, before `citynode flash`
# changes a board (host_tools/flash.py).
#
# The protocol, as micropython-lib's tools/build.py writes it and mip / mpremote's mip.py read it:
#   <index>/package/<mpy version | "py">/<name>/<version | "latest">.json
#       {"v": 1, "hashes": [[target path, sha256 prefix], ...], "version": "x",
#        "deps": [[name, version], ...] (optional), "urls": [...] (not used by micropython-lib)}
#   <index>/file/<prefix[:2]>/<prefix>        the file's bytes (.mpy, or .py for "py")
# A board asks for its bytecode version, sys.implementation._mpy & 0xFF (6 since MicroPython
# 1.19, on the unix port as on ESP32 and RP2040 boards); "py" is the source distribution.
# fetch() follows mpremote's mip.py (_install_package, _install_json) rather than calling it:
# that writes each file to the board as it downloads it and asks the board for its version, so
# it cannot stage anything before the board is touched, and it checks no hash. The index gives
# a hash prefix (8 hex digits): it catches a corrupted or wrong file, not a forged index (the
# public one is reached over HTTPS).
#
# build() reads manifest.py without running it (ast): metadata(version=..., description=...),
# package(path, files=None, base_path="."), module(path, base_path="."), require(name). As
# build.py does, a required package found among the manifests is folded into the package's own
# files (lora-sx126x brings lora/__init__.py and lora/modem.py); one that is not becomes a "deps"
# entry, which fetch() resolves by name from the index. Each .py gets `__version__` appended
# (manifestfile.tagged_py_file) and is compiled with mpy-cross (no -march: bytecode any port
# runs). Run: python -m host_tools.mipindex --output DIR LIBRARY..., or --output DIR --from URL
# PACKAGE... to copy packages, checked, from an index into a folder (README "Packages").

import argparse
import ast
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from host_tools import build as fwbuild

DEFAULT_INDEX = "https://micropython.org/pi/v2"  # mpremote's mip._PACKAGE_INDEX
HASH_PREFIX = 8  # build.py's default --hash-prefix
FETCH_TIMEOUT_S = 30.0
_MANIFEST_CALLS = ("metadata", "package", "module", "require")
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


class MipIndexError(Exception):
    """A manifest or an index that cannot be used; str() is one line."""


class FetchError(MipIndexError):
    """A package that could not be fetched or did not check out; str() names it and the URL."""


# --- building an index -----------------------------------------------------------------------


@dataclass
class Manifest:
    name: str
    folder: Path
    version: str = ""
    description: str = ""
    files: list = field(default_factory=list)  # [(target path, source path)]
    requires: list = field(default_factory=list)


def read_manifest(path):
    """The calls of a micropython-lib manifest.py, read with ast (never run)."""
    path = Path(path)
    folder = path.parent
    m = Manifest(folder.name, folder)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError, UnicodeDecodeError) as e:
        raise MipIndexError("%s: cannot read: %s" % (path, e)) from None
    for node in tree.body:
        call = node.value if isinstance(node, ast.Expr) else None
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
            raise MipIndexError("%s:%d: only calls of %s are understood"
                              % (path, node.lineno, ", ".join(_MANIFEST_CALLS)))  # fmt: skip
        fn = call.func.id
        try:
            args = [ast.literal_eval(a) for a in call.args]
            kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        except ValueError:
            raise MipIndexError("%s:%d: %s() with arguments that are not plain values"
                              % (path, node.lineno, fn)) from None  # fmt: skip
        try:
            _apply(m, fn, args, kwargs)
        except (TypeError, MipIndexError) as e:
            raise MipIndexError("%s:%d: %s" % (path, node.lineno, e)) from None
    return m


def _apply(m, fn, args, kwargs):
    if fn == "metadata":
        m.version = str(kwargs.get("version") or "")
        m.description = str(kwargs.get("description") or "")
    elif fn == "require":
        m.requires.append(_require(*args, **kwargs))
    elif fn == "package":
        _package(m, *args, **kwargs)
    elif fn == "module":
        _module(m, *args, **kwargs)
    else:
        raise MipIndexError("%s() is not supported (only %s)" % (fn, ", ".join(_MANIFEST_CALLS)))


def _require(name, version=None, library=None, **_options):
    if library is not None:
        raise MipIndexError("require(%r, library=...) is not supported" % name)
    return name


def _package(m, package_path, files=None, base_path=".", opt=None):
    base = (m.folder / base_path).resolve()
    if files is not None:
        found = [Path(package_path) / f for f in files]
    else:
        found = sorted(p.relative_to(base) for p in (base / package_path).rglob("*.py"))
    for rel in found:
        m.files.append((rel.as_posix(), base / rel))


def _module(m, module_path, base_path=".", opt=None):
    if not module_path.endswith(".py"):
        raise MipIndexError("module(%r): must be a .py file" % module_path)
    m.files.append((module_path, (m.folder / base_path / module_path).resolve()))


def find_manifests(libraries):
    """{package name: Manifest} of every <name>/manifest.py under the given folders."""
    found = {}
    for lib in libraries:
        lib = Path(lib)
        if not lib.is_dir():
            raise MipIndexError("%s: no such folder" % lib)
        for path in sorted(lib.rglob("manifest.py")):
            m = read_manifest(path)
            if m.name in found:
                raise MipIndexError("package %s twice: %s and %s"
                                  % (m.name, found[m.name].folder, m.folder))  # fmt: skip
            found[m.name] = m
    return found


def _closure(name, manifests):
    """(files [(target, source, version)], deps [names]) of a package with what it requires."""
    files, deps, seen = [], [], set()

    def walk(n):
        if n in seen:
            return
        seen.add(n)
        m = manifests.get(n)
        if m is None:
            deps.append(n)  # not among the manifests: mip fetches it by name (deps)
            return
        files.extend((target, src, m.version) for target, src in m.files)
        for r in m.requires:
            walk(r)

    walk(name)
    return files, deps


def mpy_version(mpy_cross=None):
    """The bytecode version mpy-cross emits ("6" from "mpy-cross emitting mpy v6.3")."""
    out = subprocess.run(
        [mpy_cross or fwbuild.tool("mpy-cross"), "--version"], capture_output=True, text=True
    ).stdout
    found = re.search(r"mpy v(\d+)", out)
    if not found:
        raise MipIndexError("cannot tell the .mpy version from mpy-cross --version: %r" % out)
    return found.group(1)


def build(output, libraries, mpy_cross=None):
    """Write an index for every package under `libraries` into `output`, in the "py" format and
    the .mpy format mpy-cross emits. Returns {package name: version}."""
    output = Path(output)
    mpy_cross = mpy_cross or fwbuild.tool("mpy-cross")
    mpy = mpy_version(mpy_cross)
    manifests = find_manifests(libraries)
    written = {}  # short hash -> bytes: a collision fails, as in build.py
    index = {"v": 2, "updated": int(time.time()), "packages": []}
    with tempfile.TemporaryDirectory(prefix="citynode-mipindex-") as tmp:
        for name in sorted(manifests):
            m = manifests[name]
            files, deps = _closure(name, manifests)
            py_json = {"v": 1, "hashes": [], "version": m.version}
            mpy_json = {"v": 1, "hashes": [], "version": m.version}
            for target, src, version in files:
                try:
                    source = src.read_bytes()
                except OSError as e:
                    raise MipIndexError("package %s: %s: %s" % (name, src, e.strerror)) from None
                if version and b"__version__ =" not in source:
                    source += b"\n\n__version__ = %s\n" % repr(version).encode()
                tagged = Path(tmp) / "src.py"
                tagged.write_bytes(source)
                compiled = Path(tmp) / "out.mpy"
                proc = subprocess.run(
                    [mpy_cross, "-s", target, "-o", str(compiled), str(tagged)],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    raise MipIndexError("package %s: mpy-cross failed on %s: %s"
                                      % (name, target, proc.stderr.strip()))  # fmt: skip
                py_json["hashes"].append([target, _store(output, source, written)])
                mpy_target = target[: -len(".py")] + ".mpy"
                mpy_json["hashes"].append([mpy_target, _store(output, compiled.read_bytes(),
                                                              written)])  # fmt: skip
            for doc in (py_json, mpy_json):
                if deps:
                    doc["deps"] = [[d, "latest"] for d in deps]
            for fmt, doc in (("py", py_json), (mpy, mpy_json)):
                for version in ["latest"] + ([m.version] if m.version else []):
                    path = output / "package" / fmt / name / ("%s.json" % version)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
            index["packages"].append({
                "name": name, "version": m.version, "author": "",
                "description": m.description, "license": "MIT",
                "versions": {"py": [m.version], mpy: [m.version]} if m.version else {},
                "path": m.folder.as_posix(),
            })  # fmt: skip
    (output / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {name: manifests[name].version for name in manifests}


def _store(output, data, written):
    short = hashlib.sha256(data).hexdigest()[:HASH_PREFIX]
    if written.get(short, data) != data:
        raise MipIndexError("two files share the hash prefix %s: use a longer prefix" % short)
    written[short] = data
    path = output / "file" / short[:2] / short
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return short


# --- fetching from an index ------------------------------------------------------------------


@dataclass
class StagedFile:
    target: str  # path under the board's /lib, e.g. "lora/sx126x.mpy"
    local: Path  # the checked copy in the staging folder
    sha256: str  # the whole hash of the bytes fetched (the index gives a prefix)
    package: str


def fetch(packages, index, mpy, dest, progress=None, mirror=None):
    """Fetch each package ("name" or "name@version") and its deps from the index (an http(s)
    URL or a folder holding one) for bytecode version mpy ("6", or "py"), check every file
    against its hash, and keep it in dest/<mpy>/<target path>. Returns [StagedFile] in install
    order. Raises FetchError naming the package and the URL. With mirror (a folder), what was
    fetched and checked is also written there as an index of its own, for flashing offline."""
    index = str(index).rstrip("/")
    dest = Path(dest)
    staged = {}  # target -> StagedFile
    seen = set()
    pending = [(p, None) for p in packages]  # (package, the package that needs it)
    while pending:
        spec, needed_by = pending.pop(0)
        name, _, version = spec.partition("@")
        version = version or "latest"
        if (name, version) in seen:
            continue
        seen.add((name, version))
        what = "package %s" % name + (" (required by %s)" % needed_by if needed_by else "")
        if not _NAME.match(name) or not _NAME.match(version):
            raise FetchError("%s: not a package name" % what)
        url = "%s/package/%s/%s/%s.json" % (index, mpy, name, version)
        if progress:
            progress("fetching %s" % what)
        raw = _get(what, url, "not in the index")
        doc = _package_json(what, url, raw)
        files = {}
        for target, short in doc["hashes"]:
            file_url = "%s/file/%s/%s" % (index, short[:2], short)
            data = _get(what, file_url, "file %s is missing from the index" % target)
            full = hashlib.sha256(data).hexdigest()
            if not full.startswith(short):
                raise FetchError(
                    "%s: %s from %s has sha256 %s..., not %s as the index says (corrupted or "
                    "tampered with)" % (what, target, file_url, full[:12], short)
                )
            before = staged.get(target)
            if before is not None and before.sha256 != full:
                raise FetchError(
                    "%s: %s differs from the one package %s installs (%s)"
                    % (what, target, before.package, url)
                )
            local = dest / mpy / target
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(data)
            staged[target] = StagedFile(target, local, full, name)
            files[short] = data
        if mirror is not None:
            for rel, data in [("package/%s/%s/%s.json" % (mpy, name, version), raw)] + [
                ("file/%s/%s" % (short[:2], short), data) for short, data in files.items()
            ]:
                (Path(mirror) / rel).parent.mkdir(parents=True, exist_ok=True)
                (Path(mirror) / rel).write_bytes(data)
        for dep, dep_version in doc.get("deps", ()):
            pending.append(("%s@%s" % (dep, dep_version or "latest"), name))
    return list(staged.values())


def _package_json(what, url, raw):
    try:
        doc = json.loads(raw)
    except ValueError:
        raise FetchError("%s: %s is not a package description (not JSON)" % (what, url)) from None
    if not isinstance(doc, dict):
        raise FetchError("%s: %s is not a package description" % (what, url))
    if doc.get("urls"):
        raise FetchError(
            "%s: %s lists files by URL, without hashes: not installed (only index packages, "
            "whose every file is checked)" % (what, url)
        )
    hashes = doc.get("hashes", [])
    deps = doc.get("deps", [])
    ok = isinstance(hashes, list) and isinstance(deps, list)
    for entry in hashes if ok else ():
        ok = ok and _pair(entry) and _safe_target(entry[0])
        ok = ok and re.fullmatch(r"[0-9a-f]{4,64}", entry[1]) is not None
    for entry in deps if ok else ():
        ok = ok and _pair(entry)
    if not ok:
        raise FetchError("%s: %s: malformed hashes or deps" % (what, url))
    return doc


def _pair(entry):
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)


def _safe_target(path):
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _get(what, url, missing):
    """The bytes at url (http(s)://, or a path in a local index folder)."""
    if not url.startswith(("http://", "https://")):
        try:
            return Path(url).read_bytes()
        except FileNotFoundError:
            raise FetchError("%s: %s: %s" % (what, missing, url)) from None
        except OSError as e:
            raise FetchError("%s: cannot read %s: %s" % (what, url, e.strerror)) from None
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
            return response.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FetchError("%s: %s: %s" % (what, missing, url)) from None
        raise FetchError("%s: HTTP %d %s from %s" % (what, e.code, e.reason, url)) from None
    except urllib.error.URLError as e:
        reason = getattr(e.reason, "strerror", None) or str(e.reason)
        raise FetchError("%s: cannot fetch %s: %s" % (what, url, reason)) from None
    except (OSError, ValueError) as e:  # a timeout in the middle of the body, a bad URL
        raise FetchError("%s: cannot fetch %s: %s" % (what, url, e)) from None


def check_index(text, option="--mip-index"):
    """An index given as an option: an http(s) URL, or an existing folder (made absolute).
    Raises MipIndexError."""
    if text.startswith(("http://", "https://")):
        parts = urllib.parse.urlsplit(text)
        if not parts.hostname:
            raise MipIndexError("%s: no host in %r" % (option, text))
        return text
    if "://" in text:
        raise MipIndexError("%s: expected an http(s):// URL or a folder, got %r" % (option, text))
    if not Path(text).is_dir():
        raise MipIndexError("%s: %s: no such folder (a URL starts with http://)" % (option, text))
    return str(Path(text).resolve())


# --- `python -m host_tools.mipindex` ---------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m host_tools.mipindex",
        description="Build a mip package index (as micropython.org/pi/v2 serves it) from "
        "micropython-lib style packages (folders with a manifest.py), or with --from copy "
        "packages from an index, checked, while there is Internet. Flash from it with "
        "`citynode flash --mip-index DIR`, or serve it: python3 -m http.server -d DIR.",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="the index folder to write")
    p.add_argument("--from", dest="source", metavar="URL",
                   help="copy the named packages (and what they need) from this index: "
                   "%s is micropython-lib's" % DEFAULT_INDEX)  # fmt: skip
    p.add_argument(
        "--mpy", default="6", metavar="V", help="with --from: the boards' .mpy version (default 6)"
    )
    p.add_argument("sources", nargs="+", metavar="LIBRARY|PACKAGE",
                   help="folders searched for <package>/manifest.py; with --from, package "
                   "names")  # fmt: skip
    args = p.parse_args(argv)
    try:
        if args.source:
            with tempfile.TemporaryDirectory(prefix="citynode-mipindex-") as tmp:
                staged = fetch(args.sources, check_index(args.source, "--from"), args.mpy, tmp,
                               mirror=args.output)  # fmt: skip
            for f in staged:
                print("%s %s" % (f.package, f.target))
            return 0
        packages = build(args.output, args.sources)
    except (MipIndexError, fwbuild.BuildError) as e:
        print("mipindex: %s" % e, file=sys.stderr)
        return 2
    for name, version in sorted(packages.items()):
        print("%s %s" % (name, version or "(no version)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

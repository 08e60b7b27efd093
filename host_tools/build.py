# Compiles what goes onto a board (firmware/, boards/, protocols/) to .mpy with mpy-cross.
# Used by the simulator, the tests and `citynode flash`; a 64 KB heap cannot compile sources.

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocols", "firmware", "boards")
# Architectures of the supported boards (mpy-cross -march); None = bytecode only (unix port).
ARCHES = {"unix": None, "esp32": "xtensawin", "esp32s3": "xtensawin", "rp2": "armv6m"}


class BuildError(Exception):
    pass


def tool(name):
    """Path of a command installed beside this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise BuildError("%s not found: run `make test` or `pip install -e .` first" % name)
    return found


def sources(root=ROOT):
    """(relative path, absolute path) of every .py file that goes onto a board."""
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts and "vectors" not in path.parts:
                out.append((path.relative_to(root), path))
    return out


# How the .mpy files are made, besides their sources: a build made otherwise is remade whole
# (a new source name for tracebacks changes no source file). Change it with the mpy-cross call.
OPTIONS = "mpy-cross -s <module name>"


def module_name(rel):
    """firmware/journal.py -> "firmware.journal"; firmware/__init__.py -> "firmware"."""
    parts = list(Path(rel).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def build(dest, arch=None, root=ROOT):
    """Compile every board source into dest (same tree, .mpy); returns {relative .mpy: size}.

    Recompiles only files whose source is newer than their .mpy, and all of them when the
    build was made with other options (OPTIONS, the architecture: dest/.options says)."""
    dest = Path(dest)
    mpy_cross = tool("mpy-cross")
    sizes = {}
    stamp = dest / ".options"
    options = "%s -march=%s\n" % (OPTIONS, arch or "")
    same = stamp.exists() and stamp.read_text() == options
    for rel, src in sources(root):
        out = dest / rel.with_suffix(".mpy")
        out.parent.mkdir(parents=True, exist_ok=True)
        if not same or not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
            # The source name a traceback shows: the module's own name ("firmware.journal"),
            # a qstr the board interns anyway when it imports the module; a path would be one
            # more qstr a module, kept for good (firmware/README.md "the heap").
            cmd = [mpy_cross, "-s", module_name(rel), "-o", str(out), str(src)]
            if arch:
                cmd.insert(1, "-march=" + arch)
            proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            if proc.returncode != 0:
                raise BuildError("mpy-cross failed on %s: %s" % (rel, proc.stderr.strip()))
        sizes[str(rel.with_suffix(".mpy"))] = out.stat().st_size
    stamp.write_text(options)
    # A module renamed or removed leaves its .mpy behind: gone too, or a board (citynode flash
    # copies the whole build) and the tests would still import it.
    for pkg in PACKAGES:
        for old in (dest / pkg).rglob("*.mpy"):
            if str(old.relative_to(dest)) not in sizes:
                old.unlink(missing_ok=True)
    # Data files the firmware reads at run time travel as they are.
    for extra in sorted((root / "protocols").glob("*.json")):
        shutil.copy2(extra, dest / "protocols" / extra.name)
    return sizes


def default_build_dir():
    return Path(os.environ.get("CITYNODE_BUILD", ROOT / "build" / "unix"))

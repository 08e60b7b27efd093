# What goes onto a board (host_tools.build.sources(): firmware/, boards/, protocols/) type-checked
# with mypy against the real ports' stubs, micropython-esp32-stubs and micropython-rp2-stubs, so a
# call the port does not have, a wrong argument type or a CPython-only import fails CI.
#
# The stubs (and their micropython-stdlib-stubs, used as mypy's typeshed) are installed by this
# test with pip into build/stubs/<port>, one folder per port: both packages put machine.pyi etc.
# at the top level, so they cannot share the venv. boards/*.py with ARCH "xtensawin" are checked
# against esp32 only, "armv6m" against rp2 only; everything else against both. typings/ holds our
# own minimal stubs of micropython-lib's lora package (installed on boards with mip, not on PyPI).
import ast
import re
import subprocess
import sys
import warnings

import pytest

from host_tools import build

ROOT = build.ROOT
STUB_ROOT = ROOT / "build" / "stubs"
PORTS = {
    "esp32": ("micropython-esp32-stubs==1.29.0.post1", "xtensawin"),
    "rp2": ("micropython-rp2-stubs==1.29.0.post1", "armv6m"),
}
MYPY_FLAGS = [
    "--no-site-packages",  # never the venv's CPython packages
    "--check-untyped-defs",  # the firmware has no annotations: check every body anyway
    # Untyped MicroPython code sets attributes to None first and builds lists empty; these two
    # only ask for annotations, they find no API misuse.
    "--no-strict-optional",
    "--disable-error-code=var-annotated",
    "--follow-imports=silent",  # report our files, not the stubs' own inconsistencies
    "--hide-error-context",
    "--no-error-summary",
    "--no-color-output",
]
LINE = re.compile(
    r"^(?P<path>.+?):(?P<line>\d+): (?P<sev>error|note): (?P<msg>.*?)(?:  \[(?P<code>[a-z-]+)\])?$"
)

# Errors in other people's files, reported to their owners; any other error fails the test.
# (path, error code, message start, why it is there)
KNOWN = []  # (file, code, message start, why) of type errors accepted for now


@pytest.fixture(scope="session")
def stubs():
    """{port: folder} with the pinned stubs installed (pip, once; PyPI on a fresh machine)."""
    out = {}
    for port, (requirement, _) in PORTS.items():
        dest = STUB_ROOT / port
        stamp = dest / ".citynode-requirement"
        if not stamp.exists() or stamp.read_text() != requirement:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--upgrade",
                    "--target",
                    str(dest),
                    requirement,
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert proc.returncode == 0, "pip could not install %s:\n%s" % (
                requirement,
                proc.stderr,
            )
            stamp.write_text(requirement)
        assert (dest / "machine.pyi").exists() and (dest / "stdlib" / "VERSIONS").exists()
        out[port] = dest
    return out


def mypy(stub_dir, cache_dir, files):
    """[(path, line, code, message)] of mypy's errors in files, checked against one port."""
    env = {"MYPYPATH": "%s:%s" % (stub_dir, ROOT / "typings"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--custom-typeshed-dir",
            str(stub_dir),
            "--cache-dir",
            str(cache_dir),
            *MYPY_FLAGS,
            *[str(f) for f in files],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    errors = []
    for line in proc.stdout.splitlines():
        m = LINE.match(line)
        if m is None:
            raise AssertionError("unexpected mypy output: %r\n%s" % (line, proc.stderr))
        if m["sev"] == "error":
            errors.append((m["path"], int(m["line"]), m["code"], m["msg"]))
    assert proc.returncode == (1 if errors else 0), proc.stdout + proc.stderr
    # Stub files are always followed and checked; their own inconsistencies are not ours.
    checked = {str(f) for f in files}
    return [e for e in errors if e[0] in checked]


def import_fallback_lines(path):
    """Lines that run only where a module is missing: imports inside `try:` blocks with an
    `except ImportError:` handler, and those handlers' bodies. That is the CPython side of code
    shared with the host (def const(x), import hmac, time.sleep_ms = None), which a check
    against MicroPython's stubs cannot judge."""
    lines = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if not isinstance(node, ast.Try):
            continue
        handlers = [h for h in node.handlers if _catches_import_error(h)]
        if not handlers:
            continue
        for stmt in node.body:
            if isinstance(stmt, ast.Import | ast.ImportFrom):
                lines.update(range(stmt.lineno, stmt.end_lineno + 1))
        for h in handlers:
            for stmt in h.body:
                lines.update(range(stmt.lineno, stmt.end_lineno + 1))
    return lines


def _catches_import_error(handler):
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names
    )


def board_arch(path):
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "Board":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and getattr(stmt.targets[0], "id", None) == "ARCH":
                    return stmt.value.value
    return None


def port_files(port):
    """Board sources for one port. boards/sim/ runs only on the unix port, with deliberate
    fakes (block devices, a stand-in machine module): not checked against ESP32/RP2 stubs."""
    arch = PORTS[port][1]
    files = []
    for rel, _ in build.sources():
        if rel.parts[:2] == ("boards", "sim"):
            continue
        file_arch = board_arch(rel) if rel.parts[0] == "boards" else None
        if file_arch is None or file_arch == arch:
            files.append(rel)
    return files


@pytest.mark.parametrize("port", sorted(PORTS))
def test_board_sources_type_check_against_the_port_stubs(stubs, port):
    files = port_files(port)
    names = {str(f) for f in files}
    assert "boards/hw.py" in names and "firmware/node.py" in names
    for arch_port, (_, arch) in PORTS.items():  # each real board is checked against its port
        boards = {n for n in names if n.startswith("boards/") and board_arch(n) == arch}
        assert bool(boards) == (arch_port == port), (port, boards)
    fallback = {}
    unexpected = []
    seen_known = set()
    for path, line, code, msg in mypy(stubs[port], ROOT / "build" / "mypy-cache" / port, files):
        if path not in fallback:
            fallback[path] = import_fallback_lines(path)
        if line in fallback[path]:
            continue
        known = [k for k in KNOWN if k[0] == path and k[1] == code and msg.startswith(k[2])]
        if known:
            seen_known.add(known[0][0:3])
            continue
        unexpected.append("%s:%d: %s  [%s]" % (path, line, msg, code))
    assert not unexpected, "type errors against %s stubs:\n%s" % (port, "\n".join(unexpected))
    for k in KNOWN:
        if k[:3] not in seen_known:
            warnings.warn(
                "fixed, remove from KNOWN in tests/test_typecheck.py: %s" % (k[:3],), stacklevel=1
            )


# --- the check catches real misuse -------------------------------------------------------------

MISUSE = {
    # A wrong argument type to machine.I2C, inside an unannotated function like the firmware's.
    "i2c_freq_str": (
        "from machine import I2C, Pin\n\n\ndef bus():\n"
        '    return I2C(0, scl=Pin(22), sda=Pin(21), freq="400k")\n',
        5,
        ("call-overload", "arg-type"),
    ),
    # A CPython-only module in board code.
    "cpython_module": ("import pathlib\n\nROOT = pathlib.Path('/')\n", 1, ("import-not-found",)),
    # A keyword micropython-lib's SX1262 does not take (our typings/lora stubs are in use).
    "lora_kwarg": (
        "from machine import SPI, Pin\nfrom lora import SX1262\n\n\ndef modem():\n"
        "    return SX1262(SPI(1), Pin(8), busy=Pin(13), dio3_tcxo_mv=1800)\n",
        6,
        ("call-arg",),
    ),
    # A time function MicroPython does not have.
    "time_monotonic": (
        "import time\n\n\ndef now():\n    return time.monotonic()\n",
        5,
        ("attr-defined",),
    ),
}
CORRECT = (
    "from machine import I2C, SPI, Pin\nfrom lora import SX1262\n\n\n"
    "def bus():\n    return I2C(0, scl=Pin(22), sda=Pin(21), freq=400000)\n\n\n"
    "def modem():\n    return SX1262(SPI(1), Pin(8), busy=Pin(13), dio3_tcxo_millivolts=1800)\n"
)


@pytest.mark.parametrize("port", sorted(PORTS))
def test_type_check_fails_on_api_misuse(stubs, port, tmp_path):
    files = []
    for name, (source, _, _) in MISUSE.items():
        (tmp_path / (name + ".py")).write_text(source)
        files.append(tmp_path / (name + ".py"))
    (tmp_path / "correct.py").write_text(CORRECT)
    files.append(tmp_path / "correct.py")
    errors = mypy(stubs[port], tmp_path / "mypy-cache", files)  # fresh: same module names
    by_file = {}
    for path, line, code, _ in errors:
        by_file.setdefault(path.rsplit("/", 1)[-1][:-3], []).append((line, code))
    assert "correct" not in by_file, errors  # the same calls, spelled right, pass
    for name, (_, line, codes) in MISUSE.items():
        found = by_file.get(name, [])
        assert any(n == line and c in codes for n, c in found), (name, errors)

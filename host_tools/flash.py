# Provisioning boards over USB (`citynode flash`): the .mpy firmware, the board's micropython-lib
# packages, config.json with the node's key; then a reset and the node's boot line as proof.
#
# Everything on the board is done by the real mpremote program, one subprocess per step; the first
# one soft-resets the board (stopping the firmware that runs), the others `resume`. Steps:
#   inspect   read /.provisioning, /config.json, sys.platform, the board's .mpy version (and, on a
#             `citynode sim-board --board NAME`, the board it simulates): wrong board,
#             half-flashed, same node
#   fetch     before any board is changed: the HOST fetches the board's MIP_PACKAGES (and
#             umqtt.simple for an mqtt:// uplink where the firmware does not freeze it) from
#             micropython-lib's index or --mip-index (host_tools/mipindex.py), with what they
#             require, for the board's .mpy version, and checks every file against the index's
#             hash. A package that cannot be fetched stops the run here: no board was changed.
#   prepare   write /.provisioning ("node=N step=..."), remove /main.py and the old /lib packages,
#             then reset: a watchdog the old firmware started cannot be stopped any other way.
#             A board that was another node (or a revoked one) also loses that node's state:
#             /journal, /seq.dat, /clock.dat (counting the pending readings it drops)
#   copy      the build (host_tools/build.py, the board's ARCH) into /lib
#   packages  the fetched packages' files into /lib, as `mip install --target /lib` lays them out
#   key       the node's key into the key registry (atomic, under a lock file)
#   config    /main.py and /config.json
#   verify    the board hashes every file written (sha256) against the build and the fetched
#             packages; only if all match is /.provisioning removed
#   boot      over pyserial: raw REPL, machine.reset(), then the node's log until
#             `I ... node started ... fw=X ... node=N`
# A board that still has /.provisioning is half-flashed: `citynode flash` says so and finishes it.
# A board found complete, as the same node with the registry's key and this very firmware and
# config, is not flashed again ("already flashed, skipped"): re-running a run that failed half-way
# leaves the finished boards (and their pending readings) alone, and fetches nothing.
#
# A simulated board (`citynode sim-board --board heltec_v3`) says which board it simulates; it is
# admitted as that board only, and gets what its interpreter runs: the bytecode build with the
# simulator's parts (boards/sim/), and packages for its own platform.
#
# Identity: a reading is known by (node id, reading index), and the index lives in the board's
# journal. A board that becomes another node id, or a revoked node given a new key, must not
# send the old identity's readings as the new one, so that state is dropped, and only with
# --reflash. The same node given its registry's current key (after `keys rotate`) keeps it: its
# pending readings are its own, resent under the new key.
#
# Key order: the key reaches the registry before config.json reaches the board. A run cut short
# between the two leaves a registry entry for a half-flashed board, which the next run (it finds
# /.provisioning naming the node) completes with the same key. The other order could leave a board
# sending frames under a key the host never stored: every frame rejected, readings lost.

import ast
import contextlib
import fcntl
import hashlib
import json
import os
import queue
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import serial

from host_tools import build, mipindex, nodelog, serialport
from host_tools.keys import (
    KEY_BYTES,
    KeyFileError,
    key_id,
    load_keys,
    load_registry,
    save_keys,
    save_registry,
)

MARKER = "/.provisioning"
LIB = "/lib"
MAIN_PY = "from firmware import app\napp.run()\n"  # the board's root /main.py (firmware/app.py)
# The node's own state on the board (firmware/journal.py, seq.py, clock.py; paths relative to
# the board's root, where main.py runs): it belongs to one node id and goes when the id does.
JOURNAL = "/journal"
NODE_STATE = (JOURNAL, "/seq.dat", "/seq.dat.tmp", "/clock.dat", "/clock.dat.tmp")
PACKAGES = build.PACKAGES  # what goes into /lib
BOOT_TIMEOUT_S = 30.0
RAW_REPL = b"raw REPL; CTRL-B to exit\r\n>"
# sys.platform of the MicroPython port each mpy-cross architecture runs on
PLATFORMS = {None: "linux", "xtensawin": "esp32", "armv6m": "rp2"}
MAX_NODE_ID = 0xFFFFFFFF
_STEP_TIMEOUT_S = 120.0
# A node with an "mqtt://" uplink needs micropython-lib's MQTT client. ESP32 firmware has it
# frozen in (and a /lib copy would be shadowed by the frozen one): installed everywhere else.
MQTT_PACKAGE = "umqtt.simple"
UMQTT_FROZEN = ("esp32",)  # sys.platform of the ports that freeze it

_EXCEPTION = re.compile(r"^(\w+(Error|Exception|Interrupt|Exit))\b.*")


class FlashError(Exception):
    """A board could not be flashed. str() = what failed; .hint = how to recover."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.hint = hint


class Refused(FlashError):
    """Bad input found before the board was changed (wrong board, node id in use)."""


# --- boards and firmware ---------------------------------------------------------------------


@dataclass
class BoardDef:
    name: str
    arch: str = None  # mpy-cross -march; None = bytecode only (the simulated board)
    mip_packages: tuple = ()
    wifi: bool = False
    wifi_required: bool = False
    deep_sleep: bool = False  # config "idle": "deep" (boards/README.md)
    pm_uart: int = None  # PM_UART_ID: the UART a serial PM sensor goes on; None: none

    @property
    def platform(self):
        return PLATFORMS.get(self.arch)


def board_names(root=build.ROOT):
    """Boards in boards/: every <name>.py with a `class Board` (not helpers such as hw.py), and
    every folder <name>/ with a board.py (a board with parts of its own: the simulated one)."""
    names = []
    for path in sorted((Path(root) / "boards").iterdir()):
        if path.name.startswith("_"):
            continue
        if path.suffix == ".py" and _board_class(path) is not None:
            names.append(path.stem)
        elif path.is_dir() and _board_class(path / "board.py") is not None:
            names.append(path.name)
    return sorted(names)


def _board_path(root, name):
    folder = Path(root) / "boards" / name
    return folder / "board.py" if folder.is_dir() else folder.with_suffix(".py")


def _board_class(path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Board":
            return node
    return None


def board_def(name, root=build.ROOT):
    """The board's ARCH, MIP_PACKAGES and Wi-Fi flags, read from boards/<name>.py without
    importing it (it imports `machine`). Raises Refused for an unknown name."""
    names = board_names(root)
    if name not in names:
        raise Refused(
            "unknown board %r; known boards: %s" % (name, ", ".join(names) or "(none)"),
            "pick one of them with --board",
        )
    attrs = {}
    for node in _board_class(_board_path(root, name)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                try:
                    attrs[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    arch = attrs.get("ARCH")
    # (the simulated board bridges any UART id to its PM sensor: boards/sim/uart_bridge.py)
    pm_uart = attrs.get("PM_UART_ID", -1 if arch else 1)
    if arch not in PLATFORMS:
        raise Refused("board %s: ARCH %r is not one of %s" % (name, arch, sorted(build.ARCHES)))
    return BoardDef(
        name=name,
        arch=arch,
        mip_packages=tuple(attrs.get("MIP_PACKAGES", ())),
        wifi=bool(attrs.get("WIFI", False)),
        wifi_required=bool(attrs.get("WIFI_REQUIRED", False)),
        deep_sleep=bool(attrs.get("DEEP_SLEEP", False)),
        pm_uart=pm_uart if pm_uart >= 0 else None,
    )


def firmware_version(root=build.ROOT):
    """FW_VERSION from firmware/__init__.py (read, not imported: the host does not import
    firmware)."""
    path = Path(root) / "firmware" / "__init__.py"
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "FW_VERSION":
            return ast.literal_eval(node.value)
    raise FlashError("%s has no FW_VERSION" % path)


def firmware_files(build_dir, board, simulated=False):
    """(local path, remote path) of everything copied into /lib: the build, less the simulated
    board's folder (boards/sim/) on a real board (kept on a simulated one) and its boot script
    (boards/sim/boot.py, the host's) everywhere."""
    files = []
    for path in sorted(Path(build_dir).rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(build_dir).as_posix()
        if rel.split("/")[0] not in PACKAGES or rel == "boards/sim/boot.mpy":
            continue
        if board.name != "sim" and not simulated and rel.startswith("boards/sim/"):
            continue
        files.append((path, "%s/%s" % (LIB, rel)))
    return files


def node_config(node_id, key, board, uplink, interval_s, batch, wifi=None, idle=None, sensor=None):
    """config.json's contents (firmware/config.py, README "Provisioning a board")."""
    cfg = {
        "node_id": node_id,
        "key": key.hex(),
        "board": board.name,
        "uplink": uplink,
        "interval_s": interval_s,
        "batch": batch,
    }
    if wifi:
        cfg["wifi"] = dict(wifi)
    if idle:
        cfg["idle"] = idle
    if sensor:  # a particulate sensor beside the BME280 (firmware/sensors.py)
        pm = {"type": sensor}
        if sensor in ("sds011", "pms5003"):
            pm["uart"] = board.pm_uart
        cfg["sensors"] = [{"type": "bme280"}, pm]
    return json.dumps(cfg, sort_keys=True) + "\n"


# --- the key registry ------------------------------------------------------------------------


@contextlib.contextmanager
def registry(path):
    """The key registry, read under an exclusive lock on KEYS.lock (the lock `citynode keys`
    takes too), so that two runs cannot hand out one id twice. Yields (keys, save function)."""
    path = Path(path)
    fd = os.open(str(path) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)  # as keys.locked() does
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        keys = load_keys(path) if path.exists() else {}
        yield keys, lambda: save_keys(path, keys)
    finally:
        os.close(fd)  # releases the lock


# --- mpremote --------------------------------------------------------------------------------


class Mpremote:
    """Runs the mpremote program against one port. The first call soft-resets the board (mpremote's
    default: the running firmware stops); later calls `resume`, so steps do not reset it."""

    def __init__(self, port, program=None):
        self.port = port
        self.program = program or build.tool("mpremote")
        self.resume = False

    def __call__(self, args, step, on_line=None, timeout=_STEP_TIMEOUT_S):
        cmd = [self.program, "connect", self.port] + (["resume"] if self.resume else []) + args
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, bufsize=1
        )
        # Both pipes on threads: a board that stops answering leaves mpremote blocked in a read
        # (it has no timeout on a pty), and only the deadline here ends that.
        lines, err = queue.Queue(), []
        pumps = [
            threading.Thread(target=_pump, args=(proc.stdout, lines.put, True), daemon=True),
            threading.Thread(target=_pump, args=(proc.stderr, err.append), daemon=True),
        ]
        for t in pumps:
            t.start()
        out = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() < deadline:
                    continue
                proc.kill()
                proc.wait()
                raise self._failed(
                    step, "no answer from the board in %.0f s (mpremote stopped)" % timeout
                ) from None
            if line is None:
                break
            out.append(line)
            if on_line:
                on_line(line.rstrip("\n"))
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for t in pumps:
            t.join(5)
        if proc.returncode != 0:
            lines = [x.strip() for x in err if x.strip()] or [x.strip() for x in out if x.strip()]
            raise self._failed(step, lines[-1] if lines else "exit status %d" % proc.returncode)
        self.resume = True
        return "".join(out)

    def exec(self, code, step, **kw):
        return self(["exec", code], step, **kw)

    def _failed(self, step, detail):
        if _is_device(self.port) and not os.path.exists(self.port):
            return FlashError(
                "%s: the port disappeared while %s (board unplugged or crashed?)"
                % (self.port, step)
            )
        return FlashError("%s: %s failed: %s" % (self.port, step, detail))


def _pump(stream, sink, eof=False):
    """Feed a pipe's lines to sink; then sink(None) if eof."""
    with stream:
        for line in stream:
            sink(line)
    if eof:
        sink(None)


def _is_device(port):
    return "://" not in port


# --- what runs on the board ------------------------------------------------------------------

# The board's state; getattr for what older or smaller ports may lack. $CITYNODE_SIM_BOARD is
# set by `citynode sim-board` only (host_tools/sim/simboard.py SIM_BOARD_ENV): the board it
# simulates; a board's os has no getenv.
_INSPECT = """
import sys
def _cn_read(p):
    try:
        with open(p) as f:
            return f.read()
    except OSError:
        return None
try:
    import os
    _cn_sim = os.getenv('CITYNODE_SIM_BOARD')
except (ImportError, AttributeError):
    _cn_sim = None
print('CITYNODE-STATE', repr((sys.platform, _cn_read('%s'), _cn_read('/config.json'),
    getattr(sys.implementation, '_mpy', 0) & 0xFF, _cn_sim)))
""" % (MARKER,)

_RM_TREE = """
import os
def _cn_rm(p):
    try:
        m = os.stat(p)[0]
    except OSError:
        return
    if m & 0x4000:
        for n in os.listdir(p):
            _cn_rm(p + '/' + n)
        os.rmdir(p)
    else:
        os.remove(p)
def _cn_mkdir(p):
    try:
        os.mkdir(p)
    except OSError:
        pass
"""


def _mark(node_id, step):
    return "with open(%r, 'w') as _f:\n    _f.write('node=%d step=%s\\n')\n" % (
        MARKER,
        node_id,
        step,
    )


# Readings stored in the journal and not acknowledged, from its files' names and sizes
# (firmware/journal.py's layout: r<index> small files, s<index> segments, the state's position):
# no record is read, nothing is written, and the firmware on the board is not needed (a
# half-flashed board has none). Records are not CRC-checked: a torn one counts as pending.
_PENDING = """
import os, struct, binascii
def _cn_pending(d):
    try:
        names = os.listdir(d)
    except OSError:
        return 0
    pos, gen, rec, s = 0, -1, 22, 0
    for n in ('state0', 'state1'):
        try:
            with open(d + '/' + n, 'rb') as f:
                b = f.read(24)
        except OSError:
            continue
        if len(b) == 24 and b[:2] == b'CJ':
            if struct.unpack_from('<I', b, 20)[0] == binascii.crc32(b[:20]) & 0xffffffff:
                v = struct.unpack_from('<2sBBBBHIII', b)
                if v[8] > gen:
                    gen, rec, s, pos = v[8], v[2], v[5], v[6]
    t = 128 // rec or 1
    if not s:
        s = t * max(1, 4084 // (t * rec))
    spans = []
    for n in names:
        if len(n) != 9 or n[0] not in 'rs':
            continue
        try:
            base = int(n[1:], 16)
            size = os.stat(d + '/' + n)[6]
        except (ValueError, OSError):
            continue
        if n[0] == 'r':
            spans.append((base, base + size // rec))
        else:
            spans.append((base + s - max(0, size - 12) // rec, base + s))
    n = 0
    end = pos
    for lo, hi in sorted(spans):
        lo = max(lo, end)
        if hi > lo:
            n += hi - lo
            end = hi
    return n
"""


def _prepare_script(node_id, dirs, drop=False):
    """Mark the board, remove the old firmware, create the directories the new one goes into.
    The node's state (journal, seq.dat, clock.dat) stays: a node's reading indices and sequence
    numbers must not restart. With drop (the board was another node), that state is removed
    too, after printing how many readings were pending in it (CITYNODE-DROPPED n)."""
    old = ["/main.py"] + ["%s/%s" % (LIB, p) for p in PACKAGES]
    script = _RM_TREE + _mark(node_id, "prepare")
    if drop:
        script += _PENDING + "print('CITYNODE-DROPPED', _cn_pending(%r))\n" % (JOURNAL,)
        old = list(NODE_STATE) + old
    return (
        script
        + "for _p in %r:\n    _cn_rm(_p)\n" % (old,)
        + "for _p in %r:\n    _cn_mkdir(_p)\n" % (sorted(set(dirs) | {LIB}),)
    )


# The sha256 of a file on the board in hex (OSError when it cannot be read), for the scripts
# below: read in 512-byte pieces, as a board's heap allows.
_BOARD_HASH = """
import hashlib, binascii
def _cn_hash(_p):
    _s = hashlib.sha256()
    with open(_p, 'rb') as _f:
        while True:
            _b = _f.read(512)
            if not _b:
                break
            _s.update(_b)
    return binascii.hexlify(_s.digest()).decode()
"""


def _hash_script(paths, version=True):
    """Print the sha256 of each path on the board, a line each (CITYNODE-HASH <hex or -> <path>:
    nothing accumulates on the board's heap, whatever the number of files), then, with version,
    the FW_VERSION of the firmware in /lib (CITYNODE-FW <repr>, None when it does not import)."""
    script = (
        _BOARD_HASH
        + """
for _p in %r:
    try:
        print('CITYNODE-HASH', _cn_hash(_p), _p)
    except OSError:
        print('CITYNODE-HASH', '-', _p)
"""
        % (sorted(paths),)
    )
    if version:
        script += """
try:
    from firmware import FW_VERSION as _cn_fw
except Exception:
    _cn_fw = None
print('CITYNODE-FW', repr(_cn_fw))
"""
    return script


def _hashes(output):
    """{path: hex or None} from _hash_script's output."""
    hashes = {}
    for line in output.splitlines():
        if line.startswith("CITYNODE-HASH "):
            _tag, digest, path = line.rstrip("\r").split(" ", 2)
            hashes[path] = None if digest == "-" else digest
    return hashes


def _tagged(output, tag):
    for line in output.splitlines():
        if line.startswith(tag + " "):
            return ast.literal_eval(line[len(tag) + 1 :])
    raise FlashError("no %s line in mpremote's output: %r" % (tag, output[-200:]))


# --- one board -------------------------------------------------------------------------------


@dataclass
class BoardState:
    platform: str
    marker: dict = None  # {"node": int, "step": str} when half-flashed
    config: dict = None  # the board's config.json, when it is valid JSON
    config_text: str = None
    mpy: str = "6"  # the .mpy version packages are fetched for (sys.implementation._mpy), or "py"
    simulates: str = None  # the board a `citynode sim-board` simulates ("sim", "heltec_v3"...)

    @property
    def simulated(self):
        return self.simulates is not None

    @property
    def node_id(self):
        node_id = (self.config or {}).get("node_id")
        return node_id if isinstance(node_id, int) else None

    @property
    def key(self):
        try:
            return bytes.fromhex((self.config or {}).get("key", ""))
        except (TypeError, ValueError):
            return None


def parse_marker(text):
    if text is None:
        return None
    fields = dict(re.findall(r"(\w+)=(\S+)", text))
    node = fields.get("node", "")
    return {"node": int(node) if node.isdigit() else None, "step": fields.get("step", "?")}


def inspect(mp):
    platform, marker, config_text, mpy, simulates = _tagged(
        mp.exec(_INSPECT, "inspecting"), "CITYNODE-STATE"
    )
    config = None
    if config_text is not None:
        try:
            config = json.loads(config_text)
        except ValueError:
            config = None
        if not isinstance(config, dict):
            config = None
    return BoardState(
        platform, parse_marker(marker), config, config_text, str(mpy or "py"), simulates
    )


@dataclass
class Plan:
    """What will happen to one board, decided before any board is changed."""

    index: int  # among the boards of this run, from 0
    port: str
    node_id: int
    state: BoardState
    key: bytes = None  # the registry's key to reuse; None = a new one
    registered: bytes = None  # the registry's key for node_id when the plan was made
    notes: list = field(default_factory=list)
    drop_from: int = None  # the node id whose journal, seq.dat and clock.dat are dropped
    reinstate: bool = False  # node_id is revoked: it comes back with a new key (--reflash)
    skip: bool = False  # already flashed (same node, key, firmware, config): left as it is
    files: list = None  # [(local .mpy, remote path)]: the build this board runs
    packages: list = field(default_factory=list)  # [mipindex.StagedFile], fetched and checked


def admit(index, port, node_id, state, board, keys, keys_path, reflash, revoked=()):
    """Decide whether this board may become node_id (keys: the registry's active nodes, revoked:
    the ids it has revoked). Raises Refused with the reason."""
    if state.simulates not in (None, "sim") and state.simulates != board.name:
        raise Refused(
            "%s: the board is a simulated %s, not %s" % (port, state.simulates, board.name),
            "check --board, or start the sim-board with --board %s" % board.name,
        )
    if state.simulates in (None, "sim") and state.platform != board.platform:
        raise Refused(
            "%s: the board runs MicroPython for %s, but board %s needs %s"
            % (port, state.platform, board.name, board.platform),
            "check --board (wrong board name?) or the port",
        )
    plan = Plan(index, port, node_id, state, registered=keys.get(node_id))
    marker = state.marker
    # A half-flashed board whose marker names node_id was admitted as node_id by an earlier run
    # (with --reflash where that was needed): finishing it needs nothing more.
    resumed = marker is not None and marker["node"] == node_id
    if marker is not None:
        plan.notes.append(
            "half-flashed (node %s, stopped at step %s): flashing it again"
            % (marker["node"], marker["step"])
        )
    if node_id in revoked and node_id not in keys:
        if not reflash:
            raise Refused(
                "%s: node %d is revoked in %s; --reflash reinstates it with a new key (as "
                "`citynode keys rotate %d --reinstate`)" % (port, node_id, keys_path, node_id)
            )
        plan.reinstate = True
        plan.notes.append("node %d was revoked: reinstated with a new key (--reflash)" % node_id)
        if state.node_id == node_id:
            plan.drop_from = node_id  # readings kept under a revoked key are not sent
    if state.node_id is not None and state.node_id != node_id:
        if not reflash and not resumed:
            raise Refused(
                "%s: the board is node %d; making it node %d needs --reflash, which drops "
                "node %d's pending readings, clock and sequence state"
                % (port, state.node_id, node_id, state.node_id)
            )
        plan.drop_from = state.node_id
        if marker is None:
            plan.notes.append(
                "was node %d; its key stays in %s until you revoke it" % (state.node_id, keys_path)
            )
    if node_id not in keys:
        return plan
    claims = state.node_id == node_id
    same_board = claims and state.key == keys[node_id]
    if same_board or resumed:
        plan.key = keys[node_id]  # this board has (or was being given) that very key
        if same_board and marker is None:
            plan.notes.append("already node %d (same key): updating it" % node_id)
        return plan
    if claims and reflash:
        plan.key = keys[node_id]  # e.g. after `citynode keys rotate`: deliver the current key
        plan.notes.append("node %d gets the registry's current key (--reflash)" % node_id)
        return plan
    if reflash:
        plan.notes.append("node %d moves to this board with a new key (--reflash)" % node_id)
        return plan
    if claims:
        raise Refused(
            "%s: the board is node %d but holds another key than %s has for it"
            % (port, node_id, keys_path),
            "if the key was rotated, --reflash installs the registry's current key",
        )
    free = _next_free(keys, node_id)
    raise Refused(
        "%s: node id %d is already in use (in %s)" % (port, node_id, keys_path),
        "pick a free id (the next is %d), or give node %d to this board with --reflash"
        % (free, node_id),
    )


def _next_free(keys, start):
    n = start
    while n in keys:
        n += 1
    return n


class Flasher:
    """Flashes boards one after another; progress(index, text) shows what is happening."""

    def __init__(self, board, keys_path, uplink, interval_s, batch, wifi=None, reflash=False,
                 mip_index=None, extra_packages=(), boot_timeout=BOOT_TIMEOUT_S,
                 progress=None, root=build.ROOT, mpremote=None, idle=None,
                 sensor=None):  # fmt: skip
        self.board = board
        self.idle = idle
        self.sensor = sensor
        self.keys_path = Path(keys_path)
        self.uplink = uplink
        self.interval_s = interval_s
        self.batch = batch
        self.wifi = wifi
        self.reflash = reflash
        self.mip_index = mip_index or mipindex.DEFAULT_INDEX
        self.extra_packages = tuple(extra_packages)
        self.packages = self.packages_for(board.platform)
        self.boot_timeout = boot_timeout
        self.progress = progress or (lambda index, text, final=False: None)
        self.root = Path(root)
        self.mpremote = mpremote
        self.fw_version = firmware_version(self.root)
        self.build_dir = self._build_dir(board.arch)
        self.files = None  # [(local .mpy, remote path)] once built
        self._builds = {}  # (arch, simulated) -> files
        self._staging = None  # the folder packages are fetched into (close() removes it)

    def packages_for(self, platform):
        """The micropython-lib packages a board running on `platform` needs: MIP_PACKAGES,
        --package, and umqtt.simple for an mqtt:// uplink where the port does not freeze it."""
        packages = tuple(self.board.mip_packages) + self.extra_packages
        if self.uplink.startswith("mqtt://") and platform not in UMQTT_FROZEN:
            if MQTT_PACKAGE not in packages:
                packages += (MQTT_PACKAGE,)  # firmware/mqtt_link.py
        return packages

    # -- admission: every board inspected and every id checked before any board is changed --

    def build(self):
        """Compile the firmware for the board's architecture (before any board is touched)."""
        self.files = self._build(self.board.arch, False)

    def _build_dir(self, arch):
        """build/<arch>, build/unix for bytecode; in this repository beside
        build.default_build_dir() ($CITYNODE_BUILD: each test worker builds apart)."""
        base = build.default_build_dir().parent if self.root == build.ROOT else self.root / "build"
        return base / (arch or "unix")

    def _build(self, arch, simulated):
        """The files of the build for arch (a simulated board: bytecode, with boards/sim/)."""
        key = (arch, simulated)
        if key not in self._builds:
            self.progress(0, "building firmware (%s)" % (arch or "bytecode"))
            build_dir = self._build_dir(arch)
            try:
                build.build(build_dir, arch=arch, root=self.root)
            except build.BuildError as e:
                raise Refused("build failed: %s" % e) from None
            self._builds[key] = firmware_files(build_dir, self.board, simulated)
        return self._builds[key]

    def stage(self, plans):
        """Fetch and check every package the boards to flash need, before any is changed
        (a failure raises Refused naming the package and the URL). Boards that need the same
        packages for the same .mpy version share one fetch."""
        fetched = {}
        for plan in plans:
            if plan.skip:
                continue
            packages = self.packages_for(plan.state.platform)
            if not packages:
                continue
            key = (plan.state.mpy, packages)
            if key not in fetched:
                if self._staging is None:
                    self._staging = tempfile.TemporaryDirectory(prefix="citynode-packages-")
                dest = Path(self._staging.name) / str(len(fetched))

                def say(text, index=plan.index):
                    self.progress(index, "%s (from %s)" % (text, self.mip_index))

                try:
                    fetched[key] = mipindex.fetch(
                        packages, self.mip_index, plan.state.mpy, dest, progress=say
                    )
                except mipindex.FetchError as e:
                    raise Refused("%s; no board was changed" % e) from None
            plan.packages = fetched[key]

    def close(self):
        """Remove the fetched packages."""
        if self._staging is not None:
            self._staging.cleanup()
            self._staging = None

    def release(self, sessions):
        """Start the firmware of boards that were only inspected (inspecting stopped it)."""
        for mp in sessions.values():
            if mp.resume:
                with contextlib.suppress(FlashError):
                    mp(["reset"], "resetting")

    def plan(self, ports, first_id):
        plans, refusals, sessions, inspected = [], [], {}, []
        with registry(self.keys_path) as (keys, _save):
            keys = dict(keys)  # checked again under the lock when the key is saved (_key)
            whole = load_registry(self.keys_path, private=False, missing_ok=True)
            revoked = {n for n, entry in whole.nodes.items() if not entry.active}
        for i, port in enumerate(ports):
            node_id = first_id + i
            self.progress(i, "%s node %d: inspecting" % (port, node_id))
            mp = Mpremote(port, self.mpremote)
            sessions[port] = mp
            try:
                state = inspect(mp)
            except FlashError as e:
                if e.hint is None:
                    e.hint = "is MicroPython on the board, and no other program using the port?"
                refusals.append(e)
                continue
            inspected.append(port)
            try:
                plan = admit(
                    i, port, node_id, state, self.board, keys, self.keys_path, self.reflash,
                    revoked,
                )  # fmt: skip
                simulated = state.simulated and self.board.arch is not None
                plan.files = self._build(None, True) if simulated else self.files
                plan.skip = self._complete(mp, plan, keys)
                plans.append(plan)
            except FlashError as e:
                refusals.append(e)
        if refusals:  # inspecting stopped their firmware: start it again
            self.release({port: sessions[port] for port in inspected})
        return plans, refusals, sessions

    def _complete(self, mp, plan, keys):
        """Is the board already what this run would make it: not half-flashed, the same node
        id with the registry's current key (compared by key id), the same config.json, and
        the build's files (sha256) and FW_VERSION in /lib? Extra --package runs always flash:
        what mip installed is not compared."""
        state, node_id = plan.state, plan.node_id
        if state.marker is not None or state.node_id != node_id or node_id not in keys:
            return False
        if plan.drop_from is not None or plan.reinstate or self.extra_packages:
            return False
        if state.key is None or key_id(state.key) != key_id(keys[node_id]):
            return False
        if state.config_text != self._config(node_id, keys[node_id]):
            return False
        expected = self._expected(self._config(node_id, keys[node_id]), plan.files)
        out = mp.exec(_hash_script(expected), "comparing the firmware")
        return _tagged(out, "CITYNODE-FW") == self.fw_version and _hashes(out) == expected

    def _config(self, node_id, key):
        return node_config(
            node_id, key, self.board, self.uplink, self.interval_s, self.batch, self.wifi,
            self.idle, self.sensor,
        )  # fmt: skip

    def _expected(self, config, files, packages=()):
        """{remote path: sha256} of every file a flash writes."""
        expected = {remote: _sha256(local.read_bytes()) for local, remote in files}
        for staged in packages:
            expected["%s/%s" % (LIB, staged.target)] = staged.sha256
        expected["/main.py"] = _sha256(MAIN_PY.encode())
        expected["/config.json"] = _sha256(config.encode())
        return expected

    def restart(self, plan):
        """Start a skipped board's node again (inspecting stopped it) and read its boot line."""
        started = time.monotonic()
        line = confirm_boot(plan.port, plan.node_id, self.fw_version, self.boot_timeout)
        return time.monotonic() - started, line

    # -- flashing one board -----------------------------------------------------------------

    def flash(self, plan, mp):
        started = time.monotonic()
        node_id, port = plan.node_id, plan.port

        def say(text, final=False):
            self.progress(plan.index, "%s node %d: %s" % (port, node_id, text), final=final)

        for note in plan.notes:
            say(note)
        files = plan.files
        packages = [(f.local, "%s/%s" % (LIB, f.target)) for f in plan.packages]
        hint = (
            "re-run the same command: the board is marked half-flashed (%s) and will be "
            "finished" % MARKER
        )
        try:
            say("preparing (marking the board half-flashed)")
            dirs = _folders(remote for _, remote in files + packages)
            drop = plan.drop_from is not None
            out = mp.exec(_prepare_script(node_id, dirs, drop), "preparing")
            if drop:
                n = _tagged(out, "CITYNODE-DROPPED")
                was = "node %d" % plan.drop_from
                if plan.drop_from == node_id:  # reinstated: a new key, not the revoked one
                    was, sent_as = "revoked node %d" % node_id, "under the new key"
                else:
                    sent_as = "as node %d" % node_id
                say(
                    "board was %s; its %d pending readings were dropped (not sent %s)"
                    % (was, n, sent_as),
                    final=True,
                )
            # A watchdog the old firmware started cannot be stopped (machine.WDT): it would
            # reset the board in the middle of the copy. A reset without /main.py ends it.
            say("restarting the board without its old firmware")
            mp(["exec", "--no-follow", "import machine\nmachine.reset()"], "restarting")
            self._wait_for_board(mp, "restarting")
            self._copy(mp, node_id, files, say, "copy", "copying firmware")
            if packages:
                names = sorted({f.package for f in plan.packages})
                what = "copying package%s %s" % ("s" if len(names) > 1 else "", ", ".join(names))
                self._copy(mp, node_id, packages, say, "packages", what)
            key = self._key(plan, say)
            say("writing config.json and main.py")
            config = self._config(node_id, key)
            with tempfile.TemporaryDirectory(prefix="citynode-flash-") as tmp:
                cfg_path, main_path = Path(tmp) / "config.json", Path(tmp) / "main.py"
                cfg_path.write_text(config)
                main_path.write_text(MAIN_PY)
                args = ["exec", _mark(node_id, "config"), "+", "fs", "cp", "-f"]
                args += [str(main_path), ":/main.py", "+", "fs", "cp", "-f", str(cfg_path)]
                mp(args + [":/config.json"], "writing config.json")
            expected = self._expected(config, files, plan.packages)
            say("verifying %d files" % len(expected))
            out = mp.exec(_hash_script(expected, version=False), "verifying")
            hashes = _hashes(out)
            bad = sorted(p for p, digest in expected.items() if hashes.get(p) != digest)
            if bad:
                raise FlashError(
                    "%s: %d file(s) on the board differ from what was written: %s"
                    % (port, len(bad), ", ".join(bad[:5]))
                )
            mp.exec("import os\nos.remove(%r)" % MARKER, "verifying")  # all match: complete
        except FlashError as e:
            if e.hint is None:
                e.hint = hint
            raise
        say("resetting; waiting for the node's boot line")
        line = confirm_boot(port, node_id, self.fw_version, self.boot_timeout)
        return time.monotonic() - started, line

    def _wait_for_board(self, mp, step, timeout=20.0):
        """Until the board answers again after a reset (a native USB port drops off the bus
        meanwhile, a UART bridge's stays but the chip does not listen while it boots)."""
        deadline = time.monotonic() + timeout
        time.sleep(0.3)
        while True:
            try:
                if not _is_device(mp.port) or os.path.exists(mp.port):
                    mp.exec("print('up')", step, timeout=5)
                    return
            except FlashError:
                pass
            if time.monotonic() > deadline:
                raise FlashError(
                    "%s: the board did not come back within %.0f s after a reset"
                    % (mp.port, timeout)
                )
            time.sleep(0.3)

    def _copy(self, mp, node_id, files, say, step, what):
        total = len(files)
        say("%s (0/%d files)" % (what, total))
        args = ["exec", _mark(node_id, step)]
        by_dir = {}
        for local, remote in files:
            by_dir.setdefault(remote.rsplit("/", 1)[0], []).append(str(local))
        for directory, locals_ in sorted(by_dir.items()):
            args += ["+", "fs", "cp", "-f"] + locals_ + [":%s/" % directory]
        done = [0]

        def on_line(line):
            if line.startswith("cp "):
                done[0] += 1
                say("%s (%d/%d files)" % (what, done[0], total))

        mp(args, what, on_line=on_line, timeout=max(_STEP_TIMEOUT_S, 5 * total))

    def _key(self, plan, say):
        """The node's key, in the registry before the board gets it (see the header)."""
        try:
            return self._save_key(plan, say)
        except (KeyFileError, OSError) as e:
            raise FlashError("%s: cannot save the key: %s" % (plan.port, e)) from None

    def _save_key(self, plan, say):
        with registry(self.keys_path) as (keys, save):
            current = keys.get(plan.node_id)
            if current != plan.registered:
                raise FlashError(
                    "%s: the entry of node %d in %s changed while flashing (another citynode "
                    "run?)" % (plan.port, plan.node_id, self.keys_path)
                )
            if plan.reinstate:
                return self._reinstate(plan, say)
            key = plan.key if plan.key is not None else secrets.token_bytes(KEY_BYTES)
            if key != current:
                keys[plan.node_id] = key
                say("saving the key in %s" % self.keys_path)
                save()
            return key

    def _reinstate(self, plan, say):
        """A revoked node back with a new key, as `citynode keys rotate N --reinstate` does
        (rotation time set, no grace for the revoked key; the file kept as keys.json.bak).
        Called under the registry's lock."""
        whole = load_registry(self.keys_path, private=False)
        entry = whole.nodes.get(plan.node_id)
        if entry is None or entry.active:
            raise FlashError(
                "%s: the entry of node %d in %s changed while flashing (another citynode "
                "run?)" % (plan.port, plan.node_id, self.keys_path)
            )
        now = time.time()
        entry.rotate(secrets.token_bytes(KEY_BYTES), now, 0)
        entry.rotated = now
        entry.revoked = None
        say("reinstating node %d with a new key in %s" % (plan.node_id, self.keys_path))
        save_registry(self.keys_path, whole, now=now)
        return entry.key


def _sha256(data):
    return hashlib.sha256(data).hexdigest()


def _folders(remotes):
    """Every folder the remote files go into, with its parents under /lib, parents first."""
    folders = set()
    for remote in remotes:
        parts = remote.split("/")[1:-1]  # "/lib/lora/x.mpy" -> ["lib", "lora"]
        for n in range(1, len(parts) + 1):
            folders.add("/" + "/".join(parts[:n]))
    return sorted(folders)


# --- the boot line ---------------------------------------------------------------------------


def parse_log_line(text):
    """(level, subsystem, message, {field: value}) of a node log line, REPL output glued in
    front allowed (host_tools/nodelog.py), else None."""
    found = nodelog.find_log_line(text)
    if found is None:
        return None
    log = found[1]
    return log.level, log.subsystem, log.message, dict(log.fields)


def open_serial(port):
    """The board's port at 115200 baud, held exclusively (host_tools/serialport.py)."""
    return serialport.open_serial(port)


port_busy = serialport.port_busy


def confirm_boot(port, node_id, fw_version, timeout=BOOT_TIMEOUT_S):
    """Reset the board over its serial port and read its console until the node's boot line.
    Returns that line; raises FlashError with what was seen instead."""
    hint = "watch the board's log (mpremote connect %s) and re-run the same command" % port
    try:
        ser = open_serial(port)
    except (serial.SerialException, OSError) as e:
        raise FlashError(
            "%s: cannot open the port to watch the boot: %s" % (port, e), hint
        ) from None
    try:
        ser.write(b"\r\x03\x03\x01")  # stop whatever runs, enter the raw REPL
        _read_until(ser, RAW_REPL, 10.0, port)
        ser.write(b"import machine\nmachine.reset()\x04")
        return _watch_boot(ser, port, node_id, fw_version, timeout, hint)
    finally:
        with contextlib.suppress(Exception):
            ser.close()


def _read_until(ser, ending, timeout, port):
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(ending):
        if time.monotonic() > deadline:
            raise FlashError(
                "%s: no raw REPL prompt within %.0f s (last output %r)"
                % (port, timeout, data[-60:]),
                "reset the board by hand and re-run the same command",
            )
        data += ser.read(1)
    return data


def _watch_boot(ser, port, node_id, fw_version, timeout, hint):
    deadline = time.monotonic() + timeout
    buf = b""
    last = ""
    traceback = None
    while time.monotonic() < deadline:
        try:
            chunk = ser.read(256)
        except (serial.SerialException, OSError):
            # Boards with native USB (ESP32-S3, RP2040) drop off the bus while they reset.
            ser = _reopen(ser, port, deadline)
            continue
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            text = raw.decode("utf-8", "replace").strip("\r\x04").strip()
            if not text:
                continue
            last = text
            if "Traceback (most recent call last)" in text:
                traceback = []
            elif traceback is not None:
                traceback.append(text)
                if _EXCEPTION.match(text):
                    raise FlashError(
                        "%s: node %d crashed while booting: %s" % (port, node_id, text),
                        "the board has every file but the firmware stops at boot: see the whole "
                        "traceback with `mpremote connect %s reset + repl`" % port,
                    )
            parsed = parse_log_line(text)
            if parsed is None:
                continue
            level, subsystem, message, fields = parsed
            if subsystem == "node" and message == "started":
                if fields.get("node") != str(node_id):
                    raise FlashError(
                        "%s: the board booted as node %s, not %d" % (port, fields.get("node"),
                                                                       node_id), hint
                    )  # fmt: skip
                if fields.get("fw") != fw_version:
                    raise FlashError(
                        "%s: node %d booted firmware %s, not %s"
                        % (port, node_id, fields.get("fw"), fw_version),
                        hint,
                    )
                return text[nodelog.find_log_line(text)[0] :]
            if level == "E" and subsystem in ("config", "node"):
                detail = " ".join([message] + ["%s=%s" % kv for kv in sorted(fields.items())])
                raise FlashError("%s: node %d did not start: %s" % (port, node_id, detail), hint)
    raise FlashError(
        "%s: no boot line from node %d within %.0f s (last line: %s)"
        % (port, node_id, timeout, last or "nothing"),
        hint,
    )


def _reopen(ser, port, deadline):
    with contextlib.suppress(Exception):
        ser.close()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            return open_serial(port)
        except (serial.SerialException, OSError):
            continue
    raise FlashError("%s: the port did not come back after the reset" % port)


def progress_printer(total, stream=sys.stderr):
    """progress(index, text) as "[2/3] text": on a terminal one line rewritten in place, on a
    pipe one line per step."""
    tty = stream.isatty()
    last = [None]

    def show(index, text, final=False):
        text = "[%d/%d] %s" % (index + 1, total, text)
        if tty:
            stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            # On a pipe only a new step is worth a line, not every file of a step.
            step = re.sub(r" \(\d+/\d+ files\)$", "", text)
            if step == last[0] and not final:
                return
            last[0] = step
            stream.write(text + "\n")
        stream.flush()

    return show

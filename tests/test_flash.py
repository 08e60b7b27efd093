# Tests for `citynode flash` (host_tools/flash.py): end to end on the simulated board
# (`citynode sim-board`) with the real mpremote, then `citynode receive` storing the node's
# frames in SQLite; bad input; a board killed mid-flash and finished by the next run.

import ast
import hashlib
import http.server
import json
import os
import queue
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import serial
from hypothesis import given
from hypothesis import strategies as st

from host_tools import build, flash
from host_tools.keys import load_keys, save_keys

REPO = Path(__file__).resolve().parent.parent
FW = flash.firmware_version()
OTHER_KEY = bytes(range(16))


@pytest.fixture
def keys(tmp_path):
    return tmp_path / "keys.json"


def free_udp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flash_args(port, keys, node_id=7, uplink="127.0.0.1:9", *extra):
    return ["flash", *([port] if isinstance(port, str) else port), "--board", "sim"] + [
        "--node-id", node_id, "--uplink", uplink, "--interval", 1, "--batch", 1, "--keys", keys,
        *extra,
    ]  # fmt: skip


def cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "host_tools.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def mpremote(port, *args):
    """The test's own look at a board (not the behaviour under test). Once in a full, loaded
    run mpremote got no raw-REPL prompt from a sim-board for 30 s (seen in CI right after a
    refused flash); a second, fresh mpremote is allowed before the test fails."""
    command = [build.tool("mpremote"), "connect", port, *map(str, args)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def board_files(port):
    return ast.literal_eval(mpremote(port, "exec", "import os\nprint(sorted(os.listdir('/')))"))


def assert_clean_error(result, status):
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [x for x in result.stderr.splitlines() if not x.startswith("[")]  # not progress
    assert errors and all(x.startswith("citynode: ") for x in errors), result.stderr


class Running:
    """A `citynode` subprocess whose stderr is read line by line on a thread."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "host_tools.cli", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, pattern, timeout=60.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError("no %r on stderr; got %s" % (pattern, self.seen))

    def finish(self, timeout=60):
        out = self.proc.stdout.read()  # stderr is the pump thread's
        self.proc.wait(timeout)
        while True:
            line = self.lines.get(timeout=5)
            if line is None:
                break
            self.seen.append(line)
        return self.proc.returncode, out, "\n".join(self.seen)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def running():
    started = []

    def start(*args):
        r = Running(*args)
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


# --- end to end ------------------------------------------------------------------------------


def test_flashed_node_boots_sends_and_the_receiver_stores(sim, keys, tmp_path, running):
    board = sim()
    udp = free_udp_port()
    result = cli(*flash_args(board.port, keys, 7, "127.0.0.1:%d" % udp))
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("%s: node 7 flashed and booted: I " % board.port)
    assert re.search(r" node started .*\bfw=%s\b.*\bnode=7\b" % re.escape(FW), line)
    for step in ("inspecting", "copying firmware", "writing config.json", "verifying", "done"):
        assert re.search(r"^\[1/1\] %s node 7: %s" % (board.port, step), result.stderr, re.M)
    key = load_keys(keys)[7]
    assert len(key) == 16 and (keys.stat().st_mode & 0o777) == 0o600
    files = board_files(board.port)
    assert {"config.json", "main.py", "lib"} <= set(files) and ".provisioning" not in files
    config = json.loads(
        mpremote(board.port, "resume", "exec", "print(open('config.json').read())")
    )
    assert config == {
        "node_id": 7,
        "key": key.hex(),
        "board": "sim",
        "uplink": "127.0.0.1:%d" % udp,
        "interval_s": 1,
        "batch": 1,
    }
    mpremote(board.port, "resume", "reset")  # inspecting stopped the node: start it again

    # The node sends every second; frames before the receiver listens are resent later.
    db = tmp_path / "readings.db"
    rx = running("receive", "--keys", keys, "--udp", "127.0.0.1:%d" % udp, "--db", db)
    rx.wait_for(r"listening on udp 127\.0\.0\.1:%d" % udp)
    deadline = time.monotonic() + 30
    rows = []
    while time.monotonic() < deadline and len(rows) < 3:
        time.sleep(0.5)
        if db.exists():
            with sqlite3.connect(db) as conn:
                rows = conn.execute(
                    "SELECT node_id, quantity, value FROM readings ORDER BY ts, quantity"
                ).fetchall()
    assert rows, "no reading from node 7 reached SQLite"
    by_quantity = {q: v for n, q, v in rows if n == 7}
    assert abs(by_quantity["temperature_c"] - 20.0) < 0.05  # boards/sim/board.py in real time
    assert {n for n, _, _ in rows} == {7}


def test_flashing_the_same_node_again_updates_it_with_its_key(sim, keys):
    board = sim()
    assert cli(*flash_args(board.port, keys)).returncode == 0
    key = load_keys(keys)[7]
    again = cli(*flash_args(board.port, keys), "--batch", 2)  # another config: flashed again
    assert again.returncode == 0, again.stderr
    assert "already node 7 (same key): updating it" in again.stderr
    assert load_keys(keys) == {7: key}
    # Each run resets the board after removing /main.py (a running watchdog cannot be stopped)
    # and once more to boot the node: two hard resets per run.
    assert board.log().count("sim-board: reset") == 4


def test_several_boards_get_consecutive_ids(sim, keys, tmp_path):
    a, b = sim(tmp_path / "a.img"), sim(tmp_path / "b.img")
    result = cli(*flash_args([a.port, b.port], keys, 17))
    assert result.returncode == 0, result.stderr
    assert "[1/2] %s node 17: done" % a.port in result.stderr
    assert "[2/2] %s node 18: done" % b.port in result.stderr
    assert sorted(load_keys(keys)) == [17, 18]
    assert len(set(load_keys(keys).values())) == 2


# --- bad input: precise message, exit status 2, nothing changed ------------------------------


def test_wrong_board_name_lists_the_boards(sim, keys):
    board = sim()
    result = cli(*flash_args(board.port, keys)[:3], "esp33", *flash_args(board.port, keys)[4:])
    assert_clean_error(result, 2)
    names = flash.board_names()
    assert result.stderr == "citynode: unknown board 'esp33'; known boards: %s (%s)\n" % (
        ", ".join(names),
        "pick one of them with --board",
    )
    assert "sim" in names and "hw" not in names and "bme280" not in names
    assert not keys.exists()
    assert board_files(board.port) == []


def test_node_id_in_use_is_refused_and_nothing_changes(sim, keys):
    board = sim()
    save_keys(keys, {7: OTHER_KEY, 8: OTHER_KEY})
    before = keys.read_bytes()
    result = cli(*flash_args(board.port, keys))
    assert_clean_error(result, 2)
    assert result.stderr.splitlines()[-2:] == [
        "citynode: %s: node id 7 is already in use (in %s)" % (board.port, keys),
        "citynode:   pick a free id (the next is 9), or give node 7 to this board with --reflash",
    ]
    assert keys.read_bytes() == before
    assert board_files(board.port) == []

    moved = cli(*flash_args(board.port, keys, 7, "127.0.0.1:9", "--reflash"))
    assert moved.returncode == 0, moved.stderr
    assert "node 7 moves to this board with a new key (--reflash)" in moved.stderr
    new = load_keys(keys)
    assert new[8] == OTHER_KEY and new[7] != OTHER_KEY


def test_a_port_that_does_not_exist(tools, keys, tmp_path):
    port = str(tmp_path / "ttyUSB9")
    result = cli(*flash_args(port, keys))
    assert_clean_error(result, 2)
    assert result.stderr == "citynode: %s: no such port (is the board plugged in?)\n" % port
    assert not keys.exists()


def test_a_busy_port(sim, keys):
    board = sim()
    holder = serial.serial_for_url(board.port, exclusive=True)  # as mpremote or screen holds it
    try:
        result = cli(*flash_args(board.port, keys))
    finally:
        holder.close()
    assert_clean_error(result, 2)
    assert result.stderr == (
        "citynode: %s: port is busy (close mpremote, screen, Thonny or the other program that "
        "has it open)\n" % board.port
    )


def test_bad_options(tools, keys, tmp_path):
    port = str(tmp_path / "p")
    cases = [
        (
            ["--uplink", "nowhere"],
            "citynode: --uplink: expected HOST:PORT or mqtt://HOST[:PORT] (port 1..65535), "
            "got 'nowhere'",
        ),
        (["--interval", "0"], "citynode: --interval: must be 1..86400 seconds, got 0"),
        (["--batch", "65"], "citynode: --batch: must be 1..64 readings, got 65"),
        (["--wifi-ssid", "city"], "citynode: board sim has no Wi-Fi: leave out --wifi-ssid"),
        (["--idle", "deep"], "citynode: --idle deep: board sim cannot deep sleep and keep RTC "
         "memory (the ESP32 boards can)"),
        (["--mip-index", "ftp://pi"], "citynode: --mip-index: expected an http(s):// URL or a "
         "folder, got 'ftp://pi'"),
        (["--mip-index", str(tmp_path / "pi")], "citynode: --mip-index: %s: no such folder (a "
         "URL starts with http://)" % (tmp_path / "pi")),
    ]  # fmt: skip
    for extra, message in cases:
        result = cli(*flash_args(port, keys), *extra)
        assert_clean_error(result, 2)
        assert result.stderr.splitlines() == [message]
    result = cli(*flash_args([port, port], keys))
    assert result.stderr == "citynode: a port is given twice\n"


def test_a_board_of_another_kind_is_refused(sim, keys):
    """The board's sys.platform must be the one --board is built for: .mpy files for an
    ESP32 on a simulated board (or a Pico) would not even import."""
    real = [n for n in flash.board_names() if flash.board_def(n).arch]
    if not real:
        pytest.skip("no real board definitions in boards/ yet")
    board_def = flash.board_def(real[0])
    board = sim()
    args = flash_args(board.port, keys)
    args[args.index("sim")] = board_def.name
    if board_def.wifi:
        args += ["--wifi-ssid", "koper", "--wifi-password", "12345678"]
    result = cli(*args)
    assert_clean_error(result, 2)
    assert (
        "citynode: %s: the board runs MicroPython for linux, but board %s needs %s"
        % (
            board.port,
            board_def.name,
            board_def.platform,
        )
        in result.stderr
    )
    assert not keys.exists() and board_files(board.port) == []


def test_a_simulated_board_is_taken_only_for_the_board_it_simulates(sim, keys):
    """`citynode sim-board --board heltec_v3` is flashed as heltec_v3 (tests/test_flash_mip.py),
    never as another board, the plain sim board included."""
    board = sim(board="heltec_v3")
    for other in ("lilygo_t3_v161", "sim"):
        args = flash_args(board.port, keys)
        args[args.index("sim")] = other
        result = cli(*args)
        assert_clean_error(result, 2)
        assert [x for x in result.stderr.splitlines() if not x.startswith("[")] == [
            "citynode: %s: the board is a simulated heltec_v3, not %s" % (board.port, other),
            "citynode:   check --board, or start the sim-board with --board %s" % other,
        ]
    assert not keys.exists() and board_files(board.port) == []


# --- interrupted flashing --------------------------------------------------------------------


@pytest.mark.parametrize(
    "cut_at, key_saved",
    [("copying firmware", False), ("writing config.json", True)],
)
def test_a_board_killed_mid_flash_is_found_half_flashed_and_finished(
    sim, keys, tmp_path, running, cut_at, key_saved
):
    image = tmp_path / "board.img"
    board = sim(image)
    run = running(*flash_args(board.port, keys))
    run.wait_for(r"node 7: %s" % cut_at)
    board.kill()  # the cable is pulled
    status, out, err = run.finish()
    assert status == 1, err
    assert "Traceback" not in err
    assert re.search(
        r"^citynode: %s: the port disappeared while \w[\w .]+ \(board unplugged or crashed\?\)$"
        % re.escape(board.port),
        err,
        re.M,
    ), err
    assert (
        "citynode:   re-run the same command: the board is marked half-flashed (/.provisioning) "
        "and will be finished" in err
    )
    assert (7 in (load_keys(keys) if keys.exists() else {})) == key_saved
    key = load_keys(keys)[7] if key_saved else None

    again = sim(image)  # plugged in again: a new port, the same flash
    marker = mpremote(again.port, "fs", "cat", ":/.provisioning")
    assert re.search(r"node=7 step=\w+", marker)
    result = cli(*flash_args(again.port, keys))
    assert result.returncode == 0, result.stderr
    assert re.search(r"node 7: half-flashed \(node 7, stopped at step \w+\): flashing it again",
                     result.stderr)  # fmt: skip
    if key_saved:
        assert load_keys(keys)[7] == key  # the board may already hold it: never a second key
    assert ".provisioning" not in board_files(again.port)


# --- micropython-lib packages with mip --------------------------------------------------------


class Served:
    """A folder served by http.server on loopback, on a thread."""

    def __init__(self, root):
        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class PackageIndex:
    """A micropython-lib style index (package/<mpy>/<name>/latest.json and file/<h2>/<hash>)
    served by a real HTTP server on loopback."""

    def __init__(self, root, files):
        self.root = root
        hashes = []
        for name, data in files.items():
            short = hashlib.sha256(data).hexdigest()[:8]
            path = root / "file" / short[:2] / short
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            hashes.append([name, short])
        for mpy in ("6", "py"):
            pkg = root / "package" / mpy / "citytest" / "latest.json"
            pkg.parent.mkdir(parents=True, exist_ok=True)
            pkg.write_text(json.dumps({"hashes": hashes, "version": "0.1"}))

        self._served = Served(root)
        self.url = self._served.url

    def close(self):
        self._served.close()


def test_packages_are_installed_with_mip(sim, keys, tmp_path):
    module = b"GREETING = 'dober dan'\n"
    index = PackageIndex(tmp_path / "index", {"citytest.py": module})
    try:
        board = sim()
        result = cli(
            *flash_args(board.port, keys), "--package", "citytest", "--mip-index", index.url
        )
    finally:
        index.close()
    assert result.returncode == 0, result.stderr
    # fetched on the host before the board changed, then copied as part of the flash
    fetched = result.stderr.index("fetching package citytest (from %s)" % index.url)
    assert fetched < result.stderr.index("node 7: preparing")
    assert "node 7: copying package citytest (0/1 files)" in result.stderr  # a pipe: 1st only
    code = "import citytest\nprint(citytest.GREETING)"
    assert mpremote(board.port, "exec", code).strip() == "dober dan"


def test_an_unreachable_package_index_leaves_the_board_as_it_was(sim, keys):
    """The packages are fetched before the board is changed: no index, no change (more in
    tests/test_flash_mip.py)."""
    board = sim()
    closed = free_udp_port()  # nothing listens on this TCP port either, in all likelihood
    url = "http://127.0.0.1:%d" % closed
    result = cli(*flash_args(board.port, keys), "--package", "citytest", "--mip-index", url)
    assert_clean_error(result, 2)
    assert [x for x in result.stderr.splitlines() if not x.startswith("[")] == [
        "citynode: package citytest: cannot fetch %s/package/6/citytest/latest.json: "
        "Connection refused; no board was changed" % url
    ]
    assert board_files(board.port) == [] and not keys.exists()


# --- pieces ----------------------------------------------------------------------------------


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=12)


@given(
    level=st.sampled_from("DIWE"),
    uptime=st.integers(0, 10**9),
    subsystem=st.sampled_from(["node", "sensor", "link", "clock", "config"]),
    message=st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1), max_size=4),
    fields=st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), _token, max_size=5),
    prefix=st.sampled_from(["", "OK", "\x04\x04"]),
)
def test_log_lines_parse_back(level, uptime, subsystem, message, fields, prefix):
    """The firmware's log line format (firmware/log.py) survives the parser used to spot the
    boot line, with or without REPL noise glued in front."""
    text = " ".join(message) or "started"
    line = "%s%s %d.%03d %s %s" % (prefix, level, uptime // 1000, uptime % 1000, subsystem, text)
    for key in sorted(fields):
        line += " %s=%s" % (key, fields[key])
    assert flash.parse_log_line(line) == (level, subsystem, text, fields)


def test_not_log_lines():
    for text in ["", "MicroPython v1.29 on 2026-07-05", ">>> ", "Traceback (most recent call"]:
        assert flash.parse_log_line(text) is None


def test_every_board_definition_reads():
    for name in flash.board_names():
        board = flash.board_def(name)
        assert board.arch in flash.PLATFORMS
        assert all(isinstance(p, str) and p for p in board.mip_packages)
    sim = flash.board_def("sim")  # (its PM_UART_ID: the --sensor tests)
    assert (sim.name, sim.arch, sim.mip_packages, sim.wifi, sim.wifi_required) == (
        "sim", None, (), False, False,
    )  # fmt: skip


def test_real_boards_get_no_simulator_files(tmp_path):
    files = ["boards/sim/board.mpy", "boards/sim/boot.mpy", "boards/sim_x.mpy", "boards/hw.mpy"]
    for rel in files + ["firmware/app.mpy"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    real = flash.BoardDef("esp32_devkitc", "xtensawin")
    assert [r for _, r in flash.firmware_files(tmp_path, real)] == [
        "/lib/boards/hw.mpy",
        "/lib/boards/sim_x.mpy",  # a folder is left off, not a name prefix
        "/lib/firmware/app.mpy",
    ]
    sim = flash.BoardDef("sim")
    assert [r for _, r in flash.firmware_files(tmp_path, sim)] == [
        "/lib/boards/hw.mpy",
        "/lib/boards/sim/board.mpy",
        "/lib/boards/sim_x.mpy",
        "/lib/firmware/app.mpy",
    ]


def _state(node_id=None, key=None, marker=None, platform="linux"):
    config = None if node_id is None else {"node_id": node_id, "key": (key or b"").hex()}
    return flash.BoardState(platform, marker, config)


SIM = flash.BoardDef("sim")
NEW = bytes(range(100, 116))


@pytest.mark.parametrize(
    "state, registry, reflash, key, note",
    [
        (_state(), {}, False, None, None),  # a blank board, a free id: a new key
        (_state(7, OTHER_KEY), {7: OTHER_KEY}, False, OTHER_KEY, "already node 7 (same key)"),
        (_state(marker={"node": 7, "step": "config"}), {7: OTHER_KEY}, False, OTHER_KEY,
         "half-flashed (node 7, stopped at step config)"),
        (_state(7, NEW), {7: OTHER_KEY}, True, OTHER_KEY, "registry's current key"),
        (_state(3, NEW), {7: OTHER_KEY}, True, None, "moves to this board with a new key"),
        (_state(3, NEW), {3: NEW}, True, None, "was node 3; its key stays in keys.json"),
    ],
)  # fmt: skip
def test_admission(state, registry, reflash, key, note):
    plan = flash.admit(0, "/dev/ttyUSB0", 7, state, SIM, registry, "keys.json", reflash)
    assert plan.key == key
    assert plan.registered == registry.get(7)
    if note:
        assert any(note in n for n in plan.notes), plan.notes
    # The node's journal, seq.dat and clock.dat go only when the board was another node.
    other = state.node_id is not None and state.node_id != 7
    assert plan.drop_from == (state.node_id if other else None)
    assert not plan.reinstate and not plan.skip


@pytest.mark.parametrize(
    "state, message",
    [
        (_state(), "node id 7 is already in use (in keys.json)"),
        (_state(7, NEW), "the board is node 7 but holds another key than keys.json has for it"),
        (_state(marker={"node": 8, "step": "copy"}), "node id 7 is already in use"),
        (_state(platform="rp2"), "the board runs MicroPython for rp2, but board sim needs linux"),
    ],
)
def test_admission_refusals(state, message):
    with pytest.raises(flash.Refused, match=re.escape(message)) as info:
        flash.admit(0, "/dev/ttyUSB0", 7, state, SIM, {7: OTHER_KEY}, "keys.json", False)
    assert info.value.hint


def test_a_registry_changed_meanwhile_stops_before_the_board_gets_a_key(keys):
    save_keys(keys, {7: OTHER_KEY})
    flasher = flash.Flasher(SIM, keys, "127.0.0.1:9", 1, 1)
    plan = flash.admit(0, "p", 7, _state(7, OTHER_KEY), SIM, {7: OTHER_KEY}, keys, False)
    save_keys(keys, {7: NEW})  # `citynode keys rotate` ran in between
    with pytest.raises(flash.FlashError, match="entry of node 7 in .* changed while flashing"):
        flasher._key(plan, lambda text: None)
    assert load_keys(keys) == {7: NEW}


class FakeConsole:
    """What the board prints after machine.reset(), in chunks, for flash's boot watcher."""

    def __init__(self, text):
        data = text.encode()
        self.chunks = [data[i : i + 7] for i in range(0, len(data), 7)]

    def read(self, n):
        if self.chunks:
            return self.chunks.pop(0)
        time.sleep(0.01)
        return b""


@pytest.mark.parametrize(
    "console, message",
    [
        ("OK\x04\x04Traceback (most recent call last):\r\n  File \"main.py\", line 2\r\n"
         "MemoryError: memory allocation failed\r\n",
         "node 7 crashed while booting: MemoryError: memory allocation failed"),
        ("E 0.002 config config: missing required field 'uplink' retry_s=10\r\n",
         "node 7 did not start: config: missing required field 'uplink'"),
        ("I 0.001 node started fw=%s node=8\r\n" % FW, "the board booted as node 8, not 7"),
        ("I 0.001 node started fw=0.0.1 node=7\r\n", "node 7 booted firmware 0.0.1, not %s" % FW),
        ("MicroPython v1.29\r\n>>> ", "no boot line from node 7 within 0 s (last line: "
         "MicroPython v1.29)"),
    ],
)  # fmt: skip
def test_what_the_boot_watcher_reports(console, message):
    with pytest.raises(flash.FlashError, match=re.escape(message)) as info:
        flash._watch_boot(FakeConsole(console), "p", 7, FW, 0.3, "hint")
    assert info.value.hint


def test_the_boot_line_is_found_among_noise():
    text = "OK\x04\x04MPY: soft reboot\r\nI 0.000 node started board=sim fw=%s node=7\r\n" % FW
    line = flash._watch_boot(FakeConsole(text), "p", 7, FW, 5, "hint")
    assert line == "I 0.000 node started board=sim fw=%s node=7" % FW


def test_idle_goes_into_config_and_only_esp32_boards_deep_sleep():
    deep = {n: flash.board_def(n).deep_sleep for n in flash.board_names()}
    assert deep == {
        "esp32_devkitc": True,
        "heltec_v3": True,
        "lilygo_t3_v161": True,
        "pico_lora_sx1262": False,
        "pico_w": False,
        "sim": False,
    }
    board = flash.board_def("esp32_devkitc")
    cfg = json.loads(flash.node_config(7, bytes(16), board, "10.0.0.2:1700", 60, 10, idle="deep"))
    assert cfg["idle"] == "deep"
    assert "idle" not in json.loads(flash.node_config(7, bytes(16), board, "h:1", 60, 10))

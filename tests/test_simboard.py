# Tests for `citynode sim-board` (host_tools/sim/simboard.py, boards/sim/boot.py): the real
# mpremote program and raw pyserial talk to it as to a USB board; its filesystem is a littlefs
# image; a flashed node survives the README's maintenance commands and its --fault hangs and
# crashes.

import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial

from host_tools import build
from host_tools.sim.simboard import DEFAULT_HEAP, SimBoardError, SimBoardProcess, parse_size

REPO = Path(__file__).resolve().parent.parent


def mpremote(port, *args, check=True, timeout=30):
    proc = subprocess.run(
        [build.tool("mpremote"), "connect", port, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError("mpremote %s failed:\n%s\n%s" % (args, proc.stdout, proc.stderr))
    return proc


def board_exec(port, code, resume=False):
    args = (["resume"] if resume else []) + ["exec", code]
    return mpremote(port, *args).stdout.strip()


def cli(*args, timeout=30):
    return subprocess.run(
        [sys.executable, "-m", "host_tools.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


class Console:
    """The board's serial port at byte level, as mpremote's transport drives it."""

    def __init__(self, port):
        self.ser = serial.serial_for_url(port, baudrate=115200, timeout=0.05)
        self.seen = b""

    def read_until(self, ending, timeout=10.0):
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(ending):
            if time.monotonic() > deadline:
                raise AssertionError("no %r within %.0f s; got %r" % (ending, timeout, data))
            data += self.ser.read(1)
        self.seen += data
        return data

    def raw_repl(self):
        self.ser.write(b"\r\x03\x03\x01")
        self.read_until(b"raw REPL; CTRL-B to exit\r\n>")

    def exec(self, code):
        """Run code in the raw REPL; returns its stdout."""
        self.ser.write(code.encode() + b"\x04")
        self.read_until(b"OK")
        out = self.read_until(b"\x04")[:-1]
        err = self.read_until(b"\x04")[:-1]
        assert not err, err
        self.read_until(b">")
        return out.decode()

    def close(self):
        self.ser.close()


def test_port_is_the_first_line_and_files_go_into_the_image(sim, tmp_path):
    board = sim()
    assert board.port.startswith("/dev/pts/")
    assert mpremote(board.port, "fs", "ls").stdout.splitlines() == ["ls :"]
    module = tmp_path / "citymod.py"
    module.write_text("X = 42\n")
    mpremote(board.port, "fs", "mkdir", ":lib", "+", "fs", "cp", module, ":/lib/citymod.py")
    assert board_exec(board.port, "import citymod; print(citymod.X)") == "42"
    state = board_exec(board.port, "import os, sys; print(os.getcwd(), sys.path, os.listdir())")
    assert state == "/ ['', '.frozen', '/lib'] ['lib']"


def test_the_host_filesystem_is_out_of_reach(sim, tmp_path):
    board = sim()
    outside = tmp_path / "escaped.txt"
    code = "open(%r, 'w').write('x')" % str(outside)
    proc = mpremote(board.port, "exec", code, check=False)
    assert proc.returncode != 0 and "OSError" in proc.stdout + proc.stderr
    proc = mpremote(board.port, "fs", "cp", __file__, ":%s" % outside, check=False)
    assert proc.returncode != 0
    assert not outside.exists()
    listing = board_exec(board.port, "import os; print(os.listdir('/'))")
    assert listing == "[]"  # not the host's /


def test_files_survive_soft_reset_reset_and_restart(sim, tmp_path):
    image = tmp_path / "keep.img"
    note = tmp_path / "note.txt"
    note.write_text("kept across resets\n")
    board = sim(image)
    mpremote(board.port, "fs", "cp", note, ":note.txt")
    mpremote(board.port, "soft-reset")
    assert mpremote(board.port, "fs", "cat", ":note.txt").stdout.endswith("kept across resets\n")
    mpremote(board.port, "reset")
    assert board_exec(board.port, "print(open('note.txt').read())") == "kept across resets"
    status, log = board.stop()
    assert status == 0 and "Traceback" not in log
    again = sim(image)
    assert board_exec(again.port, "print(open('/note.txt').read())") == "kept across resets"


def test_resets_run_main_py_as_a_board_does(sim, tmp_path):
    """Power-on, friendly soft reset and machine.reset() run /main.py; a soft reset from the raw
    REPL does not, and brings back the raw REPL, which mpremote relies on."""
    main = tmp_path / "main.py"
    main.write_text("with open('runs.txt', 'a') as f:\n    f.write('x')\nprint('main ran')\n")
    board = sim()
    mpremote(board.port, "fs", "cp", main, ":main.py")
    console = Console(board.port)
    try:
        console.raw_repl()
        assert console.exec("import os\nprint('runs.txt' in os.listdir())") == "False\n"
        console.ser.write(b"\x04")  # Ctrl-D on an empty raw REPL: soft reset
        console.read_until(b"MPY: soft reboot\r\n")
        after = console.read_until(b"raw REPL; CTRL-B to exit\r\n>")
        assert b"main ran" not in after and b">>>" not in after
        assert console.exec("print('os' in globals())") == "False\n"  # a fresh interpreter
        assert console.exec("import os\nprint('runs.txt' in os.listdir())") == "False\n"

        console.ser.write(b"\x02")  # Ctrl-B: friendly REPL
        console.read_until(b">>> ")
        console.ser.write(b"\x04")  # Ctrl-D there: soft reset, main.py runs
        console.read_until(b"MPY: soft reboot\r\n")
        console.read_until(b"main ran\r\n")  # print's "\n" goes out as "\r\n", as on a board
        console.read_until(b">>> ")

        console.raw_repl()
        console.ser.write(b"import machine\nmachine.reset()\x04")
        console.read_until(b"main ran\r\n")
        console.raw_repl()
        assert console.exec("print(open('runs.txt').read())") == "xx\n"
    finally:
        console.close()
    assert "soft reboot (raw REPL)" in board.log()
    assert "sim-board: reset" in board.log()


def test_ctrl_c_stops_a_running_main_py(sim, tmp_path):
    main = tmp_path / "main.py"
    main.write_text("import time\nwhile True:\n    print('tick')\n    time.sleep_ms(100)\n")
    board = sim()
    mpremote(board.port, "fs", "cp", main, ":main.py", "+", "reset")
    console = Console(board.port)
    try:
        console.read_until(b"tick\r\n", timeout=5)
    finally:
        console.close()
    started = time.monotonic()
    assert board_exec(board.port, "print(6 * 7)", resume=True) == "42"
    assert board_exec(board.port, "print('again')") == "again"
    assert time.monotonic() - started < 10


def test_a_file_that_is_not_littlefs_is_refused_unchanged(tools, tmp_path):
    image = tmp_path / "photo.img"
    data = bytes(range(256)) * 64
    image.write_bytes(data)
    result = cli("sim-board", "--image", image)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "citynode: %s: not a littlefs image (use another --image, or delete this file to "
        "start with a blank board)" % image
    ]
    assert image.read_bytes() == data


def test_one_image_one_board(sim, tmp_path):
    image = tmp_path / "shared.img"
    sim(image)
    result = cli("sim-board", "--image", image)
    assert result.returncode == 2
    assert result.stderr == "citynode: %s: in use by another sim-board\n" % image
    with pytest.raises(SimBoardError, match="in use by another sim-board"):
        SimBoardProcess(image)


def test_bad_heap_option(tools, tmp_path):
    result = cli("sim-board", "--image", tmp_path / "x.img", "--heap", "lots")
    assert result.returncode == 2
    assert (
        result.stderr == "citynode: --heap: expected a size like 64K, 2M or 100000, got 'lots'\n"
    )
    assert not (tmp_path / "x.img").exists()


def test_main_py_starts_with_the_heap_a_small_board_has(sim, tools, tmp_path):
    """--heap (default: the fleet simulator's node heap) is what main.py finds free: about what
    `micropython -X heapsize=... -c` leaves a script; the simulation's own use (boot script,
    littlefs mount) comes on top."""
    code = "import gc\ngc.collect()\nprint('free', gc.mem_free())\n"
    plain = subprocess.run(
        [tools["micropython"], "-X", "heapsize=" + DEFAULT_HEAP, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    baseline = int(plain.stdout.split()[1])
    main = tmp_path / "main.py"
    main.write_text(code)
    board = sim()
    mpremote(board.port, "fs", "cp", main, ":main.py")
    console = Console(board.port)
    try:
        console.raw_repl()
        console.ser.write(b"import machine\nmachine.reset()\x04")
        found = None
        while found is None:
            found = re.search(rb"free (\d+)\r\n", console.read_until(b"\r\n", timeout=10))
    finally:
        console.close()
    free = int(found.group(1))
    assert baseline - 2048 < free <= parse_size(DEFAULT_HEAP), (free, baseline)


def test_killing_the_sim_board_leaves_no_interpreter_behind(sim):
    board = sim()
    pid = board.proc.pid
    children = Path("/proc/%d/task/%d/children" % (pid, pid)).read_text().split()
    assert len(children) == 1
    child = int(children[0])
    board.kill()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path("/proc/%d/stat" % child).read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return  # gone
        if state in ("Z", "X"):
            return  # dead, waiting to be reaped by whoever inherited it
        time.sleep(0.05)
    raise AssertionError("micropython %d still runs after its sim-board was killed" % child)


# --- a flashed node on the sim-board: maintenance commands and faults ------------------------


def flash_node(port, keys, node_id=7):
    """`citynode flash` a sim node sampling every second onto the board at port."""
    result = cli(
        "flash", port, "--board", "sim", "--node-id", node_id, "--uplink", "127.0.0.1:9",
        "--interval", 1, "--batch", 1, "--keys", keys, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return int(re.search(r" boot=(\d+)", result.stdout).group(1))


def read_until_line(console, pattern, timeout=20.0):
    """Read the node's console line by line until one matches; returns the match."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(
                "no line like %r; the console so far:\n%s" % (pattern, console.seen)
            )
        line = console.read_until(b"\n", timeout=remaining).decode("utf-8", "replace")
        match = re.search(pattern, line)
        if match:
            return match


def readme_section(title):
    text = (REPO / "README.md").read_text()
    start = text.index("\n## %s\n" % title)
    return text[start : text.index("\n## ", start + 1)]


def readme_mpremote_commands():
    """The mpremote commands that the README's sim-board and log sections tell a technician to
    type (code lines and inline code), port left as written, in order, each once."""
    found = []
    for title in (
        "Practising on a simulated board (`citynode sim-board`)",
        "Reading a node's log",
    ):
        text = readme_section(title)
        found += re.findall(r"^    (mpremote connect .*)$", text, re.M)
        found += re.findall(r"`(mpremote connect [^`]*)`", text)
    commands = []
    for line in found:
        words = shlex.split(line, comments=True)
        if len(words) > 3 and words not in commands:  # not the bare `connect PORT`: the REPL
            commands.append(words)
    return commands


def test_the_readmes_maintenance_commands_leave_the_node_running(tools, tmp_path):
    """Each mpremote command of the README, typed as written, against a flashed node on the
    sim-board: afterwards the node boots again and samples. Without `+ reset` it would not."""
    commands = readme_mpremote_commands()
    assert len(commands) >= 2, commands
    image = tmp_path / "node.img"
    with SimBoardProcess(image, faults=["crash-at=2"]) as board:
        boot = flash_node(board.port, tmp_path / "keys.json")
        console = Console(board.port)
        try:  # the crash gives dump_log something to show
            read_until_line(console, r'node crashed error="sim: injected fault in a driver"')
            read_until_line(console, r"node started .* boot=%d .*reset_cause=5" % (boot + 1))
            read_until_line(console, r"link sent")
        finally:
            console.close()
        boot += 1

        # What went wrong before: mpremote without a reset leaves the node at its REPL.
        mpremote(board.port, "fs", "ls")
        console = Console(board.port)
        try:
            quiet = b""
            deadline = time.monotonic() + 3  # a node sampling every second would log
            while time.monotonic() < deadline:
                quiet += console.ser.read(256)
        finally:
            console.close()
        assert not re.search(rb"^[DIWE] \d+\.\d{3} ", quiet, re.M), quiet

        for words in commands:
            assert words[:3] in (
                ["mpremote", "connect", "PORT"],
                ["mpremote", "connect", "/dev/pts/N"],
            )
            assert words[-2:] == ["+", "reset"], words
            proc = mpremote(board.port, *words[3:])
            if "dump_log()" in " ".join(words):
                assert "> reset_cause=crash" in proc.stdout, proc.stdout
                assert "> E " in proc.stdout and "node crashed" in proc.stdout
            console = Console(board.port)
            try:
                read_until_line(console, r"node started .* boot=%d " % (boot + 1))
                read_until_line(console, r"link sent")  # sampling, sending: running main.py
            finally:
                console.close()
            boot += 1


def test_the_watchdog_resets_a_node_whose_driver_hangs(tools, tmp_path):
    image = tmp_path / "node.img"
    with SimBoardProcess(image) as board:
        boot = flash_node(board.port, tmp_path / "keys.json")
        # A 2 s watchdog (config.json wdt_ms; 30 s by default) keeps the test short.
        code = (
            "import json\nc = json.load(open('config.json'))\nc['wdt_ms'] = 2000\n"
            "with open('config.json', 'w') as f:\n    json.dump(c, f)"
        )
        mpremote(board.port, "exec", code)
    with SimBoardProcess(image, faults=["hang-at=3"]) as board:
        console = Console(board.port)
        try:
            started = read_until_line(console, r"node started .* boot=(\d+) .*reset_cause=1 ")
            assert int(started.group(1)) == boot + 1
            read_until_line(console, r"^\(sim: injected fault: the driver hangs\)")
            hung = time.monotonic()
            read_until_line(console, r"^\(sim: watchdog expired, resetting\)", timeout=10)
            assert time.monotonic() - hung > 1.5  # not before the watchdog's 2 s
            read_until_line(console, r"node started .* boot=%d .*reset_cause=3 " % (boot + 2))
            read_until_line(console, r"link sent")
        finally:
            console.close()
        assert "sim-board: reset" in board.log()
        # Once a run: the node keeps running after its reset.
        assert board_exec(board.port, "print(open('sim_fault_hang').read())") == "1"
    with SimBoardProcess(image, faults=["hang-at=3"]) as board:  # a new run: it fires again
        console = Console(board.port)
        try:
            read_until_line(console, r"^\(sim: watchdog expired, resetting\)")
        finally:
            console.close()


@pytest.mark.parametrize(
    "fault, message",
    [
        ("hang=3", "expected hang-at=SECONDS or crash-at=SECONDS, got 'hang=3'"),
        ("hang-at", "expected hang-at=SECONDS or crash-at=SECONDS, got 'hang-at'"),
        ("crash-at=soon", "crash-at: expected whole seconds after boot, got 'soon'"),
    ],
)
def test_bad_fault_option(tools, tmp_path, fault, message):
    result = cli("sim-board", "--image", tmp_path / "x.img", "--fault", fault)
    assert result.returncode == 2
    assert result.stderr == "citynode: --fault: %s\n" % message
    assert not (tmp_path / "x.img").exists()


# --- --board: the board it simulates ---------------------------------------------------------


def test_the_board_says_which_board_it_simulates(sim, tmp_path):
    """$CITYNODE_SIM_BOARD is what `citynode flash` reads (tests/test_flash_mip.py flashes one);
    the rest of the board is the same simulated board."""
    code = "import os, sys; print(os.getenv('CITYNODE_SIM_BOARD'), sys.platform)"
    assert board_exec(sim().port, code) == "sim linux"
    lora = sim(tmp_path / "lora.img", board="heltec_v3")
    assert board_exec(lora.port, code) == "heltec_v3 linux"
    mpremote(lora.port, "soft-reset")  # and after a soft reset, when boot.py runs again
    assert board_exec(lora.port, code) == "heltec_v3 linux"


def test_an_unknown_board_is_refused(tools, tmp_path):
    result = cli("sim-board", "--image", tmp_path / "x.img", "--board", "heltec_v4")
    assert result.returncode == 2
    assert result.stderr.startswith("citynode: --board: unknown board 'heltec_v4'; known boards: ")
    assert "heltec_v3" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "x.img").exists()

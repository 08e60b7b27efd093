# Tests for `citynode sim-board` (host_tools/simboard.py, boards/sim_boot.py): the real mpremote
# program and raw pyserial talk to it as to a USB board; its filesystem is a littlefs image.

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial

from host_tools import build
from host_tools.simboard import DEFAULT_HEAP, SimBoardError, SimBoardProcess, parse_size

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

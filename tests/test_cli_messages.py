# What `citynode` says when the input is wrong, as a user runs it (a subprocess): one line
# `citynode: ...` on stderr and exit status 2 before anything runs; --version; the demo's
# progress lines; serial ports held exclusively by flash and monitor (on real pseudo-terminals).

import ast
import io
import json
import os
import re
import select
import subprocess
import sys
import time
import tomllib
import tty
from importlib import metadata
from pathlib import Path

import pytest

from host_tools import cli, flash
from host_tools.sim import demo as demo_engine
from host_tools.sim.fleet import NODE_MIN_HEAP
from host_tools.sim.weather import HEADER

REPO = Path(__file__).resolve().parent.parent
BUSY = "port is busy (close mpremote, screen, Thonny or the other program that has it open)"


def fw_version():
    """FW_VERSION as written in firmware/__init__.py (read here on its own, not through the
    code under test)."""
    tree = ast.parse((REPO / "firmware" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "FW_VERSION":
            return ast.literal_eval(node.value)
    raise AssertionError("firmware/__init__.py has no FW_VERSION")


def citynode(*args, timeout=60, **kw):
    return subprocess.run(
        [sys.executable, "-m", "host_tools.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def assert_one_line(result, line):
    assert (result.returncode, result.stdout) == (2, ""), (result.stdout, result.stderr)
    assert result.stderr.splitlines() == [line], result.stderr


# --- argument errors: one line, every command ----------------------------------------------


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_commands_argument_error_is_one_line(command):
    result = citynode(command, "--no-such-option")
    assert (result.returncode, result.stdout) == (2, ""), result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("citynode: %s: " % command), lines[0]
    assert lines[0].endswith("(see citynode %s --help)" % command), lines[0]
    assert "usage:" not in result.stderr


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["demo", "--nodes", "many"],
            "citynode: demo: argument --nodes: expected a whole number, got 'many' "
            "(see citynode demo --help)",
        ),
        (
            ["demo", "--link", "wire"],
            "citynode: demo: argument --link: invalid choice: 'wire' (choose from 'udp', "
            "'lora') (see citynode demo --help)",
        ),
        (
            ["flash", "/dev/ttyUSB0"],
            "citynode: flash: the following arguments are required: --board, --node-id, "
            "--uplink (see citynode flash --help)",
        ),
        (
            ["keys", "add", "3", "--force"],
            "citynode: keys add: unrecognized arguments: --force (see citynode keys add --help)",
        ),
        (
            ["keys"],
            "citynode: keys: the following arguments are required: ACTION "
            "(see citynode keys --help)",
        ),
        (
            ["monitor"],
            "citynode: monitor: the following arguments are required: PORT "
            "(see citynode monitor --help)",
        ),
        ([], "citynode: the following arguments are required: COMMAND (see citynode --help)"),
    ],
)
def test_argument_errors_name_the_command(args, line):
    assert_one_line(citynode(*args), line)


def test_an_unknown_command_is_one_line():
    result = citynode("frobnicate")
    assert_one_line(result, result.stderr.rstrip("\n"))
    assert result.stderr.startswith("citynode: argument COMMAND: invalid choice: 'frobnicate'")


def test_help_is_still_argparse_help():
    for args in ([], *([name] for name in cli.COMMANDS), ["keys", "add"]):
        result = citynode(*args, "--help")
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert result.stdout.startswith("usage: citynode" + "".join(" " + a for a in args))
        assert "options:" in result.stdout


# --- one version ---------------------------------------------------------------------------


def test_version_is_the_firmwares():
    result = citynode("--version")
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == "citynode %s\n" % fw_version()


def test_the_package_takes_its_version_from_the_firmware():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"]  # no second number to forget
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "firmware.FW_VERSION"}
    assert project["project"]["license"] == "MIT"  # SPDX (PEP 639), setuptools >= 77
    assert "setuptools>=77" in project["build-system"]["requires"]


def test_the_installed_package_has_that_version():
    try:
        installed = metadata.version("citynode")
    except metadata.PackageNotFoundError:
        pytest.skip("citynode is not installed (pip install -e .)")
    assert installed == fw_version(), "reinstall: pip install -e . (metadata is from install)"
    script = Path(sys.executable).with_name("citynode")
    if script.exists():  # the console script pip made
        result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
        assert result.stdout == "citynode %s\n" % fw_version()


# --- demo: bad input refused before anything runs ------------------------------------------


def trace(path, text):
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


ROW = "2026-07-01T00:00:00Z,21.00,55.00,1013.00\n"


def demo_cases(tmp):
    a_file = tmp / "a-file"
    a_file.write_text("not a folder")
    return [
        (
            ["--trace", trace(tmp / "header.csv", "time,t,rh,p\n" + ROW)],
            "citynode: --trace: header.csv line 1: expected header '%s', got 'time,t,rh,p'"
            % HEADER,
        ),
        (
            ["--trace", trace(tmp / "value.csv", HEADER + "\n" + ROW.replace("55.00", "wet"))],
            "citynode: --trace: value.csv line 2: bad humidity_pct 'wet'",
        ),
        (
            ["--trace", trace(tmp / "bytes.csv", (HEADER + "\n" + ROW).encode() + b"\xff\xfe\n")],
            "citynode: --trace: bytes.csv line 3: not UTF-8 text (byte 0xff); a trace is a CSV "
            "file with the header %s" % HEADER,
        ),
        (
            ["--trace", trace(tmp / "empty.csv", HEADER + "\n")],
            "citynode: --trace: empty.csv has no rows",
        ),
        (
            ["--interval", "0"],
            "citynode: demo: argument --interval: must be 1..86400 s, got 0 "
            "(see citynode demo --help)",
        ),
        (
            ["--interval", "-60"],
            "citynode: demo: argument --interval: must be 1..86400 s, got -60 "
            "(see citynode demo --help)",
        ),
        (["--workdir", a_file], "citynode: --workdir %s: exists and is not a directory" % a_file),
        (
            ["--workdir", a_file / "nodes"],
            "citynode: --workdir %s: %s is not a directory" % (a_file / "nodes", a_file),
        ),
        (
            ["--hours", "-1"],
            "citynode: demo: argument --hours: must be more than 0 and at most 8784 (a year), "
            "got -1 (see citynode demo --help)",
        ),
        (
            ["--heap", "1K"],
            "citynode: demo: argument --heap: 1K is less than 32K: the firmware cannot even load "
            "(the node runs in %s, NODE_MIN_HEAP) (see citynode demo --help)" % NODE_MIN_HEAP,
        ),
        (
            ["--heap", "64G"],
            "citynode: demo: argument --heap: expected bytes, or K or M, e.g. 80K, got '64G' "
            "(see citynode demo --help)",
        ),
        (
            ["--heap", "100000M"],
            "citynode: demo: argument --heap: 100000M is more than 4M, the most any board has "
            "(see citynode demo --help)",
        ),
        (
            ["--nodes", "0"],
            "citynode: demo: argument --nodes: must be 1..100, got 0 (see citynode demo --help)",
        ),
        (
            ["--nodes", "100000"],
            "citynode: demo: argument --nodes: must be 1..100, got 100000 "
            "(see citynode demo --help)",
        ),
        (
            ["--link", "lora", "--airtime-budget", "-1"],
            "citynode: demo: argument --airtime-budget: must be 0.001..86400 seconds a day, "
            "got -1 (see citynode demo --help)",
        ),
        (
            ["--link", "lora", "--airtime-budget", "0"],
            "citynode: demo: argument --airtime-budget: must be 0.001..86400 seconds a day, "
            "got 0 (see citynode demo --help)",
        ),
        (
            ["--nodes", "100", "--hours", "8784"],
            "citynode: 100 nodes x 527040 readings each is 52704000; the demo simulates at most "
            "2000000 readings (fewer --nodes or --hours, or a longer --interval)",
        ),
    ]


def test_demo_refuses_bad_input_in_one_line_before_running(tmp_path):
    db = tmp_path / "demo.db"
    for args, line in demo_cases(tmp_path):
        started = time.monotonic()
        result = citynode("demo", "--db", db, *args, timeout=30)
        assert_one_line(result, line)
        assert time.monotonic() - started < 20  # `--airtime-budget -1` used to run for ever
        assert not db.exists() and not (tmp_path / "a-file" / "nodes").exists()


def test_demo_db_must_be_a_file_in_a_folder_that_is_there(tmp_path):
    assert_one_line(
        citynode("demo", "--db", tmp_path), "citynode: --db %s: is a directory" % tmp_path
    )
    missing = tmp_path / "no" / "demo.db"
    assert_one_line(
        citynode("demo", "--db", missing),
        "citynode: --db %s: no such directory %s" % (missing, missing.parent),
    )


def test_demo_heap_bound(tmp_path):
    # One byte less than MIN_HEAP is refused; heaps between it and NODE_MIN_HEAP may be tried
    # (bench/node_cycle.py looks for the smallest heap the node runs in).
    from host_tools.commands.demo import MIN_HEAP, heap_bytes

    assert heap_bytes(NODE_MIN_HEAP) == 56 * 1024 and heap_bytes("1M") == 1024 * 1024
    result = citynode("demo", "--db", tmp_path / "d.db", "--heap", str(MIN_HEAP - 1))
    assert result.returncode == 2 and "is less than 32K" in result.stderr


# --- demo: progress on long runs ------------------------------------------------------------


class _Fleet:
    def __init__(self, now_s):
        self.now_s = now_s

    def clock(self):
        return self.now_s


class _Receiver:
    counters = {"readings_accepted": 1234}


def test_progress_line_reads_the_fleet_clock():
    start = 1782864000
    sensor = demo_engine.NodeSpec(1, b"", [(start, 0, 0, 0), (start + 24 * 3600, 0, 0, 0)])
    out = io.StringIO()
    with demo_engine.Progress(_Fleet(start + 6 * 3600), _Receiver(), [sensor], out, 0.02):
        time.sleep(0.1)
    lines = out.getvalue().splitlines()
    assert lines and set(lines) == {
        "citynode demo: 6.0 of 24.0 simulated hours, 1234 readings stored"
    }


def test_demo_shows_progress_while_nodes_deep_sleep(tools, tmp_path):
    """--idle deep: a MicroPython process a wake, a few seconds a simulated hour."""
    result = citynode(
        "demo", "--nodes", 1, "--hours", 2, "--idle", "deep", "--json", "--db", tmp_path / "d.db",
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # the summary, as before
    assert summary["readings_stored"] == 120
    lines = result.stderr.splitlines()
    progress = r"citynode demo: (\d+\.\d) of 2\.0 simulated hours, (\d+) readings stored"
    assert all(re.fullmatch(progress, line) for line in lines), lines
    every = demo_engine.PROGRESS_EVERY_S
    if summary["wall_seconds"] < every + 1:
        pytest.skip("the run took %.1f s, too fast for a progress line" % summary["wall_seconds"])
    periods = int(summary["wall_seconds"] // every)  # a line at the end of each
    assert periods - 1 <= len(lines) <= periods
    hours = [float(re.fullmatch(progress, line).group(1)) for line in lines]
    stored = [int(re.fullmatch(progress, line).group(2)) for line in lines]
    assert hours == sorted(hours) and stored == sorted(stored) and stored[-1] <= 120


# --- flash: node ids -----------------------------------------------------------------------


def test_flash_names_the_board_whose_id_is_out_of_range(tmp_path):
    keys = tmp_path / "keys.json"
    common = ["--board", "sim", "--uplink", "127.0.0.1:9", "--keys", keys]
    result = citynode("flash", "/dev/A", "/dev/B", "--node-id", flash.MAX_NODE_ID, *common)
    assert_one_line(
        result,
        "citynode: --node-id 4294967295: port 2 of 2 (/dev/B) would get node id 4294967296, "
        "out of range 0..4294967295",
    )
    result = citynode("flash", "/dev/A", "/dev/B", "/dev/C", "--node-id", 4294967294, *common)
    assert_one_line(
        result,
        "citynode: --node-id 4294967294: port 3 of 3 (/dev/C) would get node id 4294967296, "
        "out of range 0..4294967295",
    )
    result = citynode("flash", "/dev/A", "--node-id", 4294967296, *common)
    assert_one_line(result, "citynode: --node-id: must be 0..4294967295, got 4294967296")
    assert not keys.exists()


# --- serial ports: one program at a time ---------------------------------------------------


@pytest.fixture
def pty_port():
    """A pseudo-terminal: (the master's fd, the path of its serial end)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    yield master, os.ttyname(slave)
    os.close(slave)
    os.close(master)


HOLD = """
import sys, serial
port = serial.serial_for_url(sys.argv[1], exclusive=True)  # as mpremote holds a port
print("held", flush=True)
sys.stdin.read()
"""


def read_line(proc, timeout=30.0):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no output from %s" % proc.args
    return proc.stdout.readline()


def test_monitor_refuses_a_port_another_program_holds(pty_port):
    _, name = pty_port
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, name],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert read_line(holder) == "held\n"
        for extra in ([], ["--wait"]):  # --wait is for a port not there yet, not a busy one
            started = time.monotonic()
            result = citynode("monitor", name, *extra, timeout=30)
            assert_one_line(result, "citynode: %s: %s" % (name, BUSY))
            assert time.monotonic() - started < 10
    finally:
        holder.stdin.close()
        holder.wait(10)


def test_flash_and_mpremote_are_refused_at_once_while_monitor_reads_the_port(
    pty_port, tools, tmp_path
):
    master, name = pty_port
    monitor = subprocess.Popen(
        [sys.executable, "-m", "host_tools.cli", "monitor", name, "--no-color"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        os.write(master, b"I 0.100 node started node=7\r\n")
        assert read_line(monitor) == "I 0.100 node started node=7\n"  # it has the port
        started = time.monotonic()
        result = citynode(
            "flash", name, "--board", "sim", "--node-id", 7, "--uplink", "127.0.0.1:9",
            "--keys", tmp_path / "keys.json", timeout=60,
        )  # fmt: skip
        assert_one_line(result, "citynode: %s: %s" % (name, BUSY))
        assert time.monotonic() - started < 10  # not mpremote's 120 s step timeout
        assert not (tmp_path / "keys.json").exists()
        started = time.monotonic()
        mp = subprocess.run(
            [tools["mpremote"], "connect", name, "exec", "print(1)"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert mp.returncode != 0 and "in use by another program" in mp.stderr, mp.stderr
        assert time.monotonic() - started < 10
    finally:
        monitor.terminate()
        out, err = monitor.communicate(timeout=20)
    assert monitor.returncode == 0, err
    assert err.startswith("citynode: monitor stopped: 1 lines"), err
    port = flash.open_serial(name)  # the monitor has let it go
    port.close()

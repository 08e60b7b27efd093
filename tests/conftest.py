# Shared fixtures: the board build (.mpy, as a real board gets it) and a runner for scripts on
# the MicroPython unix port with a real board's heap.
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from host_tools import build

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
# Under pytest-xdist (`make test`) each worker builds the firmware that `citynode flash`, the
# sim-board and the fleet simulator use into a folder of its own: two builds into one folder
# could hand a board a file the other is still writing. Subprocesses inherit it.
if os.environ.get("PYTEST_XDIST_WORKER") and "CITYNODE_BUILD" not in os.environ:
    os.environ["CITYNODE_BUILD"] = str(ROOT / "build" / os.environ["PYTEST_XDIST_WORKER"] / "unix")
HEAP = "64K"  # the smallest board's free heap we target (ESP32 without PSRAM, see FIELD.md)


def shared_trace(name):
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip("%s not found: the shared traces live in ../shared/data" % path)
    return path


@pytest.fixture(scope="session")
def board_build(tmp_path_factory):
    """firmware/, boards/ and protocols/ compiled to .mpy (sources of 500 lines do not compile
    inside a 64 KB heap, so boards run .mpy files, as `citynode flash` installs them)."""
    try:
        micropython = build.tool("micropython")
    except build.BuildError as e:
        pytest.skip("MicroPython unix port missing (%s); see README 'Without the wheel'" % e)
    dest = tmp_path_factory.mktemp("board")
    build.build(dest)
    return {"dir": dest, "micropython": micropython}


class MicroPythonError(AssertionError):
    pass


@pytest.fixture(scope="session")
def run_mp(board_build):
    """run_mp(script_text, heap=HEAP, timeout=60, input=None) -> stdout; the script can
    import protocols, firmware and boards from the .mpy build. Fails with stderr if it fails."""

    def run(script, heap=HEAP, timeout=60, input=None, check=True):
        # "." (the build, the cwd below), not its absolute path: MicroPython keeps each
        # module's path as a qstr on the heap, and the folder names of the machine that runs
        # the tests must not change what a 64 KB heap holds.
        env = dict(os.environ, MICROPYPATH=".frozen:.")
        proc = subprocess.run(
            [board_build["micropython"], "-X", "heapsize=" + heap, "-c", script],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            input=input,
            cwd=board_build["dir"],  # not the repo: its .py sources would shadow the .mpy
        )
        if check and proc.returncode != 0:
            raise MicroPythonError(
                "micropython exited %d\nstdout:\n%s\nstderr:\n%s"
                % (proc.returncode, proc.stdout[-3000:], proc.stderr[-3000:])
            )
        return proc.stdout if check else proc

    return run


def load_json(path):
    return json.loads(Path(path).read_text())


class ReceiveProcess:
    """`citynode receive` as a subprocess; its stderr read line by line on a thread."""

    def __init__(self, *args, stdout=subprocess.DEVNULL):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "host_tools.cli", "receive", *map(str, args)],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, pattern, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no %r on stderr; got:\n%s" % (pattern, "\n".join(self.seen)))
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def drain(self):
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return "\n".join(self.seen)

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def tools():
    """The MicroPython unix port and mpremote, or a skip that says they are missing."""
    try:
        return {"micropython": build.tool("micropython"), "mpremote": build.tool("mpremote")}
    except build.BuildError as e:
        pytest.skip("MicroPython unix port or mpremote missing (%s)" % e)


@pytest.fixture
def sim(tools, tmp_path):
    """sim(image=None, board=None) starts a simulated board (citynode sim-board [--board NAME]);
    all are stopped at the
    end of the test."""
    from host_tools.sim.simboard import SimBoardProcess

    boards = []

    def start(image=None, board=None):  # board: what it simulates (sim-board --board)
        board = SimBoardProcess(image or tmp_path / "board.img", board=board)
        boards.append(board)
        return board

    yield start
    for board in boards:
        board.stop()

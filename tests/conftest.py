# Shared fixtures: the board build (.mpy, as a real board gets it) and a runner for scripts on
# the MicroPython unix port with a real board's heap.
import json
import os
import subprocess
from pathlib import Path

import pytest

from host_tools import build

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"
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
        env = dict(os.environ, MICROPYPATH=".frozen:%s" % board_build["dir"])
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

# The simulated board behind `citynode sim-board`: the MicroPython unix port on a pseudo-terminal,
# bridged to a second one that mpremote, `citynode flash` and technicians open like a USB port.
#
# Two pty pairs. The board side: the unix port runs boards/sim/boot.py with `-i` on its own pty,
# which is also its controlling terminal, so Ctrl-C interrupts a running program (the port turns
# ISIG on while it runs code and off at its REPL), and which hangs the port up if this process
# dies. The technician's side: a pty whose path is printed first; it lives as long as this
# process, across board resets. This process copies bytes between the two and restarts the unix
# port whenever it exits:
#   - exit status 3 (machine.reset() in boards/sim/boot.py, board.reset() in
#     boards/sim/board.py): a hard reset: boot.py and main.py run again;
#   - any other exit (Ctrl-D on an empty REPL line, sys.exit, machine.soft_reset): a soft reset:
#     "MPY: soft reboot\r\n", then boot.py, then main.py when the REPL was the friendly one, or
#     straight back to the raw REPL when it was the raw one (what mpremote waits for);
#   - killed by a signal: a power cycle.
# A SystemExit in boot.py or main.py (machine.reset(), a crash or the watchdog in
# boards/sim/board.py) would take the unix port to its REPL (-i): boards/sim/boot.py announces it
# (EXIT) and this process ends the interpreter and restarts it as if it had exited with that
# status. Input is held back until boards/sim/boot.py says the image is mounted (a Ctrl-C before
# that could leave the host's filesystem as "/"), and after a raw soft reset until the fresh REPL
# has been put into the raw REPL (Ctrl-A; its friendly banner is hidden). Input the dying
# interpreter did not read goes to the next one: mpremote on a pty waits forever for an answer to
# lost bytes. Output: "\n" becomes "\r\n" outside the raw REPL, as a board's cooked stdout does;
# what nobody reads is kept up to OUT_LIMIT bytes, then the oldest is dropped (a USB buffer does
# the same). The board's flash is a littlefs image in a file (boards/sim/boot.py mounts it at "/"),
# so mpremote's `fs cp x :` and `:/lib/...` land in the image, never in the host's filesystem. Not
# a sandbox: code run on the board can still call os.system() on the host. Faults (--fault
# hang-at=S) go to boards/sim/boot.py, which gives them to a flashed sim node as the fleet
# simulator's config does. --board NAME (default sim) is the board it simulates, in the unix
# port's environment (SIM_BOARD_ENV, os.getenv() on the board; not in boards/sim/boot.py, whose
# every byte comes off the node's heap): `citynode flash --board NAME` admits the board as that
# one only (its MIP_PACKAGES and config), giving it the bytecode build its interpreter runs.

import errno
import fcntl
import os
import pty
import re
import select
import signal
import subprocess
import sys
import tempfile
import termios
import time
import tty
from pathlib import Path

from host_tools import build
from host_tools.sim.fleet import NODE_HEAP

SIM_BOOT = build.ROOT / "boards" / "sim" / "boot.py"
RESET_EXIT = 3  # boards/sim/board.py RESET_EXIT, boards/sim/boot.py _RESET_EXIT
BAD_IMAGE_EXIT = 4  # boards/sim/boot.py _BAD_IMAGE_EXIT
UP = b"\x00sim-up\x00"  # boards/sim/boot.py _UP: the image is mounted, the board takes input
DONE = b"\x00sim-boot\x00"  # boards/sim/boot.py _DONE: the board's REPL starts after it
EXIT = b"\x00sim-exit "  # boards/sim/boot.py _EXIT: "<status>\x00" follows; the process must end
RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n"
SOFT_REBOOT = b"MPY: soft reboot\r\n"
FRIENDLY_PROMPT = b">>> "
SIM_BOARD_ENV = "CITYNODE_SIM_BOARD"  # host_tools/flash.py's inspection reads it
# How the board's process was started, in its environment: "power" (the first start, or after
# the interpreter died), "reset" (it exited with RESET_EXIT) or "soft" (a soft reboot); a real
# board's machine (boards/sim/mcu.py) makes reset_cause() and its RTC memory from it.
RESET_ENV = "CITYNODE_SIM_RESET"  # boards/sim/mcu.py RESET_ENV
_LONE_LF = re.compile(rb"(?<!\r)\n")
BLOCK = 4096
IMAGE_SIZE = 1024 * 1024  # 256 blocks: about what a Pico W leaves for files (848 KB)
LITTLEFS_MAGIC = b"littlefs"
OUT_LIMIT = 8192
IN_LIMIT = 65536
# The node's heap on this 64-bit port, as the fleet simulator gives it (NODE_HEAP, 80K: a 32-bit
# board's ~100 KB less what the doubled pointers cost; see host_tools/sim/fleet.py).
DEFAULT_HEAP = NODE_HEAP
# A real board (--board NAME) runs boards/hw.py, its `machine` (boards/sim/mcu.py) and, with
# "link": "lora", micropython-lib's driver on the chip model in the same process: a node with the
# real driver needs 144-152K on this port (bench/RESULTS.md "Node heap with the real driver",
# LORA_DRIVER_HEAP 160K in the fleet), and here the chip model (boards/sim/lora_hw.py,
# sx1262.py, sx1276.py) and the BME280 model run beside it. Measured on 2026-12-03 (a flashed
# node with "link": "lora", sampling every 2 s, 20 s of real time, at 176/184/192K): every LoRa
# board boots and sends in 192K and fails to build its node in 184K (heltec_v3) / 176K
# (MemoryError); 224K keeps about the margin NODE_HEAP keeps over NODE_MIN_HEAP. Boards without
# a radio need no more than a sim node.
BOARD_HEAPS = {"heltec_v3": "224K", "lilygo_t3_v161": "224K", "pico_lora_sx1262": "224K"}
# What the simulation keeps on the heap itself: boards/sim/boot.py's code and globals, the littlefs
# mount, main.py's compiled two lines (measured 5.2 KB). The unix port gets --heap plus this, so
# main.py starts with about as much free heap as `micropython -X heapsize=80K -c ...` (the fleet
# simulator's and the firmware tests' way) gives a script: a board with nothing loaded.
SIM_OVERHEAD = 5 * 1024
QUICK_RESTARTS = 5  # main.py restarted this often after under RESTART_WINDOW_S: a boot loop
RESTART_WINDOW_S = 2.0
# --fault NAME=SECONDS: boards/sim/faults.py's faults, by their config "sim": {"faults"} keys.
FAULTS = {
    "hang-at": "hang_at_s",  # the sensor driver hangs: the watchdog resets the node
    "crash-at": "crash_at_s",  # the sensor driver raises: the node logs, saves its log, resets
}


def default_heap(board):
    """--heap's default for a sim-board simulating board."""
    return BOARD_HEAPS.get(board, DEFAULT_HEAP)


class SimBoardError(Exception):
    """The simulated board cannot start (image, interpreter); str() says what to do."""


class SimBoard:
    """One simulated board. open() -> the port's path; serve(stop) until stop() is true."""

    def __init__(
        self, image, heap=None, micropython=None, log=None, trace=None, faults=None,
        board="sim",
    ):  # fmt: skip
        self.image = Path(image)
        self.heap = heap or default_heap(board)
        self.board = board  # the board simulated (boards/<name>)
        self._start = "power"  # how the next process starts (RESET_ENV)
        self.faults = dict(faults or {})  # {"hang_at_s": 30}: parse_faults()
        self.micropython = micropython
        self.log = log or (lambda msg: print("sim-board: %s" % msg, file=sys.stderr, flush=True))
        self.port = None
        self.boots = 0
        self.dropped = 0  # output bytes nobody read
        self._image_fd = None
        self._fds = []
        self._proc = None
        self._fresh = False
        self._restarts = []
        self._trace = trace  # a binary file: every byte each way, with the time and phase
        self._t0 = time.monotonic()
        self._phase = "starting"
        self._to_tech = bytearray()  # survives resets: the port is the USB chip, not the MCU
        self._to_board = bytearray()
        self._held = bytearray()  # input the board cannot take yet

    # --- set-up ---------------------------------------------------------------------------

    def open(self):
        try:
            self.micropython = self.micropython or build.tool("micropython")
        except build.BuildError as e:
            raise SimBoardError(str(e)) from None
        self._open_image()
        try:
            self._tech, tech_slave = pty.openpty()
            self._board, self._board_slave = pty.openpty()
            self._fds = [self._tech, tech_slave, self._board, self._board_slave]
            tty.setraw(tech_slave)  # bytes pass unchanged until a program sets its own modes
            for fd in (self._tech, self._board):
                os.set_blocking(fd, False)
            self.port = os.ttyname(tech_slave)
        except OSError as e:
            self.close()
            raise SimBoardError("cannot create a pseudo-terminal: %s" % (e.strerror or e)) from e
        self._state_reset()
        self._spawn("run")
        return self.port

    def _open_image(self):
        path = self.image
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SimBoardError("%s: cannot open the image: %s" % (path, e.strerror)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SimBoardError("%s: in use by another sim-board" % path) from None
        self._image_fd = fd
        size = os.fstat(fd).st_size
        if size == 0:
            os.ftruncate(fd, IMAGE_SIZE)
            self._fresh = True
            self.log("image %s: new, %d KiB, formatting" % (path, IMAGE_SIZE // 1024))
            return
        head = os.pread(fd, 2 * BLOCK, 0)
        if size % BLOCK or size < 4 * BLOCK:
            self.close()
            raise SimBoardError(
                "%s: %d bytes is not an image of whole %d-byte blocks (at least 4)"
                % (path, size, BLOCK)
            )
        if LITTLEFS_MAGIC not in head:
            if not head.strip(b"\0") and not os.pread(fd, size, 0).strip(b"\0"):
                self._fresh = True  # created but never formatted: still blank
                return
            self.close()
            raise SimBoardError(
                "%s: not a littlefs image (use another --image, or delete this file to start "
                "with a blank board)" % path
            )
        self.log("image %s: %d KiB" % (path, size // 1024))

    def _state_reset(self):
        # starting: until UP (mounted; Ctrl-C is safe from here); boot: boot.py and main.py,
        # until DONE; hold: hiding the friendly banner before entering the raw REPL; repl;
        # ended: boards/sim/boot.py said a SystemExit ended main.py (EXIT), the process is being
        # ended
        self._phase = "starting"
        self._raw = False  # the board's REPL is the raw one
        self._pending = b""  # the board's output not yet classified (a split marker)
        self._window = b""  # recent output, to spot RAW_BANNER across reads
        self._last_cr = False
        self._exit = None  # the exit status boards/sim/boot.py announced (EXIT) before its REPL

    def _spawn(self, mode):
        slave = self._board_slave
        tty.setraw(slave)
        attrs = termios.tcgetattr(slave)
        attrs[3] |= termios.ISIG  # Ctrl-C -> SIGINT while code runs (the port clears it at >>>)
        for char in (termios.VQUIT, termios.VSUSP):  # but Ctrl-\ and Ctrl-Z are plain bytes
            attrs[6][char] = b"\x00"
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        heap = "heapsize=%d" % (parse_size(self.heap) + SIM_OVERHEAD)
        cmd = [self.micropython, "-X", heap, "-i", str(SIM_BOOT)]
        cmd += [str(self.image.resolve()), mode]
        if self._fresh:
            cmd.append("format")
            self._fresh = False
        if self.faults:
            if self.boots == 0:
                cmd.append("arm")  # a new run: faults that fired in an earlier one fire again
            cmd += ["%s=%d" % item for item in sorted(self.faults.items())]
        if self.board != "sim":
            cmd.append("mcu")  # a real board: boards/sim/boot.py gives it boards/sim/mcu.py
        drop = ("MICROPYPATH", SIM_BOARD_ENV, RESET_ENV)
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env[SIM_BOARD_ENV] = self.board  # os.getenv() on the board: what `citynode flash` reads
        env[RESET_ENV] = self._start
        self._proc = subprocess.Popen(
            cmd,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=str(self.image.resolve().parent),
            env=env,
            start_new_session=True,
            preexec_fn=_take_terminal,
        )
        self._mode = mode
        self.boots += 1
        self._started = time.monotonic()

    # --- the bridge -----------------------------------------------------------------------

    def serve(self, stop, poll_s=0.05):
        """Bridge the two terminals until stop() returns true."""
        while not stop():
            self.step(poll_s)

    def step(self, timeout):
        readers = [self._tech, self._board]
        writers = []
        if self._to_tech:
            writers.append(self._tech)
        if self._to_board:
            writers.append(self._board)
        try:
            readable, writable, _ = select.select(readers, writers, [], timeout)
        except InterruptedError:
            return
        if self._board in readable:
            self._from_board(_read(self._board))
        if self._tech in readable:
            self._from_tech(_read(self._tech))
        if self._tech in writable:
            _write_some(self._tech, self._to_tech)
        if self._board in writable and self._proc.poll() is None:
            _write_some(self._board, self._to_board)
        if self._proc.poll() is not None:
            self._restart()

    def _note(self, kind, data):
        if self._trace is not None:
            line = "%.3f %s %s %r\n" % (time.monotonic() - self._t0, kind, self._phase, data)
            self._trace.write(line.encode())
            self._trace.flush()

    def _from_tech(self, data):
        if not data:
            return
        self._note(">", data)
        if self._raw and b"\x02" in data:  # Ctrl-B: back to the friendly REPL
            self._raw = False
            self._window = b""
        self._held += data
        if len(self._held) > IN_LIMIT:
            del self._held[: len(self._held) - IN_LIMIT]
        self._release()

    def _release(self):
        """Pass held input on once the board can take it: a Ctrl-C before UP could stop the
        interpreter before its filesystem is mounted, and the raw REPL is not there yet."""
        if self._phase == "repl" or (self._phase == "boot" and self._mode == "run"):
            self._to_board += self._held
            self._held = bytearray()

    def _from_board(self, data):
        self._note("B", data)
        buf = self._pending + data
        self._pending = b""
        while buf:
            if self._phase == "ended":
                return  # the unix port's REPL banner after a SystemExit: not the board's
            if self._phase == "hold":
                j = buf.find(FRIENDLY_PROMPT)
                if j < 0:
                    self._pending = buf[-(len(FRIENDLY_PROMPT) - 1) :]  # the banner is dropped
                    return
                buf = buf[j + len(FRIENDLY_PROMPT) :]
                self._held[:0] = b"\x01"  # Ctrl-A: into the raw REPL, then what was typed
                self._phase = "repl"
                self._release()
                continue
            # The markers are stripped from the stream wherever they come.
            found = [(buf.find(m), m) for m in (UP, DONE, EXIT) if m in buf]
            if not found:
                keep = max(_partial_suffix(buf, m) for m in (UP, DONE, EXIT))
                self._emit(buf[: len(buf) - keep])
                self._pending = buf[len(buf) - keep :]
                return
            i, marker = min(found)
            self._emit(buf[:i])
            if marker == EXIT:
                end = buf.find(b"\x00", i + len(EXIT))
                if end < 0:
                    self._pending = buf[i:]  # the status is still to come
                    return
                # Under -i a SystemExit in main.py would lead to the unix port's REPL, not the
                # restart a board makes: end the process and restart it as that exit says.
                self._exit = int(buf[i + len(EXIT) : end])
                self._phase = "ended"
                self._proc.kill()
                return
            buf = buf[i + len(marker) :]
            if marker == UP:
                self._phase = "boot"
            else:
                self._phase = "hold" if self._mode == "raw" else "repl"
            self._release()

    def _emit(self, data):
        if not data:
            return
        if not self._raw:
            # A board's stdout is cooked: print's "\n" goes out as "\r\n". The raw REPL's
            # output is left alone: mpremote reads it as it comes.
            head = b""
            if self._last_cr and data[:1] == b"\n":
                head, data = b"\n", data[1:]
            data = head + _LONE_LF.sub(b"\r\n", data)
        self._last_cr = data[-1:] == b"\r"
        self._window = (self._window + data)[-2 * len(RAW_BANNER) :]
        if RAW_BANNER in self._window:
            self._raw = True
            self._window = b""
        self._note("<", data)
        self._to_tech += data
        extra = len(self._to_tech) - OUT_LIMIT
        if extra > 0:
            del self._to_tech[:extra]
            self.dropped += extra

    def _restart(self):
        while True:  # what the board printed before it stopped
            data = _read(self._board)
            if not data:
                break
            self._from_board(data)
        if self._pending and self._phase not in ("hold", "ended"):
            self._emit(self._pending)
        # Input the old process did not read is kept for the new one: mpremote on a pty waits
        # forever for an answer to bytes lost in a reset.
        self._held[:0] = _unread_input(self._board_slave) + self._to_board
        self._to_board = bytearray()
        rc = self._proc.returncode if self._exit is None else self._exit
        self._note("*", "exit %s, held %r" % (rc, bytes(self._held)))
        if rc == BAD_IMAGE_EXIT and self.boots == 1:
            raise SimBoardError(
                "%s: not a littlefs image (use another --image, or delete this file)" % self.image
            )
        if rc == RESET_EXIT:
            mode = "run"
            self._start = "reset"
            self.log("reset")
        elif rc >= 0:
            mode = "raw" if self._raw else "run"
            self._start = "soft"
            self._emit(SOFT_REBOOT)
            self.log("soft reboot%s" % (" (raw REPL)" if mode == "raw" else ""))
        else:
            mode = "run"
            self._start = "power"
            self.log("MicroPython ended by signal %d: power cycle" % -rc)
        now = time.monotonic()
        if mode == "run" and now - self._started < RESTART_WINDOW_S:
            # main.py again right after a short life: a boot loop if it keeps happening
            self._restarts = [t for t in self._restarts if now - t < 5 * RESTART_WINDOW_S]
            self._restarts.append(now)
            if len(self._restarts) >= QUICK_RESTARTS:
                self.log("boot loop: %d quick restarts, waiting 1 s" % len(self._restarts))
                time.sleep(1.0)
                self._restarts = []
        self._state_reset()
        self._spawn(mode)

    # --- tear-down ------------------------------------------------------------------------

    def close(self):
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if self._image_fd is not None:
            os.close(self._image_fd)  # releases the lock
            self._image_fd = None


def parse_size(text):
    """Bytes in a size as -X heapsize= takes it: 65536, 64K, 2M. Raises ValueError."""
    text = text.strip()
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:].upper(), 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit():
        raise ValueError("expected a size like 64K, 2M or 100000, got %r" % text)
    return int(digits) * scale


def parse_faults(texts):
    """{"hang_at_s": 30, ...} from ["hang-at=30", ...] (--fault). Raises ValueError."""
    faults = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if name not in FAULTS or not sep:
            raise ValueError(
                "expected %s, got %r" % (" or ".join(n + "=SECONDS" for n in FAULTS), text)
            )
        if not value.isdigit():
            raise ValueError("%s: expected whole seconds after boot, got %r" % (name, value))
        if FAULTS[name] in faults:
            raise ValueError("%s given twice (each fault fires once a run)" % name)
        faults[FAULTS[name]] = int(value)
    return faults


def _take_terminal():
    """In the child, after setsid: make the board's pty its controlling terminal, so that the
    line discipline turns Ctrl-C into SIGINT, and closing it (this process gone) hangs it up."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _read(fd):
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""
    except OSError as e:
        if e.errno == errno.EIO:  # no process on the other side at the moment
            return b""
        raise


def _unread_input(fd):
    """Bytes waiting in a terminal's input queue (fd stays blocking: the child shares it)."""
    data = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _write_some(fd, queue):
    try:
        n = os.write(fd, queue)
    except BlockingIOError:
        return
    except OSError as e:
        if e.errno == errno.EIO:
            return
        raise
    del queue[:n]


def _partial_suffix(buf, marker):
    """Length of the longest tail of buf that is a proper prefix of marker."""
    for n in range(min(len(marker) - 1, len(buf)), 0, -1):
        if buf.endswith(marker[:n]):
            return n
    return 0


def run_until_signal(board, out=sys.stdout):
    """Open the board, print its port first on `out`, serve until SIGINT or SIGTERM."""
    stopping = []

    def on_signal(signum, _frame):
        stopping.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        port = board.open()
        print(port, file=out, flush=True)
        what = "" if board.board == "sim" else " (a simulated %s)" % board.board
        board.log("%s is the board's serial port%s; Ctrl-C to stop" % (port, what))
        board.serve(lambda: bool(stopping))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        board.close()


class SimBoardProcess:
    """`citynode sim-board` as a subprocess, for tests and scripts: .port is its serial port.
    Use as a context manager, or call stop(); kill() stops it as a pulled USB cable would."""

    def __init__(self, image, heap=None, cwd=None, timeout=20.0, faults=(), board=None):
        cmd = [sys.executable, "-m", "host_tools.cli", "sim-board", "--image", str(image)]
        for fault in faults:  # "hang-at=30", as typed after --fault
            cmd += ["--fault", fault]
        if board is not None:
            cmd += ["--board", board]
        self._log = tempfile.TemporaryFile()  # its stderr: a pipe nobody reads could fill up
        self.proc = subprocess.Popen(
            cmd + (["--heap", heap] if heap else []),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=str(cwd or build.ROOT),
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        self.port = self.proc.stdout.readline().strip() if ready else ""
        if not self.port:
            status, log = self.stop()
            raise SimBoardError("sim-board did not print its port (%s): %s" % (status, log))

    def log(self):
        """What it wrote on stderr so far."""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def stop(self):
        """SIGTERM (a clean stop); returns (exit status, stderr)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode, self.log()

    def kill(self):
        """SIGKILL: the board vanishes at once, as when its USB cable is pulled."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        self._log.close()

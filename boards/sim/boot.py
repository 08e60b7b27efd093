# Boot script of the simulated board (`citynode sim-board`, host_tools/sim/simboard.py): mounts the
# board's littlefs image at "/", sets sys.path as a board does, gives `machine` a reset(), and runs
# /boot.py and /main.py; then the unix port's own REPL (started with -i) takes the serial line.
#
# Run as `micropython -X heapsize=64K -i sim_boot.py IMAGE MODE [format] [arm] [mcu] [FAULT=S]`
# ("mcu": the board simulates a real one, `sim-board --board NAME`: boards/sim/mcu.py):
# MODE "run" (power-on, hard or soft reset from the friendly REPL: boot.py then main.py) or "raw"
# (soft reset from the raw REPL: boot.py only, as a real board does). FAULT=S (hang_at_s=30,
# crash_at_s=60: `citynode sim-board --fault`) gives the sim board's node boards/sim/faults.py's
# faults, as config "sim": {"faults"} does in the fleet simulator; "arm" (the first boot of a
# sim-board run) forgets the faults that fired in an earlier run. The last thing it writes is
# _DONE, which the host strips from the serial stream: it marks where the board's own REPL
# begins; _UP, written once the image is mounted, marks when the board may take input (Ctrl-C);
# _EXIT says a SystemExit (machine.reset(), sys.exit()) ended the script: restart me.

import sys

import vfs

try:
    from micropython import const
except ImportError:  # pragma: no cover

    def const(x):
        return x


_BLOCK = const(4096)  # a NOR flash sector, the block size of the ESP32 and rp2 littlefs
_RESET_EXIT = const(3)  # exit status meaning "reset me" (boards/sim/board.py RESET_EXIT)
_BAD_IMAGE_EXIT = const(4)  # the image is not littlefs: the host refuses to start
_UP = "\x00sim-up\x00"
_DONE = "\x00sim-boot\x00"
_EXIT = "\x00sim-exit %d\x00"  # a SystemExit ended boot.py or main.py: the host restarts the board


class _ImageBlocks:
    """A block device (vfs extended protocol) on a file: the board's flash chip."""

    def __init__(self, f, count):
        self._f = f
        self._count = count

    def readblocks(self, n, buf, off=0):
        self._f.seek(n * _BLOCK + off)
        self._f.readinto(buf)

    def writeblocks(self, n, buf, off=0):
        self._f.seek(n * _BLOCK + off)
        self._f.write(buf)

    def ioctl(self, op, arg):
        if op == 4:  # block count
            return self._count
        if op == 5:  # block size
            return _BLOCK
        if op == 3:  # sync
            self._f.flush()
        return 0  # init, deinit, erase: a file needs none of them


class _Machine:
    """`machine` as the firmware sees it: the unix port's module plus reset(), which restarts
    the board (the host restarts the process when it exits with _RESET_EXIT)."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def reset(self):
        raise SystemExit(_RESET_EXIT)


def _inject_faults(faults, arm):
    """Give the sim board's node the faults of `citynode sim-board --fault`: its driver hangs
    or raises once, at a time after boot (boards/sim/faults.py). In real time boards/sim/board.py
    neither checks faults nor its watchdog, so the sim board is wrapped to check them."""
    import os

    if arm:  # the marker files of boards/sim/faults.py: each fault fires once per run
        for name in ("sim_fault_hang", "sim_fault_crash"):
            try:
                os.remove(name)
            except OSError:
                pass
    try:
        from boards.sim import board as sim
        from boards.sim.faults import Faults
    except ImportError:
        return  # no sim node on this flash (not flashed, or another board): nothing to break
    base = sim.Board

    class Board(base):
        def __init__(self, raw):
            base.__init__(self, raw)
            self._faults = Faults(faults)

        def sleep_ms(self, ms):
            base.sleep_ms(self, ms)  # in lockstep this checks the faults itself
            if self._control is None:
                self._faults.check(self)

    sim.Board = Board  # what firmware/bringup.py's load_board() builds


def _mount(path, fresh):
    f = open(path, "r+b")
    f.seek(0, 2)
    blocks = _ImageBlocks(f, f.tell() // _BLOCK)
    if fresh:
        vfs.VfsLfs2.mkfs(blocks)
    try:
        fs = vfs.VfsLfs2(blocks)
    except OSError as e:
        sys.stderr.write("sim-board: %s is not a littlefs image (%r)\n" % (path, e))
        raise SystemExit(_BAD_IMAGE_EXIT)
    vfs.umount("/")  # the host's filesystem: from here on the board sees only its flash
    vfs.mount(fs, "/")


def _run_file(name):
    """Run /boot.py or /main.py as a board does: a missing file is skipped, an exception is
    printed, a SystemExit (machine.reset, sys.exit) goes up and restarts the board."""
    try:
        with open(name) as f:
            source = f.read()
    except OSError:
        return
    try:
        exec(compile(source, name, "exec"), globals())  # tracebacks name the file
    except SystemExit:
        raise
    except BaseException as e:  # KeyboardInterrupt (Ctrl-C) too: the REPL comes next
        sys.print_exception(e)


def _fault_options(opts):
    """{"hang_at_s": 30} from ["hang_at_s=30"], as config "sim": {"faults"} has it."""
    faults = {}
    for opt in opts:
        if "=" in opt:
            name, value = opt.split("=")
            faults[name] = int(value)
    return faults


try:
    _opts = sys.argv[3:]
    _mount(sys.argv[1], "format" in _opts)
    import os

    import machine

    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]  # as on the esp32 and rp2 ports
    sys.modules["machine"] = _Machine(machine)
    if "mcu" in _opts:  # a real board: its port's machine (boards/sim/mcu.py), once flashed
        try:
            from boards.sim import mcu  # importing it installs it

            del mcu
        except ImportError:
            pass
    _faults = _fault_options(_opts)
    _arm = "arm" in _opts
    del os, machine, _mount, _fault_options, _opts  # a board's REPL starts with an empty namespace
    import gc

    gc.collect()
    sys.stdout.write(_UP)  # the host holds input back until here: Ctrl-C is safe now
    _run_file("boot.py")
    if sys.argv[2] == "run" and _faults:
        _inject_faults(_faults, _arm)
    del _faults, _arm
    if sys.argv[2] == "run":
        _run_file("main.py")
except SystemExit as e:
    # machine.reset() (3) or sys.exit() in main.py: with -i the unix port would go on to its
    # REPL, so the host ends the process on this marker and restarts the board as that exit.
    _code = e.args[0] if e.args else 0
    sys.stdout.write(_EXIT % (_code if isinstance(_code, int) else 1))
    raise
finally:
    sys.stdout.write(_DONE)

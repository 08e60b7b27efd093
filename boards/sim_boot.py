# Boot script of the simulated board (`citynode sim-board`, host_tools/simboard.py): mounts the
# board's littlefs image at "/", sets sys.path as a board does, gives `machine` a reset(), and runs
# /boot.py and /main.py; then the unix port's own REPL (started with -i) takes the serial line.
#
# Run as `micropython -X heapsize=64K -i sim_boot.py IMAGE MODE [format]`: MODE "run" (power-on,
# hard or soft reset from the friendly REPL: boot.py then main.py) or "raw" (soft reset from the
# raw REPL: boot.py only, as a real board does). The last thing it writes is _DONE, which the
# host strips from the serial stream: it marks where the board's own REPL begins; _UP, written
# once the image is mounted, marks when the board may take input (and Ctrl-C).

import sys

import vfs

try:
    from micropython import const
except ImportError:  # pragma: no cover

    def const(x):
        return x


_BLOCK = const(4096)  # a NOR flash sector, the block size of the ESP32 and rp2 littlefs
_RESET_EXIT = const(3)  # exit status meaning "reset me" (boards/sim.py RESET_EXIT)
_BAD_IMAGE_EXIT = const(4)  # the image is not littlefs: the host refuses to start
_UP = "\x00sim-up\x00"
_DONE = "\x00sim-boot\x00"


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


try:
    _mount(sys.argv[1], len(sys.argv) > 3 and sys.argv[3] == "format")
    import os

    import machine

    os.chdir("/")
    sys.path[:] = ["", ".frozen", "/lib"]  # as on the esp32 and rp2 ports
    sys.modules["machine"] = _Machine(machine)
    del os, machine, _mount  # a board's REPL starts with an empty namespace
    import gc

    gc.collect()
    sys.stdout.write(_UP)  # the host holds input back until here: Ctrl-C is safe now
    _run_file("boot.py")
    if sys.argv[2] == "run":
        _run_file("main.py")
finally:
    sys.stdout.write(_DONE)

# A simulated NOR flash chip behind MicroPython's block device protocol, with power cuts.
# Tests and benches mount vfs.VfsLfs2 on it to count flash wear and to cut power at any write.
#
# Semantics (as SPI NOR flash such as the W25Q16/W25Q32 on Pico and ESP32 boards): an erase sets
# a whole 4096-byte sector to 0xFF; a program can only clear bits, so it ANDs into the contents.
# A power cut interrupts one program or erase: a random prefix of the bytes gets programmed (the
# byte at the edge only partly), or the sector is left half-erased (garbage). From then on the
# chip is dead: every operation fails, nothing more reaches the bytearray. The test then
# "reboots": drops every object and mounts a new SimFlash on the same bytearray.
#
# How the cut is signalled: the interrupted call and every later one return -EIO, so littlefs
# unwinds cleanly and Python code sees OSError(EIO); `dead` tells a cut from a real error. With
# raises=True the interrupted call raises PowerCut instead (later ones still return -EIO): that
# longjmps out of littlefs's C code mid-operation, so the old VfsLfs2 is left in a state that
# only a remount forgets.

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


BLOCK_SIZE = const(4096)
_IOCTL_INIT = const(1)
_IOCTL_DEINIT = const(2)
_IOCTL_SYNC = const(3)
_IOCTL_BLOCK_COUNT = const(4)
_IOCTL_BLOCK_SIZE = const(5)
_IOCTL_BLOCK_ERASE = const(6)
_EIO = const(5)


class PowerCut(Exception):
    """Power was lost during a program or erase (SimFlash(raises=True) only)."""


class Rng:
    """xorshift32: the same sequence on MicroPython and CPython, for reproducible cuts."""

    def __init__(self, seed):
        self.state = (seed * 2654435761 + 1) & 0xFFFFFFFF or 1

    def next(self):
        x = self.state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.state = x
        return x

    def below(self, n):
        """0 <= r < n"""
        return self.next() % n


class SimFlash:
    """Block device for vfs.VfsLfs2 (extended protocol: readblocks/writeblocks with offset).

    data: an existing image (bytearray) to share with an earlier, "powered-off" instance, or
    None for a new, fully erased chip of `blocks` sectors.
    Counters: programmed (bytes), prog_ops, erased (blocks), overprogrammed (bytes programmed
    over bits that were not erased: a filesystem bug on real NOR, where they stay 0).
    """

    def __init__(self, blocks=64, data=None, block_size=BLOCK_SIZE, seed=1, raises=False):
        if data is None:
            data = bytearray(b"\xff" * (blocks * block_size))
        self.data = data
        self.block_size = block_size
        self.blocks = len(data) // block_size
        self._erased = b"\xff" * block_size
        self.rng = Rng(seed)
        self.raises = raises
        self.dead = False  # power was cut: every operation fails from now on
        self._cut_in = 0  # 0: no cut armed; n: the n-th next program/erase is cut
        self.programmed = 0
        self.prog_ops = 0
        self.erased = 0
        self.overprogrammed = 0

    # --- power cuts ----------------------------------------------------------------------

    def cut_after(self, n):
        """Arm a power cut: the n-th program or erase from now (n >= 1) is interrupted."""
        if n < 1:
            raise ValueError("cut_after: n must be >= 1")
        self._cut_in = n

    def disarm(self):
        self._cut_in = 0

    def _cut_now(self):
        if self._cut_in:
            self._cut_in -= 1
            if self._cut_in == 0:
                return True
        return False

    def _dead(self, what, block):
        if self.raises and not self.dead:
            self.dead = True
            raise PowerCut("power cut while %s block %d" % (what, block))
        self.dead = True
        return -_EIO

    def reset_counters(self):
        self.programmed = self.prog_ops = self.erased = self.overprogrammed = 0

    # --- block device protocol -----------------------------------------------------------

    def readblocks(self, block, buf, offset=0):
        if self.dead:
            return self._dead("reading", block)
        start = block * self.block_size + offset
        n = len(buf)
        if start < 0 or start + n > len(self.data):
            return -_EIO  # littlefs reports it instead of crashing
        buf[:] = memoryview(self.data)[start : start + n]
        return 0

    def writeblocks(self, block, buf, offset=None):
        if offset is None:
            # Simple protocol (FAT, raw users): whole blocks, erased first, as rp2.Flash does.
            for i in range(len(buf) // self.block_size):
                err = self._erase(block + i)
                if err:
                    return err
            offset = 0
        if self.dead:
            return self._dead("programming", block)
        start = block * self.block_size + offset
        n = len(buf)
        if start < 0 or start + n > len(self.data):
            return -_EIO
        cut = self._cut_now()
        if cut:
            keep = self.rng.below(n + 1)  # bytes fully programmed before the power failed
        else:
            keep = n
        self._program(start, buf, keep)
        if cut:
            if keep < n:
                # the byte being programmed gets some of its zero bits
                d = self.data
                d[start + keep] &= buf[keep] | (self.rng.next() & 0xFF)
            return self._dead("programming", block)
        return 0

    def _program(self, start, buf, n):
        d = self.data
        self.prog_ops += 1
        self.programmed += n
        if d[start : start + n] == self._erased[:n]:
            d[start : start + n] = buf[:n]  # the usual case, at C speed
            return
        over = 0
        for i in range(n):
            old = d[start + i]
            new = buf[i]
            if new & ~old & 0xFF:
                over += 1  # a 1 bit over a 0 bit: real NOR keeps the 0
            d[start + i] = old & new
        self.overprogrammed += over

    def _erase(self, block):
        if self.dead:
            return self._dead("erasing", block)
        start = block * self.block_size
        size = self.block_size
        if self._cut_now():
            # An interrupted sector erase: a random part done, the rest with random bits set.
            done = self.rng.below(size + 1)
            d = self.data
            for i in range(start, start + done):
                d[i] = 0xFF
            rng = self.rng
            for i in range(start + done, start + size):
                d[i] |= rng.next() & 0xFF
            return self._dead("erasing", block)
        self.erased += 1
        self.data[start : start + size] = self._erased
        return 0

    def ioctl(self, op, arg):
        if op == _IOCTL_BLOCK_COUNT:
            return self.blocks
        if op == _IOCTL_BLOCK_SIZE:
            return self.block_size
        if op == _IOCTL_BLOCK_ERASE:
            if arg < 0 or arg >= self.blocks:
                return -_EIO
            return self._erase(arg)
        if op in (_IOCTL_INIT, _IOCTL_DEINIT, _IOCTL_SYNC):
            return 0
        return None

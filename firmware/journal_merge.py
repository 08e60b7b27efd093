# Merging small files into a segment (see journal.py): needed only while the host does not
# acknowledge, once every S readings, so it is loaded when a merge is due and dropped after
# (firmware/journal.py Journal.append): the node's heap does not carry it between merges.

import binascii
import os
import struct

from firmware.journal import _errno

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


# const() names are private to their module on MicroPython: these repeat journal.py's values
# (and the segment header's format: journal.py says what it holds).
_ENOENT = const(2)
_MAGIC = const(0x4A43)  # b"CJ" as a little-endian u16
_VERSION = const(1)
_SEG_HEADER = const(12)


def merge(self, base):
    """Move the S records of the segment starting at index base (due: Journal.append) from the
    small files into one segment file: written whole under a .tmp name, then renamed."""
    s, t, rec = self._s, self._t, self._rec
    first = max(base, self._pos)
    end = base + s
    name = self._file("s", base)
    tmp = name + ".tmp"
    buf = self._buf
    try:
        with open(tmp, "wb") as out:
            struct.pack_into("<HBBI", buf, 0, _MAGIC, _VERSION, rec, first)
            struct.pack_into("<I", buf, 8, binascii.crc32(memoryview(buf)[:8]))
            out.write(memoryview(buf)[:_SEG_HEADER])
            i = first
            while i < end:
                sbase = i - i % t
                try:
                    src = open(self._file("r", sbase), "rb")
                except OSError as e:
                    if _errno(e) != _ENOENT:
                        raise
                    src = None
                try:
                    if src is not None:
                        src.seek((i - sbase) * rec)
                    while i < sbase + t:
                        n = src.readinto(buf) if src is not None else 0
                        for k in range(n or 0, rec):
                            buf[k] = 0xFF  # a missing record stays missing (bad CRC)
                        out.write(buf)
                        i += 1
                finally:
                    if src is not None:
                        src.close()
        os.rename(tmp, name)
    except OSError as e:
        # Not fatal: the readings are safe in the small files; try again after T more.
        self._log("warning", "merge failed, will retry", file=name, errno=_errno(e))
        try:
            self._remove(tmp)
        except OSError:
            pass
        return
    self._merged = end
    self.merges += 1
    for sbase in range(first - first % t, end, t):
        try:
            self._remove(self._file("r", sbase))
        except OSError:
            pass  # removed at next boot

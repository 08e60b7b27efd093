# Opening a journal at boot: read its state, scan its files, remove leftovers of a power cut.
# Kept apart from journal.py so that this code leaves the heap once the node runs (main.py).

import binascii
import os
import struct

from firmware.journal import (
    _MAGIC,
    _STATE_FMT,
    JournalError,
    _entries,
    _errno,
    _parse,
    _strerror,
)

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


# const() names are private to their module on MicroPython: these repeat journal.py's values.
_ENOENT = const(2)
_EEXIST = const(17)
_VERSION = const(1)
_SEG_HEADER = const(12)
_STATE_SIZE = const(24)
_STATE_BODY = const(20)


def boot(self):
    try:
        os.mkdir(self.path)
    except OSError as e:
        if _errno(e) != _EEXIST:
            raise JournalError(
                "journal: cannot create %s: %s" % (self.path, _strerror(e)), _errno(e)
            )
    state = _read_state(self)
    merged, end, oldest, files, leftovers, lowest_end = _scan(self, True)
    if state is None:
        pos = max(oldest, 0)
        if files:
            self._error(
                "state lost, re-sending every stored reading; dropped count restarts",
                first=pos,
            )
        # A new journal gets its state now, so that later a missing state means a loss.
        self._write_state(pos, 0)
    else:
        pos, self.dropped = state
    self._pos = pos
    self._merged = merged
    if leftovers or 0 <= lowest_end <= pos:
        _clean(self)
        merged, end, oldest, files, leftovers, lowest_end = _scan(self, False)
    # Acks that end where a small file starts are not written to the state: removing the
    # files below is what records them (see _advance). So the oldest record has the say,
    # and with no record left, everything up to the next (or an empty) small file was
    # acknowledged.
    if oldest > pos:
        pos = oldest
    elif oldest < 0:
        pos += (self._t - pos % self._t) % self._t
        if end > pos:
            pos = end
    self._pos = pos
    self._next = max(end, pos)
    self._info(
        "opened",
        pending=self._next - self._pos,
        dropped=self.dropped,
        first=self._pos,
        files=files,
    )


def _scan(self, report):
    """One pass over the directory, O(1) RAM: (end of the newest segment, end of the
    newest record, first record of the oldest file or -1, journal files, leftovers to
    remove (*.tmp, small files below a segment), end of the oldest file or -1)."""
    t, s, rec = self._t, self._s, self._rec
    merged = end = files = tmp = 0
    oldest = lowest_small = lowest_end = -1
    for name, size in _entries(self.path):
        kind, base = _parse(name)
        path = self.path + "/" + name
        if kind == "r" and base % t == 0:
            count = size // rec
            if size % rec and report:
                self._warn("torn record in small file", file=path, bytes=size % rec)
            if count > t:
                if report:
                    self._error("small file too long, extra records ignored", file=path, n=count)
                count = t
            first = base
            last = base + count
            if lowest_small < 0 or base < lowest_small:
                lowest_small = base
        elif kind == "s" and base % s == 0:
            first = _check_segment(self, name, base, size, report)
            last = base + s
            merged = max(merged, last)
        elif name.endswith(".tmp"):
            tmp += 1
            continue
        else:
            if report and name not in ("state0", "state1"):
                self._warn("unknown file left alone", file=path)
            continue
        files += 1
        end = max(end, last)
        if lowest_end < 0 or last < lowest_end:
            lowest_end = last
        if first < last and (oldest < 0 or first < oldest):
            oldest = first
    leftovers = tmp or 0 <= lowest_small < merged
    return merged, end, oldest, files, leftovers, lowest_end


def _check_segment(self, name, base, size, report):
    """Index of a segment's first record; logs what is wrong with the file."""
    try:
        with open(self.path + "/" + name, "rb") as f:
            first, problem = self._first(f, base, size)
    except OSError as e:
        first, problem = base + self._s, "unreadable (%s)" % _strerror(e)
    if problem and report:
        self._error(
            "bad segment, records checked one by one", file=self.path + "/" + name, why=problem
        )
    return first


def _read_state(self):
    """(position, dropped) from the newer valid copy, or None if neither is valid."""
    best = None
    bad = []
    for slot in (0, 1):
        name = "%s/state%d" % (self.path, slot)
        try:
            with open(name, "rb") as f:
                n = f.readinto(self._sbuf)
        except OSError as e:
            if _errno(e) != _ENOENT:
                bad.append(name)
            continue
        buf = self._sbuf
        crc = struct.unpack_from("<I", buf, _STATE_BODY)[0]
        if n != _STATE_SIZE or crc != binascii.crc32(memoryview(buf)[:_STATE_BODY]):
            bad.append(name)
            continue
        magic, version, rec, t, _, s, pos, dropped, gen = struct.unpack_from(_STATE_FMT, buf)
        if magic != _MAGIC or version != _VERSION:
            bad.append(name)
            continue
        if (rec, t, s) != (self._rec, self._t, self._s):
            raise JournalError(
                "journal: %s holds %d-byte records (%d channels) in files of %d/%d; "
                "configured %d channels: re-provision the node or keep the old channel count"
                % (name, rec, (rec - 10) // 4, t, s, self.channels)
            )
        if best is None or gen > best[2]:
            best = (pos, dropped, gen)
    for name in bad:
        self._warn("state copy unreadable, using the other one", file=name)
    if best is None:
        return None
    self._gen = best[2]
    return best[0], best[1]


def _clean(self):
    """Remove leftovers: *.tmp, small files already merged into a segment, files whose
    records are all acknowledged. A few names per directory pass: no list of all files."""
    t, s = self._t, self._s
    while True:
        doomed = []
        for name, _ in _entries(self.path):
            kind, base = _parse(name)
            if kind == "r" and base % t == 0:
                gone = base + t <= self._pos or base < self._merged
            elif kind == "s" and base % s == 0:
                gone = base + s <= self._pos
            else:
                gone = name.endswith(".tmp")
            if gone:
                doomed.append(name)
                if len(doomed) == 8:
                    break
        if not doomed:
            return
        for name in doomed:
            try:
                self._remove(self.path + "/" + name)
                self.cleaned += 1
            except OSError as e:
                self._warn("cannot remove leftover", file=self.path + "/" + name, errno=_errno(e))
                return

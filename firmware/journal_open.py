# Opening a journal at boot: read its state, scan its files, remove leftovers of a power cut;
# and what a running journal needs only rarely (repairing a small file after a failed write,
# stats()). Kept apart from journal.py so that this code leaves the heap once the node runs
# (firmware/wiring.py unloads it); the journal imports it again when it needs it.

import binascii
import os
import struct

from firmware.journal import JournalError, _errno, _strerror

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


# const() names are private to their module on MicroPython: these repeat journal.py's values,
# and the state's and the segment header's formats (journal.py says what they hold).
_ENOENT = const(2)
_EEXIST = const(17)
_MAGIC = const(0x4A43)  # b"CJ" as a little-endian u16
_VERSION = const(1)
_INLINE_MAX = const(128)  # littlefs inline_max = cache_size = 4 * max(readsize, progsize) = 128
_SEG_HEADER = const(12)
_STATE_SIZE = const(24)
_STATE_BODY = const(20)
_RESERVE = const(64)


def boot(self, path, capacity, record_channels, log, segment_bytes):
    """Journal(): check the arguments, set up the journal, read its state and files."""
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError("journal: capacity must be >= 1, got %r" % (capacity,))
    if not isinstance(record_channels, int) or not 1 <= record_channels <= 16:
        raise ValueError("journal: record_channels must be 1..16, got %r" % (record_channels,))
    self.path = path
    self.capacity = capacity
    self.channels = record_channels
    self.log = log
    rec = 10 + 4 * record_channels
    self._rec = rec
    self._fmt = "<HI%di" % record_channels
    t = _INLINE_MAX // rec or 1
    self._t = t
    # S: records per segment, so that a segment fills one 4 KB flash block (a littlefs
    # file of one block has no skip-list pointers); tests shrink it to merge more often.
    self._s = t * max(1, (segment_bytes - _SEG_HEADER) // (t * rec))
    self._buf = bytearray(rec)
    self._body = memoryview(self._buf)[: rec - 4]
    self._ibuf = bytearray(4)
    self._sbuf = bytearray(_STATE_SIZE)  # a state copy; a segment header when reading one
    self.dropped = 0  # readings dropped because the journal was full (persisted)
    self.corrupt = 0  # unreadable readings skipped since boot (bad CRC, missing file)
    self.merges = 0
    self.cleaned = 0  # leftover files removed at boot (after a power cut)
    self._pos = 0  # index of the oldest unacknowledged record
    self._next = 0  # index the next appended record gets
    self._spos = 0  # the position the state on flash holds
    self._merged = 0  # records below this index live in segments, above in small files
    self._gen = 0
    self._tail_ok = False  # the small file for _next is known to hold exactly what it should
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
            self._log(
                "error",
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
    # files below is what records them (see _advance). So the oldest record has the say.
    # With no record left, such acks went at most RESERVE past the state's position
    # (_advance): start beyond, so that no index is handed out twice. The state stays as it
    # is (no write a boot): the next ack that empties the journal writes it.
    if oldest > pos:
        pos = oldest
    elif oldest < 0:
        if state is not None:
            pos += _RESERVE
        pos += (self._t - pos % self._t) % self._t
        if end > pos:
            pos = end
    self._pos = pos
    self._next = max(end, pos)
    try:
        fix_tail(self)  # now, while this code is loaded, not at the first append
    except JournalError as e:
        self._log("error", "cannot repair the newest small file, will retry", error=str(e))
    self._log(
        "info",
        "opened",
        pending=self._next - self._pos,
        dropped=self.dropped,
        first=self._pos,
        files=files,
    )
    self.first = self._pos  # peek(): the index of its first record (unreadable ones before)


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
                self._log("warning", "torn record in small file", file=path, bytes=size % rec)
            if count > t:
                if report:
                    self._log(
                        "error", "small file too long, extra records ignored", file=path, n=count
                    )
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
                self._log("warning", "unknown file left alone", file=path)
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
    """Index of a segment's first record (Journal._first); logs what is wrong with the file."""
    path = self.path + "/" + name
    try:
        with open(path, "rb") as f:
            first = self._first(f, base, size)
        problem = _problem(self, base, size, first)
    except OSError as e:
        first, problem = base + self._s, "unreadable (%s)" % _strerror(e)
    if problem and report:
        self._log("error", "bad segment, records checked one by one", file=path, why=problem)
    return first


def _problem(self, base, size, first):
    """What is wrong with a segment whose header Journal._first() left in self._sbuf, or None.
    _first() decides where its records start (it runs on every read); this says why."""
    rec, s = self._rec, self._s
    hdr = self._sbuf
    if size < _SEG_HEADER:
        return "no header"
    if struct.unpack_from("<I", hdr, 8)[0] != binascii.crc32(memoryview(hdr)[:8]):
        return "header CRC mismatch"
    magic, version, size_rec, start = struct.unpack_from("<HBBI", hdr)
    if magic != _MAGIC or version != _VERSION or size_rec != rec:
        return "not a v%d segment of %d-byte records" % (_VERSION, rec)
    if not base <= start <= base + s:
        return "header says first %d, outside %d..%d" % (start, base, base + s)
    expected = _SEG_HEADER + (base + s - first) * rec
    if size != expected:
        return "%d bytes, expected %d" % (size, expected)
    return None


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
        magic, version, rec, t, _, s, pos, dropped, gen = struct.unpack_from("<HBBBBHIII", buf)
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
        self._log("warning", "state copy unreadable, using the other one", file=name)
    if best is None:
        return None
    self._gen = best[2]
    self._spos = best[0]
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
                self._log(
                    "warning",
                    "cannot remove leftover",
                    file=self.path + "/" + name,
                    errno=_errno(e),
                )
                return


def _entries(path):
    """(name, size) of each file in path: os.ilistdir on MicroPython, os.scandir on CPython."""
    if hasattr(os, "ilistdir"):
        for entry in os.ilistdir(path):
            name = entry[0]
            if len(entry) > 3 and entry[3] >= 0:
                size = entry[3]
            else:  # VfsPosix gives no size
                size = os.stat(path + "/" + name)[6]
            yield name, size
    else:
        for dirent in os.scandir(path):
            yield dirent.name, dirent.stat().st_size


def _parse(name):
    """('r' or 's', index) for journal file names, else (None, 0)."""
    if len(name) != 9 or name[0] not in "rs":
        return None, 0
    try:
        return name[0], int(name[1:], 16)
    except ValueError:
        return None, 0


def fix_tail(self):
    """Make the small file that the next record goes to hold exactly the records before
    it: cut off a torn record, or pad a missing part with unreadable filler records."""
    rec = self._rec
    nxt = self._next
    base = nxt - nxt % self._t
    name = self._file("r", base)
    want = (nxt - base) * rec
    try:
        size = os.stat(name)[6]
    except OSError as e:
        if _errno(e) != _ENOENT:
            raise JournalError("journal: cannot stat %s: %s" % (name, _strerror(e)), _errno(e))
        size = 0
    if size != want:
        self._log("warning", "repairing small file", file=name, bytes=size, expected=want)
        try:
            _rewrite(self, name, want)
        except OSError as e:
            raise JournalError("journal: cannot repair %s: %s" % (name, _strerror(e)), _errno(e))
    self._tail_ok = True


def _rewrite(self, name, size):
    """Rewrite `name` to `size` bytes (whole records): keep what is there, pad with 0xFF."""
    rec = self._rec
    buf = self._buf
    tmp = name + ".tmp"
    try:
        src = open(name, "rb")
    except OSError as e:
        if _errno(e) != _ENOENT:
            raise
        src = None
    try:
        with open(tmp, "wb") as out:
            done = 0
            while done < size:
                n = src.readinto(buf) if src is not None else 0
                for k in range(n or 0, rec):
                    buf[k] = 0xFF
                out.write(buf)
                done += rec
    finally:
        if src is not None:
            src.close()
    os.rename(tmp, name)


def stats(self):
    small = segments = size = 0
    for name, n in _entries(self.path):
        size += n
        kind = _parse(name)[0]
        if kind == "s":
            segments += 1
        elif kind == "r":
            small += 1
    return {
        "pending": self._next - self._pos,
        "dropped": self.dropped,
        "corrupt": self.corrupt,
        "capacity": self.capacity,
        "segments": segments,
        "small_files": small,
        "bytes": size,
        "first": self._pos,
        "next": self._next,
        "merges": self.merges,
        "cleaned": self.cleaned,
        "record_bytes": self._rec,
    }

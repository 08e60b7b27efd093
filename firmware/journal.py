# Store-and-forward journal: every reading is written to flash before it is sent and stays there
# until the host acknowledges it. Survives a power cut at any write on littlefs; bounded; low wear.
#
# On flash (the directory `path`; a record's index counts readings since provisioning):
#   r%08x   "small" files of up to T records, named by the index of their first record (a
#           multiple of T). T records fit littlefs's inline limit (128 bytes with MicroPython's
#           defaults), so an append is one metadata commit (~100-400 bytes) instead of a copy of
#           a file's last 4 KB block, which is what appending to a larger littlefs file costs.
#   s%08x   segments of S records (one 4 KB block), named by a multiple of S: while the host is
#           unreachable, every S readings are merged from the small files into one segment,
#           because inline files take 4-5 times their size in metadata blocks.
#   state0, state1   A/B copies of (index of the oldest unacknowledged record, dropped count),
#           with a generation number and a CRC: each write goes to the older copy.
# A record: boot u16, ms u32, N x i32, CRC-32 (seeded with the record's index, so a record found
# at the wrong place does not pass). A segment starts with a 12-byte header (magic, version,
# record size, index of its first record, CRC-32).
# Acknowledging removes the files below the new oldest record, oldest first; the state is written
# only when that record is not the first of a small file (at boot the oldest record on flash has
# the say), so frames of 10 over small files of 5 cost no state write. A full journal drops the
# oldest T readings at a time (one state write per T appends).
# An index is never handed out twice (the host de-duplicates readings by node and index for
# ever): an ack that empties the journal leaves no record on flash to say how far it went, so it
# skips the state write only while it ends at most RESERVE (64) readings past the state's
# position, and a boot that finds no record starts at the state's position + RESERVE (rounded
# up to a small file): a gap of unused indices, one state write per ~RESERVE readings.
#
# Power cuts: a littlefs file write is atomic at close and rename is atomic, so the only states a
# cut leaves are "record written or not", "state written or not" (the other copy is intact),
# merged segment present or not (leftover small files are removed at boot), "*.tmp" leftovers
# (removed). Acknowledged readings whose ack was cut short come back once (the host
# de-duplicates); stored ones are never lost (tests/test_journal.py cuts power 1 000 times in CI).
# On file systems where writes are not atomic (FAT, a host's POSIX), torn records fail their CRC
# and a torn last record is cut off at boot. A lost oldest file cannot be told from an ack.
# RAM: a few ints and small buffers, whatever the capacity; files are located by index.

import binascii
import os
import struct

from firmware import unload

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


_ENOENT = const(2)
_ENOSPC = const(28)
_MAGIC = const(0x4A43)  # b"CJ" read as a little-endian u16: no bytes object on the heap
_VERSION = const(1)
_RESERVE = const(64)  # see the header: indices an emptying ack may pass the state by
_SEG_HEADER = const(12)
_STATE_BODY = const(20)
# Repeated in journal_open.py and journal_merge.py (const() names are private to a module; a
# format as a global would cost the running node a dict entry and a name):
#   state, 24 bytes: "<HBBBBHIII" magic, version, record size, T, 0, S, position, dropped,
#                    generation; then the CRC-32 of those 20 bytes
#   segment header:  "<HBBI" magic, version, record size, first index; then its CRC-32


class JournalError(Exception):
    """The journal could not store or acknowledge: the message says what and why. Attribute
    errno: the OSError's errno (28 ENOSPC: flash full), or 0."""

    def __init__(self, message, errno=0):
        super().__init__(message)
        self.errno = errno


def _errno(e):
    return e.args[0] if e.args and isinstance(e.args[0], int) else 0


def _strerror(e):
    n = _errno(e)
    name = {2: "ENOENT", 5: "EIO", 22: "EINVAL", 28: "ENOSPC", 30: "EROFS"}.get(n, "OSError")
    return "%s (errno %d)" % (name, n)


class Journal:
    """Readings waiting for the host's acknowledgement, on flash, oldest first.

    append(boot, ms, values) stores one reading (durable when it returns); peek(n) gives the
    oldest n as (boot, ms, values), contiguous, and sets `first` to the index of the first;
    ack(n) forgets those up to first + n. When `capacity` readings are waiting,
    append drops the oldest T of them (5 with 3 channels) and counts them in `dropped`.
    segment_bytes: size of a merged segment file (default one 4 KB flash block); part of the
    on-flash layout, like record_channels: a journal is reopened with the values it was made
    with (JournalError otherwise)."""

    # Set by journal_open.boot(); declared for the type checker (bare annotations cost a
    # MicroPython heap nothing: the compiler drops them).
    path: str
    capacity: int
    channels: int
    log: object
    first: int
    dropped: int
    corrupt: int
    merges: int
    cleaned: int
    _rec: int
    _fmt: str
    _t: int
    _s: int
    _buf: bytearray
    _body: memoryview
    _ibuf: bytearray
    _sbuf: bytearray
    _pos: int
    _next: int
    _spos: int
    _merged: int
    _gen: int
    _tail_ok: bool

    def __init__(
        self, path="journal", capacity=10080, record_channels=3, log=None, segment_bytes=4096
    ):
        # Checking the arguments, the attributes, reading the state, scanning the files:
        # boot-time code, dropped from the heap after boot (firmware/wiring.py).
        from firmware import journal_open

        journal_open.boot(self, path, capacity, record_channels, log, segment_bytes)

    # --- names and helpers ---------------------------------------------------------------

    def _file(self, kind, base):
        """The file whose first record has index base: kind "r" a small file, "s" a segment."""
        return "%s/%s%08x" % (self.path, kind, base)

    def _log(self, level, message, **fields):
        if self.log is not None:
            getattr(self.log, level)("journal", message, **fields)

    def _crc(self, index, data):
        struct.pack_into("<I", self._ibuf, 0, index & 0xFFFFFFFF)
        return binascii.crc32(data, binascii.crc32(self._ibuf))

    def _remove(self, name):
        try:
            os.remove(name)
        except OSError as e:
            if _errno(e) != _ENOENT:
                raise

    # --- a segment's header, the state ---------------------------------------------------

    def _first(self, f, base, size):
        """Index of the first record of an open segment of `size` bytes. The header says it;
        if the header is damaged, the size says it (a segment ends at base + S). The header is
        left in self._sbuf: at boot journal_open.py says what is wrong with it."""
        rec, s = self._rec, self._s
        hdr = self._sbuf
        f.seek(0)
        if f.readinto(hdr) >= _SEG_HEADER:
            crc = struct.unpack_from("<I", hdr, 8)[0]
            magic, version, size_rec, first = struct.unpack_from("<HBBI", hdr)
            if (
                crc == binascii.crc32(memoryview(hdr)[:8])
                and magic == _MAGIC
                and version == _VERSION
                and size_rec == rec
                and base <= first <= base + s
            ):
                return first
        return base + s - min(s, max(0, size - _SEG_HEADER) // rec)

    def _write_state(self, pos, dropped):
        gen = self._gen + 1
        buf = self._sbuf
        rec, t, s = self._rec, self._t, self._s
        struct.pack_into("<HBBBBHIII", buf, 0, _MAGIC, _VERSION, rec, t, 0, s, pos, dropped, gen)
        struct.pack_into("<I", buf, _STATE_BODY, binascii.crc32(memoryview(buf)[:_STATE_BODY]))
        name = "%s/state%d" % (self.path, gen & 1)
        try:
            with open(name, "wb") as f:
                f.write(buf)
        except OSError as e:
            raise JournalError(
                "journal: cannot write %s: %s; acknowledged readings will be re-sent"
                % (name, _strerror(e)),
                _errno(e),
            )
        self._gen = gen
        self._spos = pos

    # --- append --------------------------------------------------------------------------

    def __len__(self):
        return self._next - self._pos

    def append(self, boot, ms, values):
        """Store one reading; it is on flash when this returns. Raises ValueError for values
        out of range, JournalError when the flash refuses (errno 28: full)."""
        if len(values) != self.channels:
            raise ValueError("journal: %d values expected, got %d" % (self.channels, len(values)))
        if not 0 <= boot <= 0xFFFF or not 0 <= ms <= 0xFFFFFFFF:
            raise ValueError("journal: boot %r or ms %r out of range (u16, u32)" % (boot, ms))
        for v in values:
            if not -0x80000000 <= v <= 0x7FFFFFFF:
                raise ValueError("journal: value %r out of the signed 32-bit range" % (v,))
        t = self._t
        pending = self._next - self._pos
        if pending >= self.capacity:
            # Full: forget the oldest, T at a time (one state write per T readings while the
            # journal is full), and count them.
            pos = self._pos + pending - self.capacity + 1
            pos = min(pos + (t - pos % t) % t, self._next)
            k = pos - self._pos
            # The node logs the drop (it sees `dropped` grow); here only for debugging.
            self._log("debug", "full, dropping oldest", n=k, first=self._pos)
            self._advance(pos, k)
        if not self._tail_ok:
            # The small file this record goes to may hold part of one (a failed write): repair
            # it with boot-time code, which leaves the heap again (a repair is rare).
            try:
                from firmware import journal_open

                journal_open.fix_tail(self)
            finally:
                unload("journal_open")
        i = self._next
        buf = self._buf
        struct.pack_into(self._fmt, buf, 0, boot, ms, *values)
        struct.pack_into("<I", buf, self._rec - 4, self._crc(i, self._body))
        name = self._file("r", i - i % t)
        try:
            with open(name, "ab") as f:
                f.write(buf)
        except OSError as e:
            self._tail_ok = False  # on a non-atomic FS the file may now hold part of a record
            raise JournalError(
                "journal: cannot store reading %d in %s: %s; %d stored readings kept"
                % (i, name, _strerror(e), self._next - self._pos),
                _errno(e),
            )
        nxt = self._next = i + 1
        if nxt % t:
            return
        # While the host does not acknowledge, move each full range of S records from the small
        # files into one segment (firmware/journal_merge.py, loaded for it and dropped after).
        pos, s = self._pos, self._s
        base = max(self._merged, pos - pos % s)
        if nxt >= base + s and nxt - pos >= s:
            try:
                from firmware import journal_merge

                journal_merge.merge(self, base)
            except MemoryError:
                # Not fatal: the readings are safe in the small files; try again after T more.
                self._log("warning", "merge postponed: no heap to load it", next=nxt)
            finally:
                unload("journal_merge")

    # --- read and acknowledge --------------------------------------------------------------

    def _walk(self, i, lim, rows, n=0):
        """Visit the records i..lim-1 in order. Returns (the first readable one or -1,
        unreadable ones). With a list `rows` (peek): put up to n readable records in it, and
        stop before an unreadable record that follows them."""
        s, t, rec = self._s, self._t, self._rec
        buf = self._buf
        first = -1
        bad = 0
        while i < lim:
            seg = i < self._merged
            if seg:
                base = i - i % s
                end = base + s
            else:
                base = i - i % t
                end = base + t
            name = self._file("s" if seg else "r", base)
            start = base  # the file's first record
            f = None
            try:
                try:
                    f = open(name, "rb")
                except OSError as e:
                    if _errno(e) != _ENOENT:
                        raise
                    start = end  # a missing file: its records are unreadable
                if f is None:
                    pass
                elif seg:
                    f.seek(0, 2)
                    start = self._first(f, base, f.tell())
                    f.seek(_SEG_HEADER + (max(i, start) - start) * rec)
                else:
                    f.seek((i - base) * rec)
                while i < end and i < lim:
                    if (
                        i >= start
                        and f.readinto(buf) == rec
                        and struct.unpack_from("<I", buf, rec - 4)[0] == self._crc(i, self._body)
                    ):
                        if first < 0:
                            first = i
                            if rows is not None:
                                lim = min(lim, i + n)
                        if rows is not None:
                            v = struct.unpack_from(self._fmt, buf)
                            rows.append((v[0], v[1], v[2:]))
                    elif first >= 0 and rows is not None:
                        return first, bad
                    else:
                        bad += 1
                    i += 1
            except OSError as e:
                raise JournalError("journal: cannot read %s: %s" % (name, _strerror(e)), _errno(e))
            finally:
                if f is not None:
                    f.close()
        return first, bad

    def peek(self, n):
        """Up to n oldest unacknowledged readings as [(boot, ms, values)], oldest first and
        contiguous: reading k has index self.first + k. Unreadable records (bad CRC, missing
        file) before them are skipped (ack() counts and logs them); one after them ends the
        list, so it can be shorter than n even when len() is not (a later peek skips it)."""
        rows = []
        first = -1
        if n > 0:
            first = self._walk(self._pos, self._next, rows, n)[0]
            if first < 0 and len(self):
                # Every waiting record is unreadable: forget them now (ack counts and logs
                # them), as a node that waits for peek() to return something would otherwise
                # wait for ever.
                self.first = self._pos
                try:
                    self.ack(len(self))
                except JournalError as e:
                    self._log("error", "cannot skip them", error=str(e))
        self.first = self._pos if first < 0 else first
        return rows

    def ack(self, n):
        """The n readings from index `first` (as the last peek returned them; without one, from
        the oldest) reached the host: forget every reading up to first + n. Durable when it
        returns; raises JournalError if the state cannot be written."""
        old = self._pos
        first = self.first
        end = min(first + n, self._next)
        if n <= 0 or end <= old:
            return
        # peek() found those before first unreadable; count those after it that are
        bad = first - old + self._walk(first, end, None)[1]
        if bad:
            self.corrupt += bad
            self._log("error", "skipped unreadable readings", n=bad, first=old, last=end - 1)
        self._advance(end, 0)

    def _advance(self, pos, dropped):
        """Make pos the oldest unacknowledged index (and add to the dropped count), durably,
        and remove the files below it."""
        old = self._pos
        if (
            not dropped
            and pos % self._t == 0
            and pos >= self._merged
            and (pos < self._next or pos - self._spos <= _RESERVE)
        ):
            # pos starts a small file: removing the files below it, oldest first, is the
            # record of this ack (at boot the oldest file has the say), so the state is not
            # written. The usual case with frames of 10 and small files of 5: one commit less.
            # With no record left, a boot starts RESERVE past the state: pos may not pass it.
            try:
                self._delete_range(old, pos)
                self._pos = self.first = pos
                if pos > self._next:
                    self._next = pos
                return
            except OSError:
                pass  # write the state then
        try:
            self._write_state(pos, self.dropped + dropped)
        except JournalError as e:
            if e.errno != _ENOSPC:
                raise
            # Flash full: free what is below pos first (at worst those readings, which the
            # host already has or which are being dropped, are later reported missing), but
            # the newest record's file: if the state still cannot be written, that file keeps
            # the next boot from handing out its index again.
            self._delete_range(old, min(pos, self._next - 1))
            self._write_state(pos, self.dropped + dropped)
        self._pos = self.first = pos
        self.dropped += dropped
        if pos > self._next:
            self._next = pos
        try:
            self._delete_range(old, pos)
        except OSError as e:
            self._log(
                "warning", "cannot remove acknowledged files, next boot will", errno=_errno(e)
            )

    def _delete_range(self, old, pos):
        """Remove files whose records all lie below pos (those from index old on)."""
        s, t = self._s, self._t
        base = old - old % s
        while base < self._merged and base + s <= pos:
            self._remove(self._file("s", base))
            base += s
        base = max(old - old % t, self._merged)
        while base + t <= pos:
            self._remove(self._file("r", base))
            base += t

    # --- telemetry (code in journal_open, loaded for it) ----------------------------------

    def stats(self):
        """Counters and what is on flash (pending, dropped, corrupt, segments, bytes ...)."""
        from firmware import journal_open

        return journal_open.stats(self)

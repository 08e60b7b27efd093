# Ledgers: which readings a sink already holds, by identity (node id, reading index), so that a
# copy is dropped wherever and whenever it arrives (SPEC.md "Identity"). A node's indices come
# almost in order, so a node's set is kept as a few ranges of indices ("0-40311, 40320-52000"),
# not one row per reading: a sink's ledger stays a few rows per node however long it runs.
#
# Range sets live in SQLite, in a table `ranges(node_id, first, last)`: the spool keeps it in its
# own file and writes it in the same transaction as its rows (SqlRanges); the JSON-lines and
# InfluxDB files keep it in a file beside them (FileLedger), with the file's size after the last
# write it records, so that lines a crash left unrecorded are read back on open (and what a
# crash may have cut short, never acked, cut off to be written whole when its node sends again).
#
# Rows are sink rows (node_id, reading_index, ts, quantity, value). A v1 row (reading_index None)
# has no identity: it is always new here (the SQLite sink has the v1 rules).

import bisect
import os
import sqlite3

_RANGES_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ranges(node_id INTEGER NOT NULL, first INTEGER NOT NULL, "
    "last INTEGER NOT NULL, PRIMARY KEY(node_id, first)) WITHOUT ROWID"
)


class RangeSet:
    """Sorted, disjoint, non-adjacent inclusive ranges of integers."""

    __slots__ = ("firsts", "lasts")

    def __init__(self, ranges=()):
        self.firsts = []
        self.lasts = []
        for first, last in sorted(ranges):
            self.add(first, last)

    def __contains__(self, i):
        k = bisect.bisect_right(self.firsts, i) - 1
        return k >= 0 and i <= self.lasts[k]

    def add(self, first, last):
        firsts, lasts = self.firsts, self.lasts
        # ranges that touch or overlap [first - 1, last + 1] merge into one
        lo = bisect.bisect_left(lasts, first - 1)
        hi = bisect.bisect_right(firsts, last + 1)
        if lo < hi:
            first = min(first, firsts[lo])
            last = max(last, lasts[hi - 1])
        firsts[lo:hi] = [first]
        lasts[lo:hi] = [last]

    def ranges(self):
        return list(zip(self.firsts, self.lasts, strict=True))

    def __len__(self):
        return len(self.firsts)


def split_new(rows, held):
    """The rows whose reading is not in held (node_id -> RangeSet), each reading once (the first
    copy in rows wins), v1 rows all; and {node_id: [indices taken]}."""
    new = []
    taken = {}
    seen = set()
    for row in rows:
        node_id, index = row[0], row[1]
        if index is None:
            new.append(row)
            continue
        ranges = held.get(node_id)
        if ranges is not None and index in ranges:
            continue
        key = (node_id, index, row[3])
        if key in seen:
            continue
        seen.add(key)
        new.append(row)
        taken.setdefault(node_id, set()).add(index)
    return new, taken


def _add_indices(ranges, indices):
    run_first = run_last = None
    for i in sorted(indices):
        if run_last is not None and i == run_last + 1:
            run_last = i
            continue
        if run_first is not None:
            ranges.add(run_first, run_last)
        run_first = run_last = i
    if run_first is not None:
        ranges.add(run_first, run_last)


class SqlRanges:
    """The ranges table in a caller's SQLite connection, used inside the caller's transaction
    (the spool's): take(rows) reads the ranges of the rows' nodes, writes back the new ones and
    returns the rows not held before. Nothing is cached: a second process on the same file
    sees what the first committed."""

    def __init__(self, db):
        self.db = db
        db.execute(_RANGES_SCHEMA)

    def take(self, rows):
        db = self.db
        nodes = {row[0] for row in rows if row[1] is not None}
        held = {}
        for node_id in nodes:
            held[node_id] = RangeSet(
                db.execute("SELECT first, last FROM ranges WHERE node_id = ?", (node_id,))
            )
        new, taken = split_new(rows, held)
        for node_id, indices in taken.items():
            ranges = held[node_id]
            _add_indices(ranges, indices)
            db.execute("DELETE FROM ranges WHERE node_id = ?", (node_id,))
            db.executemany(
                "INSERT INTO ranges VALUES (?, ?, ?)",
                [(node_id, f, last) for f, last in ranges.ranges()],
            )
        return new


class MemoryLedger:
    """A ledger for a stream that has no file to keep one beside (a pipe, a terminal): copies
    are dropped while the process runs."""

    def __init__(self):
        self.held = {}

    def new_rows(self, rows):
        return split_new(rows, self.held)[0]

    def commit(self, rows, size=None):
        for node_id, indices in split_new(rows, {})[1].items():
            _add_indices(self.held.setdefault(node_id, RangeSet()), indices)

    def close(self):
        pass


class FileLedger(MemoryLedger):
    """A ledger in a SQLite file beside an append-only file: the ranges, and the size the file
    had after the last write recorded. Loaded whole at open (a few rows per node)."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.size = 0
        self.known = False  # a size was recorded before: the file's bytes past it are ours
        self.recovered = 0  # readings read back from lines past the recorded size
        self.unreadable = 0  # lines past the recorded size that do not parse (skipped)
        self.cut = 0  # bytes of a partial last line cut off by recover()
        # Nodes whose ranges in memory are not yet in the file (a commit that failed): written
        # by the next commit, which records a later size past the lines that hold them.
        self._unsaved = set()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_RANGES_SCHEMA)
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS file(id INTEGER PRIMARY KEY CHECK (id = 0), "
                "size INTEGER NOT NULL)"
            )
            for node_id, first, last in self._db.execute(
                "SELECT node_id, first, last FROM ranges"
            ):
                self.held.setdefault(node_id, RangeSet()).add(first, last)
            row = self._db.execute("SELECT size FROM file").fetchone()
            self.size = row[0] if row else 0
            self.known = row is not None
        except sqlite3.Error:
            self._db.close()
            raise

    def commit(self, rows, size=None):
        taken = split_new(rows, {})[1]
        for node_id, indices in taken.items():
            _add_indices(self.held.setdefault(node_id, RangeSet()), indices)
        nodes = self._unsaved | set(taken)
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for node_id in nodes:
                db.execute("DELETE FROM ranges WHERE node_id = ?", (node_id,))
                db.executemany(
                    "INSERT INTO ranges VALUES (?, ?, ?)",
                    [(node_id, f, last) for f, last in self.held[node_id].ranges()],
                )
            if size is not None:
                db.execute("INSERT OR REPLACE INTO file VALUES (0, ?)", (size,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._unsaved = nodes
            raise
        self._unsaved = set()
        if size is not None:
            self.size = size
            self.known = True

    def recover(self, path, ids_of_line, line_per_reading=False):
        """Read the lines of path past the recorded size (written, then a crash before the
        ledger's commit) into the ledger, line by line. ids_of_line(line) -> (node_id,
        reading_index or None); a line that does not parse is skipped (counted in
        `unreadable`). A file smaller than the recorded size was replaced: read whole.

        Those lines were never acked (the ack waits for the commit), so their node sends them
        again; what a crash may have cut short is cut off, to be written whole then (`cut`
        bytes): a last line without its newline, and, unless each line holds a whole reading
        (line_per_reading: InfluxDB points), the lines of the last reading, which may lack
        quantities that its held index would then drop for good. Only past the recorded size:
        bytes the ledger did not see written are never cut. Returns True when the file ends
        in a partial line that is not cut (no size recorded, or a replaced file): the next
        write must start with a newline."""
        with open(path, "r+b") as f:
            end = f.seek(0, 2)
            if self.known and end == self.size:  # nothing past it; a partial line not ours?
                if end:
                    f.seek(end - 1)
                    return f.read(1) != b"\n"
                return False
            ours = self.known and self.size < end
            start = self.size if ours else 0
            f.seek(start)
            whole = start  # the end of the last whole line
            last = None  # (node_id, index) of the last reading, where its lines begin
            last_at = start
            found = []
            for line in f:
                if not line.endswith(b"\n"):
                    break
                at, whole = whole, whole + len(line)
                try:
                    node_id, index = ids_of_line(line.decode("utf-8"))
                except (ValueError, KeyError, TypeError, AttributeError):
                    self.unreadable += 1
                    last = None
                    continue
                if index is None:
                    last = None
                    continue
                if (node_id, index) != last:
                    last, last_at = (node_id, index), at
                found.append((node_id, index))
            keep = whole
            if ours and last is not None and not line_per_reading:
                keep = last_at
                while found and found[-1] == last:
                    found.pop()
            for node_id, index in found:
                ranges = self.held.get(node_id)
                if ranges is None:
                    ranges = self.held[node_id] = RangeSet()
                ranges.add(index, index)
                self._unsaved.add(node_id)
            self.recovered = len(set(found))
            partial = end - whole
            if ours and keep < end:
                f.truncate(keep)
                os.fsync(f.fileno())
                self.cut = end - keep
                end = keep
        self.commit([], end)
        return bool(partial) and not ours

    def close(self):
        self._db.close()

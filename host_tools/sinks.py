# Sinks: where accepted readings go. Each write(rows) returns only once the rows are durable,
# because the receiver acks a frame to its node only after that (docs/ARCHITECTURE.md).
#
# A row is (node_id, ts, quantity, value): ts in unix seconds (UTC, float, millisecond
# resolution), quantity a name from protocols/frame.py CHANNELS, value in that quantity's unit.

import json
import os
import sqlite3
import stat

# Exactly this schema: the demo and other readers query it.
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS readings(node_id INTEGER, ts REAL /* unix seconds, UTC */, "
    "quantity TEXT, value REAL, PRIMARY KEY(node_id, ts, quantity))"
)
_COLUMNS = ["node_id", "ts", "quantity", "value"]


class SinkError(Exception):
    """A sink that cannot be opened or used as asked."""


class SqliteSink:
    """Readings in an SQLite file, table `readings`. A row already stored (same node, ts and
    quantity) is ignored, so writing the same rows twice is harmless."""

    def __init__(self, path):
        self.path = path
        try:
            # One receiver thread uses it at a time, not necessarily the one that opened it.
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode only synchronous=FULL makes each commit survive a power cut.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)
            columns = [row[1] for row in self._db.execute("PRAGMA table_info(readings)")]
        except sqlite3.Error as e:
            raise SinkError("%s: cannot open SQLite database: %s" % (path, e)) from None
        if columns != _COLUMNS:
            self._db.close()
            raise SinkError(
                "%s: table readings has columns %s, expected %s" % (path, columns, _COLUMNS)
            )

    def write(self, rows):
        """Insert rows in one transaction and commit; return how many were new."""
        db = self._db
        before = db.total_changes
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?)", rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT leaves it open
                db.execute("ROLLBACK")
            raise
        return db.total_changes - before

    def close(self):
        self._db.close()


class JsonlSink:
    """One JSON object per row on a text stream: {"node_id", "ts", "quantity", "value"}.
    A regular file is fsynced on every write; a pipe or terminal is only flushed."""

    def __init__(self, stream):
        self.stream = stream
        try:
            self._fsync = stat.S_ISREG(os.fstat(stream.fileno()).st_mode)
        except (AttributeError, OSError, ValueError):  # io.StringIO and the like
            self._fsync = False

    def write(self, rows):
        lines = []
        for node_id, ts, quantity, value in rows:
            row = {"node_id": node_id, "ts": ts, "quantity": quantity, "value": value}
            lines.append(json.dumps(row) + "\n")
        self.stream.write("".join(lines))
        self.stream.flush()
        if self._fsync:
            os.fsync(self.stream.fileno())
        return len(lines)

    def close(self):
        self.stream.flush()


class TeeSink:
    """Several sinks as one: rows are durable once every sink has them. Returns the first
    sink's count of new rows."""

    def __init__(self, sinks):
        if not sinks:
            raise SinkError("TeeSink needs at least one sink")
        self.sinks = list(sinks)

    def write(self, rows):
        counts = [sink.write(rows) for sink in self.sinks]
        return counts[0]

    def close(self):
        for sink in self.sinks:
            sink.close()

# Spool: readings on their way to remote sinks (webhook, MQTT, InfluxDB over HTTP), kept on disk
# so a frame can be acked before a remote end has confirmed it. The receiver writes it like any
# local sink (the ack waits for the commit); one forwarder per remote sink (host_tools/forward.py)
# reads through it with a progress mark of its own; rows every sink has passed are deleted.
#
# It is an SQLite file: WAL, synchronous=FULL (each commit survives a power cut), AUTOINCREMENT
# ids (never reused after a delete, so a progress mark stays meaningful). A full disk, or the
# optional size limit, makes write() raise SpoolFull: the frame is not acked and its node sends
# it again; what was spooled before stays.

import collections
import logging
import sqlite3
import threading

from host_tools.sinks import SinkError, is_disk_full

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spool(id INTEGER PRIMARY KEY AUTOINCREMENT, node_id INTEGER, "
    "ts REAL /* unix seconds, UTC */, quantity TEXT, value REAL)",
    "CREATE TABLE IF NOT EXISTS progress(sink TEXT PRIMARY KEY, last_id INTEGER NOT NULL)",
)
_BUSY_TIMEOUT_S = 30.0  # other threads hold the write lock for milliseconds at a time
_WAL_LIMIT = 64 << 20  # truncate the WAL back to this after a checkpoint


class SpoolFull(SinkError):
    """The spool cannot take more rows: the disk is full or the spool is at its size limit."""


class Spool:
    """The on-disk queue between the receiver and the remote sinks. Thread-safe: each thread
    gets its own SQLite connection. Sink interface: write(rows) -> count, durable on return."""

    def __init__(self, path, max_bytes=None, log=None):
        self.path = str(path)
        self.max_bytes = max_bytes
        self.log = log if log is not None else logging.getLogger("citynode.spool")
        self.counters = collections.Counter()
        self.consumers = []
        self._local = threading.local()
        self._conns = []
        self._conns_lock = threading.Lock()
        self._new_rows = threading.Condition()
        self._closed = False
        try:
            db = self._db()
            for statement in _SCHEMA:
                db.execute(statement)
            columns = [row[1] for row in db.execute("PRAGMA table_info(spool)")]
        except sqlite3.Error as e:
            self.close()
            raise SinkError("spool %s: cannot open: %s" % (self.path, e)) from None
        if columns != ["id", "node_id", "ts", "quantity", "value"]:
            self.close()
            raise SinkError("spool %s: table spool has columns %s" % (self.path, columns))

    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.path,
                isolation_level=None,
                timeout=_BUSY_TIMEOUT_S,
                check_same_thread=False,  # close() runs on another thread
            )
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                db.execute("PRAGMA journal_size_limit=%d" % _WAL_LIMIT)
                if self.max_bytes:
                    (page_size,) = db.execute("PRAGMA page_size").fetchone()
                    db.execute("PRAGMA max_page_count=%d" % max(2, self.max_bytes // page_size))
            except sqlite3.Error:
                db.close()
                raise
            self._local.db = db
            with self._conns_lock:
                self._conns.append(db)
        return db

    def _transaction(self, sql, args=None, many=False):
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            if many:
                db.executemany(sql, args)
            else:
                db.execute(sql, args or ())
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT leaves it open
                db.execute("ROLLBACK")
            raise

    # --- the receiver's side: a durable sink ---

    def write(self, rows):
        """Append rows in one transaction and commit (fsync); return how many. Raises SpoolFull
        (a SinkError) when the disk or the size limit is reached, nothing of rows written."""
        try:
            self._transaction(
                "INSERT INTO spool(node_id, ts, quantity, value) VALUES (?, ?, ?, ?)",
                rows,
                many=True,
            )
        except sqlite3.Error as e:
            if is_disk_full(e):
                self.counters["spool_full"] += 1
                limit = " or at its limit of %d bytes" % self.max_bytes if self.max_bytes else ""
                raise SpoolFull(
                    "spool %s: disk full%s (%s): %d readings not spooled"
                    % (self.path, limit, e, len(rows))
                ) from None
            self.counters["spool_error"] += 1
            raise
        self.counters["rows_spooled"] += len(rows)
        with self._new_rows:
            self._new_rows.notify_all()
        return len(rows)

    def wait(self, timeout):
        """Block until rows are written (or timeout seconds pass)."""
        with self._new_rows:
            self._new_rows.wait(timeout)

    def wake(self):
        """Wake every wait() (at shutdown)."""
        with self._new_rows:
            self._new_rows.notify_all()

    # --- the forwarders' side ---

    def register(self, name):
        """Add a consumer (a remote sink's stable name). One seen for the first time starts after
        the rows already spooled: it gets readings accepted from now on."""
        db = self._db()
        row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()
        self._transaction(
            "INSERT OR IGNORE INTO progress(sink, last_id) VALUES (?, ?)",
            (name, row[0] if row else 0),
        )
        if name not in self.consumers:
            self.consumers.append(name)

    def read(self, name, limit):
        """Up to limit rows (id, node_id, ts, quantity, value) the consumer has not passed yet,
        oldest first."""
        return (
            self._db()
            .execute(
                "SELECT id, node_id, ts, quantity, value FROM spool WHERE id > "
                "(SELECT last_id FROM progress WHERE sink = ?) ORDER BY id LIMIT ?",
                (name, limit),
            )
            .fetchall()
        )

    def advance(self, name, last_id):
        """Record that the consumer has delivered every row up to last_id."""
        self._transaction("UPDATE progress SET last_id = ? WHERE sink = ?", (last_id, name))

    def prune(self):
        """Delete the rows every registered consumer has passed; return how many."""
        if not self.consumers:
            return 0
        db = self._db()
        marks = ",".join("?" * len(self.consumers))
        (floor,) = db.execute(
            "SELECT min(last_id) FROM progress WHERE sink IN (%s)" % marks, self.consumers
        ).fetchone()
        if floor is None:
            return 0
        before = db.total_changes
        self._transaction("DELETE FROM spool WHERE id <= ?", (floor,))
        return db.total_changes - before

    def backlog(self, name):
        """How many rows the consumer has still to deliver."""
        (count,) = (
            self._db()
            .execute(
                "SELECT count(*) FROM spool WHERE id > "
                "(SELECT last_id FROM progress WHERE sink = ?)",
                (name,),
            )
            .fetchone()
        )
        return count

    def close(self):
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for db in conns:
            try:
                db.close()
            except sqlite3.Error:  # pragma: no cover - closing never fails in practice
                pass
        self._local = threading.local()

# Spool: readings on their way to remote sinks (webhook, MQTT, InfluxDB over HTTP), kept on disk
# so a frame can be acked before a remote end has confirmed it. The receiver writes it like any
# local sink (the ack waits for the commit); one forwarder per remote sink
# (host_tools/receive/forward.py) reads through it with a progress mark of its own; rows every sink
# has passed are deleted.
#
# It is an SQLite file: WAL, synchronous=FULL (each commit survives a power cut), AUTOINCREMENT
# ids (never reused after a delete, so a progress mark stays meaningful). A full disk, or the
# optional size limit, makes write() raise SpoolFull: the frame is not acked and its node sends
# it again; what was spooled before stays.
#
# Dead letters: rows a remote end refused for good (an HTTP 4xx but 408 and 429: a bad token, a
# wrong URL, a payload it will never take) are not retried forever: the forwarder moves the
# batch to the table `dead` (per sink, with the error and the server's answer), counts and logs
# it, and carries on with the next batch. Nothing is lost: once the cause is fixed, an operator
# puts them back in the queue of that sink alone (the other sinks have them) with the receiver
# running or not, the sink named as in the log and the status file:
#   python -c "from host_tools.receive.spool import Spool
#   print(Spool('citynode-spool.db').requeue('webhook https://example.org/readings'))"
# Spool.dead_letters() lists them. They count towards the size limit until queued again.

import collections
import logging
import sqlite3
import threading
import time

from host_tools.receive.interfaces import Sink
from host_tools.receive.ledger import SqlRanges
from host_tools.receive.sinks import SinkError, is_disk_full

_SCHEMA = (
    # sink: NULL for a row every consumer delivers; a consumer's name for a dead letter put back
    # in that consumer's queue alone (requeue)
    "CREATE TABLE IF NOT EXISTS spool(id INTEGER PRIMARY KEY AUTOINCREMENT, node_id INTEGER, "
    "reading_index INTEGER, ts REAL /* unix seconds, UTC */, quantity TEXT, value REAL, "
    "sink TEXT)",
    "CREATE TABLE IF NOT EXISTS progress(sink TEXT PRIMARY KEY, last_id INTEGER NOT NULL)",
    # rows a sink refused for good; id is the row's id in the spool, error what the sink said
    "CREATE TABLE IF NOT EXISTS dead(sink TEXT NOT NULL, id INTEGER NOT NULL, "
    "node_id INTEGER, reading_index INTEGER, ts REAL, quantity TEXT, value REAL, "
    "reason TEXT NOT NULL, error TEXT NOT NULL, time REAL NOT NULL /* unix seconds, UTC */, "
    "PRIMARY KEY(sink, id))",
)
_COLUMNS = ["id", "node_id", "reading_index", "ts", "quantity", "value", "sink"]
# the rows past a consumer's mark that are its to deliver
_MINE = "id > (SELECT last_id FROM progress WHERE sink = ?1) AND (sink IS NULL OR sink = ?1)"
_BUSY_TIMEOUT_S = 30.0  # other threads hold the write lock for milliseconds at a time
_WAL_LIMIT = 64 << 20  # truncate the WAL back to this after a checkpoint


class SpoolFull(SinkError):
    """The spool cannot take more rows: the disk is full or the spool is at its size limit."""


class Spool(Sink):
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
        if columns == ["id", "node_id", "ts", "quantity", "value"]:
            self.close()
            raise SinkError(
                "spool %s: made by an older citynode (no reading_index column): let that "
                "version deliver it, or move it away to start a new spool" % self.path
            )
        if columns != _COLUMNS:
            self.close()
            raise SinkError("spool %s: table spool has columns %s" % (self.path, columns))
        try:
            SqlRanges(self._db())  # creates the ledger table
        except sqlite3.Error as e:
            self.close()
            raise SinkError("spool %s: cannot open: %s" % (self.path, e)) from None

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
        """Append the rows of readings not spooled before (the ledger of reading identities
        in the same file, the same transaction) and commit (fsync); return how many were new.
        Raises SpoolFull (a SinkError) when the disk or the size limit is reached, nothing of
        rows written."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                new = SqlRanges(db).take(rows)
                db.executemany(
                    "INSERT INTO spool(node_id, reading_index, ts, quantity, value) "
                    "VALUES (?, ?, ?, ?, ?)",
                    new,
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a failed COMMIT leaves it open
                    db.execute("ROLLBACK")
                raise
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
        self.counters["rows_spooled"] += len(new)
        if len(new) < len(rows):
            self.counters["rows_already_spooled"] += len(rows) - len(new)
        with self._new_rows:
            self._new_rows.notify_all()
        return len(new)

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
        """Up to limit rows (id, node_id, reading_index, ts, quantity, value) the consumer has
        not passed yet, oldest first."""
        return (
            self._db()
            .execute(
                "SELECT id, node_id, reading_index, ts, quantity, value FROM spool WHERE "
                + _MINE
                + " ORDER BY id LIMIT ?2",
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
            self._db().execute("SELECT count(*) FROM spool WHERE " + _MINE, (name,)).fetchone()
        )
        return count

    # --- dead letters ---

    def dead_letter(self, name, rows, reason, error, now=None):
        """Move rows (as read(): id first) the consumer's sink refused for good to the dead
        letters, and its mark past them, in one transaction."""
        now = time.time() if now is None else now
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(
                "INSERT OR IGNORE INTO dead VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(name, *row, reason, error, now) for row in rows],
            )
            db.execute(
                "UPDATE progress SET last_id = max(last_id, ?) WHERE sink = ?",
                (max(row[0] for row in rows), name),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.counters["rows_dead"] += len(rows)

    def dead_count(self, name):
        """How many of the consumer's rows are in the dead letters."""
        (count,) = (
            self._db().execute("SELECT count(*) FROM dead WHERE sink = ?", (name,)).fetchone()
        )
        return count

    def dead_letters(self):
        """{sink: {"rows", "first", "last" (unix times), "reason", "error" (the latest)}}."""
        out = {}
        for name, rows, first, last in self._db().execute(
            "SELECT sink, count(*), min(time), max(time) FROM dead GROUP BY sink ORDER BY sink"
        ):
            reason, error = (
                self._db()
                .execute(
                    "SELECT reason, error FROM dead WHERE sink = ? ORDER BY time DESC, id DESC",
                    (name,),
                )
                .fetchone()
            )
            out[name] = {
                "rows": rows,
                "first": first,
                "last": last,
                "reason": reason,
                "error": error,
            }
        return out

    def requeue(self, name):
        """Put the consumer's dead letters back in its queue (its alone: the other sinks have
        those readings), oldest first, after what is spooled; return how many. Raises
        SinkError for a name the spool has no consumer of."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM progress WHERE sink = ?", (name,)).fetchone() is None:
                known = [r[0] for r in db.execute("SELECT sink FROM progress ORDER BY sink")]
                raise SinkError(
                    "spool %s: no sink named %r; its sinks: %s"
                    % (self.path, name, ", ".join(map(repr, known)) or "none")
                )
            cur = db.execute(
                "INSERT INTO spool(node_id, reading_index, ts, quantity, value, sink) "
                "SELECT node_id, reading_index, ts, quantity, value, sink FROM dead "
                "WHERE sink = ? ORDER BY id",
                (name,),
            )
            count = cur.rowcount
            db.execute("DELETE FROM dead WHERE sink = ?", (name,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.log.info("spool %s: %d dead letters of %s queued again", self.path, count, name)
        with self._new_rows:
            self._new_rows.notify_all()
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

# Sinks: where accepted readings go. Each write(rows) returns only once the rows are durable,
# because the receiver acks a frame to its node only after that (the team's design notes,
# ../shared/docs/ARCHITECTURE.md: "Lines not to cross").
#
# A row is (node_id, reading_index, ts, quantity, value): reading_index the node's counter of
# readings (frame format v2: with node_id, the reading's identity; None for a v1 frame, which
# carries none), ts in unix seconds (UTC, float, millisecond resolution), quantity a name from
# protocols/uplink.py CHANNELS, value in that quantity's unit.
#
# Identity: every sink stores a reading once under (node_id, reading_index), whenever and
# however often a copy arrives (a frame re-sent after a lost ack, heard by two gateways,
# replayed, released late, received by two receivers): the copy is dropped and the first
# accepted timestamp stands. SQLite has it as a unique key; the spool keeps the index ranges it
# has taken (host_tools/receive/ledger.py) in the same transaction as the rows; the JSON-lines and
# InfluxDB files keep them in a ledger file beside them.
#
# Two kinds of sink (host_tools/receive/interfaces.py Sink and RemoteSink). Local ones (SQLite,
# JSON lines, an InfluxDB line-protocol file) have write(rows) and are written before the ack.
# Remote ones (HTTP webhook, InfluxDB over HTTP, and MQTT in host_tools/receive/mqtt.py) have
# deliver(rows) and a stable `name`: the receiver never waits for them; readings go to the
# on-disk spool (host_tools/receive/spool.py) and host_tools/receive/forward.py delivers them,
# retrying until the remote end confirms, or moving a batch it refuses for good (an HTTP 4xx) to
# the spool's dead letters. Delivery is at least once;
# every reading carries its id (reading_id: "node_id/reading_index/quantity") so the backend drops
# the copies a retry may bring: exactly once from its point of view. A remote sink's `name` (logs,
# the status file) never shows the credentials of its URL.

import base64
import datetime
import email.utils
import errno
import http.client
import json
import logging
import os
import re
import socket
import sqlite3
import stat
import time
import urllib.parse

from host_tools.receive.interfaces import RemoteSink, Sink
from host_tools.receive.ledger import FileLedger, MemoryLedger
from host_tools.utc import iso_utc

log = logging.getLogger("citynode.sinks")

SCHEMA_VERSION = 2  # PRAGMA user_version of the SQLite sink's file
# Exactly this schema: the demo and other readers query it. A v2 reading is unique by
# (node_id, reading_index, quantity); a v1 reading (reading_index NULL) by (node_id, ts, quantity).
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS readings(node_id INTEGER NOT NULL, reading_index INTEGER, "
    "ts REAL NOT NULL /* unix seconds, UTC */, quantity TEXT NOT NULL, value REAL NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS readings_identity "
    "ON readings(node_id, reading_index, quantity)",
    "CREATE UNIQUE INDEX IF NOT EXISTS readings_v1 "
    "ON readings(node_id, ts, quantity) WHERE reading_index IS NULL",
    # A reading whose identity is taken by a reading of another value: the node's count
    # restarted (its journal erased, or its id given to another board). Kept here, not lost.
    "CREATE TABLE IF NOT EXISTS readings_conflicts(node_id INTEGER NOT NULL, "
    "reading_index INTEGER NOT NULL, ts REAL NOT NULL, quantity TEXT NOT NULL, "
    "value REAL NOT NULL, stored_value REAL NOT NULL)",
)
_COLUMNS = ["node_id", "reading_index", "ts", "quantity", "value"]
_COLUMNS_V1 = ["node_id", "ts", "quantity", "value"]


class SinkError(Exception):
    """A sink that cannot be opened or used as asked."""


# v1 frames only (they carry no reading index): a reading a node sends again (its ack was lost)
# comes under a new seq with its age counted anew: whole seconds, relative to the new sending,
# so its timestamp can differ from the first copy's by up to 1 s plus the difference in
# latency. Within this of a stored row of the same node and quantity, with the same value, it
# is that row (SPEC.md "Readings sent again, v1"): nodes sample far less often than every 3 s.
RESENT_WITHIN_S = 1.5

_INSERT_V1 = (
    "INSERT OR IGNORE INTO readings SELECT ?1, NULL, ?2, ?3, ?4 WHERE NOT EXISTS ("
    "SELECT 1 FROM readings WHERE node_id = ?1 AND reading_index IS NULL "
    "AND ts BETWEEN ?2 - %s AND ?2 + %s AND quantity = ?3 AND value = ?4)"
    % (RESENT_WITHIN_S, RESENT_WITHIN_S)
)
_INSERT = "INSERT OR IGNORE INTO readings VALUES (?, ?, ?, ?, ?)"


class SqliteSink(Sink):
    """Readings in an SQLite file, table `readings`. A reading already stored (the same node,
    reading index and quantity) is ignored, so writing the same rows twice is harmless, from one
    receiver or several on the same file. A file of schema 1 (before reading identities) is
    upgraded in place, in one transaction, its rows kept with reading_index NULL."""

    def __init__(self, path):
        self.path = path
        self.upgraded = 0  # v1 rows carried over by an upgrade on open
        # Several receivers may open one file at once (they share it: every reading once): the
        # switch to WAL and the schema check take locks that SQLite's busy timeout does not
        # always wait for, so a "locked" open is tried again for up to OPEN_WAIT_S.
        deadline = time.monotonic() + self.OPEN_WAIT_S
        while True:
            try:
                self._open()
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise SinkError("%s: cannot open SQLite database: %s" % (path, e)) from None
                time.sleep(0.05)
            except sqlite3.Error as e:
                raise SinkError("%s: cannot open SQLite database: %s" % (path, e)) from None

    OPEN_WAIT_S = 30.0

    def _open(self):
        # One receiver thread uses it at a time, not necessarily the one that opened it.
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        try:
            if self._db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                self._db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode only synchronous=FULL makes each commit survive a power cut.
            self._db.execute("PRAGMA synchronous=FULL")
            self._open_schema()
        except BaseException:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            raise

    def _columns(self):
        return [row[1] for row in self._db.execute("PRAGMA table_info(readings)")]

    def _open_schema(self):
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            columns = self._columns()
            if columns == _COLUMNS_V1:
                db.execute("ALTER TABLE readings RENAME TO readings_schema1")
                for statement in SCHEMA:
                    db.execute(statement)
                cur = db.execute(
                    "INSERT INTO readings SELECT node_id, NULL, ts, quantity, value "
                    "FROM readings_schema1"
                )
                self.upgraded = cur.rowcount
                db.execute("DROP TABLE readings_schema1")
            elif columns and columns != _COLUMNS:
                raise SinkError(
                    "%s: table readings has columns %s, expected %s"
                    % (self.path, columns, _COLUMNS)
                )
            else:
                for statement in SCHEMA:
                    db.execute(statement)
            db.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            db.close()
            raise

    def write(self, rows):
        """Insert rows in one transaction and commit; return how many were new. A reading
        whose identity is already stored with another value is kept in readings_conflicts and
        counted in `conflicts` (the node's reading count restarted: see SPEC.md "Identity")."""
        db = self._db
        v1 = [(n, ts, q, v) for n, i, ts, q, v in rows if i is None]
        v2 = rows if not v1 else [r for r in rows if r[1] is not None]
        before = db.total_changes
        self._last_conflicts = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            if v2:
                db.executemany(_INSERT, v2)
                if db.total_changes - before < len(v2):  # copies, or a count restarted
                    self._keep_conflicts(v2)
            if v1:
                db.executemany(_INSERT_V1, v1)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # a failed COMMIT leaves it open
                db.execute("ROLLBACK")
            raise
        return db.total_changes - before - self._last_conflicts

    _last_conflicts = 0
    conflicts = 0

    def _keep_conflicts(self, rows):
        """Rows not inserted whose stored reading has another value: into readings_conflicts.
        Only batches with copies pay for this (a node's re-sent frame: one range query)."""
        db = self._db
        spans = {}
        for n, i, _, _, _ in rows:
            lo, hi = spans.get(n, (i, i))
            spans[n] = (min(lo, i), max(hi, i))
        stored = {}
        for n, (lo, hi) in spans.items():
            for i, q, v, ts in db.execute(
                "SELECT reading_index, quantity, value, ts FROM readings "
                "WHERE node_id = ? AND reading_index BETWEEN ? AND ?",
                (n, lo, hi),
            ):
                stored[(n, i, q)] = (v, ts)
        # a reading (all its quantities) conflicts if any of its values differs from the stored
        differ = {
            (n, i)
            for n, i, _, q, v in rows
            if (n, i, q) in stored and abs(stored[(n, i, q)][0] - v) > 1e-9 * max(1.0, abs(v))
        }
        conflicts = [
            (n, i, ts, q, v, stored[(n, i, q)][0])
            for n, i, ts, q, v in rows
            if (n, i) in differ and (n, i, q) in stored
        ]
        if conflicts:
            db.executemany("INSERT INTO readings_conflicts VALUES (?, ?, ?, ?, ?, ?)", conflicts)
            self.conflicts += len(conflicts)
        self._last_conflicts = len(conflicts)

    def close(self):
        self._db.close()


def reading_id(node_id, reading_index, ts, quantity):
    """The stable id of a reading: "17/40312/temperature_c" (node, reading index, quantity).
    A v1 reading has no index: "17/1700000000.250/temperature_c" (its ts, fixed when the frame
    was accepted, with three decimals)."""
    if reading_index is None:
        return "%d/%.3f/%s" % (node_id, ts, quantity)
    return "%d/%d/%s" % (node_id, reading_index, quantity)


def reading_json(row):
    """The JSON object of one reading in webhook and MQTT payloads and JSON lines."""
    node_id, reading_index, ts, quantity, value = row
    return {
        "id": reading_id(node_id, reading_index, ts, quantity),
        "node_id": node_id,
        "reading_index": reading_index,
        "ts": ts,
        "time": iso_utc(ts),
        "quantity": quantity,
        "value": value,
    }


class _AppendFile:
    """An append-only text file that is written whole or not at all, with a ledger of the
    readings it holds. The lines go to the file descriptor with os.write, not through the
    stream's buffer: a write that fails (a full disk, a failed fsync) is cut back to where it
    began and leaves nothing behind, neither a partial line in the file nor bytes in a buffer
    that a later flush would write beside the retry. The ledger (FileLedger, SQLite beside the
    file) is committed after the fsync, recording the file's size, and on open the lines past
    that size (a crash between the two) are read back into it. A stream that is not a regular
    file (a pipe, a terminal, io.StringIO) is written through, flushed, with the ledger in
    memory."""

    def __init__(self, stream, ledger, ids_of_line, what, line_per_reading=False):
        self.stream = stream
        self.ledger = ledger
        self.what = what
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self._fd = None
        try:
            fd = stream.fileno()
            if stat.S_ISREG(os.fstat(fd).st_mode):
                self._fd = fd
        except (AttributeError, OSError, ValueError):  # io.StringIO and the like
            pass
        self._cut_to = None  # where a failed write's bytes begin when cutting them back failed
        self._unrecorded = None  # the file's size after a write whose ledger commit failed
        self._newline = False  # the file ends in a partial line not ours: start with "\n"
        if self._fd is not None and isinstance(ledger, FileLedger):
            try:
                self._newline = ledger.recover(stream.name, ids_of_line, line_per_reading)
            except (OSError, sqlite3.Error) as e:
                raise SinkError(
                    "%s: cannot read it back into its ledger: %s" % (what, e)
                ) from None
            if ledger.recovered or ledger.cut or ledger.unreadable:
                log.warning(
                    "%s: %d readings written after the ledger's last record read back into it, "
                    "%d lines that do not parse skipped, %d bytes cut (a write a crash may have "
                    "cut short, never acked: written again when its node sends it again)",
                    what,
                    ledger.recovered,
                    ledger.unreadable,
                    ledger.cut,
                )

    def append(self, rows, render):
        """Append the lines of the rows not already held; return how many rows were new."""
        if self._unrecorded is not None:  # lines whose ledger commit failed: record them first
            self.ledger.commit([], self._unrecorded)  # raises: no ack, not even for copies
            self._unrecorded = None
        new = self.ledger.new_rows(rows)
        if not new:
            return 0
        text = render(new)
        fd = self._fd
        if fd is None:
            self.stream.write(text)
            self.stream.flush()
            self.ledger.commit(new)
            return len(new)
        if self._cut_to is not None:  # a failed write is still in the file: cut it first
            try:
                self._truncate(self._cut_to)
            except OSError as e:
                raise SinkError(
                    "%s: cannot cut back a failed write (%s): nothing written"
                    % (self.what, e.strerror or e)
                ) from None
            self._cut_to = None
        data = text.encode(self.encoding)
        self.stream.flush()  # anything written through the stream goes first
        start = os.lseek(fd, 0, os.SEEK_END)
        if self._newline and start:
            data = b"\n" + data
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n <= 0:  # pragma: no cover - a regular file never takes nothing
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[n:]
            os.fsync(fd)
        except BaseException:
            self._cut(start)
            raise
        self._newline = False
        try:
            self.ledger.commit(new, start + len(data))
        except BaseException:
            # The rows are in the file and held in memory, not yet in the ledger's file: no
            # ack until they are (a restart reads them back, or cuts the last reading, which
            # is safe only while it has not been acked).
            self._unrecorded = start + len(data)
            raise
        return len(new)

    def _truncate(self, size):
        fd = self._fd
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.lseek(fd, size, os.SEEK_SET)  # a stream not opened for appending writes here

    def _cut(self, size):
        try:
            self._truncate(size)
        except OSError as e:
            self._cut_to = size  # the next write cuts first, or writes nothing
            log.error(
                "%s: cannot cut back a failed write to %d bytes: %s; the next write will try "
                "again first",
                self.what,
                size,
                e.strerror or e,
            )

    def close(self):
        try:
            self.stream.flush()
        finally:
            self.ledger.close()


def _ledger_for(stream, what):
    """A FileLedger beside a regular file (<file>.ledger), else one in memory. Standard output
    sent to a file has no name to put a ledger beside ("<stdout>"): in memory."""
    name = getattr(stream, "name", None)
    try:
        st = os.fstat(stream.fileno())
        named = os.stat(name) if isinstance(name, str) else None
    except (AttributeError, OSError, ValueError):
        return MemoryLedger()
    if (
        named is None
        or not stat.S_ISREG(st.st_mode)
        or (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino)
    ):
        return MemoryLedger()
    path = name + ".ledger"
    try:
        return FileLedger(path)
    except sqlite3.Error as e:
        raise SinkError("%s: cannot open its ledger %s: %s" % (what, path, e)) from None


def _jsonl_ids(line):
    row = json.loads(line)
    index = row.get("reading_index")
    return int(row["node_id"]), None if index is None else int(index)


class JsonlSink(Sink):
    """One JSON object per reading on a text stream (reading_json: id, node_id, reading_index,
    ts, time, quantity, value). A regular file is fsynced on every write and has a ledger
    beside it (<file>.ledger), so a reading is in it once; a pipe or terminal is only flushed,
    with the ledger in memory."""

    def __init__(self, stream, ledger=None):
        self.stream = stream
        what = "--jsonl %s" % getattr(stream, "name", "stream")
        if ledger is None:
            ledger = _ledger_for(stream, what)
        try:
            self._file = _AppendFile(stream, ledger, _jsonl_ids, what)
        except BaseException:
            ledger.close()
            raise

    def write(self, rows):
        return self._file.append(
            rows, lambda new: "".join(json.dumps(reading_json(r)) + "\n" for r in new)
        )

    def close(self):
        self._file.close()


class TeeSink(Sink):
    """Several sinks as one: rows are durable once every sink has them. Returns the first
    sink's count of new rows."""

    def __init__(self, sinks):
        if not sinks:
            raise SinkError("TeeSink needs at least one sink")
        self.sinks = list(sinks)

    def write(self, rows):
        counts = [sink.write(rows) for sink in self.sinks]
        return counts[0]

    @property
    def conflicts(self):
        return sum(getattr(sink, "conflicts", 0) for sink in self.sinks)

    def close(self):
        for sink in self.sinks:
            sink.close()


class DeliveryError(Exception):
    """A remote sink did not confirm a delivery. `reason` is a snake_case code to count by
    (connect, timeout, http_500, io, ...); str() says exactly what happened. `permanent`: the
    remote end refused these rows for good (an HTTP 4xx but 408 and 429), so sending them
    again is pointless: the forwarder moves them to the spool's dead letters. `retry_after`:
    seconds the remote end asked to wait before the next attempt (HTTP Retry-After), or None."""

    def __init__(self, reason, message, permanent=False, retry_after=None):
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent
        self.retry_after = retry_after


def is_disk_full(e):
    """True for the errors a full disk (or a spool at its size limit) raises."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    code = getattr(e, "sqlite_errorcode", None)
    return code is not None and code == sqlite3.SQLITE_FULL


# --- InfluxDB line protocol --------------------------------------------------------------

INFLUX_MEASUREMENT = "citynode"


def _influx_escape(text, specials):
    if not text:
        raise ValueError("line protocol names and tag values cannot be empty")
    if "\n" in text or "\\" in text:  # no newline at all; a backslash would need its own rules
        raise ValueError("line protocol name or tag value with a newline or backslash: %r" % text)
    for c in specials:
        text = text.replace(c, "\\" + c)
    return text


def _influx_value(value):
    if isinstance(value, int) and not isinstance(value, bool):
        return "%di" % value  # an integer field
    return repr(float(value))


def influx_line(measurement, tags, fields, ts_ns):
    """One line of InfluxDB line protocol (no newline): measurement, tags (sorted, as InfluxDB
    prefers), fields (floats; ints as integer fields), integer nanosecond timestamp. Escaping
    as the reference says: comma and space in the measurement; comma, equals sign and space in
    tag keys, tag values and field keys. Names with a newline or a backslash are refused
    (ValueError)."""
    parts = [_influx_escape(measurement, ", ")]
    for key in sorted(tags):
        parts.append(
            ",%s=%s" % (_influx_escape(key, ",= "), _influx_escape(str(tags[key]), ",= "))
        )
    field_text = ",".join(
        "%s=%s" % (_influx_escape(key, ",= "), _influx_value(value))
        for key, value in sorted(fields.items())
    )
    if not field_text:
        raise ValueError("a line protocol point needs at least one field")
    return "%s %s %d" % ("".join(parts), field_text, ts_ns)


def influx_lines(rows, measurement=INFLUX_MEASUREMENT):
    """Rows as line protocol, one point per reading with one field per quantity, and the
    reading's index as an integer field (not a tag: a tag per reading would be a series per
    reading): `citynode,node_id=17 humidity_pct=45.0,reading_index=40312i,temperature_c=21.5
    1700000000250000000`. Writing a point again overwrites it in InfluxDB (same series and
    time), so retries are idempotent; copies sent later never reach it (the ledgers)."""
    points = {}
    for node_id, reading_index, ts, quantity, value in rows:
        fields = points.setdefault((node_id, round(ts * 1000)), {})
        fields[quantity] = float(value)
        if reading_index is not None:
            fields["reading_index"] = reading_index
    return [
        influx_line(measurement, {"node_id": node_id}, fields, ts_ms * 1_000_000)
        for (node_id, ts_ms), fields in points.items()
    ]


_INFLUX_IDS = re.compile(r"[,]node_id=(\d+)[ ,].*?\breading_index=(\d+)i\b")


def _influx_ids(line):
    m = _INFLUX_IDS.search(line)
    if m is None:
        raise ValueError("no node_id and reading_index")
    return int(m.group(1)), int(m.group(2))


class InfluxFileSink(Sink):
    """Line protocol appended to a file (for Telegraf's tail input or `influx write`), fsynced
    on every write: a local, durable sink written before the ack, each reading once (a ledger
    beside the file, <file>.ledger)."""

    def __init__(self, path, measurement=INFLUX_MEASUREMENT):
        self.path = path
        self.measurement = measurement
        try:
            stream = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise SinkError("--influx %s: %s" % (path, e.strerror or e)) from None
        what = "--influx %s" % path
        try:
            ledger = _ledger_for(stream, what)
        except BaseException:
            stream.close()
            raise
        try:
            self._file = _AppendFile(stream, ledger, _influx_ids, what, line_per_reading=True)
        except BaseException:
            ledger.close()
            stream.close()
            raise

    def write(self, rows):
        return self._file.append(
            rows,
            lambda new: "".join(line + "\n" for line in influx_lines(new, self.measurement)),
        )

    def close(self):
        try:
            self._file.close()
        finally:
            self._file.stream.close()


# --- HTTP sinks ---------------------------------------------------------------------------


# An answer is read whole, so that the kept-alive connection is ready for the next request;
# past this size the rest is not worth reading: the connection is dropped instead.
ANSWER_MAX = 1 << 20  # bytes
_EXCERPT = 200  # characters of an error answer quoted in the message
# Query parameters whose values are credentials (InfluxDB 1.x takes u= and p=): shown as ***.
_SECRET_PARAMS = {
    "p",
    "password",
    "pass",
    "pwd",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "key",
    "secret",
    "auth",
    "sig",
    "signature",
}


def redact_url(url):
    """The URL as it may be shown (logs, sink names, the status file): without user and
    password, and with the values of credential-like query parameters as ***."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<a URL that does not parse>"
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            query = "&".join(
                "%s=%s"
                % (
                    urllib.parse.quote(k, safe=""),
                    "***" if k.lower() in _SECRET_PARAMS else urllib.parse.quote(v, safe=""),
                )
                for k, v in pairs
            )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def retry_after_s(value, now):
    """Seconds to wait from a Retry-After header (RFC 9110 section 10.2.3: delay-seconds or an
    HTTP-date) at unix time now, at least 0; None if it is neither."""
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, as HTTP-dates are
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - now)


class HttpPoster:
    """POSTs bodies to one URL over a kept-alive connection (http.client), each request bounded
    by `timeout` seconds for connecting and for every read. Raises DeliveryError on anything but
    a 2xx answer; the connection is dropped after an error and made again on the next post.

    Every answer is read to its end (up to ANSWER_MAX bytes; a longer one, or one that cannot
    be read, drops the connection): a 2xx answer confirms the delivery by its status line
    whatever its body does. 4xx answers but 408 and 429 are permanent (DeliveryError.permanent);
    429 and 503 carry their Retry-After. User and password in the URL are sent as HTTP Basic
    authentication and never shown: `url` is the redacted URL, used in every message."""

    def __init__(self, what, url, timeout=10.0, headers=None, clock=time.time):
        shown = redact_url(url)
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as e:
            raise SinkError("%s: bad URL %r: %s" % (what, shown, e)) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SinkError("%s: expected an http:// or https:// URL, got %r" % (what, shown))
        try:
            port = parts.port
        except ValueError:
            raise SinkError("%s: bad port in %r" % (what, shown)) from None
        self.what = what
        self.url = shown
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = port
        self.path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        self.timeout = timeout
        self.headers = dict(headers or {})
        self.clock = clock
        # what an answer echoing the request must not bring into a message
        self._secrets = []
        for pair in parts.query.split("&"):
            key, _, raw = pair.partition("=")
            if urllib.parse.unquote_plus(key).lower() in _SECRET_PARAMS and len(raw) >= 4:
                self._secrets += [raw, urllib.parse.unquote_plus(raw)]  # as sent, as meant
        if parts.password:
            self._secrets.append(parts.password)
            self._secrets.append(urllib.parse.unquote(parts.password))
        if parts.username is not None or parts.password is not None:
            if any(k.lower() == "authorization" for k in self.headers):
                raise SinkError(
                    "%s: %s: a user and password in the URL and another Authorization too "
                    "(a token?): give one" % (what, shown)
                )
            user = urllib.parse.unquote(parts.username or "")
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(("%s:%s" % (user, password)).encode("utf-8")).decode()
            self.headers["Authorization"] = "Basic " + token
        for k, v in self.headers.items():
            if k.lower() == "authorization":
                self._secrets.append(v.partition(" ")[2] or v)
        self._conn = None

    def _connection(self):
        if self._conn is None:
            cls = (
                http.client.HTTPSConnection
                if self.scheme == "https"
                else http.client.HTTPConnection
            )
            self._conn = cls(self.host, self.port, timeout=self.timeout)
        return self._conn

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _read_answer(self, response):
        """The answer's first bytes (for an error's excerpt), having read it to its end; the
        connection is dropped when the answer cannot be read whole, or need not be kept."""
        head = b""
        total = 0
        deadline = time.monotonic() + self.timeout
        try:
            while True:
                chunk = response.read(64 * 1024)
                if not chunk:
                    break
                if len(head) < 4 * _EXCERPT:
                    head += chunk[: 4 * _EXCERPT - len(head)]
                total += len(chunk)
                if total > ANSWER_MAX or time.monotonic() > deadline:
                    self.close()  # the rest is not worth waiting for
                    return head
        except (OSError, http.client.HTTPException):
            self.close()
            return head
        if response.will_close:
            self.close()
        return head

    def post(self, body, content_type):
        headers = dict(self.headers, **{"Content-Type": content_type})
        try:
            conn = self._connection()
            conn.request("POST", self.path, body=body, headers=headers)
            response = conn.getresponse()
        except (TimeoutError, socket.timeout):
            self.close()
            raise DeliveryError(
                "timeout", "%s: no answer within %.1f s" % (self.url, self.timeout)
            ) from None
        except ConnectionRefusedError:
            self.close()
            raise DeliveryError("connect", "%s: connection refused" % self.url) from None
        except (OSError, http.client.HTTPException) as e:
            self.close()
            text = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise DeliveryError("io", "%s: %s" % (self.url, text)) from None
        answer = self._read_answer(response)
        status = response.status
        if 200 <= status < 300:
            return
        self.close()
        excerpt = answer.decode("utf-8", "replace")
        for secret in self._secrets:
            excerpt = excerpt.replace(secret, "***")
        excerpt = excerpt.strip().replace("\n", " ")[:_EXCERPT]
        notes = []
        retry_after = None
        if status in (429, 503):
            value = response.getheader("Retry-After")
            if value is not None:
                retry_after = retry_after_s(value, self.clock())
                if retry_after is None:
                    notes.append("Retry-After %r not understood" % value[:40])
                else:
                    notes.append("Retry-After %.0f s" % retry_after)
        if 300 <= status < 400:
            location = response.getheader("Location")
            notes.append(
                "redirects are not followed: give the URL it points to"
                + (", %s" % redact_url(location) if location else "")
            )
        raise DeliveryError(
            "http_%d" % status,
            "%s: HTTP %d %s%s%s"
            % (
                self.url,
                status,
                response.reason,
                " (%s)" % "; ".join(notes) if notes else "",
                ": " + excerpt if excerpt else "",
            ),
            permanent=400 <= status < 500 and status not in (408, 429),
            retry_after=retry_after,
        )


class WebhookSink(RemoteSink):
    """Readings POSTed as JSON to a URL: {"readings": [reading_json(row), ...]}, up to a batch
    per request. Any 2xx answer confirms the whole request; a 4xx but 408 and 429 refuses it for
    good (the forwarder moves the batch to the spool's dead letters); anything else (or no
    answer within the timeout) is retried later by the forwarder, after the Retry-After of a 429
    or 503, so the receiver must accept copies: each reading's "id" is stable (reading_id).
    http://USER:PASSWORD@host/... is sent as HTTP Basic authentication; `name` (logs, the
    status file, the spool's progress mark) has the URL without them."""

    def __init__(self, url, timeout=10.0):
        self._http = HttpPoster("--webhook", url, timeout)
        self.name = "webhook %s" % self._http.url  # no credentials: logs and the status file

    def deliver(self, rows):
        body = json.dumps({"readings": [reading_json(r) for r in rows]}).encode()
        self._http.post(body, "application/json")

    def close(self):
        self._http.close()


class InfluxHttpSink(RemoteSink):
    """Line protocol POSTed to an InfluxDB write endpoint: a URL such as
    http://host:8086/api/v2/write?org=ORG&bucket=BUCKET (a URL with no path gets /api/v2/write;
    precision=ns is added when absent). A token in $INFLUX_TOKEN goes in the Authorization
    header; a user and password in the URL go as HTTP Basic authentication (InfluxDB's 1.x
    API), never both. InfluxDB answers 204 when the points are written; errors as for
    WebhookSink (HttpPoster)."""

    def __init__(self, url, timeout=10.0, token=None, measurement=INFLUX_MEASUREMENT):
        try:
            parts = urllib.parse.urlsplit(url)
        except ValueError as e:
            raise SinkError("--influx: bad URL %r: %s" % (redact_url(url), e)) from None
        path = parts.path if parts.path not in ("", "/") else "/api/v2/write"
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if not any(k == "precision" for k, _ in query):
            query.append(("precision", "ns"))
        full = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, path, urllib.parse.urlencode(query), "")
        )
        headers = {"Authorization": "Token %s" % token} if token else {}
        self.measurement = measurement
        self._http = HttpPoster("--influx", full, timeout, headers)
        self.name = "influx %s" % self._http.url  # no credentials: logs and the status file

    def deliver(self, rows):
        body = "".join(line + "\n" for line in influx_lines(rows, self.measurement))
        self._http.post(body.encode(), "text/plain; charset=utf-8")

    def close(self):
        self._http.close()

# Sinks: where accepted readings go. Each write(rows) returns only once the rows are durable,
# because the receiver acks a frame to its node only after that (docs/ARCHITECTURE.md).
#
# A row is (node_id, ts, quantity, value): ts in unix seconds (UTC, float, millisecond
# resolution), quantity a name from protocols/frame.py CHANNELS, value in that quantity's unit.
#
# Two kinds of sink. Local ones (SQLite, JSON lines, an InfluxDB line-protocol file) have
# write(rows) and are written before the ack. Remote ones (HTTP webhook, InfluxDB over HTTP, and
# MQTT in host_tools/mqtt.py) have deliver(rows) and a stable `name`: the receiver never waits
# for them; readings go to the on-disk spool (host_tools/spool.py) and host_tools/forward.py
# delivers them, retrying until the remote end confirms. Delivery is at least once; every reading
# carries a stable id (reading_id: "node_id/ts/quantity", ts with 3 decimals) so the backend
# can drop the copies a retry may bring: exactly once from its point of view.

import datetime
import errno
import http.client
import json
import os
import socket
import sqlite3
import stat
import urllib.parse

# Exactly this schema: the demo and other readers query it.
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS readings(node_id INTEGER, ts REAL /* unix seconds, UTC */, "
    "quantity TEXT, value REAL, PRIMARY KEY(node_id, ts, quantity))"
)
_COLUMNS = ["node_id", "ts", "quantity", "value"]


class SinkError(Exception):
    """A sink that cannot be opened or used as asked."""


# A reading a node sends again (its ack was lost) comes under a new seq with its age counted
# anew: whole seconds, relative to the new sending, so its timestamp can differ from the first
# copy's by up to 1 s plus the difference in latency. Within this of a stored row of the same
# node and quantity, with the same value, it is that row (SPEC.md "Replay and duplicates"):
# nodes sample far less often than every 3 s.
RESENT_WITHIN_S = 1.5

_INSERT_NEW = (
    "INSERT OR IGNORE INTO readings SELECT ?1, ?2, ?3, ?4 WHERE NOT EXISTS ("
    "SELECT 1 FROM readings WHERE node_id = ?1 AND ts BETWEEN ?2 - %s AND ?2 + %s "
    "AND quantity = ?3 AND value = ?4)" % (RESENT_WITHIN_S, RESENT_WITHIN_S)
)


class SqliteSink:
    """Readings in an SQLite file, table `readings`. A row already stored (same node, ts and
    quantity), or the same reading sent again (same node, quantity and value, ts within
    RESENT_WITHIN_S), is ignored, so writing the same rows twice is harmless."""

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
            db.executemany(_INSERT_NEW, rows)
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


# --- readings as the remote sinks see them ----------------------------------------------


def reading_id(node_id, ts, quantity):
    """The stable id of a reading: "17/1700000000.250/temperature_c". The same reading always
    gets the same id (its ts is fixed when the frame is accepted), a different one never does."""
    return "%d/%.3f/%s" % (node_id, ts, quantity)


def iso_utc(ts):
    """Unix seconds as ISO 8601 UTC with milliseconds: "2023-11-14T22:13:20.250Z"."""
    dt = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def reading_json(row):
    """The JSON object of one reading in webhook and MQTT payloads."""
    node_id, ts, quantity, value = row
    return {
        "id": reading_id(node_id, ts, quantity),
        "node_id": node_id,
        "ts": ts,
        "time": iso_utc(ts),
        "quantity": quantity,
        "value": value,
    }


class DeliveryError(Exception):
    """A remote sink did not confirm a delivery. `reason` is a snake_case code to count by
    (connect, timeout, http_500, io, ...); str() says exactly what happened."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


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


def influx_line(measurement, tags, fields, ts_ns):
    """One line of InfluxDB line protocol (no newline): measurement, tags (sorted, as InfluxDB
    prefers), float fields, integer nanosecond timestamp. Escaping as the reference says:
    comma and space in the measurement; comma, equals sign and space in tag keys, tag values and
    field keys. Names with a newline or a backslash are refused (ValueError)."""
    parts = [_influx_escape(measurement, ", ")]
    for key in sorted(tags):
        parts.append(
            ",%s=%s" % (_influx_escape(key, ",= "), _influx_escape(str(tags[key]), ",= "))
        )
    field_text = ",".join(
        "%s=%s" % (_influx_escape(key, ",= "), repr(float(value)))
        for key, value in sorted(fields.items())
    )
    if not field_text:
        raise ValueError("a line protocol point needs at least one field")
    return "%s %s %d" % ("".join(parts), field_text, ts_ns)


def influx_lines(rows, measurement=INFLUX_MEASUREMENT):
    """Rows as line protocol, one point per node and time with one field per quantity:
    `citynode,node_id=17 humidity_pct=45.0,temperature_c=21.5 1700000000250000000`. Writing a
    point again overwrites it in InfluxDB (same series and time), so retries are idempotent."""
    points = {}
    for node_id, ts, quantity, value in rows:
        points.setdefault((node_id, round(ts * 1000)), {})[quantity] = value
    return [
        influx_line(measurement, {"node_id": node_id}, fields, ts_ms * 1_000_000)
        for (node_id, ts_ms), fields in points.items()
    ]


class InfluxFileSink:
    """Line protocol appended to a file (for Telegraf's tail input or `influx write`), fsynced
    on every write: a local, durable sink written before the ack."""

    def __init__(self, path, measurement=INFLUX_MEASUREMENT):
        self.path = path
        self.measurement = measurement
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise SinkError("--influx %s: %s" % (path, e.strerror or e)) from None

    def write(self, rows):
        lines = influx_lines(rows, self.measurement)
        self._file.write("".join(line + "\n" for line in lines))
        self._file.flush()
        os.fsync(self._file.fileno())
        return len(rows)

    def close(self):
        self._file.close()


# --- HTTP sinks ---------------------------------------------------------------------------


class HttpPoster:
    """POSTs bodies to one URL over a kept-alive connection (http.client), each request bounded
    by `timeout` seconds for connecting and for every read. Raises DeliveryError on anything but
    a 2xx answer; the connection is dropped after an error and made again on the next post."""

    def __init__(self, what, url, timeout=10.0, headers=None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SinkError("%s: expected an http:// or https:// URL, got %r" % (what, url))
        try:
            port = parts.port
        except ValueError:
            raise SinkError("%s: bad port in %r" % (what, url)) from None
        self.what = what
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = port
        self.path = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        self.timeout = timeout
        self.headers = dict(headers or {})
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

    def post(self, body, content_type):
        headers = dict(self.headers, **{"Content-Type": content_type})
        try:
            conn = self._connection()
            conn.request("POST", self.path, body=body, headers=headers)
            response = conn.getresponse()
            answer = response.read(2048)
            if response.will_close:
                self.close()
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
        if not 200 <= response.status < 300:
            self.close()
            excerpt = answer.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
            raise DeliveryError(
                "http_%d" % response.status,
                "%s: HTTP %d %s%s"
                % (self.url, response.status, response.reason, ": " + excerpt if excerpt else ""),
            )


class WebhookSink:
    """Readings POSTed as JSON to a URL: {"readings": [reading_json(row), ...]}, up to a batch
    per request. Any 2xx answer confirms the whole request; anything else (or no answer within
    the timeout) is retried later by the forwarder, so the receiver must accept copies: each
    reading's "id" is stable (reading_id)."""

    def __init__(self, url, timeout=10.0):
        self.name = "webhook %s" % url
        self._http = HttpPoster("--webhook", url, timeout)

    def deliver(self, rows):
        body = json.dumps({"readings": [reading_json(r) for r in rows]}).encode()
        self._http.post(body, "application/json")

    def close(self):
        self._http.close()


class InfluxHttpSink:
    """Line protocol POSTed to an InfluxDB write endpoint: a URL such as
    http://host:8086/api/v2/write?org=ORG&bucket=BUCKET (a URL with no path gets /api/v2/write;
    precision=ns is added when absent). A token in $INFLUX_TOKEN goes in the Authorization
    header. InfluxDB answers 204 when the points are written."""

    def __init__(self, url, timeout=10.0, token=None, measurement=INFLUX_MEASUREMENT):
        parts = urllib.parse.urlsplit(url)
        path = parts.path if parts.path not in ("", "/") else "/api/v2/write"
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if not any(k == "precision" for k, _ in query):
            query.append(("precision", "ns"))
        full = urllib.parse.urlunsplit(
            (parts.scheme, parts.netloc, path, urllib.parse.urlencode(query), "")
        )
        headers = {"Authorization": "Token %s" % token} if token else {}
        self.name = "influx %s" % full
        self.measurement = measurement
        self._http = HttpPoster("--influx", full, timeout, headers)

    def deliver(self, rows):
        body = "".join(line + "\n" for line in influx_lines(rows, self.measurement))
        self._http.post(body.encode(), "text/plain; charset=utf-8")

    def close(self):
        self._http.close()

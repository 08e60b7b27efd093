# PostgreSQL for more than one receiver (README "Beyond one machine"): the readings
# (PostgresSink), the replay windows (PgReplayStore) and the node keys (PgKeyStore) in one
# database, so that any receiver can take any frame. psycopg 3; one connection per object.
#
# Schema. Every table is created and upgraded by one list of migrations, MIGRATIONS[v] taking
# the database from version v to v + 1, all applied in order in one transaction under an
# advisory lock (two receivers starting at once: the second waits, then finds the work done).
# The version is the single row of citynode_schema; a database of a newer version than
# SCHEMA_VERSION is refused. To change the schema: append a migration, bump SCHEMA_VERSION,
# and test the upgrade from the version before (tests/test_postgres.py).
#
#   version 0  before citynode_schema: an empty database, or a `readings` table of frame format
#              v1 readings laid out as in SQLite's schema 1, (node_id, ts, quantity, value),
#              ts a timestamptz or unix seconds
#   version 1  readings with reading identities, replay_windows, node_keys; the v0 readings
#              are carried over with reading_index NULL
#
# Identity (host_tools/receive/sinks.py): a v2 reading is stored once under (node_id,
# reading_index, quantity), a UNIQUE constraint; a v1 reading (reading_index NULL) once under
# (node_id, ts, quantity), a partial unique index. INSERT ... ON CONFLICT DO NOTHING makes a copy a
# no-op whose first timestamp stands, whichever receiver writes it and however many write at once.
# SQLite's 1.5 s rule for v1 copies (sinks.RESENT_WITHIN_S) is not ported: a v1 copy sent again
# under a new seq can get a timestamp up to about a second apart and is stored twice here. v1 is
# the old format: nodes that run through several receivers are expected to send v2.
#
# Errors name the database as postgresql://user@host:port/db, never with its password. A lost
# connection raises on the call that finds it lost and is made again on the next call.

import datetime
import logging
import re
import time
import urllib.parse

import psycopg
from psycopg import conninfo as pg_conninfo
from psycopg.types.json import Jsonb

from host_tools.keys import KeyFileError, NodeKeys, Registry
from host_tools.receive.interfaces import Sink
from host_tools.receive.receiver import StateError
from host_tools.receive.sinks import SinkError
from protocols import frame

log = logging.getLogger("citynode.pg")

SCHEMA_VERSION = 1
# pg_advisory_xact_lock keys: "citynode" and "citykeys" as 8 ASCII bytes (both below 2**63).
SCHEMA_LOCK = int.from_bytes(b"citynode", "big")
KEYS_LOCK = int.from_bytes(b"citykeys", "big")

# Where libpq's URL or connection string does not say: a receiver must not hang on a server that
# went away (STYLE.md: every network operation has a timeout). Seconds, tcp_user_timeout in ms.
CONNECT_DEFAULTS = {
    "connect_timeout": "10",
    "application_name": "citynode",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
    "tcp_user_timeout": "60000",
}

_READINGS_COLUMNS = ["node_id", "reading_index", "ts", "quantity", "value"]
_READINGS_V0 = ["node_id", "ts", "quantity", "value"]


class _Refused(Exception):
    """A database this citynode must not use as it is; raised again as the caller's error."""


# --- migrations -----------------------------------------------------------------------------


def _columns(conn, table):
    return conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
        (table,),
    ).fetchall()


def _to_v1(conn):
    """Version 0 -> 1: the tables; a v0 readings table's rows carried over. Returns how many."""
    old = _columns(conn, "readings")
    names = [name for name, _ in old]
    if old and names != _READINGS_V0:
        raise _Refused(
            "table readings has columns %s, expected %s (schema version 0) or none: not a "
            "citynode database, or one changed by hand"
            % (", ".join(names), ", ".join(_READINGS_V0))
        )
    if old:
        conn.execute("ALTER TABLE readings RENAME TO readings_v0")
    conn.execute(
        "CREATE TABLE readings ("
        " node_id bigint NOT NULL,"
        " reading_index bigint,"  # NULL: a reading of a v1 frame, which carries no index
        " ts timestamptz NOT NULL,"
        " quantity text NOT NULL,"
        " value double precision NOT NULL,"
        " CONSTRAINT readings_identity UNIQUE (node_id, reading_index, quantity))"
    )
    conn.execute(
        "CREATE UNIQUE INDEX readings_v1 ON readings (node_id, ts, quantity) "
        "WHERE reading_index IS NULL"
    )
    conn.execute(
        "CREATE TABLE replay_windows ("
        " node_id bigint PRIMARY KEY CHECK (node_id BETWEEN 0 AND 4294967295),"
        " key_id text NOT NULL,"  # fingerprint of the key the window belongs to
        " highest bigint NOT NULL CHECK (highest BETWEEN 0 AND 4294967295),"
        " bitmap numeric NOT NULL CHECK (bitmap >= 0 AND bitmap = trunc(bitmap)),"
        " updated timestamptz NOT NULL DEFAULT now())"
    )
    conn.execute(
        "CREATE TABLE node_keys ("
        " node_id bigint PRIMARY KEY CHECK (node_id BETWEEN 0 AND 4294967295),"
        " key bytea NOT NULL CHECK (length(key) = 16),"
        " previous bytea CHECK (length(previous) = 16),"
        " previous_until timestamptz,"
        " revoked boolean NOT NULL DEFAULT false,"
        " revoked_at timestamptz,"  # NULL with revoked: revoked at a time not known
        " created timestamptz,"
        " rotated timestamptz,"
        " extra jsonb NOT NULL DEFAULT '{}',"  # the key file's other fields of the node
        " CHECK ((previous IS NULL) = (previous_until IS NULL)),"
        " CHECK (revoked OR revoked_at IS NULL))"
    )
    carried = 0
    if old:
        ts = "ts" if dict(old)["ts"] == "timestamp with time zone" else "to_timestamp(ts)"
        carried = conn.execute(
            "INSERT INTO readings SELECT node_id, NULL, %s, quantity, value FROM readings_v0 "
            "ORDER BY ts ON CONFLICT DO NOTHING" % ts
        ).rowcount
        conn.execute("DROP TABLE readings_v0")
    return carried


MIGRATIONS = [_to_v1]  # MIGRATIONS[v]: version v -> v + 1; returns the rows it carried over
assert len(MIGRATIONS) == SCHEMA_VERSION


def _schema_version(conn):
    if conn.execute("SELECT to_regclass('citynode_schema')").fetchone()[0] is None:
        return None
    rows = conn.execute("SELECT version FROM citynode_schema").fetchall()
    if len(rows) != 1 or rows[0][0] is None:
        raise _Refused("table citynode_schema holds %d rows, expected one version" % len(rows))
    return rows[0][0]


def open_schema(conn):
    """Bring the database to SCHEMA_VERSION in one transaction, under SCHEMA_LOCK. Returns
    (the version it had, rows carried over); raises _Refused for a newer or foreign one."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        version = _schema_version(conn)
        found = 0 if version is None else version
        if found > SCHEMA_VERSION:
            raise _Refused(
                "schema version %d is newer than this citynode's (%d): a newer citynode has "
                "upgraded the database; upgrade citynode here too" % (found, SCHEMA_VERSION)
            )
        carried = 0
        for v in range(found, SCHEMA_VERSION):
            carried += MIGRATIONS[v](conn)
        if version is None:
            conn.execute("CREATE TABLE citynode_schema (version int NOT NULL)")
            conn.execute("INSERT INTO citynode_schema VALUES (%s)", (SCHEMA_VERSION,))
        elif found != SCHEMA_VERSION:
            conn.execute("UPDATE citynode_schema SET version = %s", (SCHEMA_VERSION,))
    return found, carried


# --- connections --------------------------------------------------------------------------


def _secrets_of(url):
    """The password as written in url (percent-encoded or not): what no message may show."""
    found = []
    match = re.match(r"^\w+://([^/@?#]*)@", url)
    if match and ":" in match.group(1):
        raw = match.group(1).partition(":")[2]
        found += [raw, urllib.parse.unquote(raw)]
    for match in re.finditer(r"(?:^|\s|[?&])password\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]+)", url):
        raw = match.group(1)
        found += [raw, raw.strip("'"), urllib.parse.unquote(raw)]
    return [s for s in found if s]


def describe(url):
    """postgresql://user@host:port/db for messages and logs: never the password. Parts the URL
    does not give (libpq then takes $PGHOST and the like, or its defaults) are left out."""
    try:
        params = pg_conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "<a PostgreSQL URL that does not parse>"
    user = params.get("user")
    host = params.get("host") or params.get("hostaddr") or ""
    port = params.get("port")
    if host.startswith("/"):  # a unix socket's directory, percent-encoded as libpq reads it
        host = urllib.parse.quote(host, safe="")
    elif ":" in host:  # IPv6
        host = "[%s]" % host
    return "postgresql://%s%s%s/%s" % (
        user + "@" if user else "",
        host,
        ":" + port if port else "",
        params.get("dbname") or "",
    )


class _Database:
    """One connection to the citynode database: made (and the schema opened) on first use, and
    again after it was lost. Errors are raised as `error` (the owner's exception type)."""

    def __init__(self, url, error, on_connect=None):
        self.error = error
        self.on_connect = on_connect
        self._secrets = _secrets_of(url)
        self.name = describe(url)
        try:
            params = pg_conninfo.conninfo_to_dict(url)
        except psycopg.Error as e:
            raise error("%s: %s" % (self.name, self.text(e))) from None
        defaults = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in params}
        self._conninfo = pg_conninfo.make_conninfo(url, **defaults)
        self._conn = None
        self.version_found = None  # the schema version the database had when first opened
        self.upgraded = 0  # rows carried over by an upgrade on open

    def text(self, e):
        """An error's message, on one line, with any password replaced by ***."""
        message = " ".join(str(e).split()) or type(e).__name__
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message

    def connection(self):
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self.drop()
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as e:
            raise self.error("%s: cannot connect: %s" % (self.name, self.text(e))) from None
        try:
            found, carried = open_schema(conn)
            if self.on_connect is not None:
                self.on_connect(conn)
        except _Refused as e:
            conn.close()
            raise self.error("%s: %s" % (self.name, e)) from None
        except psycopg.Error as e:
            conn.close()
            raise self.error(
                "%s: cannot open the schema: %s" % (self.name, self.text(e))
            ) from None
        except BaseException:
            conn.close()
            raise
        if self.version_found is None:
            self.version_found = found
        self.upgraded += carried
        if found != SCHEMA_VERSION:
            log.info(
                "%s: schema version %d -> %d, %d readings carried over",
                self.name,
                found,
                SCHEMA_VERSION,
                carried,
            )
        self._conn = conn
        return conn

    def run(self, doing, work):
        """work(conn) in one transaction, committed before this returns its result. Raises
        `error` naming what it was doing; a lost connection is dropped, to be made anew."""
        conn = self.connection()
        try:
            with conn.transaction():
                return work(conn)
        except psycopg.Error as e:
            lost = conn.closed or conn.broken
            if lost:
                self.drop()
            raise self.error(
                "%s: %s failed: %s%s"
                % (
                    self.name,
                    doing,
                    self.text(e),
                    " (connection lost: the next call connects again)" if lost else "",
                )
            ) from None

    def drop(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:  # pragma: no cover - closing a broken connection
                pass

    def close(self):
        self.drop()


# --- readings -----------------------------------------------------------------------------

# Rows go to a temporary table by COPY, then into readings in one statement. Sorted by
# identity, so that two receivers inserting overlapping rows take their row locks in the same
# order (no deadlock); `n`, the row's place in the batch, breaks ties: the first copy in a batch
# is the one kept, its timestamp stands.
_INCOMING = (
    "CREATE TEMPORARY TABLE IF NOT EXISTS citynode_incoming (n int, node_id bigint, "
    "reading_index bigint, ts double precision, quantity text, value double precision) "
    "ON COMMIT DELETE ROWS"
)
_COPY = "COPY citynode_incoming FROM STDIN"
_INSERT = (
    "INSERT INTO readings (node_id, reading_index, ts, quantity, value) "
    "SELECT node_id, reading_index, to_timestamp(ts), quantity, value FROM citynode_incoming "
    "ORDER BY node_id, reading_index, quantity, "
    "CASE WHEN reading_index IS NULL THEN ts END, n "
    "ON CONFLICT DO NOTHING"
)


class PostgresSink(Sink):
    """Readings in PostgreSQL, table `readings` (node_id, reading_index, ts timestamptz,
    quantity, value): a reading already stored is a no-op, whoever writes it. write() returns
    once the rows are committed. `url`: a libpq URL or connection string, e.g.
    postgresql://citynode:PASSWORD@db.example:5432/citynode; `name` shows it without the
    password. Raises SinkError, naming the database, when it cannot be reached or used."""

    def __init__(self, url):
        self._db = _Database(url, SinkError, on_connect=self._prepare)
        self.name = "postgres %s" % self._db.name
        self._db.connection()  # fail now, not at the first frame, on a wrong URL or schema

    @property
    def upgraded(self):
        """v0 rows carried over by a schema upgrade when the sink opened the database."""
        return self._db.upgraded

    @staticmethod
    def _prepare(conn):
        # A commit is durable only with synchronous_commit on (or stronger): a server or
        # database set to "off" would let write() return before the WAL is flushed, and the
        # receiver would ack readings a crash could still lose. Stronger settings are kept.
        if conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":
            conn.execute("SET synchronous_commit = on")
        conn.execute(_INCOMING)

    def write(self, rows):
        """Insert rows (node_id, reading_index, ts, quantity, value) in one transaction and
        commit; return how many were new. Raises SinkError (nothing is then committed, or the
        outcome of a commit the connection was lost in is unknown: the rows come again from
        their node, and the copy of what was stored is a no-op)."""
        if not rows:
            return 0

        def insert(conn):
            with conn.cursor() as cur:
                with cur.copy(_COPY) as copy:
                    for n, row in enumerate(rows):
                        copy.write_row((n, *row))
                cur.execute(_INSERT)
                return cur.rowcount

        return self._db.run("write of %d rows" % len(rows), insert)

    def close(self):
        self._db.close()


# --- replay windows -------------------------------------------------------------------------


def merge_window(stored, new, window):
    """One node's replay window from two receivers' (key_id, highest, bitmap): every seq
    either has seen, within `window` seqs of the higher highest. A window of another key
    (the node was given a new one) is replaced by the one saved last."""
    (key0, high0, bits0), (key1, high1, bits1) = stored, new
    if key0 != key1:
        return new
    high = max(high0, high1)
    bits = 0
    for h, b in ((high0, bits0), (high1, bits1)):
        if high - h < window:  # older: outside the window, a replay anyway
            bits |= b << (high - h)
    return key1, high, bits & ((1 << window) - 1)


class PgReplayStore:
    """receiver.ReplayStore's interface (load, save, close, bad_rows, path) on the table
    replay_windows: the replay windows of v1 frames and STATUS frames, shared by every
    receiver of the database. save() merges a node's window with the one stored (another
    receiver's), so that neither forgets the seqs the other has seen; `window` is the
    verifier's window size (bits kept). Raises receiver.StateError naming the database."""

    def __init__(self, url, window=64):
        self._db = _Database(url, StateError)
        self.path = self._db.name  # what the receiver's messages name
        self.window = window
        self.bad_rows = 0
        self._db.connection()

    def load(self):
        """{node_id: (key_id, highest, bitmap)}; rows that do not parse are skipped."""

        def select(conn):
            return conn.execute(
                "SELECT node_id, key_id, highest, bitmap FROM replay_windows"
            ).fetchall()

        windows = {}
        for n, k, h, b in self._db.run("load of the replay windows", select):
            try:
                if not 0 <= h <= frame.MAX_U32 or b < 0 or b != int(b):
                    raise ValueError("highest seq is not a u32 or bitmap not a natural number")
                windows[n] = (str(k), h, int(b))
            except (TypeError, ValueError, ArithmeticError):
                self.bad_rows += 1
        return windows

    def save(self, rows):
        """rows: [(node_id, key_id, highest, bitmap)], merged with the stored windows and
        committed in one transaction."""
        rows = sorted(rows)  # row locks in node order: two receivers saving at once
        if not rows:
            return

        def upsert(conn):
            # The rows not stored yet go in as they are; the others are locked and merged.
            # A row another receiver is inserting right now makes the INSERT wait for it.
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO replay_windows (node_id, key_id, highest, bitmap) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (node_id) DO NOTHING RETURNING node_id",
                    rows,
                    returning=True,
                )
                inserted = set()
                while True:
                    inserted.update(r[0] for r in cur.fetchall())
                    if not cur.nextset():
                        break
            rest = [r for r in rows if r[0] not in inserted]
            if not rest:
                return
            stored = {
                n: (k, h, int(b))
                for n, k, h, b in conn.execute(
                    "SELECT node_id, key_id, highest, bitmap FROM replay_windows "
                    "WHERE node_id = ANY(%s) ORDER BY node_id FOR UPDATE",
                    ([r[0] for r in rest],),
                )
            }
            merged = [(n, *merge_window(stored[n], (k, h, b), self.window)) for n, k, h, b in rest]
            with conn.cursor() as cur:
                cur.executemany(
                    "UPDATE replay_windows SET key_id = %s, highest = %s, bitmap = %s, "
                    "updated = now() WHERE node_id = %s",
                    [(k, h, b, n) for n, k, h, b in merged],
                )

        self._db.run("save of %d replay windows" % len(rows), upsert)

    def close(self):
        self._db.close()


# --- node keys ------------------------------------------------------------------------------


def _to_time(ts):
    return None if ts is None else datetime.datetime.fromtimestamp(ts, datetime.UTC)


def _from_time(dt):
    if dt is None:
        return None
    ts = dt.timestamp()
    return int(ts) if ts == int(ts) else ts


_KEY_COLUMNS = (
    "node_id, key, previous, previous_until, revoked, revoked_at, created, rotated, extra"
)


def _entry(row):
    node_id, key, previous, until, revoked, revoked_at, created, rotated, extra = row
    if revoked:
        revoked = True if revoked_at is None else _from_time(revoked_at)
    else:
        revoked = None
    extra = dict(extra or {})
    older = extra.pop("older", [])  # keys of earlier rotations still in their grace
    node = NodeKeys(
        node_id,
        bytes(key),
        _from_time(created),
        _from_time(rotated),
        revoked,
        None if previous is None else bytes(previous),
        _from_time(until),
        extra,
    )
    node.older = [(bytes.fromhex(k), float(u)) for k, u in older]
    return node


def _row(entry):
    revoked = entry.revoked is not None
    revoked_at = None if entry.revoked in (None, True) else _to_time(entry.revoked)
    previous = None if entry.previous is None else bytes(entry.previous)
    return (
        entry.node_id,
        bytes(entry.key),
        previous,
        _to_time(entry.previous_until) if previous is not None else None,
        revoked,
        revoked_at,
        _to_time(entry.created),
        _to_time(entry.rotated),
        Jsonb(dict(entry.extra, older=[[bytes(k).hex(), u] for k, u in entry.older])),
    )


class PgKeyStore:
    """The node keys in the table node_keys, so that several receivers share the keys and the
    rotation state: import_registry() puts a key file's registry (keys.load_registry) in the
    database; load_accepted(now) gives what keys.load_accepted_keys gives for a file. The
    table holds node secrets: grant it to the receivers' role only. Raises keys.KeyFileError
    naming the database."""

    def __init__(self, url):
        self._db = _Database(url, KeyFileError)
        self.path = self._db.name
        self._db.connection()

    def import_registry(self, registry):
        """Make node_keys hold exactly the registry's nodes (revoked ones included, as
        revoked; nodes no longer in it removed), in one transaction. Returns (added, changed,
        removed) node counts. The registry's top-level fields are not kept."""
        entries = [registry.nodes[n] for n in sorted(registry.nodes)]
        for entry in entries:
            if not 0 <= entry.node_id <= frame.MAX_U32 or len(entry.key) != 16:
                raise KeyFileError(
                    "%s: node %r: not a u32 node id with a 16-byte key"
                    % (self.path, entry.node_id)
                )

        def write(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (KEYS_LOCK,))
            stored = {
                row[0]: _entry(row)
                for row in conn.execute("SELECT %s FROM node_keys" % _KEY_COLUMNS)
            }
            changed = [e for e in entries if stored.get(e.node_id) != e]
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO node_keys (%s) VALUES (%s) ON CONFLICT (node_id) DO UPDATE SET "
                    "%s"
                    % (
                        _KEY_COLUMNS,
                        ", ".join(["%s"] * 9),
                        ", ".join(
                            "%s = excluded.%s" % (c, c) for c in _KEY_COLUMNS.split(", ")[1:]
                        ),
                    ),
                    [_row(e) for e in changed],
                )
            gone = sorted(set(stored) - set(registry.nodes))
            if gone:
                conn.execute("DELETE FROM node_keys WHERE node_id = ANY(%s)", (gone,))
            added = sum(1 for e in changed if e.node_id not in stored)
            return added, len(changed) - added, len(gone)

        return self._db.run("import of %d node keys" % len(entries), write)

    def load_registry(self):
        """The Registry of every node in the table (revoked ones too)."""

        def select(conn):
            return conn.execute("SELECT %s FROM node_keys" % _KEY_COLUMNS).fetchall()

        rows = self._db.run("load of the node keys", select)
        return Registry({row[0]: _entry(row) for row in rows})

    def load_accepted(self, now=None):
        """{node_id: (key, ...)}: every key a frame from an active node may be signed with at
        `now` (default: the current time): the current key, then the one rotated out, during
        its grace period. As keys.load_accepted_keys for a file."""
        now = time.time() if now is None else now
        accepted = {}
        for node_id, entry in self.load_registry().nodes.items():
            keys = entry.accepted_keys(now)
            if keys:
                accepted[node_id] = keys
        return accepted

    def close(self):
        self._db.close()

# Tests for host_tools/receive/pg.py against a real PostgreSQL 15 (tests/pg_server.py starts one on
# 127.0.0.1): schema and its upgrades, copies as no-ops, concurrent receivers, a server
# restarted mid-run, the shared replay windows and node keys, errors that hide the password.

import datetime
import random
import socket
import threading

import psycopg
import pytest

from host_tools import keys as keyfile
from host_tools.keys import KeyFileError, NodeKeys, Registry
from host_tools.receive import pg
from host_tools.receive.pg import PgKeyStore, PgReplayStore, PostgresSink, merge_window
from host_tools.receive.receiver import Receiver, StateError, Verifier, key_id
from host_tools.receive.sinks import SinkError
from protocols import frame, uplink

pytest_plugins = ["pg_server"]  # the fixtures pg_server (one per session) and pg_url

T0 = 1_700_000_000.25
QUANTITIES = ("temperature_c", "humidity_pct", "pressure_hpa")
KEY7 = bytes(range(16))
KEY8 = bytes(range(100, 116))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def v2_rows(node_id, first, count, ts=T0, value=21.5):
    """count readings from reading_index first, three quantities each."""
    return [
        (node_id, i, ts + (i - first) * 60.0, q, value + k)
        for i in range(first, first + count)
        for k, q in enumerate(QUANTITIES)
    ]


def query(url, sql, params=()):
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else None


def stored(url):
    """Every reading as written: ts back in unix seconds."""
    return query(
        url,
        "SELECT node_id, reading_index, extract(epoch FROM ts)::float8, quantity, value "
        "FROM readings ORDER BY node_id, reading_index, quantity, ts",
    )


@pytest.fixture
def sink(pg_url):
    s = PostgresSink(pg_url)
    yield s
    s.close()


# --- schema ---------------------------------------------------------------------------------


def test_schema_created_versioned_and_opened_again_unchanged(pg_url):
    sink = PostgresSink(pg_url)
    assert sink._db.version_found == 0 and sink.upgraded == 0
    sink.close()
    assert query(pg_url, "SELECT version FROM citynode_schema") == [(pg.SCHEMA_VERSION,)]
    columns = query(
        pg_url,
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns "
        "WHERE table_name = 'readings' ORDER BY ordinal_position",
    )
    assert columns == [
        ("node_id", "bigint", "NO"),
        ("reading_index", "bigint", "YES"),
        ("ts", "timestamp with time zone", "NO"),
        ("quantity", "text", "NO"),
        ("value", "double precision", "NO"),
    ]
    indexes = dict(query(pg_url, "SELECT indexname, indexdef FROM pg_indexes"))
    assert "UNIQUE" in indexes["readings_identity"]
    assert "(node_id, reading_index, quantity)" in indexes["readings_identity"]
    assert "(node_id, ts, quantity) WHERE (reading_index IS NULL)" in indexes["readings_v1"]
    tables = {r[0] for r in query(pg_url, "SELECT tablename FROM pg_tables")}
    assert {"readings", "replay_windows", "node_keys", "citynode_schema"} <= tables
    again = PostgresSink(pg_url)
    assert again._db.version_found == pg.SCHEMA_VERSION and again.upgraded == 0
    again.close()
    assert query(pg_url, "SELECT version FROM citynode_schema") == [(pg.SCHEMA_VERSION,)]


@pytest.mark.parametrize("ts_type", ["timestamptz", "double precision"])
@pytest.mark.parametrize("version_table", [False, True])
def test_version_0_database_is_upgraded_in_place_keeping_its_readings(
    pg_url, ts_type, version_table
):
    as_ts = (lambda t: "to_timestamp(%s)" % t) if ts_type == "timestamptz" else str
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE readings (node_id bigint, ts %s, quantity text, value double precision)"
            % ts_type
        )
        conn.execute(
            "INSERT INTO readings VALUES (7, %s, 'temperature_c', 21.5), "
            "(7, %s, 'temperature_c', 21.5), "  # a copy stored twice by version 0
            "(7, %s, 'temperature_c', 21.75), (8, %s, 'humidity_pct', 45)"
            % (as_ts(T0), as_ts(T0), as_ts(T0 + 60.001), as_ts(T0))
        )
        if version_table:
            conn.execute("CREATE TABLE citynode_schema (version int NOT NULL)")
            conn.execute("INSERT INTO citynode_schema VALUES (0)")
    sink = PostgresSink(pg_url)
    assert sink._db.version_found == 0
    assert sink.upgraded == 3
    assert query(pg_url, "SELECT version FROM citynode_schema") == [(pg.SCHEMA_VERSION,)]
    assert stored(pg_url) == [
        (7, None, T0, "temperature_c", 21.5),
        (7, None, T0 + 60.001, "temperature_c", 21.75),
        (8, None, T0, "humidity_pct", 45.0),
    ]
    assert query(pg_url, "SELECT to_regclass('readings_v0')") == [(None,)]
    # the upgraded table has the identities: a v1 copy is a no-op, v2 rows go in
    assert sink.write([(7, None, T0, "temperature_c", 99.0)] + v2_rows(7, 1, 1)) == 3
    sink.close()


def test_newer_schema_is_refused_by_every_user_of_the_database(pg_url):
    PostgresSink(pg_url).close()
    query(pg_url, "UPDATE citynode_schema SET version = %s", (pg.SCHEMA_VERSION + 1,))
    newer = "schema version %d is newer than this citynode's (%d)" % (
        pg.SCHEMA_VERSION + 1,
        pg.SCHEMA_VERSION,
    )
    for cls, error in ((PostgresSink, SinkError), (PgReplayStore, StateError)):
        with pytest.raises(error, match="newer") as e:
            cls(pg_url)
        assert newer in str(e.value)
        assert pg_url.rpartition("/")[2] in str(e.value)  # names the database
    with pytest.raises(KeyFileError, match="upgrade citynode"):
        PgKeyStore(pg_url)
    assert query(pg_url, "SELECT version FROM citynode_schema") == [(pg.SCHEMA_VERSION + 1,)]


def test_foreign_readings_table_is_refused_and_left_untouched(pg_url):
    query(pg_url, "CREATE TABLE readings (id serial, payload text)")
    with pytest.raises(SinkError, match="table readings has columns id, payload"):
        PostgresSink(pg_url)
    # the failed upgrade was one transaction: nothing of it stays
    assert query(pg_url, "SELECT to_regclass('citynode_schema'), to_regclass('node_keys')") == [
        (None, None)
    ]


def test_receivers_starting_at_once_create_the_schema_once(pg_url):
    barrier = threading.Barrier(6)
    errors, sinks = [], []

    def start():
        barrier.wait()
        try:
            sinks.append(PostgresSink(pg_url))
        except Exception as e:  # recorded: the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(s._db.version_found for s in sinks) == [0] + [pg.SCHEMA_VERSION] * 5
    assert query(pg_url, "SELECT version FROM citynode_schema") == [(pg.SCHEMA_VERSION,)]
    for s in sinks:
        s.close()


# --- readings -------------------------------------------------------------------------------


def test_write_commits_and_counts_new_rows_and_a_copy_is_a_no_op(sink, pg_url):
    rows = v2_rows(7, 100, 3)
    assert sink.write(rows) == 9
    # committed: another connection sees them at once
    assert len(stored(pg_url)) == 9
    # the same readings again, later and with other values: nothing changes
    later = [(n, i, ts + 3600.0, q, v + 10) for n, i, ts, q, v in rows]
    assert sink.write(later) == 0
    assert sink.write(later[:3] + v2_rows(7, 103, 1)) == 3
    assert stored(pg_url)[:9] == sorted(rows, key=lambda r: (r[0], r[1], r[3]))
    assert sink.write([]) == 0


def test_copies_within_one_batch_keep_the_first(sink, pg_url):
    # copies of reading 5 interleaved with other readings, the later ones with earlier ts
    batch = []
    for k in range(60):
        batch.append((7, 5, T0 - k, "temperature_c", float(k)))
        batch.append((7, 100 + k, T0, "temperature_c", 1.0))
    assert sink.write(batch) == 61
    assert stored(pg_url)[0] == (7, 5, T0, "temperature_c", 0.0)


def test_v1_rows_unique_by_node_ts_and_quantity(sink, pg_url):
    v1 = [(7, None, T0, q, 1.0) for q in QUANTITIES]
    assert sink.write(v1) == 3
    assert sink.write(v1) == 0
    assert sink.write([(7, None, T0, "temperature_c", 2.0)]) == 0  # a copy: first value stands
    # SQLite's 1.5 s rule is not ported: a resent v1 reading with a new ts is a new row
    assert sink.write([(7, None, T0 + 1.0, "temperature_c", 1.0)]) == 1
    # another node, and a v2 reading at the same time, are other readings
    assert sink.write([(8, None, T0, "temperature_c", 1.0), (7, 1, T0, "temperature_c", 1)]) == 2
    assert len(stored(pg_url)) == 6


def test_ts_keeps_milliseconds_exactly(sink, pg_url):
    rng = random.Random(5)
    stamps = [T0, 0.001, 1.0, 946_684_800.0, 4_102_444_799.999, 1_700_000_000.001]
    stamps += [rng.randrange(0, 4_102_444_800_000) / 1000 for _ in range(3000)]
    rows = [(1, i, ts, "temperature_c", rng.uniform(-40, 85)) for i, ts in enumerate(stamps)]
    assert sink.write(rows) == len(rows)
    back = query(
        pg_url,
        "SELECT reading_index, extract(epoch FROM ts)::float8, ts, value FROM readings "
        "ORDER BY reading_index",
    )
    assert [r[1] for r in back] == stamps  # exactly, as written
    assert [r[2].timestamp() for r in back] == stamps  # also through psycopg's datetime
    assert [r[3] for r in back] == [r[4] for r in rows]
    assert back[0][2] == datetime.datetime(2023, 11, 14, 22, 13, 20, 250000, datetime.UTC)


ROUNDS = 30


def test_two_receivers_writing_overlapping_rows_at_once_store_each_reading_once(pg_url):
    # Two sinks, two connections, two threads, started together on each round: the same
    # readings (v2 and v1) in opposite orders, plus some of each's own. Rows locked in batch
    # order would deadlock here; PostgreSQL would then abort one write.
    rounds = []
    for r in range(ROUNDS):
        shared = v2_rows(7, 1000 * r, 300) + [
            (9, None, T0 + 1000 * r + i, "temperature_c", 1.0) for i in range(100)
        ]
        random.Random(r).shuffle(shared)
        own = [v2_rows(8, 1000 * r, 10), v2_rows(8, 1000 * r + 500, 10)]
        rounds.append((shared + own[0], shared[::-1] + own[1]))
    sinks = [PostgresSink(pg_url), PostgresSink(pg_url)]
    new = [0, 0]
    errors = []
    barrier = threading.Barrier(2, timeout=30)

    def run(k):
        try:
            for batches in rounds:
                barrier.wait()
                new[k] += sinks[k].write(batches[k])
        except Exception as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in sinks:
        s.close()
    assert errors == []
    everything = {
        (n, i, ts if i is None else None, q) for a, b in rounds for n, i, ts, q, _ in a + b
    }
    assert sum(new) == len(everything) == ROUNDS * (900 + 100 + 60)  # each counted new once
    rows = stored(pg_url)
    assert len(rows) == len(everything)
    assert {(n, i, ts if i is None else None, q) for n, i, ts, q, _ in rows} == everything


def test_server_restarted_mid_run_write_raises_then_reconnects_nothing_lost(pg_own_server):
    server = pg_own_server
    url = server.url(server.create_database("citynode"))
    sink = PostgresSink(url)
    first, second, third = v2_rows(7, 0, 100), v2_rows(7, 100, 100), v2_rows(7, 200, 100)
    assert sink.write(first) == 300
    server.restart("immediate")  # killed as in a crash; recovery replays the WAL
    with pytest.raises(SinkError, match="connection lost") as e:
        sink.write(second)  # the receiver does not ack: the node sends it again
    assert "postgresql://postgres@127.0.0.1:%d/citynode" % server.port in str(e.value)
    assert sink.write(second) == 300  # connects again
    server.stop("fast")
    with pytest.raises(SinkError, match="connection lost"):
        sink.write(third)
    with pytest.raises(SinkError, match="cannot connect.*127.0.0.1.*Connection refused"):
        sink.write(third)  # still down
    server.start()
    assert sink.write(second + third) == 300  # the copies of the second are no-ops
    sink.close()
    assert sorted(stored(url)) == sorted(first + second + third)


def test_unreachable_server_is_a_sink_error_naming_it_without_the_password():
    port = free_port()  # nothing listens there
    url = "postgresql://citynode:s3cret-PaSS@127.0.0.1:%d/readings_db?connect_timeout=5" % port
    for cls, error in ((PostgresSink, SinkError), (PgReplayStore, StateError)):
        with pytest.raises(error, match="cannot connect") as e:
            cls(url)
        message = str(e.value)
        assert "postgresql://citynode@127.0.0.1:%d/readings_db" % port in message
        assert "s3cret" not in message and "PaSS" not in message
    with pytest.raises(KeyFileError, match="127.0.0.1:%d/readings_db" % port) as e:
        PgKeyStore("host=127.0.0.1 port=%d dbname=readings_db password=s3cret-PaSS" % port)
    assert "s3cret" not in str(e.value)
    # a URL that does not parse: libpq quotes the bad part, here the password
    with pytest.raises(SinkError) as e:
        PostgresSink("postgresql://citynode:s3cret%zz@127.0.0.1/db")
    assert "s3cret" not in str(e.value) and "percent-encoded" in str(e.value)


def test_sink_commits_durably_even_where_the_database_says_otherwise(pg_url):
    database = pg_url.rpartition("/")[2]
    query(pg_url, "ALTER DATABASE %s SET synchronous_commit = off" % database)
    sink = PostgresSink(pg_url)
    conn = sink._db.connection()
    assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    sink.close()
    query(pg_url, "ALTER DATABASE %s SET synchronous_commit = remote_apply" % database)
    sink = PostgresSink(pg_url)  # a stronger setting stays
    assert sink._db.connection().execute("SHOW synchronous_commit").fetchone() == ("remote_apply",)
    sink.close()


def test_sink_error_on_bad_rows_rolls_back_the_whole_batch(sink, pg_url):
    with pytest.raises(SinkError, match="write of 2 rows failed.*null value"):
        sink.write([(7, 1, T0, "temperature_c", 1.0), (7, 2, T0, "temperature_c", None)])
    assert stored(pg_url) == []
    assert sink.write([(7, 1, T0, "temperature_c", 1.0)]) == 1  # the connection still works


# --- replay windows -------------------------------------------------------------------------


def test_replay_store_round_trip_and_merge_between_receivers(pg_url):
    a, b = PgReplayStore(pg_url), PgReplayStore(pg_url)
    assert a.load() == {}
    top = (1 << 64) - 1  # all 64 bits: does not fit a signed bigint
    a.save([(7, "aa", 100, 0b1011), (8, "bb", frame.MAX_U32, top)])
    assert b.load() == {7: ("aa", 100, 0b1011), 8: ("bb", frame.MAX_U32, top)}
    # b saw seqs a did not: 102 (so highest 102) and 99; a's 100, 99, 97 stay seen
    b.save([(7, "aa", 102, 0b1001)])
    assert a.load()[7] == ("aa", 102, 0b101101)
    a.save([(7, "aa", 101, 0b1)])  # a is behind: the stored window does not move back
    assert b.load()[7] == ("aa", 102, 0b101111)
    a.save([(8, "cc", 3, 0b1)])  # node 8 was given a new key: its old window is gone
    assert b.load()[8] == ("cc", 3, 0b1)
    assert a.bad_rows == b.bad_rows == 0
    assert a.path == pg.describe(pg_url)
    a.close()
    b.close()


def test_merge_window_far_apart_does_not_build_huge_numbers():
    assert merge_window(("k", 0, 1), ("k", frame.MAX_U32, 1), 64) == ("k", frame.MAX_U32, 1)
    assert merge_window(("k", 10, 1), ("k", 5, 1), 64) == ("k", 10, 0b100001)
    assert merge_window(("k", 10, 1), ("j", 5, 1), 64) == ("j", 5, 1)


def v1_frame(node_id, seq, key):
    return frame.encode_data(
        frame.Signer(key), node_id, seq, (1, 2, 3), [(2150, 4500, 101325)], [0], version=1
    )


def test_two_receivers_share_keys_windows_and_readings(pg_url):
    PgKeyStore(pg_url).import_registry(Registry({7: NodeKeys(7, KEY7), 8: NodeKeys(8, KEY8)}))

    def receiver():
        keys = PgKeyStore(pg_url).load_accepted()
        store = PgReplayStore(pg_url)
        return Receiver(Verifier(keys, store=store), PostgresSink(pg_url), clock=lambda: T0)

    a = receiver()
    ack = a.datagram(v1_frame(7, 5, KEY7))
    assert uplink.decode_ack(ack, frame.Signer(KEY7)).acked == [(5, 5)]  # seqs 5..5
    v2 = frame.encode_data(frame.Signer(KEY8), 8, 40, (1,), [(2150,)], [0], version=2)
    assert a.datagram(v2) is not None
    b = receiver()  # started after a saved its windows: a replay of seq 5 is refused
    assert b.datagram(v1_frame(7, 5, KEY7)) is None
    assert b.counters["rejected_duplicate"] == 1
    assert b.datagram(v2) is not None  # a v2 copy: acked again, stored once
    assert b.counters["values_already_stored"] == 1
    assert len(stored(pg_url)) == 4
    assert query(pg_url, "SELECT node_id, key_id, highest FROM replay_windows") == [
        (7, key_id(KEY7), 5)
    ]


# --- node keys ------------------------------------------------------------------------------


def registry_file(tmp_path, now):
    """A key file with each case: plain, rotated in grace, rotated long ago, revoked (at a time
    and at one not known), with fields of its own."""
    nodes = {
        1: NodeKeys(1, bytes([1]) * 16, created=now - 86400, extra={"name": "Titov trg"}),
        2: NodeKeys(2, bytes([2]) * 16, rotated=now - 600, previous=bytes([22]) * 16),
        3: NodeKeys(3, bytes([3]) * 16, rotated=now - 9e5, previous=bytes([33]) * 16),
        4: NodeKeys(4, bytes([4]) * 16, revoked=now - 60),
        5: NodeKeys(5, bytes([5]) * 16, revoked=True),
    }
    nodes[2].previous_until = now + 3600
    nodes[3].previous_until = now + 3600  # expires between the two checks below
    path = tmp_path / "keys.json"
    keyfile.save_registry(path, Registry(nodes, {"site": "Koper"}), now=now, backup=False)
    return path


def test_key_store_holds_the_registry_and_accepts_what_the_file_does(pg_url, tmp_path):
    now = 1_750_000_000
    path = registry_file(tmp_path, now)
    registry = keyfile.load_registry(path)
    store = PgKeyStore(pg_url)
    assert store.import_registry(registry) == (5, 0, 0)
    assert store.import_registry(registry) == (0, 0, 0)  # unchanged: nothing written
    assert store.load_registry().nodes == registry.nodes
    for t in (now, now + 3599, now + 3600, now + 10**6):
        assert store.load_accepted(t) == keyfile.load_accepted_keys(path, t)
    assert store.load_accepted(now)[2] == (bytes([2]) * 16, bytes([22]) * 16)
    assert 2 in store.load_accepted(now + 3600) and 4 not in store.load_accepted(now)
    # another receiver sees a rotation and a removal once imported
    other = PgKeyStore(pg_url)
    registry.nodes[1].previous, registry.nodes[1].key = registry.nodes[1].key, bytes([9]) * 16
    registry.nodes[1].previous_until = now + 60
    del registry.nodes[5]
    assert store.import_registry(registry) == (0, 1, 1)
    assert other.load_accepted(now)[1] == (bytes([9]) * 16, bytes([1]) * 16)
    assert other.load_accepted(now + 60)[1] == (bytes([9]) * 16,)
    assert sorted(other.load_registry().nodes) == [1, 2, 3, 4]
    store.close()
    other.close()


def test_key_store_refuses_a_bad_key_before_writing(pg_url):
    store = PgKeyStore(pg_url)
    with pytest.raises(KeyFileError, match="16-byte key"):
        store.import_registry(Registry({1: NodeKeys(1, b"short")}))
    assert store.load_registry().nodes == {}
    store.close()

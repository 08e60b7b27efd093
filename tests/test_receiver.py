# Tests for host_tools/receive/receiver.py and host_tools/receive/sinks.py: verification, replay
# window, timestamps, ack-after-durable, and the UDP loop on real sockets, with real SQLite files.

import collections
import contextlib
import io
import json
import logging
import random
import socket
import sqlite3
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_tools.receive.logfold import FoldingLog
from host_tools.receive.receiver import (
    Intake,
    Receiver,
    Rejected,
    ReplayStore,
    ReplayWindow,
    UdpSource,
    Verifier,
    frame_rows,
    serve,
)
from host_tools.receive.sinks import JsonlSink, SinkError, SqliteSink, TeeSink
from protocols import frame, uplink

KEY7 = bytes(range(16))
KEY8 = bytes(range(100, 116))
WRONG = bytes(16)
KEYS = {7: KEY7, 8: KEY8}
RX_TIME = 1_700_000_000.25  # the receiver's clock in most tests: unix seconds, UTC

BME = (1, 2, 3)
READINGS = [(2150, 4500, 101325), (2160, 4510, 101320), (2171, 4490, 101318)]
AGES = [120, 60, 0]


def data_frame(node_id=7, seq=1, key=None, readings=READINGS, ages=AGES, channels=BME, version=1):
    """A DATA frame; v1 (seq) unless version=2 (seq is then the first reading index)."""
    signer = frame.Signer(key if key is not None else KEYS[node_id])
    return frame.encode_data(signer, node_id, seq, channels, readings, ages, version=version)


def stored(db_path):
    with sqlite3.connect(db_path) as db:
        return db.execute(
            "SELECT node_id, ts, quantity, value FROM readings "
            "ORDER BY ts, quantity, reading_index"
        ).fetchall()


class FakeClock:
    def __init__(self, now=RX_TIME):
        self.now = now

    def __call__(self):
        return self.now


class ListSink:
    def __init__(self):
        self.rows = []

    def write(self, rows):
        self.rows.extend(rows)
        return len(rows)


class FlakySink:
    """Raises on the first `failures` writes, then delegates."""

    def __init__(self, inner, failures=1):
        self.inner = inner
        self.failures = failures
        self.calls = 0

    def write(self, rows):
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(28, "No space left on device")
        return self.inner.write(rows)


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "citynode.db"


@pytest.fixture
def sink(db_path):
    s = SqliteSink(db_path)
    yield s
    s.close()


@pytest.fixture
def receiver(sink):
    return Receiver(Verifier(KEYS), sink, clock=FakeClock())


# --- replay window ----------------------------------------------------------------------


def test_window_in_order_duplicate_late_and_replay():
    w = ReplayWindow(64)
    assert w.check(100) is None
    w.mark(100)
    assert w.check(100) == "duplicate"
    assert w.check(101) is None
    assert w.check(99) is None  # late but inside the window
    w.mark(99)
    assert w.check(99) == "duplicate"
    assert w.check(100 - 63) is None  # the oldest seq the window still holds
    assert w.check(100 - 64) == "replay"
    w.mark(300)  # a jump larger than the window forgets everything before it
    assert w.bitmap == 1
    assert w.check(299) is None
    assert w.check(236) == "replay"


@given(st.lists(st.integers(0, 300), max_size=200), st.integers(1, 70))
def test_window_matches_a_model(seqs, size):
    """Against a set of every seq ever seen: accepted iff unseen and within size of the max."""
    w = ReplayWindow(size)
    seen = set()
    for seq in seqs:
        verdict = w.check(seq)
        if seen and seq <= max(seen) - size:
            assert verdict == "replay"
        elif seq in seen:
            assert verdict == "duplicate"
        else:
            assert verdict is None
            w.mark(seq)
            seen.add(seq)


# --- accepting frames -------------------------------------------------------------------


def test_valid_frame_stored_with_receive_time_minus_age_then_acked(receiver, db_path):
    ack = receiver.datagram(data_frame(seq=42))
    rows = stored(db_path)
    assert len(rows) == 9
    assert rows[:3] == [
        (7, RX_TIME - 120, "humidity_pct", 45.0),
        (7, RX_TIME - 120, "pressure_hpa", 1013.25),
        (7, RX_TIME - 120, "temperature_c", 21.5),
    ]
    assert rows[-1] == (7, RX_TIME, "temperature_c", 21.71)
    decoded = uplink.decode_ack(ack, frame.Signer(KEY7))
    assert decoded == uplink.Ack(7, int(RX_TIME), [(42, 42)], None)  # v1 frame: v1 ack
    with pytest.raises(frame.FrameError):
        uplink.decode_ack(ack, frame.Signer(KEY8))  # signed with the node's own key
    assert receiver.counters == {"frames_accepted": 1, "readings_accepted": 3}


def test_ts_rounded_to_milliseconds():
    sink = ListSink()
    r = Receiver(Verifier(KEYS), sink, clock=FakeClock(1_700_000_000.123456))
    assert r.datagram(data_frame(readings=[(1, 2, 3)], ages=[5])) is not None
    assert {row[2] for row in sink.rows} == {1_699_999_995.123}


def test_unknown_channel_is_carried_raw():
    sink = ListSink()
    r = Receiver(Verifier(KEYS), sink, clock=FakeClock())
    r.datagram(data_frame(channels=(1, 99), readings=[(2000, 7)], ages=[0]))
    assert sink.rows == [
        (7, None, RX_TIME, "temperature_c", 20.0),
        (7, None, RX_TIME, "channel_99", 7.0),
    ]


def test_duplicate_from_two_gateways_stored_once(receiver, db_path):
    datagram = data_frame(seq=5)
    assert receiver.datagram(datagram) is not None
    assert receiver.datagram(datagram) is None
    assert len(stored(db_path)) == 9
    assert receiver.counters["frames_heard_again"] == 1
    assert receiver.counters["frames_accepted"] == 1


def test_late_out_of_order_seq_accepted_once(receiver):
    for seq in (10, 12):
        assert receiver.datagram(data_frame(seq=seq)) is not None
    assert receiver.datagram(data_frame(seq=11)) is not None
    assert receiver.datagram(data_frame(seq=11)) is None
    assert receiver.counters["frames_accepted"] == 3
    assert receiver.counters["frames_heard_again"] == 1


def test_seq_older_than_window_is_replay(receiver, caplog):
    assert receiver.datagram(data_frame(seq=100)) is not None
    with caplog.at_level(logging.WARNING, logger="citynode.receiver"):
        assert receiver.datagram(data_frame(seq=36)) is None
    assert receiver.counters["rejected_replay"] == 1
    assert "reason=replay node=7" in caplog.text
    assert receiver.datagram(data_frame(seq=37)) is not None  # just inside the window


def test_windows_are_per_node(receiver):
    assert receiver.datagram(data_frame(node_id=7, seq=100)) is not None
    assert receiver.datagram(data_frame(node_id=8, seq=1)) is not None


def test_wrong_key_is_tag(receiver, caplog, db_path):
    datagram = data_frame(seq=1, key=WRONG)
    with caplog.at_level(logging.WARNING, logger="citynode.receiver"):
        assert receiver.datagram(datagram) is None
    assert receiver.counters == {"rejected_tag": 1}
    assert caplog.messages == [
        "frame rejected reason=tag node=7 len=%d: bad tag for node 7 "
        "(wrong key or corrupted frame)" % len(datagram)
    ]
    assert stored(db_path) == []


def test_unknown_node(receiver):
    signer = frame.Signer(KEY7)
    datagram = frame.encode_data(signer, 9, 1, BME, READINGS, AGES)
    assert receiver.datagram(datagram) is None
    assert receiver.counters == {"rejected_unknown_node": 1}


def test_ack_frame_sent_to_host_is_rejected(receiver):
    ack = uplink.encode_ack(frame.Signer(KEY7), 7, 1, [(1, 1)])
    assert receiver.datagram(ack) is None
    assert receiver.counters == {"rejected_unsupported_type": 1}


def test_status_frame_logged_acked_and_shares_the_seq_window(receiver, caplog, db_path):
    status = frame.encode_status(frame.Signer(KEY7), 7, 20, {3: 51200, 1: 4, 42: -1}, version=1)
    with caplog.at_level(logging.INFO, logger="citynode.receiver"):
        ack = receiver.datagram(status)
    assert uplink.decode_ack(ack, frame.Signer(KEY7)).acked == [(20, 20)]
    assert caplog.messages == ["status node=7 seq=20 boot_count=4 free_heap=51200 field_42=-1"]
    assert receiver.counters == {"status_accepted": 1}
    assert stored(db_path) == []
    assert receiver.datagram(status) is None
    assert receiver.datagram(data_frame(seq=20)) is None  # same seq space as DATA
    assert receiver.counters["frames_heard_again"] == 1  # the same bytes: a 2nd gateway
    assert receiver.counters["rejected_duplicate"] == 1  # another frame under seq 20
    assert receiver.datagram(data_frame(seq=19)) is not None


def test_verifier_check_does_not_mark_seen():
    v = Verifier(KEYS)
    datagram = data_frame(seq=3)
    assert v.check(datagram).seq == 3
    assert v.check(datagram).seq == 3  # still new: nothing was accepted
    v.accept(v.check(datagram))
    with pytest.raises(Rejected) as info:
        v.check(datagram)
    assert info.value.reason == "duplicate"
    assert info.value.node_id == 7


def test_verifier_caches_one_signer_per_node():
    v = Verifier(KEYS)
    assert v.signer(7) is v.signer(7)
    assert v.signer(7) is not v.signer(8)


# --- bad datagrams: counted, logged, never raised ---------------------------------------


def assert_still_works(receiver, seq=1000):
    before = receiver.counters["frames_accepted"]
    assert receiver.datagram(data_frame(node_id=8, seq=seq)) is not None
    assert receiver.counters["frames_accepted"] == before + 1


def test_truncated_frames(receiver):
    datagram = data_frame(seq=1)
    for n in range(len(datagram)):
        assert receiver.datagram(datagram[:n]) is None
    assert receiver.counters["frames_accepted"] == 0
    assert sum(receiver.counters.values()) == len(datagram)
    assert receiver.counters["rejected_truncated"] >= 6  # shorter than any frame
    assert_still_works(receiver)


def test_every_single_bit_flip_is_rejected(receiver):
    datagram = data_frame(seq=1)
    for bit in range(8 * len(datagram)):
        flipped = bytearray(datagram)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert receiver.datagram(bytes(flipped)) is None
    assert receiver.counters["frames_accepted"] == 0
    assert receiver.counters["rejected_tag"] > 0
    assert_still_works(receiver)


def test_oversized_datagram(receiver):
    assert receiver.datagram(data_frame() + bytes(300)) is None
    assert receiver.counters == {"rejected_too_long": 1}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_garbage_never_raises(garbage):
    r = Receiver(Verifier(KEYS), ListSink(), clock=FakeClock())
    r.log.disabled = True
    try:
        assert r.datagram(garbage) is None
    finally:
        r.log.disabled = False
    assert r.counters["frames_accepted"] == 0
    assert sum(r.counters.values()) == 1
    assert_still_works(r)


def test_seeded_mutations_never_raise(receiver):
    rng = random.Random(1)
    datagram = data_frame(seq=1)
    receiver.log.disabled = True
    try:
        for _ in range(2000):
            b = bytearray(datagram)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            receiver.datagram(bytes(b))
    finally:
        receiver.log.disabled = False
    # a mutation that left the bytes unchanged is the real frame: accepted once at most
    assert receiver.counters["frames_accepted"] <= 1
    assert_still_works(receiver)


# --- sink failure: no ack, not marked seen, retransmission accepted ---------------------


def test_sink_failure_means_no_ack_and_retransmission_accepted(db_path, caplog):
    sqlite_sink = SqliteSink(db_path)
    r = Receiver(Verifier(KEYS), FlakySink(sqlite_sink), clock=FakeClock())
    datagram = data_frame(seq=7)
    with caplog.at_level(logging.ERROR, logger="citynode.receiver"):
        assert r.datagram(datagram) is None
    assert r.counters == {"sink_error": 1}
    assert "sink failed node=7 seq=7: OSError" in caplog.text
    assert stored(db_path) == []
    ack = r.datagram(datagram)  # the node retransmits, having had no ack
    assert uplink.decode_ack(ack, frame.Signer(KEY7)).acked == [(7, 7)]
    assert len(stored(db_path)) == 9
    assert r.datagram(datagram) is None
    assert r.counters["frames_heard_again"] == 1
    sqlite_sink.close()


# --- format v2: identity ---------------------------------------------------------------


def v2_frame(index, node_id=7, key=None, readings=READINGS, ages=AGES):
    return data_frame(node_id, index, key, readings, ages, version=2)


def identity_rows(db_path):
    with sqlite3.connect(db_path) as db:
        return db.execute(
            "SELECT node_id, reading_index, ts, quantity FROM readings ORDER BY reading_index, "
            "quantity"
        ).fetchall()


def test_v2_frame_stored_under_its_reading_indices_and_acked_by_range(receiver, db_path):
    datagram = v2_frame(40310)
    ack = receiver.datagram(datagram)
    rows = identity_rows(db_path)
    assert [r[1] for r in rows] == [40310] * 3 + [40311] * 3 + [40312] * 3
    assert rows[0][2] == RX_TIME - 120
    decoded = uplink.decode_ack(ack, frame.Signer(KEY7))
    assert decoded == uplink.Ack(7, int(RX_TIME), [(40310, 40312)], datagram[-4:])


def test_v2_copy_resent_later_with_new_ages_is_acked_and_not_stored_again(db_path):
    """A lost ack: the node sends the same readings again, ages counted anew, 7 s later. The
    copy is acked (the node must forget them) and dropped; the first timestamps stand."""
    clock = FakeClock()
    sink = SqliteSink(db_path)
    r = Receiver(Verifier(KEYS), sink, clock=clock)
    assert r.datagram(v2_frame(5)) is not None
    first = identity_rows(db_path)
    clock.now += 7
    again = v2_frame(5, ages=[a + 7 for a in AGES])
    ack = r.datagram(again)
    assert uplink.decode_ack(ack, frame.Signer(KEY7)).echo == again[-4:]
    assert identity_rows(db_path) == first
    assert r.counters["frames_copies"] == 1
    sink.close()


def test_v2_copy_is_dropped_by_the_sink_when_the_receiver_forgot_it(db_path):
    """A fresh receiver (restart, lost state, a second receiver on the same database) has no
    memory of the frame: the database's identity key drops the copy, and it is still acked."""
    for clock_s in (RX_TIME, RX_TIME + 12):
        sink = SqliteSink(db_path)
        r = Receiver(Verifier(KEYS), sink, clock=FakeClock(clock_s))
        assert r.datagram(v2_frame(100)) is not None
        sink.close()
    rows = identity_rows(db_path)
    assert len(rows) == 9
    assert {row[2] for row in rows} == {RX_TIME - 120, RX_TIME - 60, RX_TIME}
    assert r.counters["values_already_stored"] == 9


def test_v2_overlapping_backlog_stores_only_the_new_readings(receiver, db_path):
    assert receiver.datagram(v2_frame(10, readings=READINGS[:2], ages=[60, 0])) is not None
    assert receiver.datagram(v2_frame(10, ages=[70, 10, 0])) is not None
    assert [r[1] for r in identity_rows(db_path)] == [10] * 3 + [11] * 3 + [12] * 3
    assert receiver.counters["values_already_stored"] == 6


def test_v2_frame_heard_twice_is_acked_once_quietly(receiver, db_path, caplog):
    """Two gateways hear one transmission: the same bytes twice. One ack (a second would
    collide with it on the air), counted apart, not logged as a rejection."""
    datagram = v2_frame(7)
    with caplog.at_level(logging.WARNING, logger="citynode.receiver"):
        acks = receiver.handle([(datagram, RX_TIME), (datagram, RX_TIME + 0.2)])
        late = receiver.datagram(datagram, RX_TIME + 0.5)  # the second gateway, a batch later
    assert acks[0] is not None and acks[1] is None and late is None
    assert len(identity_rows(db_path)) == 9
    assert receiver.counters["frames_heard_again"] == 2
    assert "rejected" not in caplog.text


def test_v2_resent_copy_in_the_same_batch_is_acked_too(receiver, db_path):
    first, again = v2_frame(7), v2_frame(7, ages=[a + 30 for a in AGES])
    acks = receiver.handle([(first, RX_TIME), (again, RX_TIME)])
    assert all(acks)
    assert uplink.decode_ack(acks[1], frame.Signer(KEY7)).echo == again[-4:]
    assert len(identity_rows(db_path)) == 9
    assert receiver.counters["frames_copies"] == 1


def test_v2_receive_time_is_the_sources(receiver, db_path):
    """rx_time given by the source (read time) is used, not the time the batch is handled."""
    receiver.handle([(v2_frame(1, readings=[(1, 2, 3)], ages=[4]), RX_TIME - 5)])
    assert {r[2] for r in identity_rows(db_path)} == {RX_TIME - 9}


def test_v2_status_frame_acked_with_its_tag_and_windowed_by_seq(receiver, caplog):
    status = frame.encode_status(frame.Signer(KEY7), 7, 20, {1: 4})
    ack = receiver.datagram(status)
    assert uplink.decode_ack(ack, frame.Signer(KEY7)) == uplink.Ack(
        7, int(RX_TIME), [], status[-4:]
    )
    assert receiver.datagram(status) is None
    assert receiver.counters["frames_heard_again"] == 1


def test_previous_key_accepted_during_grace_and_acked_under_it(db_path):
    old, new = KEY7, bytes(range(50, 66))
    sink = SqliteSink(db_path)
    r = Receiver(Verifier({7: (new, old)}), sink, clock=FakeClock())
    for i, key in enumerate((old, new, old)):
        datagram = data_frame(7, 10 * i, key=key, version=2)
        ack = r.datagram(datagram)
        assert uplink.decode_ack(ack, frame.Signer(key)).echo == datagram[-4:]
    assert r.counters["frames_accepted"] == 3
    assert r.datagram(data_frame(7, 50, key=WRONG, version=2)) is None
    assert r.counters["rejected_tag"] == 1
    sink.close()


def test_sqlite_schema_1_file_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE readings(node_id INTEGER, ts REAL, quantity TEXT, value REAL, "
            "PRIMARY KEY(node_id, ts, quantity))"
        )
        db.execute("INSERT INTO readings VALUES (7, 1.5, 'temperature_c', 21.0)")
    sink = SqliteSink(path)
    assert sink.upgraded == 1
    assert sink.write([(7, None, 1.5, "temperature_c", 21.0)]) == 0  # v1 rule still applies
    assert sink.write([(7, 3, 1.5, "temperature_c", 21.0)]) == 1
    sink.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT * FROM readings ORDER BY reading_index").fetchall()
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
    assert rows == [(7, None, 1.5, "temperature_c", 21.0), (7, 3, 1.5, "temperature_c", 21.0)]


@pytest.mark.parametrize(
    "setup",
    [
        "CREATE TABLE windows(node_id INTEGER, other TEXT)",
        "CREATE TABLE windows (node_id INTEGER PRIMARY KEY, key_id TEXT NOT NULL,"
        " highest INTEGER NOT NULL, bitmap TEXT NOT NULL);"
        "INSERT INTO windows VALUES (7, 'x', 5, 'zz');"
        "INSERT INTO windows VALUES (8, 'x', -5, 'ff')",
    ],
    ids=["other_columns", "bad_rows"],
)
def test_replay_state_with_bad_contents_is_a_clear_error_or_skipped(tmp_path, setup):
    from host_tools.receive.receiver import StateError

    path = tmp_path / "keys.json.replay"
    with sqlite3.connect(path) as db:
        db.executescript(setup)
    if "other" in setup:
        with pytest.raises(StateError, match="table windows has columns"):
            ReplayStore(path)
        return
    store = ReplayStore(path)
    assert store.load() == {}
    assert store.bad_rows == 2
    Verifier(KEYS, store=store)  # no traceback
    store.close()


# --- sinks ------------------------------------------------------------------------------


def test_sqlite_schema_and_insert_or_ignore(sink, db_path):
    rows = frame_rows(uplink.decode_data(data_frame(), frame.Signer(KEY7)), RX_TIME)
    assert sink.write(rows) == 9
    assert sink.write(rows) == 0
    with sqlite3.connect(db_path) as db:
        (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'readings'").fetchone()
        info = db.execute("PRAGMA table_info(readings)").fetchall()
        (version,) = db.execute("PRAGMA user_version").fetchone()
    assert "ts REAL NOT NULL /* unix seconds, UTC */" in sql
    assert [(c[1], c[2], c[3]) for c in info] == [
        ("node_id", "INTEGER", 1),
        ("reading_index", "INTEGER", 0),
        ("ts", "REAL", 1),
        ("quantity", "TEXT", 1),
        ("value", "REAL", 1),
    ]
    assert version == 2


def test_sqlite_reopen_keeps_rows(db_path):
    s = SqliteSink(db_path)
    s.write([(7, None, 1.5, "temperature_c", 21.0)])
    s.close()
    s = SqliteSink(db_path)
    rows = [(7, None, 1.5, "temperature_c", 99.0), (7, None, 2.5, "temperature_c", 22.0)]
    assert s.write(rows) == 1
    s.close()
    assert stored(db_path) == [(7, 1.5, "temperature_c", 21.0), (7, 2.5, "temperature_c", 22.0)]


def test_sqlite_rejects_foreign_table(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE readings(a, b)")
    with pytest.raises(SinkError, match="table readings has columns"):
        SqliteSink(path)


def test_sqlite_failed_write_rolls_back(sink, db_path):
    with pytest.raises(sqlite3.Error):
        sink.write([(7, 5, 1.0, "temperature_c", 1.0), (7, 6, 2.0, "x", object())])  # unbindable
    assert stored(db_path) == []
    assert sink.write([(7, 5, 1.0, "temperature_c", 1.0)]) == 1  # no transaction left open


def test_jsonl_sink(tmp_path):
    stream = io.StringIO()
    assert JsonlSink(stream).write([(7, 40, 1.5, "temperature_c", 21.0)]) == 1
    assert json.loads(stream.getvalue()) == {
        "id": "7/40/temperature_c",
        "node_id": 7,
        "reading_index": 40,
        "ts": 1.5,
        "time": "1970-01-01T00:00:01.500Z",
        "quantity": "temperature_c",
        "value": 21.0,
    }
    with open(tmp_path / "out.jsonl", "a", encoding="utf-8") as f:
        sink = JsonlSink(f)  # a file: fsynced, with a ledger beside it
        rows = [(7, 40, 1.5, "temperature_c", 21.0), (7, 41, 2.5, "temperature_c", 21.0)]
        assert sink.write(rows + rows) == 2
        assert sink.write([(7, 40, 9.5, "temperature_c", 21.0)]) == 0  # a copy
        sink.close()
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_tee_sink(sink, db_path):
    stream = io.StringIO()
    tee = TeeSink([sink, JsonlSink(stream)])
    assert tee.write([(7, 3, 1.5, "temperature_c", 21.0)]) == 1
    assert len(stored(db_path)) == 1
    assert len(stream.getvalue().splitlines()) == 1


# --- UDP --------------------------------------------------------------------------------


@contextlib.contextmanager
def udp_loop(receiver):
    """The receive loop `citynode receive` runs (UdpSource -> Intake -> serve) on one socket
    bound to a free port; yields its address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    source, intake, stop = UdpSource(sock, poll_s=0.05), Intake(), threading.Event()
    source.start(intake)
    thread = threading.Thread(target=serve, args=(intake, receiver, stop, 0.05), daemon=True)
    thread.start()
    try:
        yield sock.getsockname()
    finally:
        stop.set()
        thread.join(timeout=5)
        source.stop()
    assert not thread.is_alive()


@pytest.fixture
def udp_server(receiver):
    with udp_loop(receiver) as addr:
        yield addr


@pytest.fixture
def client():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def exchange(client, addr, datagram, timeout=5.0):
    """Send a datagram; the ack, or None if none came within timeout."""
    client.settimeout(timeout)
    client.sendto(datagram, addr)
    try:
        reply, source = client.recvfrom(1024)
    except TimeoutError:
        return None
    assert source == addr
    return reply


def test_udp_frame_acked_after_storage(udp_server, client, receiver, db_path):
    assert exchange(client, udp_server, b"\x00garbage", timeout=0.3) is None
    ack = exchange(client, udp_server, data_frame(seq=3))
    assert uplink.decode_ack(ack, frame.Signer(KEY7)).acked == [(3, 3)]
    assert len(stored(db_path)) == 9  # durable by the time the ack arrived
    assert exchange(client, udp_server, data_frame(seq=3), timeout=0.3) is None  # duplicate
    ack = exchange(client, udp_server, data_frame(node_id=8, seq=1))
    assert uplink.decode_ack(ack, frame.Signer(KEY8)).node_id == 8
    assert receiver.counters["frames_accepted"] == 2
    assert receiver.counters["acks_sent"] == 2
    assert receiver.counters["frames_heard_again"] == 1
    assert receiver.counters["rejected_version"] == 1


def test_udp_loop_survives_an_internal_error(client):
    class Broken:
        def __init__(self):
            self.log = logging.getLogger("citynode.test")
            self.folded = FoldingLog(self.log)
            self.counters = collections.Counter()
            self.calls = 0

        def handle(self, batch):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("bug")
            return [b"ack:" + data for data, _ in batch]

    broken = Broken()
    with udp_loop(broken) as addr:
        assert exchange(client, addr, b"one", timeout=0.3) is None
        assert exchange(client, addr, b"two") == b"ack:two"
        assert broken.counters["internal_error"] == 1


def test_replay_windows_survive_a_restart_in_their_store(tmp_path):
    path = tmp_path / "replay.db"
    store = ReplayStore(path)
    rx = Receiver(Verifier(KEYS, store=store), ListSink(), clock=FakeClock())
    for seq in (100, 98):
        assert rx.datagram(data_frame(seq=seq)) is not None
    assert rx.datagram(data_frame(node_id=8, seq=3)) is not None
    store.close()

    # A new receiver on the same store: what was seen is still seen, the window still moves.
    v = Verifier(KEYS, store=ReplayStore(path))
    for seq, reason in ((100, "duplicate"), (98, "duplicate"), (30, "replay")):
        with pytest.raises(Rejected) as e:
            v.check(data_frame(seq=seq))
        assert e.value.reason == reason
    assert v.check(data_frame(seq=99)).seq == 99  # inside the window, not seen
    with pytest.raises(Rejected) as e:
        v.check(data_frame(node_id=8, seq=3))
    assert e.value.reason == "duplicate"

    # Node 7 re-flashed with a new key counts from seq 0 again: its old window does not apply.
    new_key = bytes(range(50, 66))
    v = Verifier({7: new_key, 8: KEY8}, store=ReplayStore(path))
    assert v.check(data_frame(seq=0, key=new_key)).seq == 0
    with pytest.raises(Rejected):
        v.check(data_frame(node_id=8, seq=3))


class BrokenStore:
    path = "/nowhere/replay.db"

    def load(self):
        return {}

    def save(self, rows):
        raise sqlite3.OperationalError("disk I/O error")


def test_a_replay_state_that_cannot_be_saved_still_acks_durable_readings(caplog):
    sink = ListSink()
    rx = Receiver(Verifier(KEYS, store=BrokenStore()), sink, clock=FakeClock())
    with caplog.at_level(logging.ERROR, logger="citynode.receiver"):
        ack = rx.datagram(data_frame(seq=5))
    assert ack is not None and len(sink.rows) == 9
    assert rx.counters["replay_state_error"] == 1
    assert "replay state /nowhere/replay.db not saved: disk I/O error" in caplog.text
    with pytest.raises(Rejected):  # still known in memory
        rx.verifier.check(data_frame(seq=5))


# --- intake and sources -----------------------------------------------------------------


def test_intake_is_bounded_in_bytes_as_well_as_datagrams():
    from host_tools.receive.receiver import Intake

    intake = Intake(maxsize=100, max_bytes=1000)
    assert all(intake.put(b"x" * 200, None, 1.0) for _ in range(5))
    assert intake.put(b"x", None, 1.0) is False  # 1000 bytes queued: full
    batch = intake.get_batch(0.1, 2)
    assert [len(d) for d, _, _ in batch] == [200, 200] and intake.bytes == 600
    assert intake.put(b"y" * 400, None, 2.0) is True
    assert intake.put(b"y", None, 2.0) is False
    small = Intake(maxsize=2, max_bytes=10**6)
    assert small.put(b"a", None) and small.put(b"b", None) and not small.put(b"c", None)


def test_udp_source_stamps_the_read_time_and_drops_oversize_datagrams():
    from host_tools.receive.receiver import MAX_DATAGRAM, Intake, UdpSource

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    source = UdpSource(sock, poll_s=0.05)
    intake = Intake()
    source.start(intake)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            before = time.time()
            client.sendto(b"z" * 60000, sock.getsockname())
            client.sendto(b"z" * (MAX_DATAGRAM + 1), sock.getsockname())
            client.sendto(b"f" * MAX_DATAGRAM, sock.getsockname())
            deadline = time.monotonic() + 5
            batch = []
            while not batch and time.monotonic() < deadline:
                batch = intake.get_batch(0.1, 10)
            after = time.time()
    finally:
        source.stop()
    assert [len(d) for d, _, _ in batch] == [MAX_DATAGRAM]
    assert before <= batch[0][2] <= after  # the time it was read, given to the receiver
    assert source.counters["oversize"] == 2


def test_a_node_whose_count_restarted_is_an_error_and_loses_nothing(receiver, db_path, caplog):
    """A node's journal erased (or its id given to a fresh board): it numbers its readings from
    0 again. Those indices are stored already with other values: the new readings are kept in
    readings_conflicts, counted and logged, not silently dropped as copies."""
    assert receiver.datagram(v2_frame(0)) is not None
    other = [(r[0] + 7, r[1], r[2]) for r in READINGS]
    with caplog.at_level(logging.ERROR, logger="citynode.receiver"):
        assert receiver.datagram(v2_frame(0, readings=other, ages=[30, 20, 10])) is not None
    assert receiver.counters["index_conflicts"] == 9
    assert "count restarted" in caplog.text
    with sqlite3.connect(db_path) as db:
        kept = db.execute("SELECT reading_index, value FROM readings_conflicts").fetchall()
    assert len(kept) == 9 and {i for i, _ in kept} == {0, 1, 2}
    assert len(identity_rows(db_path)) == 9  # the first readings stand
    # a true copy (the same values, re-sent) is no conflict
    assert receiver.datagram(v2_frame(0, ages=[a + 5 for a in AGES])) is not None
    assert receiver.counters["index_conflicts"] == 9

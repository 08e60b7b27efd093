# Tests for host_tools/receiver.py and host_tools/sinks.py: verification, replay window,
# timestamps, ack-after-durable, and the UDP loop on real sockets, with real SQLite files.

import collections
import io
import json
import logging
import random
import socket
import sqlite3
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_tools.receiver import (
    Receiver,
    Rejected,
    ReplayStore,
    ReplayWindow,
    Verifier,
    frame_rows,
    serve_udp,
)
from host_tools.sinks import JsonlSink, SinkError, SqliteSink, TeeSink
from protocols import frame, uplink

KEY7 = bytes(range(16))
KEY8 = bytes(range(100, 116))
WRONG = bytes(16)
KEYS = {7: KEY7, 8: KEY8}
RX_TIME = 1_700_000_000.25  # the receiver's clock in most tests: unix seconds, UTC

BME = (1, 2, 3)
READINGS = [(2150, 4500, 101325), (2160, 4510, 101320), (2171, 4490, 101318)]
AGES = [120, 60, 0]


def data_frame(node_id=7, seq=1, key=None, readings=READINGS, ages=AGES, channels=BME):
    signer = frame.Signer(key if key is not None else KEYS[node_id])
    return frame.encode_data(signer, node_id, seq, channels, readings, ages)


def stored(db_path):
    with sqlite3.connect(db_path) as db:
        return db.execute(
            "SELECT node_id, ts, quantity, value FROM readings ORDER BY ts, quantity"
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
    assert decoded == uplink.Ack(7, int(RX_TIME), [(42, 42)])
    with pytest.raises(frame.FrameError):
        uplink.decode_ack(ack, frame.Signer(KEY8))  # signed with the node's own key
    assert receiver.counters == {"frames_accepted": 1, "readings_accepted": 3}


def test_ts_rounded_to_milliseconds():
    sink = ListSink()
    r = Receiver(Verifier(KEYS), sink, clock=FakeClock(1_700_000_000.123456))
    assert r.datagram(data_frame(readings=[(1, 2, 3)], ages=[5])) is not None
    assert {row[1] for row in sink.rows} == {1_699_999_995.123}


def test_unknown_channel_is_carried_raw():
    sink = ListSink()
    r = Receiver(Verifier(KEYS), sink, clock=FakeClock())
    r.datagram(data_frame(channels=(1, 99), readings=[(2000, 7)], ages=[0]))
    assert sink.rows == [(7, RX_TIME, "temperature_c", 20.0), (7, RX_TIME, "channel_99", 7.0)]


def test_duplicate_from_two_gateways_stored_once(receiver, db_path):
    datagram = data_frame(seq=5)
    assert receiver.datagram(datagram) is not None
    assert receiver.datagram(datagram) is None
    assert len(stored(db_path)) == 9
    assert receiver.counters["rejected_duplicate"] == 1
    assert receiver.counters["frames_accepted"] == 1


def test_late_out_of_order_seq_accepted_once(receiver):
    for seq in (10, 12):
        assert receiver.datagram(data_frame(seq=seq)) is not None
    assert receiver.datagram(data_frame(seq=11)) is not None
    assert receiver.datagram(data_frame(seq=11)) is None
    assert receiver.counters["frames_accepted"] == 3
    assert receiver.counters["rejected_duplicate"] == 1


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
    status = frame.encode_status(frame.Signer(KEY7), 7, 20, {3: 51200, 1: 4, 42: -1})
    with caplog.at_level(logging.INFO, logger="citynode.receiver"):
        ack = receiver.datagram(status)
    assert uplink.decode_ack(ack, frame.Signer(KEY7)).acked == [(20, 20)]
    assert caplog.messages == ["status node=7 seq=20 boot_count=4 free_heap=51200 field_42=-1"]
    assert receiver.counters == {"status_accepted": 1}
    assert stored(db_path) == []
    assert receiver.datagram(status) is None
    assert receiver.datagram(data_frame(seq=20)) is None  # same seq space as DATA
    assert receiver.counters["rejected_duplicate"] == 2
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
    assert r.counters["rejected_duplicate"] == 1
    sqlite_sink.close()


# --- sinks ------------------------------------------------------------------------------


def test_sqlite_schema_and_insert_or_ignore(sink, db_path):
    rows = frame_rows(uplink.decode_data(data_frame(), frame.Signer(KEY7)), RX_TIME)
    assert sink.write(rows) == 9
    assert sink.write(rows) == 0
    with sqlite3.connect(db_path) as db:
        (sql,) = db.execute("SELECT sql FROM sqlite_master WHERE name = 'readings'").fetchone()
        info = db.execute("PRAGMA table_info(readings)").fetchall()
    assert "ts REAL /* unix seconds, UTC */" in sql
    assert [(c[1], c[2], c[5]) for c in info] == [
        ("node_id", "INTEGER", 1),
        ("ts", "REAL", 2),
        ("quantity", "TEXT", 3),
        ("value", "REAL", 0),
    ]


def test_sqlite_reopen_keeps_rows(db_path):
    s = SqliteSink(db_path)
    s.write([(7, 1.5, "temperature_c", 21.0)])
    s.close()
    s = SqliteSink(db_path)
    assert s.write([(7, 1.5, "temperature_c", 99.0), (7, 2.5, "temperature_c", 22.0)]) == 1
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
        sink.write([(7, 1.0, "temperature_c", 1.0), (7, 2.0)])  # second row malformed
    assert stored(db_path) == []
    assert sink.write([(7, 1.0, "temperature_c", 1.0)]) == 1  # no transaction left open


def test_jsonl_sink(tmp_path):
    stream = io.StringIO()
    assert JsonlSink(stream).write([(7, 1.5, "temperature_c", 21.0)]) == 1
    assert json.loads(stream.getvalue()) == {
        "node_id": 7,
        "ts": 1.5,
        "quantity": "temperature_c",
        "value": 21.0,
    }
    with open(tmp_path / "out.jsonl", "a", encoding="utf-8") as f:
        JsonlSink(f).write([(7, 1.5, "temperature_c", 21.0)] * 2)  # a file: fsynced
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 2


def test_tee_sink(sink, db_path):
    stream = io.StringIO()
    tee = TeeSink([sink, JsonlSink(stream)])
    assert tee.write([(7, 1.5, "temperature_c", 21.0)]) == 1
    assert len(stored(db_path)) == 1
    assert len(stream.getvalue().splitlines()) == 1


# --- UDP --------------------------------------------------------------------------------


@pytest.fixture
def udp_server(receiver):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=serve_udp, args=(sock, receiver, stop, 0.05), daemon=True)
    thread.start()
    yield sock.getsockname()
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
    sock.close()


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
    assert receiver.counters["rejected_duplicate"] == 1
    assert receiver.counters["rejected_version"] == 1


def test_udp_loop_survives_an_internal_error(client):
    class Broken:
        def __init__(self):
            self.log = logging.getLogger("citynode.test")
            self.counters = collections.Counter()
            self.calls = 0

        def datagram(self, data):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("bug")
            return b"ack:" + data

    broken = Broken()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    stop = threading.Event()
    thread = threading.Thread(target=serve_udp, args=(sock, broken, stop, 0.05), daemon=True)
    thread.start()
    try:
        addr = sock.getsockname()
        assert exchange(client, addr, b"one", timeout=0.3) is None
        assert exchange(client, addr, b"two") == b"ack:two"
        assert broken.counters["internal_error"] == 1
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()
    assert not thread.is_alive()


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

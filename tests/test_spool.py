# Tests for host_tools/spool.py and host_tools/forward.py: the on-disk spool (real SQLite files,
# a real full disk on a small tmpfs when root), progress and pruning, restart, back-off, and
# forwarders that keep every reading through a sink that fails, hangs or raises.

import errno
import logging
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import pytest

from host_tools.forward import Backoff, Forwarder
from host_tools.receiver import Receiver, Verifier
from host_tools.sinks import DeliveryError, SinkError, SqliteSink, TeeSink, is_disk_full
from host_tools.spool import Spool, SpoolFull
from protocols import frame

KEY7 = bytes(range(16))
KEYS = {7: KEY7}
BME = (1, 2, 3)


def rows(n, node_id=7, t0=1_700_000_000.0):
    return [(node_id, t0 + i, "temperature_c", 20.0 + i / 100) for i in range(n)]


def data_frame(seq, readings=None, ages=None):
    readings = readings or [(2150 + seq % 50, 4500, 101325)] * 3
    # frames ten minutes apart, as a node sends them (equal readings of one node within 1.5 s
    # are one reading sent again, to the SQLite sink)
    ages = ages or [600 * (5000 - seq) + a for a in (120, 60, 0)]
    return frame.encode_data(frame.Signer(KEY7), 7, seq, BME, readings, ages)


class ListSink:
    """A remote sink that records what it was given; fails while `failing` is set."""

    def __init__(self, name="list"):
        self.name = name
        self.delivered = []
        self.failing = None  # a DeliveryError to raise, or an exception class instance
        self.calls = 0

    def deliver(self, rows):
        self.calls += 1
        if self.failing is not None:
            raise self.failing
        self.delivered.extend(rows)

    def close(self):
        pass


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.01)


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool.db")
    yield s
    s.close()


# --- the spool itself -------------------------------------------------------------------


def test_spool_is_wal_and_fsyncs_each_commit(spool):
    db = spool._db()
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_progress_read_advance_prune(spool):
    spool.register("a")
    spool.register("b")
    assert spool.write(rows(5)) == 5
    got = spool.read("a", 3)
    assert [r[1:] for r in got] == rows(3)
    spool.advance("a", got[-1][0])
    assert spool.backlog("a") == 2 and spool.backlog("b") == 5
    assert spool.prune() == 0  # b has passed nothing
    spool.advance("b", spool.read("b", 10)[-1][0])
    assert spool.prune() == 3  # what both have passed
    assert [r[1:] for r in spool.read("a", 10)] == rows(5)[3:]
    assert spool.read("b", 10) == []


def test_ids_never_reused_after_prune(spool):
    spool.register("a")
    spool.write(rows(3))
    last = spool.read("a", 10)[-1][0]
    spool.advance("a", last)
    assert spool.prune() == 3
    spool.write(rows(1, t0=5.0))
    (row,) = spool.read("a", 10)  # a plain rowid would restart at 1 and hide this row
    assert row[0] > last


def test_new_consumer_starts_after_what_is_spooled(spool):
    spool.register("a")
    spool.write(rows(4))
    spool.register("late")
    assert spool.backlog("late") == 0
    spool.write(rows(1, t0=9.0))
    assert [r[1:] for r in spool.read("late", 10)] == rows(1, t0=9.0)
    spool.register("a")  # registering again keeps the mark
    assert spool.backlog("a") == 5


def test_reopen_keeps_rows_and_marks(tmp_path):
    path = tmp_path / "spool.db"
    s = Spool(path)
    s.register("a")
    s.write(rows(6))
    s.advance("a", s.read("a", 2)[-1][0])
    s.close()
    s = Spool(path)
    s.register("a")
    assert [r[1:] for r in s.read("a", 10)] == rows(6)[2:]
    s.close()


def test_spooled_rows_survive_a_killed_process(tmp_path):
    """A process that spooled (commit returned) and was SIGKILLed loses nothing."""
    path = tmp_path / "spool.db"
    script = (
        "import os, signal, sys\n"
        "from host_tools.spool import Spool\n"
        "s = Spool(sys.argv[1])\n"
        "s.register('a')\n"
        "for i in range(50):\n"
        "    s.write([(7, 1000.0 + i, 'temperature_c', float(i))])\n"
        "print('spooled', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -9 and proc.stdout == "spooled\n"
    s = Spool(path)
    s.register("a")
    assert [r[4] for r in s.read("a", 100)] == [float(i) for i in range(50)]
    s.close()


def test_foreign_file_is_refused(tmp_path):
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE spool(a, b)")
    with pytest.raises(SinkError, match="table spool has columns"):
        Spool(path)
    with pytest.raises(SinkError, match="cannot open"):
        Spool(tmp_path / "no" / "dir" / "spool.db")


def test_size_limit_refuses_rows_and_keeps_what_was_spooled(tmp_path):
    s = Spool(tmp_path / "spool.db", max_bytes=64 * 1024)
    s.register("a")
    written = 0
    with pytest.raises(SpoolFull, match=r"disk full or at its limit of 65536 bytes .*not spooled"):
        for i in range(1000):
            written += s.write(rows(50, t0=i * 100.0))
    assert written > 0
    assert s.counters["spool_full"] == 1
    assert s.backlog("a") == written  # the failed write left nothing half-done
    # delivering and pruning makes room again
    s.advance("a", s.read("a", 100000)[-1][0])
    s.prune()
    assert s.write(rows(50, t0=-1e6)) == 50
    s.close()


def test_is_disk_full():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(ValueError("x"))


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB filesystem (tmpfs), mounted for the test: root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % proc.stderr.strip())
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk_means_no_ack_and_nothing_lost(small_disk, caplog):
    spool = Spool(small_disk / "spool.db")
    spool.register("webhook")
    receiver = Receiver(Verifier(KEYS), spool, clock=lambda: 1_700_000_000.0)
    acked = []
    seq = 0
    # fill the disk with a file so only a little room is left for the spool
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (2 * 1024 * 1024 - 256 * 1024))
    with caplog.at_level(logging.ERROR, logger="citynode.receiver"):
        while True:
            seq += 1
            assert seq < 100000, "the disk never filled"
            if receiver.datagram(data_frame(seq)) is None:
                break
            acked.append(seq)
    assert receiver.counters["sink_error"] == 1
    assert spool.counters["spool_full"] == 1
    assert "not acked" in caplog.text and "disk full" in caplog.text
    # every acked frame's readings are in the spool, the unacked one's are not
    assert spool.backlog("webhook") == 9 * len(acked)
    # the node resends after space is freed: accepted once, stored once
    filler.unlink()
    assert receiver.datagram(data_frame(seq)) is not None
    assert receiver.datagram(data_frame(seq)) is None  # a copy: duplicate
    assert spool.backlog("webhook") == 9 * (len(acked) + 1)
    spool.close()


def test_full_spool_first_in_the_tee_keeps_sqlite_clean(tmp_path):
    """With the spool first, a full spool leaves the SQLite sink without the frame, and the
    resent frame keeps its first receive time, so nothing is stored twice anywhere."""
    spool = Spool(tmp_path / "spool.db", max_bytes=32 * 1024)
    spool.register("a")
    db = SqliteSink(tmp_path / "r.db")
    clock = iter(range(1_700_000_000, 1_800_000_000, 7))
    receiver = Receiver(Verifier(KEYS), TeeSink([spool, db]), clock=lambda: float(next(clock)))
    receiver.log.disabled = True
    seq = 0
    try:
        while receiver.datagram(data_frame(seq + 1)) is not None:
            seq += 1
    finally:
        receiver.log.disabled = False
    failed = seq + 1
    spool.advance("a", spool.read("a", 10**6)[-1][0])  # delivered: room again
    spool.prune()
    assert receiver.datagram(data_frame(failed)) is not None
    db.close()
    with sqlite3.connect(tmp_path / "r.db") as conn:
        (count,) = conn.execute("SELECT count(*) FROM readings").fetchone()
        (distinct,) = conn.execute("SELECT count(DISTINCT ts) FROM readings").fetchone()
    assert count == 9 * failed
    assert distinct == 3 * failed
    spool.close()


# --- back-off ---------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_caps():
    b = Backoff(base=1.0, cap=8.0, rng=random.Random(3))
    delays = [b.next() for _ in range(7)]
    for i, d in enumerate(delays):
        full = min(8.0, 2.0**i)
        assert full / 2 <= d <= full
    assert len(set(delays)) == 7  # jittered
    b.reset()
    assert 0.5 <= b.next() <= 1.0


# --- forwarders -------------------------------------------------------------------------


def test_forwarder_delivers_in_order_and_prunes(spool):
    sink = ListSink()
    f = Forwarder(spool, sink, batch=7, poll_s=0.05)
    f.start()
    try:
        spool.write(rows(20))
        wait_until(lambda: len(sink.delivered) == 20, what="delivery")
        spool.write(rows(3, t0=5.0))
        wait_until(lambda: len(sink.delivered) == 23, what="second delivery")
    finally:
        assert f.stop(5)
    assert sink.delivered == rows(20) + rows(3, t0=5.0)
    assert f.counters["delivered"] == 23
    assert spool.read(sink.name, 100) == []
    assert spool._db().execute("SELECT count(*) FROM spool").fetchone() == (0,)


def test_forwarder_retries_with_backoff_then_delivers_everything(spool, caplog):
    sink = ListSink("webhook x")
    sink.failing = DeliveryError("http_500", "x: HTTP 500 Internal Server Error: boom")
    f = Forwarder(spool, sink, backoff=Backoff(base=0.02, cap=0.1), poll_s=0.05)
    with caplog.at_level(logging.WARNING, logger="citynode.forward"):
        f.start()
        try:
            spool.write(rows(10))
            wait_until(lambda: sink.calls >= 3, what="retries")
            assert f.status()["state"] == "retrying"
            assert f.status()["backlog"] == 10
            assert "HTTP 500" in f.status()["last_error"]
            spool.write(rows(5, t0=50.0))  # more arrive while it is down
            sink.failing = None
            wait_until(lambda: len(sink.delivered) == 15, what="delivery after recovery")
        finally:
            assert f.stop(5)
    assert sorted(sink.delivered) == sorted(rows(10) + rows(5, t0=50.0))
    assert f.counters["failed_http_500"] >= 3
    assert (
        "webhook x: delivery failed reason=http_500 attempt=1: x: HTTP 500 Internal Server "
        "Error: boom; 10 readings waiting in the spool, retry in" in caplog.text
    )
    assert f.status()["state"] == "idle" and f.status()["last_error"] is None


def test_a_sink_that_raises_a_bug_loses_nothing(spool, caplog):
    sink = ListSink()
    sink.failing = KeyError("bug")
    f = Forwarder(spool, sink, backoff=Backoff(base=0.01, cap=0.02), poll_s=0.05)
    with caplog.at_level(logging.ERROR, logger="citynode.forward"):
        f.start()
        try:
            spool.write(rows(4))
            wait_until(lambda: f.counters["failed_internal"] >= 2, what="internal failures")
            sink.failing = None
            wait_until(lambda: len(sink.delivered) == 4, what="delivery")
        finally:
            assert f.stop(5)
    assert "internal error delivering 4 readings" in caplog.text


def test_a_hanging_sink_does_not_hold_up_the_others_or_receiving(spool):
    release = threading.Event()

    class Hanging(ListSink):
        def deliver(self, rows):
            release.wait(10)
            raise DeliveryError("timeout", "no answer")

    slow, fast = Hanging("slow"), ListSink("fast")
    forwarders = [Forwarder(spool, s, poll_s=0.05) for s in (slow, fast)]
    for f in forwarders:
        f.start()
    try:
        receiver = Receiver(Verifier(KEYS), spool, clock=lambda: 1_700_000_000.0)
        t0 = time.monotonic()
        for seq in range(1, 21):
            assert receiver.datagram(data_frame(seq)) is not None
        assert time.monotonic() - t0 < 5
        wait_until(lambda: len(fast.delivered) == 180, what="the fast sink")
        assert spool.backlog("slow") == 180
    finally:
        release.set()
        for f in forwarders:
            assert f.stop(5)


def test_forwarder_resumes_after_restart(tmp_path):
    """Rows not yet delivered when the receiver stops are delivered by the next run."""
    path = tmp_path / "spool.db"
    spool = Spool(path)
    sink = ListSink("webhook y")
    sink.failing = DeliveryError("connect", "refused")
    f = Forwarder(spool, sink, backoff=Backoff(base=0.01, cap=0.05), poll_s=0.05)
    f.start()
    spool.write(rows(8))
    wait_until(lambda: sink.calls >= 1, what="an attempt")
    assert f.stop(5)
    spool.close()
    spool = Spool(path)
    sink2 = ListSink("webhook y")
    f = Forwarder(spool, sink2, poll_s=0.05)
    f.start()
    try:
        wait_until(lambda: len(sink2.delivered) == 8, what="delivery after restart")
    finally:
        assert f.stop(5)
        spool.close()
    assert sink2.delivered == rows(8)


def test_unique_names_give_independent_progress(spool):
    names = ["webhook %s" % uuid.uuid4().hex for _ in range(3)]
    for name in names:
        spool.register(name)
    spool.write(rows(3))
    spool.advance(names[0], spool.read(names[0], 10)[-1][0])
    assert [spool.backlog(n) for n in names] == [0, 3, 3]

# Tests for host_tools/receive/spool.py and host_tools/receive/forward.py: the on-disk spool (real
# SQLite files, a real full disk on a small tmpfs when root), progress and pruning, restart,
# back-off, and forwarders that keep every reading through a sink that fails, hangs or raises; each
# reading spooled and forwarded once whatever copies arrive (its ledger of reading identities);
# batches refused for good kept as dead letters and queued again; Retry-After waited for.

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

from host_tools.backoff import Backoff
from host_tools.receive.forward import Forwarder
from host_tools.receive.receiver import Receiver, Verifier
from host_tools.receive.sinks import DeliveryError, SinkError, SqliteSink, TeeSink, is_disk_full
from host_tools.receive.spool import Spool, SpoolFull
from protocols import frame

KEY7 = bytes(range(16))
KEYS = {7: KEY7}
BME = (1, 2, 3)


def rows(n, node_id=7, first=0, t0=1_700_000_000.0):
    """Sink rows of n readings, reading indices first.., a second apart."""
    return [
        (node_id, first + i, t0 + first + i, "temperature_c", 20.0 + (first + i) / 100)
        for i in range(n)
    ]


def data_frame(seq, readings=None, ages=None):
    readings = readings or [(2150 + seq % 50, 4500, 101325)] * 3
    # frames ten minutes apart, as a node sends them
    ages = ages or [600 * (5000 - seq) + a for a in (120, 60, 0)]
    # format v2: three readings a frame, indices 3 * seq ..
    return frame.encode_data(frame.Signer(KEY7), 7, 3 * seq, BME, readings, ages)


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
    spool.write(rows(1, first=100))
    (row,) = spool.read("a", 10)  # a plain rowid would restart at 1 and hide this row
    assert row[0] > last


def test_new_consumer_starts_after_what_is_spooled(spool):
    spool.register("a")
    spool.write(rows(4))
    spool.register("late")
    assert spool.backlog("late") == 0
    spool.write(rows(1, first=100))
    assert [r[1:] for r in spool.read("late", 10)] == rows(1, first=100)
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
        "from host_tools.receive.spool import Spool\n"
        "s = Spool(sys.argv[1])\n"
        "s.register('a')\n"
        "for i in range(50):\n"
        "    s.write([(7, i, 1000.0 + i, 'temperature_c', float(i))])\n"
        "print('spooled', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == -9 and proc.stdout == "spooled\n"
    s = Spool(path)
    s.register("a")
    assert [r[5] for r in s.read("a", 100)] == [float(i) for i in range(50)]
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
            written += s.write(rows(50, first=i * 100))
    assert written > 0
    assert s.counters["spool_full"] == 1
    assert s.backlog("a") == written  # the failed write left nothing half-done
    # delivering and pruning makes room again
    s.advance("a", s.read("a", 100000)[-1][0])
    s.prune()
    assert s.write(rows(50, first=10**6)) == 50
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
    assert receiver.datagram(data_frame(seq)) is None  # the very frame again (a second gateway)
    assert receiver.counters["frames_heard_again"] == 1
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
        spool.write(rows(3, first=100))
        wait_until(lambda: len(sink.delivered) == 23, what="second delivery")
    finally:
        assert f.stop(5)
    assert sink.delivered == rows(20) + rows(3, first=100)
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
            spool.write(rows(5, first=50))  # more arrive while it is down
            sink.failing = None
            wait_until(lambda: len(sink.delivered) == 15, what="delivery after recovery")
        finally:
            assert f.stop(5)
    assert sorted(sink.delivered) == sorted(rows(10) + rows(5, first=50))
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


# --- reading identity: each reading spooled and forwarded once -----------------------------


def test_copies_are_spooled_once_after_delivery_prune_and_reopen(tmp_path):
    path = tmp_path / "spool.db"
    spool = Spool(path)
    sink = ListSink()
    f = Forwarder(spool, sink, batch=4, poll_s=0.05)
    f.start()
    try:
        assert spool.write(rows(10)) == 10
        assert spool.write(rows(10)) == 0  # the same frame again (its ack was lost)
        assert spool.counters["rows_already_spooled"] == 10
        wait_until(lambda: len(sink.delivered) == 10, what="delivery")
        wait_until(lambda: spool._db().execute("SELECT count(*) FROM spool").fetchone() == (0,))
        assert spool.write(rows(10)) == 0  # delivered and pruned: still known
        assert spool.write(rows(5, first=8)) == 3  # overlapping: only the new ones
        wait_until(lambda: len(sink.delivered) == 13, what="the new ones")
    finally:
        assert f.stop(5)
        spool.close()
    spool = Spool(path)  # a restarted receiver
    sink2 = ListSink()
    f = Forwarder(spool, sink2, batch=4, poll_s=0.05)
    f.start()
    try:
        assert spool.write(rows(13) + rows(13)) == 0
        assert spool.write(rows(3, first=12)) == 2
        wait_until(lambda: len(sink2.delivered) == 2, what="after restart")
        time.sleep(0.2)
    finally:
        assert f.stop(5)
        spool.close()
    delivered = sink.delivered + sink2.delivered
    assert delivered == rows(15)  # each reading once, in order, the first copy's timestamp


def test_v1_rows_have_no_identity_here(spool):
    v1 = [(7, None, 1000.0, "temperature_c", 1.0)]
    assert spool.write(v1) == 1
    assert spool.write(v1) == 1  # the SQLite sink has the v1 rules; the spool keeps all


def test_two_receivers_on_one_spool_spool_each_reading_once(tmp_path):
    """Two receivers (each with its own Spool on the same file) hear the same frames: the
    ledger is read and written inside each write's transaction, so each reading is spooled
    once whichever comes first."""
    path = tmp_path / "spool.db"
    spools = [Spool(path), Spool(path)]
    spools[0].register("a")
    counts = [0, 0]

    def receive(k):
        for i in range(0, 400, 4):
            counts[k] += spools[k].write(rows(4, first=i) + rows(2, node_id=8, first=i))

    threads = [threading.Thread(target=receive, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(counts) == 600
    got = [r[1:] for r in spools[0].read("a", 10_000)]
    node8 = [r for i in range(0, 400, 4) for r in rows(2, node_id=8, first=i)]
    assert sorted(got) == sorted(rows(400) + node8)
    for s in spools:
        s.close()


def test_a_copy_resent_to_a_restarted_receiver_is_forwarded_once(tmp_path):
    """Through the receiver: a frame delivered and pruned, then sent again to a restarted
    receiver (which has no memory of it), is acked and not forwarded again."""
    path = tmp_path / "spool.db"
    spool = Spool(path)
    sink = ListSink()
    f = Forwarder(spool, sink, poll_s=0.05)
    f.start()
    try:
        receiver = Receiver(Verifier(KEYS), spool, clock=lambda: 1_700_000_000.0)
        for seq in (1, 2):
            assert receiver.datagram(data_frame(seq)) is not None
        wait_until(lambda: len(sink.delivered) == 18, what="delivery")
        wait_until(lambda: spool._db().execute("SELECT count(*) FROM spool").fetchone() == (0,))
    finally:
        assert f.stop(5)
        spool.close()
    spool = Spool(path)
    f = Forwarder(spool, sink, poll_s=0.05)
    f.start()
    try:
        receiver = Receiver(Verifier(KEYS), spool, clock=lambda: 1_700_000_500.0)
        assert receiver.datagram(data_frame(2)) is not None  # acked again
        assert receiver.datagram(data_frame(3)) is not None
        wait_until(lambda: len(sink.delivered) == 27, what="the new frame")
        time.sleep(0.2)
    finally:
        assert f.stop(5)
        spool.close()
    ids = [(r[0], r[1], r[3]) for r in sink.delivered]
    assert len(ids) == len(set(ids)) == 27
    assert receiver.counters["values_already_stored"] == 9


# --- dead letters ------------------------------------------------------------------------


class Refusing(ListSink):
    """Refuses (for good, like an HTTP 4xx) every batch that holds a reading index in `bad`."""

    def __init__(self, name, bad):
        super().__init__(name)
        self.bad = set(bad)

    def deliver(self, rows):
        self.calls += 1
        if any(r[1] in self.bad for r in rows):
            raise DeliveryError(
                "http_400",
                "http://h/x: HTTP 400 Bad Request: value out of range",
                permanent=True,
            )
        self.delivered.extend(rows)


def test_refused_batches_go_to_the_dead_letters_and_can_be_queued_again(spool, caplog):
    sink = Refusing("webhook x", bad={3, 12})
    other = ListSink("other")
    forwarders = [
        Forwarder(spool, s, batch=5, backoff=Backoff(base=5.0), poll_s=0.05) for s in (sink, other)
    ]
    with caplog.at_level(logging.WARNING, logger="citynode.forward"):
        for f in forwarders:
            f.start()
        try:
            spool.write(rows(20))
            f = forwarders[0]
            # (delivered comes before the forwarder records its place: wait for both, or a
            # loaded machine sees the last batch delivered and still in the backlog)
            wait_until(
                lambda: (
                    len(sink.delivered) == 10
                    and len(other.delivered) == 20
                    and f.status()["backlog"] == 0
                )
            )
            assert sink.calls == 4  # each refused batch tried once, no waiting: no back-off
            assert f.counters["dead_letter"] == 10 and f.counters["failed_http_400"] == 2
            assert f.status()["dead_letters"] == 10 and f.status()["backlog"] == 0
            assert spool.dead_count("webhook x") == 10 and spool.dead_count("other") == 0
            dead = spool.dead_letters()
            assert set(dead) == {"webhook x"} and dead["webhook x"]["rows"] == 10
            assert dead["webhook x"]["reason"] == "http_400"
            assert "HTTP 400 Bad Request: value out of range" in dead["webhook x"]["error"]
            # kept though every consumer has passed them and the spool was pruned
            wait_until(
                lambda: spool._db().execute("SELECT count(*) FROM spool").fetchone()[0] == 0
            )
            # the cause fixed, an operator queues them again: for this sink alone
            sink.bad.clear()
            assert spool.requeue("webhook x") == 10
            wait_until(lambda: len(sink.delivered) == 20, what="the requeued rows")
            time.sleep(0.2)
        finally:
            for f in forwarders:
                assert f.stop(5)
    assert sorted(sink.delivered) == rows(20)
    assert other.delivered == rows(20)  # no copies for the sink that had them
    assert spool.dead_count("webhook x") == 0
    refused = [r for r in caplog.records if "refused, not retried" in r.getMessage()]
    assert len(refused) == 2  # logged once per batch, not per attempt
    assert refused[0].levelno == logging.ERROR
    assert refused[0].getMessage() == (
        "webhook x: 5 readings refused, not retried: http://h/x: HTTP 400 Bad Request: value "
        "out of range; moved to the spool's dead letters (spool ids 1..5); once the cause is "
        "fixed, queue them again with Spool(%r).requeue('webhook x')" % spool.path
    )
    with pytest.raises(SinkError) as info:
        spool.requeue("webhook y")
    assert (
        str(info.value)
        == "spool %s: no sink named 'webhook y'; its sinks: 'other', " % (spool.path)
        + "'webhook x'"
    )


def test_dead_letters_survive_a_restart(tmp_path):
    path = tmp_path / "spool.db"
    spool = Spool(path)
    spool.register("a")
    spool.write(rows(6))
    spool.dead_letter("a", spool.read("a", 4), "http_404", "x: HTTP 404 Not Found")
    assert spool.backlog("a") == 2
    spool.close()
    spool = Spool(path)
    spool.register("a")
    assert spool.dead_count("a") == 4
    assert spool.requeue("a") == 4
    assert [r[1:] for r in spool.read("a", 10)] == rows(6)[4:] + rows(4)
    spool.close()


def test_dead_letter_that_cannot_be_written_keeps_the_rows_queued(spool, caplog):
    class Broken(Spool):
        def dead_letter(self, *args, **kwargs):
            raise sqlite3.OperationalError("disk I/O error")

    spool.close()
    broken = Broken(spool.path)
    sink = Refusing("s", bad={0})
    f = Forwarder(broken, sink, backoff=Backoff(base=0.02, cap=0.05), poll_s=0.05)
    with caplog.at_level(logging.WARNING, logger="citynode.forward"):
        f.start()
        try:
            broken.write(rows(3))
            wait_until(lambda: f.counters["failed_spool"] >= 2, what="retries")
        finally:
            assert f.stop(5)
    assert broken.backlog("s") == 3  # still queued: nothing lost
    assert "cannot move 3 readings to the dead letters: OperationalError: disk I/O error" in (
        caplog.text
    )
    broken.close()


# --- Retry-After ---------------------------------------------------------------------------


class Busy(ListSink):
    """Answers "busy, retry after n s" (a 429 or 503) to the first `times` calls."""

    def __init__(self, retry_after, times=1):
        super().__init__("busy")
        self.retry_after = retry_after
        self.times = times
        self.at = []

    def deliver(self, rows):
        self.at.append(time.monotonic())
        self.calls += 1
        if self.calls <= self.times:
            raise DeliveryError(
                "http_429",
                "busy (Retry-After %g s)" % self.retry_after,
                retry_after=self.retry_after,
            )
        self.delivered.extend(rows)


def test_retry_after_is_waited_at_least(spool):
    sink = Busy(retry_after=0.8)
    f = Forwarder(spool, sink, backoff=Backoff(base=0.01, cap=30.0), poll_s=0.05)
    f.start()
    try:
        spool.write(rows(2))
        wait_until(lambda: sink.calls >= 1)
        assert f.retry_at - time.time() > 0.6  # what the status file shows
        wait_until(lambda: len(sink.delivered) == 2, what="delivery after the wait")
    finally:
        assert f.stop(5)
    assert sink.at[1] - sink.at[0] >= 0.8  # the back-off alone would be 0.01 s


def test_retry_after_is_bounded_by_the_retry_maximum(spool):
    sink = Busy(retry_after=3600.0)
    f = Forwarder(spool, sink, backoff=Backoff(base=0.01, cap=0.3), poll_s=0.05)
    f.start()
    try:
        spool.write(rows(2))
        wait_until(lambda: len(sink.delivered) == 2, timeout=5, what="delivery within the cap")
    finally:
        assert f.stop(5)
    assert 0.29 <= sink.at[1] - sink.at[0] < 2

# Tests for host_tools/receive/ledger.py (range sets of reading indices, their SQLite homes) and
# the append-only file sinks built on them (JsonlSink, InfluxFileSink in
# host_tools/receive/sinks.py): copies dropped, writes that fail part-way (a real file size limit,
# a real full tmpfs when root, a failing fsync) leaving the file exactly as before, and crash
# recovery from real killed processes.

import errno
import json
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_tools.receive import sinks
from host_tools.receive.ledger import FileLedger, MemoryLedger, RangeSet, SqlRanges, split_new
from host_tools.receive.sinks import InfluxFileSink, JsonlSink, SinkError, reading_id

TESTS = Path(__file__).resolve().parent
QUANTITIES = ("temperature_c", "humidity_pct", "pressure_hpa")


def readings(first, n, node_id=7, t0=1_700_000_000.0):
    """Sink rows of n readings (3 quantities each), indices first..first+n-1, 60 s apart."""
    return [
        (node_id, first + i, t0 + 60 * (first + i), q, first + i + k / 10)
        for i in range(n)
        for k, q in enumerate(QUANTITIES)
    ]


# --- RangeSet ------------------------------------------------------------------------------

spans = st.tuples(st.integers(-50, 300), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1]))


def check_invariants(ranges):
    pairs = ranges.ranges()
    for first, last in pairs:
        assert first <= last
    for (_, last), (first, _) in zip(pairs, pairs[1:], strict=False):
        assert last + 1 < first  # sorted, disjoint and not adjacent (else they would be one)


@settings(max_examples=400, deadline=None)
@given(st.lists(spans, max_size=40), st.lists(st.integers(-60, 360), max_size=50))
def test_rangeset_is_a_set_of_integers(adds, probes):
    ranges = RangeSet()
    model = set()
    for first, last in adds:
        ranges.add(first, last)
        model.update(range(first, last + 1))
        check_invariants(ranges)
    for i in list(model) + probes:
        assert (i in ranges) == (i in model)
    # the ranges are exactly the model's maximal runs
    assert sum(last - first + 1 for first, last in ranges.ranges()) == len(model)
    assert RangeSet(ranges.ranges()).ranges() == ranges.ranges()
    assert RangeSet(reversed(adds)).ranges() == ranges.ranges()  # order does not matter


def test_rangeset_merges_adjacent_and_overlapping():
    r = RangeSet()
    r.add(10, 12)
    r.add(14, 15)
    assert r.ranges() == [(10, 12), (14, 15)]
    r.add(13, 13)  # fills the gap: one range
    assert r.ranges() == [(10, 15)]
    r.add(0, 9)
    r.add(16, 16)
    r.add(3, 4)
    assert r.ranges() == [(0, 16)] and len(r) == 1
    assert -1 not in r and 0 in r and 16 in r and 17 not in r


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 3), st.one_of(st.none(), st.integers(0, 30)), st.sampled_from("ab")
        ),
        max_size=40,
    )
)
def test_split_new_keeps_first_copy_and_every_v1_row(keys):
    rows = [(n, i, float(k), q, float(k)) for k, (n, i, q) in enumerate(keys)]
    held = {1: RangeSet([(0, 4)])}
    new, taken = split_new(rows, held)
    expected = []
    seen = set()
    for row in rows:
        n, i, _, q, _ = row
        if i is None:
            expected.append(row)
        elif not (n == 1 and i <= 4) and (n, i, q) not in seen:
            seen.add((n, i, q))
            expected.append(row)
    assert new == expected  # the first copy, in order
    assert taken == {
        n: {i for m, i, *_ in expected if m == n and i is not None}
        for n in {r[0] for r in expected if r[1] is not None}
    }


# --- SqlRanges and FileLedger -------------------------------------------------------------


def test_sqlranges_take_is_part_of_the_callers_transaction(tmp_path):
    db = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    ranges = SqlRanges(db)
    db.execute("BEGIN IMMEDIATE")
    assert ranges.take(readings(0, 5)) == readings(0, 5)
    db.execute("COMMIT")
    db.execute("BEGIN IMMEDIATE")
    assert ranges.take(readings(3, 5)) == readings(5, 3)
    db.execute("ROLLBACK")  # the caller's rows failed: the ledger did not take them either
    assert db.execute("SELECT node_id, first, last FROM ranges").fetchall() == [(7, 0, 4)]
    db.execute("BEGIN IMMEDIATE")
    assert ranges.take(readings(3, 5) + readings(20, 1, node_id=8)) == readings(5, 3) + readings(
        20, 1, node_id=8
    )
    db.execute("COMMIT")
    assert sorted(db.execute("SELECT node_id, first, last FROM ranges")) == [
        (7, 0, 7),
        (8, 20, 20),
    ]
    # a second connection (another receiver on the same spool) sees what was committed
    other = SqlRanges(sqlite3.connect(tmp_path / "s.db", isolation_level=None))
    assert other.take(readings(0, 9)) == readings(8, 1)


def test_memory_ledger():
    ledger = MemoryLedger()
    assert ledger.new_rows(readings(0, 3)) == readings(0, 3)
    ledger.commit(readings(0, 3))
    assert ledger.new_rows(readings(0, 4)) == readings(3, 1)
    v1 = [(7, None, 5.0, "temperature_c", 1.0)]
    ledger.commit(v1)
    assert ledger.new_rows(v1) == v1  # no identity: always new here


def test_file_ledger_keeps_ranges_and_size_across_reopen(tmp_path):
    path = tmp_path / "x.ledger"
    ledger = FileLedger(str(path))
    assert not ledger.known and ledger.size == 0
    ledger.commit(readings(0, 10) + readings(100, 2, node_id=9), 1234)
    ledger.close()
    ledger = FileLedger(str(path))
    assert ledger.known and ledger.size == 1234
    assert ledger.held[7].ranges() == [(0, 9)] and ledger.held[9].ranges() == [(100, 101)]
    assert ledger.new_rows(readings(8, 4)) == readings(10, 2)
    ledger.close()


def test_file_ledger_commit_that_fails_is_written_by_the_next(tmp_path):
    """A commit the ledger file refuses (locked here by a real second connection) keeps the
    rows in memory, and the next commit writes them, even with a later size: a restart then
    knows them though the size recorded is past their lines."""
    path = tmp_path / "x.ledger"
    ledger = FileLedger(str(path))
    ledger._db.execute("PRAGMA busy_timeout=50")
    ledger.commit(readings(0, 2), 100)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        ledger.commit(readings(2, 3), 200)
    assert ledger.new_rows(readings(2, 3)) == []  # held: the lines are in the file
    blocker.execute("ROLLBACK")
    ledger.commit(readings(50, 1, node_id=8), 300)  # another node only
    ledger.close()
    ledger = FileLedger(str(path))
    assert ledger.size == 300
    assert ledger.held[7].ranges() == [(0, 4)]
    assert ledger.held[8].ranges() == [(50, 50)]
    ledger.close()
    blocker.close()


# --- the append-only file sinks -----------------------------------------------------------


class JsonlFile:
    """JsonlSink on a real file, opened as `citynode receive --jsonl FILE` does."""

    suffix = ".jsonl"

    def __init__(self, path):
        self.stream = open(path, "a", encoding="utf-8")
        try:
            self.sink = JsonlSink(self.stream)
        except BaseException:
            self.stream.close()
            raise

    def write(self, rows):
        return self.sink.write(rows)

    def close(self):
        self.sink.close()
        self.stream.close()

    @staticmethod
    def ids(path):
        """One id per reading line, in file order."""
        out = []
        for line in open(path, encoding="utf-8").read().splitlines():
            row = json.loads(line)
            assert set(row) == {
                "id",
                "node_id",
                "reading_index",
                "ts",
                "time",
                "quantity",
                "value",
            }
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", row["time"])
            out.append(row["id"])
        return out

    @staticmethod
    def expected(rows):
        return [reading_id(*r[:4]) for r in rows]


class InfluxFile:
    """InfluxFileSink on a real file."""

    suffix = ".lp"

    def __init__(self, path):
        self.sink = InfluxFileSink(path)

    def write(self, rows):
        return self.sink.write(rows)

    def close(self):
        self.sink.close()

    @staticmethod
    def ids(path):
        """ "node/index" per point line (a point holds a reading's quantities), file order."""
        out = []
        for line in open(path, encoding="utf-8").read().splitlines():
            m = re.fullmatch(r"citynode,node_id=(\d+) \S*\breading_index=(\d+)i\S* \d+", line)
            assert m, line
            out.append("%s/%s" % m.groups())
        return out

    @staticmethod
    def expected(rows):
        ids = []
        for n, i, *_ in rows:
            if "%d/%d" % (n, i) not in ids:
                ids.append("%d/%d" % (n, i))
        return ids


@pytest.fixture(params=[JsonlFile, InfluxFile], ids=["jsonl", "influx"])
def kind(request):
    return request.param


def test_file_sink_drops_copies_across_writes_and_reopen(tmp_path, kind):
    path = tmp_path / ("out" + kind.suffix)
    sink = kind(path)
    assert sink.write(readings(0, 4)) == 12
    assert sink.write(readings(0, 4)) == 0  # the same frame again (a lost ack)
    assert sink.write(readings(2, 4) + readings(2, 4)) == 6  # overlapping, with copies inside
    sink.close()
    assert os.path.exists(str(path) + ".ledger")
    sink = kind(path)  # a restarted receiver
    assert sink.write(readings(0, 6)) == 0
    assert sink.write(readings(6, 1)) == 3
    sink.close()
    assert kind.ids(path) == kind.expected(readings(0, 7))  # each reading once, in order


def test_jsonl_lines_have_id_and_time(tmp_path):
    path = tmp_path / "out.jsonl"
    sink = JsonlFile(path)
    v1 = (7, None, 1_700_000_000.25, "temperature_c", 21.5)  # a v1 frame's reading: no index
    assert sink.write([(7, 40312, 1_700_000_000.25, "temperature_c", 21.5), v1]) == 2
    assert sink.write([v1]) == 1  # no identity to drop a copy by (the SQLite sink has v1 rules)
    sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {
        "id": "7/40312/temperature_c",
        "node_id": 7,
        "reading_index": 40312,
        "ts": 1_700_000_000.25,
        "time": "2023-11-14T22:13:20.250Z",
        "quantity": "temperature_c",
        "value": 21.5,
    }
    assert lines[1]["id"] == lines[2]["id"] == "7/1700000000.250/temperature_c"
    assert lines[1]["reading_index"] is None


@pytest.fixture
def file_size_limit():
    """limit(n): writes past n bytes of any file of this process fail with EFBIG (a real
    kernel limit, RLIMIT_FSIZE; SIGXFSZ ignored), until the end of the test."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(n):
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, old_limit[1]))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_write_that_fails_part_way_leaves_the_file_as_it_was(tmp_path, kind, file_size_limit):
    """The file reaches its limit in the middle of a batch (part of it written, then EFBIG):
    the file is cut back to exactly its bytes before, nothing stays buffered, and the retry
    (after room is made) writes each line once."""
    path = tmp_path / ("out" + kind.suffix)
    sink = kind(path)
    assert sink.write(readings(0, 5)) == 15
    before = path.read_bytes()
    file_size_limit(len(before) + 300)  # room for a line or two of the next batch
    with pytest.raises(OSError) as info:
        sink.write(readings(5, 40))
    assert info.value.errno == errno.EFBIG
    assert path.read_bytes() == before
    with pytest.raises(OSError):  # still no room: still nothing half-written
        sink.write(readings(5, 40))
    assert path.read_bytes() == before
    file_size_limit(resource.RLIM_INFINITY)
    assert sink.write(readings(5, 40)) == 120
    assert sink.write(readings(0, 45)) == 0
    sink.close()
    assert kind.ids(path) == kind.expected(readings(0, 45))


def test_failed_write_to_a_stream_not_appending_leaves_no_hole(tmp_path, file_size_limit):
    """Standard output sent to a file with `>` is not in append mode: after a write cut back,
    the next one goes where the file now ends, not where the failed one stopped (a run of NUL
    bytes in between)."""
    path = tmp_path / "out.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        sink = JsonlSink(stream)
        assert sink.write(readings(0, 1)) == 3
        before = path.read_bytes()
        file_size_limit(len(before) + 300)
        with pytest.raises(OSError):
            sink.write(readings(1, 10))
        file_size_limit(resource.RLIM_INFINITY)
        assert path.read_bytes() == before
        assert sink.write(readings(1, 10)) == 30
        sink.close()
    assert b"\0" not in path.read_bytes()
    assert JsonlFile.ids(path) == JsonlFile.expected(readings(0, 11))


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB filesystem (tmpfs), mounted for the test: root only."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: %s" % proc.stderr.strip())
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_leaves_the_file_as_it_was(small_disk, kind):
    path = small_disk / ("out" + kind.suffix)
    sink = kind(path)
    assert sink.write(readings(0, 5)) == 15
    before = path.read_bytes()
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk to its last byte
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        sink.write(readings(5, 200))
    assert sinks.is_disk_full(info.value)
    assert path.read_bytes() == before
    filler.unlink()
    assert sink.write(readings(5, 200)) == 600
    sink.close()
    assert kind.ids(path) == kind.expected(readings(0, 205))


def test_fsync_that_fails_cuts_the_write_back(tmp_path, kind, monkeypatch):
    """fsync reporting EIO (the written pages did not reach the disk): the lines are cut back,
    nothing is recorded, and the retry writes them once."""
    path = tmp_path / ("out" + kind.suffix)
    sink = kind(path)
    assert sink.write(readings(0, 2)) == 6
    before = path.read_bytes()
    real_fsync = os.fsync
    data_ino = os.stat(path).st_ino
    failures = []

    def fsync(fd):
        if os.fstat(fd).st_ino == data_ino and not failures:
            failures.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        sink.write(readings(2, 3))
    assert failures and path.read_bytes() == before
    assert sink.write(readings(2, 3)) == 9
    sink.close()
    assert kind.ids(path) == kind.expected(readings(0, 5))


def test_ledger_that_cannot_record_holds_back_every_ack(tmp_path, kind):
    """The lines are in the file but the ledger cannot record them (its file locked here by a
    real second connection): the write fails (no ack), and so does the copy the node sends
    again, until the ledger has recorded them: a reading is acked only once a restart would
    know it."""
    path = tmp_path / ("out" + kind.suffix)
    sink = kind(path)
    ledger = sink.sink._file.ledger
    ledger._db.execute("PRAGMA busy_timeout=50")
    sink.write(readings(0, 1))
    blocker = sqlite3.connect(str(path) + ".ledger", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sink.write(readings(1, 2))
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        sink.write(readings(1, 2))  # the copy: held in memory, but not acked either
    blocker.execute("ROLLBACK")
    blocker.close()
    assert sink.write(readings(1, 2)) == 0  # recorded now: acked, nothing written twice
    sink.close()
    reopened = FileLedger(str(path) + ".ledger")
    assert reopened.held[7].ranges() == [(0, 2)] and reopened.size == path.stat().st_size
    reopened.close()
    assert kind.ids(path) == kind.expected(readings(0, 3))


CRASH_SCRIPT = r"""
import os, signal, sys
from host_tools.receive import ledger
sys.path.insert(0, sys.argv[3])
import test_ledger

kind = getattr(test_ledger, sys.argv[2])
sink = kind(sys.argv[1])
sink.write(test_ledger.readings(0, 3))
print("first", flush=True)
# a crash after the lines are written and fsynced, before the ledger records them
ledger.FileLedger.commit = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
sink.write(test_ledger.readings(3, 4))
"""


def test_lines_written_before_a_crash_are_not_written_again(tmp_path, kind):
    """A receiver killed between the fsync and the ledger's commit (so it never acked): the
    restarted one reads those lines back into the ledger, and the node's resent frame adds
    nothing."""
    path = tmp_path / ("out" + kind.suffix)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(path), kind.__name__, str(TESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=TESTS.parent,
    )
    assert proc.returncode == -signal.SIGKILL and proc.stdout == "first\n", proc.stderr
    assert kind.ids(path) == kind.expected(readings(0, 7))  # in the file, unrecorded
    sink = kind(path)
    ledger = sink.sink._file.ledger
    if kind is InfluxFile:  # a line per reading: all four read back
        assert (ledger.recovered, ledger.cut) == (4, 0)
    else:  # the last reading's lines cut: it may lack quantities (here it does not)
        assert ledger.recovered == 3 and ledger.cut > 0
    assert sink.write(readings(3, 4)) == (0 if kind is InfluxFile else 3)  # sent again
    assert sink.write(readings(0, 8)) == 3
    sink.close()
    assert kind.ids(path) == kind.expected(readings(0, 8))


def test_partial_write_of_a_crash_is_cut(tmp_path, kind, caplog):
    """A crash in the middle of writing a batch (before the fsync, so never acked) leaves a
    partial last line, and in JSON lines perhaps a reading with only some of its quantities:
    both cut on open, the whole readings before them held; the node's resent frame then
    completes the file, each line once."""
    path = tmp_path / ("out" + kind.suffix)
    sink = kind(path)
    sink.write(readings(0, 2))
    sink.close()
    committed = path.read_bytes()
    scratch = tmp_path / ("scratch" + kind.suffix)
    other = kind(scratch)
    other.write(readings(2, 4))  # the batch the crash interrupted
    other.close()
    lines = scratch.read_bytes().splitlines(keepends=True)
    per_reading = 1 if kind is InfluxFile else 3
    whole = b"".join(lines[: 2 * per_reading])  # readings 2 and 3
    started = lines[2 * per_reading : 2 * per_reading + per_reading - 1]  # some of reading 4
    with open(path, "ab") as f:
        f.write(whole + b"".join(started) + lines[3 * per_reading - 1][:10])
    with caplog.at_level("WARNING", logger="citynode.sinks"):
        sink = kind(path)
    cut = len(b"".join(started)) + 10
    assert "2 readings written after the ledger's last record read back" in caplog.text
    assert "%d bytes cut" % cut in caplog.text
    assert path.read_bytes() == committed + whole
    assert sink.write(readings(2, 4)) == 6  # readings 4 and 5
    sink.close()
    assert kind.ids(path) == kind.expected(readings(0, 6))


def test_file_without_a_ledger_and_a_partial_line_is_not_cut(tmp_path):
    """A file the ledger did not see written (made before it, or by someone else): its bytes
    are kept; the next line starts on a line of its own."""
    path = tmp_path / "out.jsonl"
    path.write_text('{"note": "written by hand"}\n{"partial')
    sink = JsonlFile(path)
    sink.write(readings(0, 1))
    sink.close()
    sink = JsonlFile(path)  # reopened: still knows the file ends in a whole line
    sink.write(readings(1, 1))
    sink.close()
    lines = path.read_text().splitlines()
    assert lines[:2] == ['{"note": "written by hand"}', '{"partial']
    assert [json.loads(line)["id"] for line in lines[2:]] == [
        reading_id(*r[:4]) for r in readings(0, 2)
    ]


def test_stdout_to_a_file_gets_no_ledger_named_after_stdout(tmp_path):
    """`--jsonl -` with standard output sent to a file: a stream named "<stdout>" has no path
    to keep a ledger beside; a ledger in memory (not "<stdout>.ledger" in the working
    directory, shared by every later run)."""
    script = (
        "import sys\n"
        "from host_tools.receive.sinks import JsonlSink\n"
        "s = JsonlSink(sys.stdout)\n"
        "rows = [(7, 1, 5.0, 'temperature_c', 1.0)]\n"
        "print(s.write(rows), s.write(rows), file=sys.stderr)\n"
        "s.close()\n"
    )
    out = tmp_path / "out.jsonl"
    with open(out, "w") as f:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            stdout=f,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=dict(os.environ, PYTHONPATH=str(TESTS.parent)),
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "1 0"
    assert len(out.read_text().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_ledger_that_cannot_be_opened_is_a_precise_error(tmp_path):
    path = tmp_path / "out.lp"
    (tmp_path / "out.lp.ledger").write_bytes(b"not a database" * 100)
    with pytest.raises(SinkError, match=r"--influx .*out\.lp: cannot open its ledger "):
        InfluxFileSink(path)

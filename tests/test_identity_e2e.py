# End to end, reading identity (SPEC.md "Identity", "Replay and duplicates"): a real `citynode
# receive` over UDP on loopback with a real SQLite file, under floods, SIGKILLs, a lost replay
# state, a jammed frame, two receivers on one database and key rotation. Afterwards the database
# must hold every reading exactly once by (node_id, reading_index, quantity), with the timestamp
# of its first accepted copy, and every frame a node sent must have been acked, copies too (a
# node re-sends its readings re-encoded with their new ages: a copy has bytes of its own).

import contextlib
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ReceiveProcess as Receiver

from host_tools.keys import save_keys, write_private
from protocols import frame, uplink

REPO = Path(__file__).resolve().parent.parent
NODES = {n: bytes((n * 11 + 3 * i) % 256 for i in range(16)) for n in range(1, 6)}
BME = frame.BME280_CHANNELS
QUANTITIES = ("temperature_c", "humidity_pct", "pressure_hpa")  # all three have scale 100
LISTENING = r"listening on udp 127\.0\.0\.1:(\d+)"


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys.json"
    save_keys(path, NODES)  # mode 0600, as the receiver requires
    return path


# --- a v2 node, as the firmware behaves ---------------------------------------------------


def age_s(t_send, sampled):
    """A reading's age in whole seconds at t_send, rounded as firmware/node.py does."""
    return (int((t_send - sampled) * 1000) + 500) // 1000


def covers(ranges, first, last):
    return any(a <= first and last <= b for a, b in ranges)


class Node:
    """A v2 node: it numbers its readings from a count never reused and keeps each until an ack
    that echoes the tag of the frame it has just sent covers it; readings sent again are
    re-encoded under the same indices with the ages of the moment they are sent. The test's
    clock is the node's: each reading's true sample time is known."""

    def __init__(self, node_id, key=None, first_index=0, seed=None):
        self.node_id = node_id
        self.key = key if key is not None else NODES[node_id]
        self.rng = random.Random(node_id if seed is None else seed)
        self.next_index = first_index
        self.sampled = {}  # index -> (sample time, raw values)
        self.pending = []  # indices not acked yet, oldest first
        self.datagrams = 0
        self.last_ack = None  # the bytes of the last ack taken
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))

    def close(self):
        self.sock.close()

    def sample(self, when):
        index = self.next_index
        self.next_index += 1
        raw = (
            1500 + self.rng.randrange(1500),
            3000 + self.rng.randrange(5000),
            98000 + self.rng.randrange(6000),
        )
        self.sampled[index] = (when, raw)
        self.pending.append(index)
        return index

    def encode(self, indices, t_send, key=None):
        ages = [age_s(t_send, self.sampled[i][0]) for i in indices]
        return frame.encode_data(
            frame.Signer(key if key is not None else self.key),
            self.node_id,
            indices[0],
            BME,
            [self.sampled[i][1] for i in indices],
            ages,
        )

    def send(self, addr, indices, key=None):
        """Encode the readings with their ages now and send them: (datagram, time sent)."""
        t_send = time.time()
        datagram = self.encode(indices, t_send, key)
        self.sock.sendto(datagram, addr)
        self.datagrams += 1
        return datagram, t_send

    def ack_for(self, datagram, indices, timeout, key=None):
        """The ack the node takes for `datagram` (its tag echoed, its readings covered, the tag
        good under `key`), or None after `timeout` s; acks of earlier copies are skipped."""
        signer = frame.Signer(key if key is not None else self.key)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                reply, _ = self.sock.recvfrom(512)
            except TimeoutError:
                return None
            except ConnectionRefusedError:  # ICMP from a receiver that is down
                continue
            try:
                ack = uplink.decode_ack(reply, signer)
            except frame.FrameError:
                continue
            if ack.echo == datagram[-frame.TAG_LEN :] and covers(
                ack.acked, indices[0], indices[-1]
            ):
                self.last_ack = reply
                return ack

    def deliver(self, addr, indices, tries=5, timeout=2.0, key=None):
        """Send until acked (fresh ages each time): (datagram, time sent, ack) of the copy
        acked, or AssertionError after `tries` copies."""
        for _ in range(tries):
            datagram, t_send = self.send(addr, indices, key)
            ack = self.ack_for(datagram, indices, timeout, key)
            if ack is not None:
                return datagram, t_send, ack
        raise AssertionError("node %d: readings %s never acked" % (self.node_id, indices))

    def forget(self, indices):
        done = set(indices)
        self.pending = [i for i in self.pending if i not in done]


# --- the receiver and its database --------------------------------------------------------


def start(*args):
    """A `citynode receive` listening on loopback: (process, (host, port))."""
    rx = Receiver(*args)
    try:
        port = int(rx.wait_for(LISTENING).group(1))
    except BaseException:
        rx.stop(signal.SIGKILL)
        raise
    return rx, ("127.0.0.1", port)


def parse_counters(text):
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}


def stop(rx):
    """SIGTERM; the final counters, after checking a clean exit."""
    assert rx.stop() == 0, rx.drain()
    return parse_counters(rx.wait_for(r"^citynode: final counters: (.*)$").group(1))


def live_counters(rx):
    rx.proc.send_signal(signal.SIGUSR1)
    return parse_counters(rx.wait_for(r" INFO counters: (.*)$").group(1))


def stored(db):
    """{(node_id, reading_index): {quantity: (ts, value)}}, after checking that no reading is
    stored twice and that every row has its reading index (v2 only in these tests)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT node_id, reading_index, ts, quantity, value FROM readings"
        ).fetchall()
    identities = [(n, i, q) for n, i, _, q, _ in rows]
    assert len(identities) == len(set(identities)), "a reading stored twice"
    assert all(i is not None for _, i, _, _, _ in rows), "a v2 reading stored without its index"
    out = {}
    for n, i, ts, q, v in rows:
        out.setdefault((n, i), {})[q] = (ts, v)
    return out


def check_stored(got, expected, tol=1.0):
    """got: stored(db); expected {(node, index): (ts, raw values)}: exactly these readings,
    each with its three quantities, the values sent and a timestamp within tol s of ts."""
    assert sorted(set(got) - set(expected))[:10] == [], "readings stored that were not expected"
    assert sorted(set(expected) - set(got))[:10] == [], "readings missing"
    wrong = []
    for key, (ts, raw) in sorted(expected.items()):
        values = got[key]
        if set(values) != set(QUANTITIES):
            wrong.append((key, "quantities", sorted(values)))
            continue
        for name, r in zip(QUANTITIES, raw, strict=True):
            t, v = values[name]
            if abs(v - r / 100) > 1e-9:
                wrong.append((key, name, "value", v, r / 100))
            if not abs(t - ts) < tol:
                wrong.append((key, name, "ts", t, "expected", ts))
    assert wrong[:10] == [], "%d readings wrong" % len(wrong)


def udp_drops(port):
    """Datagrams the kernel dropped at a full receive buffer of the loopback socket on port
    (/proc/net/udp, last column); 0 if the socket is gone."""
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            host, _, hexport = fields[1].partition(":")
            if host == "0100007F" and int(hexport, 16) == port:
                return int(fields[-1])
    return 0


def proc_kb(pid, name):
    """A memory figure of /proc/<pid>/status (VmRSS, VmHWM) in kB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (name, pid))


def citynode(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "host_tools.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


class Flood(threading.Thread):
    """Sends `payloads` round robin from a socket of its own at about `rate` datagrams a
    second, until `count` are sent or `seconds` have passed."""

    def __init__(self, addr, payloads, count, seconds, rate):
        super().__init__(daemon=True)
        self.addr = addr
        self.payloads = payloads
        self.count = count
        self.seconds = seconds
        self.rate = rate
        self.sent = 0
        self.errors = 0

    def run(self):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            begin = time.monotonic()
            while self.sent < self.count and time.monotonic() - begin < self.seconds:
                k = self.sent % len(self.payloads)
                try:
                    sock.sendto(self.payloads[k], self.addr)
                except OSError:
                    self.errors += 1
                    time.sleep(0.001)
                    continue
                self.sent += 1
                if self.sent % 50 == 0:  # pace: no faster than `rate`
                    ahead = begin + self.sent / self.rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)


def bad_tag_frame(node_id):
    good = frame.encode_data(
        frame.Signer(NODES[node_id]), node_id, 0, BME, [(2000, 4000, 101000)], [0]
    )
    return good[: -frame.TAG_LEN] + bytes(b ^ 0x5A for b in good[-frame.TAG_LEN :])


# --- 1. a flood of bad tags ----------------------------------------------------------------


def test_bad_tag_flood_while_a_node_resends_after_a_lost_ack(tmp_path, keys):
    db = tmp_path / "rx.db"
    rx, addr = start("--keys", keys, "--udp", "127.0.0.1:0", "--db", db)
    node = Node(2)
    now = time.time()
    for k in range(200):
        node.sample(now - 600 + 2 * k)
    flood = Flood(addr, [bad_tag_frame(1)], count=20000, seconds=5.0, rate=5000)
    first_copy = {}  # index -> time the first copy was sent - the reading's age in it
    resent = frames = 0
    try:
        flood.start()
        deadline = time.monotonic() + 15
        while (flood.is_alive() or frames < 6) and time.monotonic() < deadline:
            indices = node.pending[:5]
            datagram, t_send, _ = node.deliver(addr, indices)
            for i in indices:
                first_copy.setdefault(i, t_send - age_s(t_send, node.sampled[i][0]))
            frames += 1
            if frames % 2 == 0:
                # That ack was lost on the way back: after its ack timeout (firmware: 2 s) the
                # node sends the readings again, re-encoded with their new ages (so new bytes),
                # and the copy is acked again.
                time.sleep(1.1)
                node.deliver(addr, indices)
                resent += 1
            node.forget(indices)
        flood.join(10)
        drops = udp_drops(addr[1])
        counters = stop(rx)
    finally:
        rx.stop(signal.SIGKILL)
        node.close()
    log = rx.drain()
    log_bytes = len(log.encode()) + 1
    print(
        "\nflood: %d bad tags sent, %d frames (%d sent again), kernel drops %d, log %d bytes "
        "in %d lines; counters %s"
        % (flood.sent, frames, resent, drops, log_bytes, len(log.splitlines()), counters)
    )
    assert "Traceback" not in log
    assert flood.sent >= 10000, "the flood sender fell behind: %d sent" % flood.sent

    acked = {i: first_copy[i] for i in node.sampled if i not in node.pending}
    assert len(acked) == 5 * frames
    check_stored(stored(db), {(2, i): (ts, node.sampled[i][1]) for i, ts in acked.items()})

    # Every bad tag is counted (less any the kernel or a full intake dropped before reading).
    lost = drops + counters.get("intake_full", 0)
    assert flood.sent - lost <= counters["rejected_tag"] <= flood.sent
    if lost == 0:
        assert counters["rejected_tag"] == flood.sent
        assert counters["acks_sent"] == node.datagrams  # copies are acked again
        assert counters["frames_copies"] == resent
        assert counters["udp_datagrams"] == flood.sent + node.datagrams
    assert counters["frames_accepted"] == frames

    # The log says so, folded: the first line, then a count (at the latest when it stops).
    assert log_bytes < 50_000
    first = r"frame rejected reason=tag node=1 len=\d+: bad tag for node 1 \(wrong key or"
    lines = [line for line in log.splitlines() if re.search(first, line)]
    repeated = [re.search(r"\(repeated (\d+) more times? in [\d.]+ s\)$", line) for line in lines]
    firsts = sum(1 for m in repeated if m is None)
    assert firsts >= 1 and any(repeated)
    assert firsts + sum(int(m.group(1)) for m in repeated if m) == counters["rejected_tag"]


def test_handling_held_up_by_a_locked_database_keeps_the_times_frames_were_read(tmp_path, keys):
    # SPEC.md "Timing": the receive time is when the datagram was read, not when it was
    # handled. Another writer holds the database for 3 s: the frames that arrive meanwhile wait
    # in the intake and are stored afterwards, with the times they arrived.
    db = tmp_path / "rx.db"
    rx, addr = start("--keys", keys, "--udp", "127.0.0.1:0", "--db", db)
    node = Node(1)
    now = time.time()
    for k in range(12):
        node.sample(now - 120 + 10 * k)
    sent = {}  # tag -> (indices, time sent - ages)
    acks = {}
    try:
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as lock:
            lock.execute("BEGIN EXCLUSIVE")
            held = time.monotonic()
            for f in range(6):
                indices = [2 * f, 2 * f + 1]
                datagram, t_send = node.send(addr, indices)
                sent[datagram[-4:]] = (indices, t_send)
                time.sleep(0.25)
            time.sleep(max(0.0, 3.0 - (time.monotonic() - held)))
            node.sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                node.sock.recvfrom(512)  # nothing acked while the database is held
            lock.execute("COMMIT")
        deadline = time.monotonic() + 20
        while len(acks) < len(sent) and time.monotonic() < deadline:
            node.sock.settimeout(max(0.01, deadline - time.monotonic()))
            ack = uplink.decode_ack(node.sock.recvfrom(512)[0], frame.Signer(node.key))
            acks[ack.echo] = ack
        counters = stop(rx)
    finally:
        rx.stop(signal.SIGKILL)
        node.close()
    assert "Traceback" not in rx.drain()
    assert {tag: a.acked for tag, a in acks.items()} == {
        tag: [(i[0], i[-1])] for tag, (i, _) in sent.items()
    }
    assert counters["frames_accepted"] == 6
    expected = {}
    for indices, t_send in sent.values():
        for i in indices:
            expected[(1, i)] = (t_send - age_s(t_send, node.sampled[i][0]), node.sampled[i][1])
    check_stored(stored(db), expected, tol=0.5)  # handled up to 2.75 s after they were read


# --- 2. a flood of 64 KB datagrams ----------------------------------------------------------

# Measured: the peak RSS grows by ~20 kB over the flood. A receiver that queued whole 64 KB
# datagrams without a byte bound would grow by ~190 MB here; one whose intake (20 000
# datagrams, 4 MB) filled up with small ones, as a stalled disk may make it, by ~12 MB.
RSS_GROWTH_BOUND_KB = 32 * 1024


def test_oversize_flood_keeps_memory_bounded_and_frames_stored(tmp_path, keys):
    db = tmp_path / "rx.db"
    rx, addr = start("--keys", keys, "--udp", "127.0.0.1:0", "--db", db)
    pid = rx.proc.pid
    node = Node(3)
    now = time.time()
    for k in range(400):
        node.sample(now - 1800 + 3 * k)
    first_copy = {}

    def deliver_next():
        indices = node.pending[:5]
        _, t_send, _ = node.deliver(addr, indices)
        for i in indices:
            first_copy[i] = t_send - age_s(t_send, node.sampled[i][0])
        node.forget(indices)

    rng = random.Random(2)
    big = bytes(rng.randrange(256) for _ in range(1024)) * 64  # 65 536 bytes: too big for UDP
    big = big[:65507]  # the largest UDP payload over IPv4
    small = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) for _ in range(50)]
    small.append(bad_tag_frame(3))
    try:
        deliver_next()  # warm: the sink, the codec and the socket all in use once
        deliver_next()
        rss_before = proc_kb(pid, "VmRSS")
        hwm_before = proc_kb(pid, "VmHWM")
        floods = [
            Flood(addr, [big], count=3000, seconds=5.0, rate=600),  # ~40 MB/s
            Flood(addr, small, count=20000, seconds=5.0, rate=4000),
        ]
        for f in floods:
            f.start()
        deadline = time.monotonic() + 15
        while any(f.is_alive() for f in floods) and time.monotonic() < deadline:
            deliver_next()
            time.sleep(0.1)  # a frame every 0.1 s while the floods run
        for f in floods:
            f.join(10)
        time.sleep(0.5)  # let the receiver empty its socket
        rss_after = proc_kb(pid, "VmRSS")
        hwm_after = proc_kb(pid, "VmHWM")
        drops = udp_drops(addr[1])
        counters = stop(rx)
    finally:
        rx.stop(signal.SIGKILL)
        node.close()
    log = rx.drain()
    growth = hwm_after - rss_before
    print(
        "\nRSS: before %d kB (peak %d kB), after %d kB, peak after %d kB: growth to peak %d kB; "
        "sent %d x %d bytes + %d small; kernel drops %d; log %d bytes; counters %s"
        % (
            rss_before,
            hwm_before,
            rss_after,
            hwm_after,
            growth,
            floods[0].sent,
            len(big),
            floods[1].sent,
            drops,
            len(log.encode()),
            counters,
        )
    )
    assert "Traceback" not in log
    assert floods[0].sent >= 1000 and floods[1].sent >= 10000, "the flood senders fell behind"
    assert growth < RSS_GROWTH_BOUND_KB
    # Every big datagram read is counted as oversize and dropped (none reaches the verifier).
    assert floods[0].sent - drops <= counters["oversize"] <= floods[0].sent
    outcomes = ("frames_accepted", "frames_copies", "frames_heard_again", "sink_error")
    handled = sum(v for k, v in counters.items() if k.startswith("rejected_") or k in outcomes)
    assert (
        handled + counters["oversize"] + counters.get("intake_full", 0)
        == (counters["udp_datagrams"])
    )
    assert counters["udp_datagrams"] + drops == floods[0].sent + floods[1].sent + node.datagrams
    check_stored(stored(db), {(3, i): (ts, node.sampled[i][1]) for i, ts in first_copy.items()})
    assert len(first_copy) >= 20


# --- 3. the replay state lost, emptied or unwritable -------------------------------------


def twenty_frames(node, now):
    """20 frames of 3 readings each (indices 0..59), encoded once: a capture to replay."""
    for k in range(60):
        node.sample(now - 3600 + 30 * k)
    frames = []
    for f in range(20):
        indices = list(range(3 * f, 3 * f + 3))
        frames.append((indices, node.encode(indices, now)))
    return frames


def send_and_collect(node, addr, frames, timeout=5.0):
    """Send each captured frame (same bytes) and wait for its ack; the acks."""
    acks = []
    for indices, datagram in frames:
        node.sock.sendto(datagram, addr)
        ack = node.ack_for(datagram, indices, timeout)
        assert ack is not None, "frame %s not acked" % indices
        acks.append(ack)
    return acks


def status_ack(node, addr, datagram):
    """Send a STATUS frame; its ack (no ranges, its tag echoed) must come."""
    node.sock.sendto(datagram, addr)
    node.sock.settimeout(5.0)
    ack = uplink.decode_ack(node.sock.recvfrom(512)[0], frame.Signer(node.key))
    assert ack.echo == datagram[-frame.TAG_LEN :] and ack.acked == []


def refuse_writes(path):
    """Make a replay-state file refuse every write. The tests run as root, whom file modes do
    not stop; a trigger does: the file still opens and reads, and every write fails."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for op in ("INSERT", "UPDATE", "DELETE"):
            conn.execute(
                "CREATE TRIGGER refuse_%s BEFORE %s ON windows "
                "BEGIN SELECT RAISE(ABORT, 'replay state is read-only'); END" % (op, op)
            )
        conn.commit()


@pytest.mark.parametrize("damage", ["deleted", "zeroed", "unwritable"])
def test_replay_state_lost_then_frames_replayed_are_acked_not_stored_again(tmp_path, keys, damage):
    db, state = tmp_path / "rx.db", tmp_path / "replay.db"
    args = ["--keys", keys, "--udp", "127.0.0.1:0", "--db", db, "--replay-state", state]
    node = Node(5)
    frames = twenty_frames(node, time.time())
    status = [
        frame.encode_status(frame.Signer(NODES[5]), 5, seq, {1: 4, 9: 60 * seq}) for seq in (1, 2)
    ]
    rx, addr = start(*args)
    try:
        send_and_collect(node, addr, frames)
        status_ack(node, addr, status[0])  # its window goes to the state file
        stop(rx)
    finally:
        rx.stop(signal.SIGKILL)
    before = stored(db)
    assert len(before) == 60
    with contextlib.closing(sqlite3.connect(state)) as conn:
        assert conn.execute("SELECT node_id FROM windows").fetchall() == [(5,)]
    for leftover in (Path(str(state) + "-wal"), Path(str(state) + "-shm")):
        leftover.unlink(missing_ok=True)
    if damage == "deleted":
        state.unlink()
    elif damage == "zeroed":
        os.truncate(state, 0)
    else:
        refuse_writes(state)

    time.sleep(1.1)  # a copy accepted as new would now get other timestamps
    rx, addr = start(*args)
    try:
        acks = send_and_collect(node, addr, frames)  # all acked again, with their own tags
        status_ack(node, addr, status[1])
        counters = stop(rx)
    finally:
        rx.stop(signal.SIGKILL)
        node.close()
    log = rx.drain()
    assert "Traceback" not in log
    assert [a.acked for a in acks] == [[(i[0], i[-1])] for i, _ in frames]
    assert stored(db) == before  # nothing stored twice, every timestamp unchanged
    assert counters["values_already_stored"] == 20 * 3 * 3
    if damage == "unwritable":
        assert counters["replay_state_error"] >= 1
        assert re.search(r"replay state .*replay\.db not saved: .*replay state is read-only", log)
    else:
        assert "replay_state_error" not in counters


@pytest.mark.parametrize("where", ["directory", "under_a_file"])
def test_replay_state_that_cannot_be_opened_one_line_exit_2(tmp_path, keys, where):
    if where == "directory":
        state = tmp_path / "replay.d"
        state.mkdir()
    else:
        (tmp_path / "plain").write_text("not a directory\n")
        state = tmp_path / "plain" / "replay.db"
    result = citynode(
        "receive",
        "--keys",
        keys,
        "--udp",
        "127.0.0.1:0",
        "--db",
        tmp_path / "rx.db",
        "--replay-state",
        state,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "citynode: --replay-state %s: unable to open database file" % state
    ]


# --- 4. a jammed frame released late --------------------------------------------------------


@pytest.mark.parametrize("restart", [False, True], ids=["same_receiver", "restarted"])
def test_jammed_frame_released_after_its_resend_keeps_the_resends_timestamps(
    tmp_path, keys, restart
):
    # The node sent F1 (readings 100..104) twelve seconds ago; a jammer held it back. Having no
    # ack, the node sent the same readings again now (F2, ages 12 s more). F2 arrives, then the
    # jammer releases F1: were it taken as new, its readings would be stored 12 s late. The
    # twelve seconds are modelled by the ages, not waited for.
    db = tmp_path / "rx.db"
    args = ["--keys", keys, "--udp", "127.0.0.1:0", "--db", db]
    node = Node(3, first_index=100)
    now = time.time()
    for k in range(5):
        node.sample(now - 300 + 60 * k)
    indices = list(range(100, 105))
    f1 = node.encode(indices, time.time() - 12)
    rx, addr = start(*args)
    try:
        f2, t2, ack2 = node.deliver(addr, indices)
        if restart:
            stop(rx)
            rx, addr = start(*args)
        node.sock.sendto(f1, addr)  # released by the jammer
        ack1 = node.ack_for(f1, indices, 5.0)
        counters = stop(rx)
    finally:
        rx.stop(signal.SIGKILL)
        node.close()
    assert "Traceback" not in rx.drain()
    assert ack1 is not None, "the late copy was not acked"
    assert ack1.acked == ack2.acked == [(100, 104)]
    assert ack1.echo == f1[-4:] and ack2.echo == f2[-4:]
    expected = {(3, i): (t2 - age_s(t2, node.sampled[i][0]), node.sampled[i][1]) for i in indices}
    check_stored(stored(db), expected)
    # ... and those are the true sample times: F1's would be 12 s late.
    check_stored(stored(db), {k: (node.sampled[k[1]][0], v[1]) for k, v in expected.items()})
    if restart:
        assert counters["values_already_stored"] == 15
    else:
        assert counters["frames_copies"] == 1


# --- 5. two receivers, one database -------------------------------------------------------


def test_two_receivers_one_database_each_reading_once_all_acked(tmp_path, keys):
    db = tmp_path / "rx.db"
    common = ["--keys", keys, "--udp", "127.0.0.1:0", "--db", db]
    node_a, node_b = Node(4), Node(4)  # one node heard through two gateways: two sockets
    now = time.time()
    frames = []
    for f in range(20):
        indices = [node_a.sample(now - 1200 + 60 * f + k) for k in range(3)]
        for i in indices:
            node_b.sampled[i] = node_a.sampled[i]
        frames.append((indices, node_a.encode(indices, now)))  # captured: the same bytes
    first = {}  # index -> when the first copy was sent - its age

    def send_all(node, addr, chosen):
        for indices, datagram in chosen:
            t_send = time.time()
            node.sock.sendto(datagram, addr)
            assert node.ack_for(datagram, indices, 5.0) is not None, indices
            for i in indices:
                first.setdefault(i, t_send - age_s(now, node_a.sampled[i][0]))  # as encoded

    rx_a = rx_b = None
    try:
        rx_a, addr_a = start(*common, "--replay-state", tmp_path / "a.replay")
        rx_b, addr_b = start(*common, "--replay-state", tmp_path / "b.replay")
        send_all(node_a, addr_a, frames[:10])  # some to one
        time.sleep(1.5)  # a copy stored as new would get a timestamp 1.5 s late
        send_all(node_b, addr_b, frames)  # then all to the other
        # and all, re-sent by the node (re-encoded: new ages, new bytes), heard by both at once:
        # the two write the same rows concurrently.
        t_again = time.time()
        again = [(indices, node_a.encode(indices, t_again)) for indices, _ in frames]
        assert not {d for _, d in again} & {d for _, d in frames}
        threads = [
            threading.Thread(target=send_all, args=(n, a, again))
            for n, a in ((node_a, addr_a), (node_b, addr_b))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        counters_a, counters_b = stop(rx_a), stop(rx_b)
    finally:
        for rx in (rx_a, rx_b):
            if rx is not None:
                rx.stop(signal.SIGKILL)
        node_a.close()
        node_b.close()
    for rx in (rx_a, rx_b):
        assert "Traceback" not in rx.drain()
    assert counters_a["acks_sent"] == 30 and counters_b["acks_sent"] == 40
    assert "rejected_duplicate" not in counters_a and "rejected_replay" not in counters_b
    check_stored(stored(db), {(4, i): (ts, node_a.sampled[i][1]) for i, ts in first.items()})
    assert len(first) == 60


# --- 6. soak: SIGKILLs at random moments while nodes send --------------------------------


class SoakNode(Node):
    """A node on a thread: samples every `sample_s`, sends up to 8 readings a frame, re-sends
    what is not acked with fresh ages; one ack in ten is lost on the way back. Right after each
    ack it takes, it checks the readings are already in SQLite (acked only once durable)."""

    def __init__(self, node_id, seed, addr, db, sample_s):
        super().__init__(node_id, seed=seed)
        self.addr = addr
        self.db = db
        self.sample_s = sample_s
        self.frames_acked = self.acks_lost = self.unanswered = 0
        self.lost = set()  # indices whose last ack was lost on purpose
        self.not_durable = []
        self.sampling = threading.Event()
        self.sampling.set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        next_sample = time.time()
        with contextlib.closing(sqlite3.connect(self.db, timeout=30)) as conn:
            while not self.stopping.is_set():
                now = time.time()
                while self.sampling.is_set() and next_sample <= now:
                    self.sample(next_sample)
                    next_sample += self.sample_s
                if not self.pending:
                    self.stopping.wait(0.02)
                    continue
                indices = self.pending[:8]
                datagram, _ = self.send(self.addr, indices)
                if self.ack_for(datagram, indices, 0.3) is None:
                    self.unanswered += 1
                    continue
                if self.rng.random() < 0.1:
                    self.acks_lost += 1
                    self.lost.update(indices)
                    continue
                (count,) = conn.execute(
                    "SELECT count(*) FROM readings WHERE node_id = ? AND reading_index "
                    "BETWEEN ? AND ?",
                    (self.node_id, indices[0], indices[-1]),
                ).fetchone()
                if count != 3 * len(indices):
                    self.not_durable.append((indices[0], indices[-1], count))
                self.frames_acked += 1
                self.forget(indices)
                self.lost.difference_update(indices)


def stored_not_acked(db, nodes):
    """Readings in SQLite that their node still waits to see acked, less those whose ack the
    test itself lost: right after a SIGKILL, those of a batch committed but not acked."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        count = 0
        for node in nodes:
            waiting = set(node.pending) - set(node.lost)
            if waiting:
                rows = conn.execute(
                    "SELECT DISTINCT reading_index FROM readings WHERE node_id = ? AND "
                    "reading_index >= ?",
                    (node.node_id, min(waiting)),
                ).fetchall()
                count += len(waiting & {i for (i,) in rows})
    return count


def soak(tmp_path, kills, seed, n_nodes=5, sample_s=0.01):
    keys = tmp_path / "keys.json"
    save_keys(keys, NODES)
    db = tmp_path / "rx.db"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # fixed across restarts: the nodes keep their address
    args = ["--keys", keys, "--udp", "127.0.0.1:%d" % port, "--db", db]
    rng = random.Random(seed)
    begin = time.monotonic()
    addr = ("127.0.0.1", port)
    nodes = [SoakNode(n, seed * 100 + n, addr, db, sample_s) for n in list(NODES)[:n_nodes]]
    logs = []
    caught = 0  # readings committed but not acked when a SIGKILL came
    rx = None
    try:
        rx, _ = start(*args)
        for node in nodes:
            node.thread.start()
        for _ in range(kills):
            time.sleep(rng.uniform(0.05, 4.0))
            assert rx.stop(signal.SIGKILL) == -signal.SIGKILL, "the receiver died by itself"
            logs.append(rx.drain())
            # Down for a while, the nodes sending meanwhile; past 0.3 s, every ack that was on
            # its way has been taken.
            time.sleep(rng.uniform(0.35, 0.8))
            caught += stored_not_acked(db, nodes)
            rx, _ = start(*args)
        for node in nodes:
            node.sampling.clear()  # the nodes stop sampling and send what they hold
        deadline = time.monotonic() + 30
        while any(node.pending for node in nodes) and time.monotonic() < deadline:
            time.sleep(0.1)
        for node in nodes:
            node.stopping.set()
            node.thread.join(10)
        counters = stop(rx)
    finally:
        for node in nodes:
            node.stopping.set()
        if rx is not None:
            rx.stop(signal.SIGKILL)
        for node in nodes:
            if node.thread.ident is not None:
                node.thread.join(10)
            node.close()
    logs.append(rx.drain())
    took = time.monotonic() - begin
    readings = sum(len(node.sampled) for node in nodes)
    print(
        "\nsoak: %d kills in %.0f s; %d nodes sampled %d readings; %d frames acked, %d acks "
        "lost, %d frames unanswered (sent again); %d readings committed but not acked when "
        "killed; last receiver's counters %s"
        % (
            kills,
            took,
            len(nodes),
            readings,
            sum(n.frames_acked for n in nodes),
            sum(n.acks_lost for n in nodes),
            sum(n.unanswered for n in nodes),
            caught,
            counters,
        )
    )
    log = "\n".join(logs)
    assert "Traceback" not in log and "frame rejected" not in log
    assert [n.not_durable for n in nodes] == [[]] * len(nodes), "acked before durable"
    assert [n.pending[:5] for n in nodes] == [[]] * len(nodes), "readings never acked"
    # Every reading (all acked now) stored once, with its value, within 1 s of its sample time.
    expected = {(n.node_id, i): s for n in nodes for i, s in n.sampled.items()}
    check_stored(stored(db), expected, tol=1.0)
    assert not any(k.startswith("rejected_") for k in counters)


def test_soak_receiver_killed_10_times_every_acked_reading_once(tmp_path):
    """The suite's size (30 s); 150 kills behind -m slow."""
    soak(tmp_path, kills=10, seed=1)


@pytest.mark.slow
def test_soak_receiver_killed_150_times_long(tmp_path):
    soak(tmp_path, kills=150, seed=2)


# --- 7. the key file's mode ----------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o666], ids=["0644", "0640", "0666"])
def test_key_file_others_can_read_is_refused_one_line_exit_2(tmp_path, keys, mode):
    os.chmod(keys, mode)
    result = citynode(
        "receive",
        "--keys",
        keys,
        "--udp",
        "127.0.0.1:0",
        "--db",
        tmp_path / "rx.db",
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("citynode: %s: " % keys)
    assert "mode %04o" % mode in lines[0]


def test_private_key_file_starts_and_stays_in_use_when_a_reload_is_refused(tmp_path, keys):
    db = tmp_path / "rx.db"
    os.chmod(keys, 0o600)
    rx, addr = start("--keys", keys, "--udp", "127.0.0.1:0", "--db", db)
    node = Node(1)
    now = time.time()
    for k in range(4):
        node.sample(now - 100 + k)
    try:
        node.deliver(addr, [0, 1])
        os.chmod(keys, 0o644)  # someone loosened it: not reloaded, the keys in use stay
        rx.proc.send_signal(signal.SIGHUP)
        rx.wait_for(
            r"keys not reloaded, the 5 node\(s\) loaded before stay: %s: mode 0644"
            % re.escape(str(keys))
        )
        node.deliver(addr, [2, 3])
        counters = stop(rx)
    finally:
        rx.stop(signal.SIGKILL)
        node.close()
    assert "Traceback" not in rx.drain()
    assert counters["frames_accepted"] == 2


# --- 8. key rotation with a grace period ---------------------------------------------------


def export_key(path, node_id):
    return bytes.fromhex(citynode("keys", "--keys", path, "export", node_id).stdout.strip())


def assert_refused(node, addr, indices, key):
    datagram, _ = node.send(addr, indices, key)
    assert node.ack_for(datagram, indices, 1.5, key) is None, "acked under a key not accepted"


def test_key_rotation_grace_and_reload_on_change_and_on_sighup(tmp_path):
    path = tmp_path / "keys.json"
    db = tmp_path / "rx.db"
    citynode("keys", "--keys", path, "add", 7, 8)
    k1 = export_key(path, 7)
    citynode("keys", "--keys", path, "rotate", 7, "--grace", 1)
    k2 = export_key(path, 7)
    node = Node(7, key=k2)
    now = time.time()
    for k in range(40):
        node.sample(now - 400 + 10 * k)
    sent = {}  # index -> time sent - age, of readings acked

    def deliver(indices, key):
        datagram, t_send, ack = node.deliver(addr, indices, key=key)
        for i in indices:
            sent[i] = t_send - age_s(t_send, node.sampled[i][0])
        return ack

    rx, addr = start("--keys", path, "--udp", "127.0.0.1:0", "--db", db)
    try:
        # Frames signed before the node was re-provisioned: accepted, acked under the old key.
        for f in range(3):
            indices = [2 * f, 2 * f + 1]
            ack = deliver(indices, k1)  # the ack verified under K1
            assert ack.acked == [(indices[0], indices[1])]
            with pytest.raises(frame.FrameError) as e:
                uplink.decode_ack(node.last_ack, frame.Signer(k2))
            assert e.value.reason == "tag"  # ... and not under the node's new key
        deliver([6, 7], k2)
        deliver([8, 9], k2)

        # `keys rotate` while the receiver runs: the changed file is picked up, no restart.
        citynode("keys", "--keys", path, "rotate", 7, "--grace", 1)
        k3 = export_key(path, 7)
        rx.wait_for(
            r"keys reloaded from %s \(changed\): 2 node\(s\)" % re.escape(str(path)), timeout=10
        )
        deliver([10, 11], k3)
        deliver([12, 13], k2)  # K2 is now the previous key, in its grace period
        deliver([14, 15], k1)  # and K1 stays until its own grace ends (a node still on it)

        # SIGHUP: the file rewritten in place with its size, inode and mtime kept (as an
        # editor or `cp -p` may leave it), so only the signal can tell the receiver.
        other = tmp_path / "rotated.json"
        write_private(other, path.read_bytes())
        citynode("keys", "--keys", other, "rotate", 7, "--grace", 0)
        k4 = export_key(other, 7)
        st = os.stat(path)
        text = other.read_bytes()
        assert len(text) <= st.st_size  # no "previous" entry now: shorter
        with open(path, "r+b") as f:
            f.write(text.rstrip(b"\n") + b" " * (st.st_size - len(text)) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        after = os.stat(path)
        assert (after.st_mtime_ns, after.st_size, after.st_ino) == (
            st.st_mtime_ns,
            st.st_size,
            st.st_ino,
        )
        rx.proc.send_signal(signal.SIGHUP)
        rx.wait_for(r"keys reloaded from %s \(SIGHUP\): 2 node\(s\)" % re.escape(str(path)))
        deliver([16, 17], k4)
        assert_refused(node, addr, [18, 19], k3)  # rotated with no grace: K3 refused at once
        counters = stop(rx)
    finally:
        rx.stop(signal.SIGKILL)
        node.close()
    assert "Traceback" not in rx.drain()
    assert counters["rejected_tag"] == 1
    assert counters["frames_accepted"] == 9
    check_stored(stored(db), {(7, i): (ts, node.sampled[i][1]) for i, ts in sent.items()})

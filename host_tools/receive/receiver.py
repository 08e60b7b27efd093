# Host receiver: verify a datagram (tag, replay window), timestamp its readings, store them in a
# sink and only then build the ack. Sans-IO core (Verifier, Receiver) plus thin source loops.
#
# Timestamps (protocols/frame.py): a reading's UTC time = time the frame was received - its age.
#
# Sources (UDP here; gateways and nodes over MQTT in host_tools/receive/mqtt.py; LoRa gateways on a
# serial line in host_tools/receive/gateway_serial.py) all feed one Intake; serve() drains it in
# batches on one thread and group-commits each batch: one durable sink write for every frame in it,
# then one ack per accepted frame. Sources and sinks are written against
# host_tools/receive/interfaces.py (Source, Intake, Sink, RemoteSink). `reply(ack_bytes)` sends
# one ack back the way the datagram came and may raise OSError; `rx_time` is the UTC time of
# reception when the source knows it better than the host's clock (a LoRa gateway stamps the end
# of reception, SPEC.md "Timing"), else None.

import collections
import logging
import socket
import sqlite3
import threading
import time

from host_tools.keys import key_id
from host_tools.receive import interfaces
from host_tools.receive.health import Health
from host_tools.receive.logfold import FoldingLog
from protocols import frame, uplink

# A frame is at most 255 bytes (SPEC.md). Sources read at most MAX_DATAGRAM bytes of a datagram
# (one more, to see that it was longer): a bigger one is counted ("oversize") and dropped,
# so a flood of 64 KB datagrams costs no more memory than one of frames.
MAX_DATAGRAM = 256


class Rejected(Exception):
    """A datagram not accepted. `reason` is a snake_case code to count by (the codec's
    FrameError reasons, or "unknown_node", "duplicate", "replay", "unsupported_type" for an
    ACK sent to the host);
    `message` says what exactly; `node_id` is the header's node id if it could be read."""

    def __init__(self, reason, message, node_id=None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.node_id = node_id


class ReplayWindow:
    """One node's sequence numbers seen: the highest, plus a bitmap of the `size` seqs ending at
    it (bit i set = seq highest - i seen), as IPsec's anti-replay window (RFC 4303, 3.4.3).
    Seqs are u32 on the wire and do not wrap in a node's life (2^32 frames)."""

    __slots__ = ("size", "highest", "bitmap")  # 100 000 nodes' windows stay small (bench/)

    def __init__(self, size=64):
        if size < 1:
            raise ValueError("replay window size must be at least 1, got %d" % size)
        self.size = size
        self.highest = None
        self.bitmap = 0

    def check(self, seq):
        """None if seq is new, else "duplicate" (seen) or "replay" (older than the window)."""
        if self.highest is None or seq > self.highest:
            return None
        behind = self.highest - seq
        if behind >= self.size:
            return "replay"
        if (self.bitmap >> behind) & 1:
            return "duplicate"
        return None

    def mark(self, seq):
        if self.highest is None:
            self.highest, self.bitmap = seq, 1
        elif seq > self.highest:
            shift = seq - self.highest
            mask = (1 << self.size) - 1
            self.bitmap = ((self.bitmap << shift) | 1) & mask if shift < self.size else 1
            self.highest = seq
        else:
            behind = self.highest - seq
            if behind < self.size:  # older seqs are outside the window: already "replay"
                self.bitmap |= 1 << behind


class StateError(Exception):
    """A replay-state file that cannot be used as it is (another program's table, say)."""


_WINDOW_COLUMNS = ["node_id", "key_id", "highest", "bitmap"]


class ReplayStore:
    """The replay windows in a SQLite file, so that a restarted receiver still refuses the v1
    frames and STATUS frames it has seen. Since format v2 this is a fast path, not the safety:
    a v2 reading is stored under its identity (node id, reading index) by every sink, so a copy
    is harmless whatever this file says, or if it is lost.
    One row per node: its key's fingerprint (a node given a new key starts from seq 0 again, so
    its old window no longer applies), the highest seq, the window's bitmap (hex: 64 bits do not
    fit SQLite's signed integers). WAL with synchronous=NORMAL: a power cut can lose the last
    batches' rows, not corrupt the file. A row that cannot be read is skipped (counted in
    `bad_rows`); a file whose table has other columns raises StateError."""

    def __init__(self, path):
        self.path = str(path)
        self.bad_rows = 0
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS windows (node_id INTEGER PRIMARY KEY,"
                " key_id TEXT NOT NULL, highest INTEGER NOT NULL, bitmap TEXT NOT NULL)"
            )
            columns = [row[1] for row in self._db.execute("PRAGMA table_info(windows)")]
        except sqlite3.Error:
            self._db.close()
            raise
        if columns != _WINDOW_COLUMNS:
            self._db.close()
            raise StateError(
                "%s: table windows has columns %s, expected %s (not a citynode replay state: "
                "pass another --replay-state)" % (self.path, columns, _WINDOW_COLUMNS)
            )

    def load(self):
        """{node_id: (key_id, highest, bitmap)}; rows that do not parse are skipped."""
        windows = {}
        for n, k, h, b in self._db.execute("SELECT node_id, key_id, highest, bitmap FROM windows"):
            try:
                if not isinstance(n, int) or not isinstance(h, int) or not 0 <= h <= frame.MAX_U32:
                    raise ValueError("node id or highest seq is not a u32")
                windows[n] = (str(k), h, int(b, 16))
            except (TypeError, ValueError):
                self.bad_rows += 1
        return windows

    def save(self, rows):
        """rows: [(node_id, key_id, highest, bitmap)], written in one transaction."""
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO windows VALUES (?, ?, ?, ?)",
                [(n, k, h, "%x" % b) for n, k, h, b in rows],
            )

    def close(self):
        self._db.close()


class Verifier:
    """Checks datagrams against the node keys and, for v1 frames and STATUS frames, each node's
    replay window of seqs. check() does not change state: call accept() once the frame's
    readings are durable, then save() to keep the windows in `store` (a ReplayStore; None: in
    memory only). A v2 DATA frame has no seq: it is never refused as a replay here, because
    its readings carry their identity and every sink drops a copy (SPEC.md "Identity").

    keys: {node_id: key} or {node_id: (key, ...)}: every key a frame may be signed with, the
    current one first (during a rotation's grace period, the previous one too). A frame is
    acked under the key that verified it.

    Memory per known node is its keys and, once it has sent, its window. Signers are built on
    use and kept in a bounded LRU cache (`signer_cache` keys): a Signer costs a few hundred
    bytes, and building one is a microsecond."""

    def __init__(self, keys, window=64, signer_cache=4096, store=None):
        self.set_keys(keys)
        self.window = window
        self.signer_cache = max(1, signer_cache)
        self._signers = collections.OrderedDict()
        self._windows = {}
        self.store = store
        self._dirty = set()
        if store is not None:
            mask = (1 << window) - 1
            for node_id, (kid, highest, bitmap) in store.load().items():
                keys = self.keys.get(node_id)
                if keys is not None and kid == key_id(keys[0]):
                    w = self._windows[node_id] = ReplayWindow(window)
                    w.highest, w.bitmap = highest, bitmap & mask

    def set_keys(self, keys):
        """Replace the keys (a reloaded key file). Windows stay: a node's window is dropped only
        when the store's key fingerprint no longer matches, at the next start."""
        self.keys = {
            n: (k,) if isinstance(k, (bytes, bytearray)) else tuple(k) for n, k in keys.items()
        }

    def _signer_for(self, key):
        signers = self._signers
        signer = signers.get(key)
        if signer is None:
            signer = signers[key] = frame.Signer(key)
            if len(signers) > self.signer_cache:
                signers.popitem(last=False)
        else:
            signers.move_to_end(key)
        return signer

    def signer(self, node_id):
        """The Signer of the node's current key (cached); KeyError for an unknown node."""
        return self._signer_for(bytes(self.keys[node_id][0]))

    def check(self, datagram):
        """The verified DataFrame or Status, or raise Rejected."""
        return self.verify(datagram)[0]

    def verify(self, datagram):
        """(the verified DataFrame or Status, the Signer that verified it), or raise
        Rejected."""
        try:
            _, ftype, node_id = uplink.peek(datagram)
        except frame.FrameError as e:
            raise Rejected(e.reason, str(e)) from None
        keys = self.keys.get(node_id)
        if keys is None:
            raise Rejected("unknown_node", "no key for node %d" % node_id, node_id)
        if ftype == frame.TYPE_DATA:
            decode = uplink.decode_data
        elif ftype == frame.TYPE_STATUS:
            decode = uplink.decode_status
        else:  # an ACK: downlink only
            raise Rejected(
                "unsupported_type", "frame type %d is not an uplink frame" % ftype, node_id
            )
        data = signer = None
        for key in keys:
            signer = self._signer_for(bytes(key))
            try:
                data = decode(datagram, signer)
                break
            except frame.FrameError as e:
                if e.reason == "tag":
                    continue
                raise Rejected(e.reason, "node %d: %s" % (node_id, e), node_id) from None
        if data is None:
            raise Rejected(
                "tag", "bad tag for node %d (wrong key or corrupted frame)" % node_id, node_id
            )
        if data.seq is None:  # v2 DATA: identity, not a window, keeps copies out
            return data, signer
        window = self._windows.get(node_id)
        seen = window.check(data.seq) if window is not None else None
        if seen == "duplicate":
            raise Rejected(
                "duplicate", "node %d seq %d already received" % (node_id, data.seq), node_id
            )
        if seen == "replay":
            raise Rejected(
                "replay",
                "node %d seq %d is older than the replay window (highest %d, window %d)"
                % (node_id, data.seq, window.highest, window.size),
                node_id,
            )
        return data, signer

    def accept(self, data):
        """Mark the frame's seq as seen: later copies are duplicates. (v2 DATA: nothing.)"""
        if data.seq is None:
            return
        window = self._windows.get(data.node_id)
        if window is None:
            window = self._windows[data.node_id] = ReplayWindow(self.window)
        window.mark(data.seq)
        if self.store is not None:
            self._dirty.add(data.node_id)

    def save(self):
        """Write the windows accept() changed to the store (if any). Raises what the store
        raises (sqlite3.Error, OSError); the windows stay marked to be written next time."""
        if not self._dirty:
            return
        rows = []
        for node_id in self._dirty:
            w = self._windows[node_id]
            keys = self.keys.get(node_id)
            if keys is not None:
                rows.append((node_id, key_id(keys[0]), w.highest, w.bitmap))
        self.store.save(rows)
        self._dirty.clear()


def iter_readings(data, rx_time):
    """(age_s, ts, quantity, value) for each value of a DataFrame received at rx_time (unix
    seconds, UTC); ts rounded to milliseconds."""
    quantities = [uplink.quantity(ch) for ch in data.channels]
    for raw_values, age in zip(data.readings, data.ages, strict=True):
        ts = round(rx_time - age, 3)
        for (name, scale), raw in zip(quantities, raw_values, strict=True):
            yield age, ts, name, raw / scale


def frame_rows(data, rx_time):
    """Sink rows (node_id, reading_index, ts, quantity, value) of a DataFrame received at
    rx_time; reading_index None for a v1 frame (it has no identity on the wire)."""
    quantities = [uplink.quantity(ch) for ch in data.channels]
    node_id = data.node_id
    index = data.index
    rows = []
    for i, (raw_values, age) in enumerate(zip(data.readings, data.ages, strict=True)):
        ts = round(rx_time - age, 3)
        ri = None if index is None else index + i
        for (name, scale), raw in zip(quantities, raw_values, strict=True):
            rows.append((node_id, ri, ts, name, raw / scale))
    return rows


def _frame_key(received):
    """What identifies a frame's content: (node, "i", first, last) for v2 readings, else
    (node, "s", seq)."""
    if received.seq is None:
        return (received.node_id, "i", received.index, received.index + len(received.readings) - 1)
    return (received.node_id, "s", received.seq)


class Receiver:
    """Datagrams in, acks out: verify, store durably in the sink, then ack. Never raises for a
    bad datagram or a failing sink; counts and logs each instead.

    handle() takes a batch and writes the readings of all its accepted frames in one sink write
    (group commit: one fsync for many frames); datagram() is a batch of one.

    Identity (format v2): a reading is (node id, reading index); the sinks store each once, so a
    copy (a frame re-sent after a lost ack, heard by two gateways, replayed, released late) is
    dropped by them and acked again: its first accepted timestamp stands. `_stored` remembers
    the frames of the last STORED_MEMORY accepted so that a copy of a recent one is acked without
    a sink write (a fast path; the sinks are the safety). A copy with the very bytes (the tag) of
    a frame accepted less than HEARD_AGAIN_S ago is not acked again: it was heard by a second
    gateway, whose ack would collide with the first one's on the air; a node re-sends its
    readings re-encoded, with new ages.

    v1 frames have no identity: a frame the sink failed to store keeps its receive time, so
    that when the node sends the same frame again its readings get the same timestamps."""

    RETRY_MEMORY = 4096  # v1 frames whose receive time is kept after a failed sink write
    STORED_MEMORY = 65536  # v2 frames known stored (about 150 bytes each)
    HEARD_AGAIN_S = 10.0  # the same bytes within this: another gateway's copy, not acked

    def __init__(self, verifier, sink, clock=time.time, log=None):
        self.verifier = verifier
        self.sink = sink
        self.clock = clock
        self.log = log if log is not None else logging.getLogger("citynode.receiver")
        self.counters = collections.Counter()
        # Rejections are all counted; their log lines are folded (a flood of bad datagrams
        # writes a few lines with counts, not a line each). serve() flushes it.
        self.folded = FoldingLog(self.log)
        self.health = Health()  # per node: last heard, its STATUS fields (receive --status)
        self._failed_rx = collections.OrderedDict()  # (node_id, "s", seq) -> rx_time
        self._stored = collections.OrderedDict()  # (node_id, "i", first, last) of v2 frames
        # tag -> time.monotonic() of every frame taken lately (v1 and STATUS frames too: their
        # copies from a second gateway are duplicates in the seq window, counted quietly)
        self._recent_tags = collections.OrderedDict()

    def datagram(self, data, rx_time=None):
        """Handle one datagram; return the ack to send back, or None."""
        return self.handle([(data, rx_time)])[0]

    def _reject(self, e, data):
        self.counters["rejected_" + e.reason] += 1
        node = "-" if e.node_id is None else e.node_id
        # folded by reason alone: the node id of a frame that failed is not to be trusted
        self.folded.warning(
            ("frame rejected", e.reason),
            "frame rejected reason=%s node=%s len=%d: %s",
            e.reason,
            node,
            len(data),
            e.message,
        )

    def handle(self, batch):
        """Handle a batch of (datagram, rx_time or None); return the acks (bytes or None), in
        the batch's order. rx_time is when the source read the datagram (None: now). The very
        bytes of a frame accepted in the last HEARD_AGAIN_S (a second gateway) are counted and
        not acked; a re-sent copy of a recent frame is counted (frames_copies) and goes through
        the sinks like any frame (they store nothing twice, and keep a reading whose identity
        is stored with another value apart). If the sink write fails no frame is acked."""
        acks = [None] * len(batch)
        accepted, copies, rows = self._take(batch)
        new = None
        if rows:
            new, accepted = self._store(rows, accepted)
        for i, received, rx_time, signer, tag in accepted:
            acks[i] = self._accept(received, rx_time, signer, tag, i in copies)
        if isinstance(new, int) and 0 <= new < len(rows):
            self.counters["values_already_stored"] += len(rows) - new
        if accepted:
            self._save_windows()
        return acks

    def _take(self, batch):
        """The frames of a batch that verify, in order: (accepted [(index, frame, rx_time,
        signer, tag)], indices of re-sent copies, the rows of their readings)."""
        accepted = []
        copies = set()
        rows = []
        in_batch = {}  # frame key -> tag of the frames taken from this batch
        for i, (data, rx_time) in enumerate(batch):
            taken = self._verify(data, in_batch)
            if taken is None:
                continue
            received, signer, key, tag, copy = taken
            if copy:
                copies.add(i)
            if self._failed_rx:
                rx_time = self._failed_rx.pop(key, rx_time)
            if rx_time is None:
                rx_time = self.clock()
            if _is_data(received):
                rows.extend(frame_rows(received, rx_time))
            accepted.append((i, received, rx_time, signer, tag))
        return accepted, copies, rows

    def _verify(self, data, in_batch):
        """(frame, signer, key, tag, a re-sent copy?) of a datagram to take, or None: rejected
        (counted, logged folded) or heard again through a second gateway (counted, quiet)."""
        counters = self.counters
        try:
            received, signer = self.verifier.verify(data)
        except Rejected as e:
            if e.reason == "duplicate" and self._heard_again(bytes(data[-frame.TAG_LEN :])):
                counters["frames_heard_again"] += 1  # a second gateway: quiet
                return None
            self._reject(e, data)
            return None
        key = _frame_key(received)
        tag = bytes(data[-frame.TAG_LEN :])
        if tag == in_batch.get(key) or self._heard_again(tag):
            # The very frame taken already: heard by a second gateway. Its ack is on its way
            # (two would collide on the air): counted, quiet.
            counters["frames_heard_again"] += 1
            return None
        if key in in_batch or key in self._stored:
            if received.seq is not None:  # v1 / STATUS: another frame under a seen seq
                self._reject(
                    Rejected(
                        "duplicate",
                        "node %d seq %d already received" % (received.node_id, received.seq),
                        received.node_id,
                    ),
                    data,
                )
                return None
            return received, signer, key, tag, True  # re-sent: to the sinks (they drop it)
        in_batch[key] = tag
        return received, signer, key, tag, False

    def _store(self, rows, accepted):
        """One durable sink write for the batch's rows: (new rows or None, the frames still
        to ack). If it fails, no data frame is acked (the nodes send again) and v1 frames keep
        their receive time for then."""
        conflicts = getattr(self.sink, "conflicts", 0)
        try:
            new = self.sink.write(rows)
        except Exception as e:  # any sink failure: not durable, so no ack; the node retries
            failed = [a for a in accepted if _is_data(a[1])]
            self._sink_failed([f for _, f, _, _, _ in failed], e)
            for _, f, rx_time, _, _ in failed:
                if f.seq is not None:
                    self._failed_rx[_frame_key(f)] = rx_time
            while len(self._failed_rx) > self.RETRY_MEMORY:
                self._failed_rx.popitem(last=False)
            return None, [a for a in accepted if not _is_data(a[1])]
        conflicts = getattr(self.sink, "conflicts", 0) - conflicts
        if conflicts:
            self._conflicts(conflicts, rows)
        return new, accepted

    def _accept(self, received, rx_time, signer, tag, copy):
        """Count a durable (or STATUS) frame, note its node's health, remember it; its ack."""
        counters = self.counters
        if copy:
            counters["frames_copies"] += 1
        elif _is_data(received):
            counters["frames_accepted"] += 1
            counters["readings_accepted"] += len(received.readings)
            self.health.data(received, rx_time)
        else:
            self._status(received)
            self.health.status(received, rx_time)
        self._remember(received, tag)
        return self._ack(received, int(rx_time), signer, tag)

    def _save_windows(self):
        try:
            self.verifier.save()
        except (sqlite3.Error, OSError, StateError) as e:
            # The readings are durable, so the acks go out; after a restart this batch's seqs
            # would not be known as seen (v2 readings are deduped by identity).
            self.counters["replay_state_error"] += 1
            self.log.error("replay state %s not saved: %s", self.verifier.store.path, e)

    def _conflicts(self, count, rows):
        self.counters["index_conflicts"] += count
        nodes = sorted({row[0] for row in rows if row[1] is not None})
        for node_id in nodes:  # (which of the batch's nodes: not known; each is flagged)
            self.health.conflicts(node_id, count)
        self.folded.error(
            ("index conflicts",),
            "%d readings of node(s) %s carry reading indices already stored with other values: "
            "the node's count restarted (journal erased, or its id given to another board); "
            "kept in readings_conflicts, re-provision it under a new node id",
            count,
            ",".join(str(n) for n in nodes[:10]),
        )

    def _heard_again(self, tag):
        """Whether a frame with this tag was taken less than HEARD_AGAIN_S ago."""
        seen = self._recent_tags.get(tag)
        return seen is not None and time.monotonic() - seen < self.HEARD_AGAIN_S

    def _remember(self, received, tag):
        """A frame taken (durable, acked): its tag for HEARD_AGAIN_S, a v2 frame's key."""
        recent = self._recent_tags
        recent[tag] = time.monotonic()
        if len(recent) > self.STORED_MEMORY:
            recent.popitem(last=False)
        if received.seq is None:
            stored = self._stored
            stored[_frame_key(received)] = None
            if len(stored) > self.STORED_MEMORY:
                stored.popitem(last=False)

    def _sink_failed(self, frames, e):
        self.counters["sink_error"] += len(frames)
        first = frames[0]
        more = " and %d more frames" % (len(frames) - 1) if len(frames) > 1 else ""
        what = "seq=%d" % first.seq if first.seq is not None else "index=%d" % first.index
        self.log.error(
            "sink failed node=%d %s%s: %s: %s; not acked",
            first.node_id,
            what,
            more,
            type(e).__name__,
            e,
        )

    def _status(self, status):
        # Node health has no sink yet: the log line is its record. Acked so the node stops
        # re-sending it; it carries no readings, so nothing is acked before it is durable.
        fields = " ".join(
            "%s=%d" % (uplink.STATUS_FIELDS.get(f, "field_%d" % f), v)
            for f, v in sorted(status.fields.items())
        )
        self.log.info("status node=%d seq=%d %s", status.node_id, status.seq, fields)
        self.counters["status_accepted"] += 1

    def _ack(self, received, host_time, signer, tag):
        self.verifier.accept(received)
        if received.version == 1:
            return uplink.encode_ack(
                signer, received.node_id, host_time, [(received.seq, received.seq)]
            )
        if _is_data(received):
            last = received.index + len(received.readings) - 1
            ranges = [(received.index, last)]
        else:
            ranges = []
        return uplink.encode_ack(signer, received.node_id, host_time, ranges, echo=tag)

    def counters_line(self):
        """The counters as one log-friendly line: "frames_accepted=3 rejected_tag=1"."""
        return counters_line(self.counters)


def _is_data(received):
    return not isinstance(received, uplink.Status)


def counters_line(counters):
    """Counters as one log-friendly line, sorted by name; "(none)" if empty."""
    return " ".join("%s=%d" % kv for kv in sorted(counters.items())) or "(none)"


# --- sources and the receive loop -------------------------------------------------------


class Intake(interfaces.Intake):
    """Where every source puts its datagrams: a queue that the receive loop drains, bounded in
    datagrams and in bytes. Full means the receiver is behind (a slow disk, a flood): the
    datagram is dropped and counted by its source, and the node, having no ack, sends it
    again."""

    def __init__(self, maxsize=20000, max_bytes=4 << 20):
        self._queue = collections.deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        self.bytes = 0

    def put(self, datagram, reply, rx_time=None):
        """Queue one datagram, read at rx_time (unix seconds; None: when it is handled);
        False if the intake is full (the caller counts the drop)."""
        size = len(datagram)
        with self._lock:
            if len(self._queue) >= self.maxsize or self.bytes + size > self.max_bytes:
                return False
            self._queue.append((datagram, reply, rx_time))
            self.bytes += size
            self._ready.notify()
        return True

    def get_batch(self, timeout, max_batch):
        """Up to max_batch queued items, waiting up to timeout for the first; [] if none."""
        with self._lock:
            if not self._queue:
                self._ready.wait(timeout)
            batch = []
            queue_ = self._queue
            while queue_ and len(batch) < max_batch:
                item = queue_.popleft()
                self.bytes -= len(item[0])
                batch.append(item)
        return batch

    def qsize(self):
        return len(self._queue)


def serve(intake, receiver, stop_event, poll_s=0.5, on_poll=None, max_batch=256):
    """The receive loop: take batches from the intake, handle each (one durable write), send the
    acks through each datagram's source. Runs until stop_event is set; on_poll() is called
    between batches and at least every poll_s seconds. Counts acks_sent, ack_send_error and
    internal_error in receiver.counters."""
    log = receiver.log
    counters = receiver.counters
    while not stop_event.is_set():
        if on_poll is not None:
            on_poll()
        receiver.folded.flush()
        batch = intake.get_batch(poll_s, max_batch)
        if not batch:
            continue
        try:
            acks = receiver.handle([(data, rx_time) for data, _, rx_time in batch])
        except Exception:  # a bug, not bad input: keep serving the other nodes
            counters["internal_error"] += len(batch)
            log.exception("internal error on a batch of %d datagrams", len(batch))
            continue
        for (_, reply, _), ack in zip(batch, acks, strict=True):
            if ack is None:
                continue
            counters["acks_sent"] += 1  # before the send: whoever got it can see it counted
            try:
                reply(ack)
            except OSError as e:
                counters["acks_sent"] -= 1
                counters["ack_send_error"] += 1
                log.warning("cannot send ack: %s", e)


class UdpSource(interfaces.Source):
    """Datagrams from a bound UDP socket (nodes on Wi-Fi, or gateways that forward over UDP);
    each ack goes back to the datagram's sender. A thread of its own."""

    RCVBUF = 4 << 20  # absorb bursts (a gateway's backlog) while a batch is being committed

    def __init__(self, sock, poll_s=0.5, log=None):
        self.sock = sock
        host, port = sock.getsockname()[:2]
        self.name = "udp %s:%d" % (host, port)
        self.poll_s = poll_s
        self.log = log if log is not None else logging.getLogger("citynode.receiver")
        self.counters = collections.Counter()
        self._stop = threading.Event()
        self._thread = None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        except OSError:  # a system limit: the default buffer still works
            pass

    def start(self, intake):
        self._thread = threading.Thread(
            target=self._run, args=(intake,), name=self.name, daemon=True
        )
        self._thread.start()

    def _run(self, intake):
        sock = self.sock
        sock.settimeout(self.poll_s)
        sendto = sock.sendto
        while not self._stop.is_set():
            try:
                data, addr = sock.recvfrom(MAX_DATAGRAM + 1)
            except TimeoutError:
                continue
            except ConnectionResetError:  # ICMP port unreachable from an earlier ack (Windows)
                continue
            except OSError as e:
                if self._stop.is_set():  # closed under us by stop()
                    break
                self.counters["udp_error"] += 1
                self.log.warning("%s: receive failed: %s", self.name, e)
                time.sleep(self.poll_s)
                continue
            rx_time = time.time()  # SPEC.md "Timing": when the frame arrived, not when handled
            self.counters["udp_datagrams"] += 1
            if len(data) > MAX_DATAGRAM:
                self.counters["oversize"] += 1
                continue
            if not intake.put(data, lambda ack, addr=addr: sendto(ack, addr), rx_time):
                self.counters["intake_full"] += 1

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll_s + 1)
        self.sock.close()

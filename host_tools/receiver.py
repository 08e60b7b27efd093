# Host receiver: verify a datagram (tag, replay window), timestamp its readings, store them in a
# sink and only then build the ack. Sans-IO core (Verifier, Receiver) plus thin source loops.
#
# Timestamps (protocols/frame.py): a reading's UTC time = time the frame was received - its age.
#
# Sources (UDP here, MQTT in host_tools/mqtt.py, a serial gateway later) all feed one Intake;
# serve() drains it in batches on one thread and group-commits each batch: one durable sink write
# for every frame in it, then one ack per accepted frame. A source is any object with
#     name            str, for logs and status ("udp 0.0.0.0:1700")
#     counters        collections.Counter of its own (it runs on its own thread)
#     start(intake)   begin delivering: intake.put(datagram, reply, rx_time=None)
#     stop()          stop delivering and release the port; may be called twice
# `reply(ack_bytes)` sends one ack back the way the datagram came and may raise OSError;
# `rx_time` is the UTC time of reception when the source knows it better than the host's clock
# (a LoRa gateway stamps the end of reception, SPEC.md "Timing"), else None.

import collections
import hashlib
import logging
import queue
import socket
import sqlite3
import threading
import time

from protocols import frame, uplink

_MAX_DATAGRAM = 65535  # read whole oversized datagrams so the codec can say "too_long"


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


def key_id(key):
    """A node key's fingerprint: the first 8 bytes of its SHA-256, in hex."""
    return hashlib.sha256(key).hexdigest()[:16]


class ReplayStore:
    """The replay windows in a SQLite file, so that a restarted receiver still refuses the frames
    it has seen (a replay after a restart would otherwise be stored again, at the wrong time).
    One row per node: its key's fingerprint (a node given a new key starts from seq 0 again, so
    its old window no longer applies), the highest seq, the window's bitmap (hex: 64 bits do not
    fit SQLite's signed integers). WAL with synchronous=NORMAL: a power cut can lose the last
    batches' rows, not corrupt the file."""

    def __init__(self, path):
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS windows (node_id INTEGER PRIMARY KEY,"
            " key_id TEXT NOT NULL, highest INTEGER NOT NULL, bitmap TEXT NOT NULL)"
        )

    def load(self):
        """{node_id: (key_id, highest, bitmap)}"""
        rows = self._db.execute("SELECT node_id, key_id, highest, bitmap FROM windows")
        return {n: (k, h, int(b, 16)) for n, k, h, b in rows}

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
    """Checks datagrams against the node keys and each node's replay window. check() does not
    change state: call accept() once the frame's readings are durable, then save() to keep the
    windows in `store` (a ReplayStore; None: in memory only).

    Memory per known node is its key and, once it has sent, its window. Signers are built on use
    and kept in a bounded LRU cache (`signer_cache` nodes): a Signer costs a few hundred bytes
    (on MicroPython-style builds two 64-byte pads too), and building one is a microsecond."""

    def __init__(self, keys, window=64, signer_cache=4096, store=None):
        self.keys = dict(keys)
        self.window = window
        self.signer_cache = max(1, signer_cache)
        self._signers = collections.OrderedDict()
        self._windows = {}
        self.store = store
        self._dirty = set()
        if store is not None:
            mask = (1 << window) - 1
            for node_id, (kid, highest, bitmap) in store.load().items():
                key = self.keys.get(node_id)
                if key is not None and kid == key_id(key):
                    w = self._windows[node_id] = ReplayWindow(window)
                    w.highest, w.bitmap = highest, bitmap & mask

    def signer(self, node_id):
        """The node's Signer (cached); KeyError for an unknown node."""
        signers = self._signers
        signer = signers.get(node_id)
        if signer is None:
            signer = signers[node_id] = frame.Signer(self.keys[node_id])
            if len(signers) > self.signer_cache:
                signers.popitem(last=False)
        else:
            signers.move_to_end(node_id)
        return signer

    def check(self, datagram):
        """The verified DataFrame (or Status: health frames share the DATA seq space, SPEC.md),
        or raise Rejected."""
        try:
            _, ftype, node_id = uplink.peek(datagram)
        except frame.FrameError as e:
            raise Rejected(e.reason, str(e)) from None
        if node_id not in self.keys:
            raise Rejected("unknown_node", "no key for node %d" % node_id, node_id)
        if ftype == frame.TYPE_DATA:
            decode = uplink.decode_data
        elif ftype == frame.TYPE_STATUS:
            decode = uplink.decode_status
        else:  # an ACK: downlink only
            raise Rejected(
                "unsupported_type", "frame type %d is not an uplink frame" % ftype, node_id
            )
        try:
            data = decode(datagram, self.signer(node_id))
        except frame.FrameError as e:
            if e.reason == "tag":
                message = "bad tag for node %d (wrong key or corrupted frame)" % node_id
            else:
                message = "node %d: %s" % (node_id, e)
            raise Rejected(e.reason, message, node_id) from None
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
        return data

    def accept(self, data):
        """Mark the frame's seq as seen: later copies are duplicates."""
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
            rows.append((node_id, key_id(self.keys[node_id]), w.highest, w.bitmap))
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
    """Sink rows (node_id, ts, quantity, value) of a DataFrame received at rx_time."""
    return [(data.node_id, ts, name, value) for _, ts, name, value in iter_readings(data, rx_time)]


class Receiver:
    """Datagrams in, acks out: verify, store durably in the sink, then ack. Never raises for a
    bad datagram or a failing sink; counts and logs each instead.

    handle() takes a batch and writes the readings of all its accepted frames in one sink write
    (group commit: one fsync for many frames); datagram() is a batch of one.

    A frame the sink failed to store keeps its receive time: when the node sends the same frame
    again its readings get the same timestamps (its ages count from the first sending), so a
    sink that did store part of it (SQLite's primary key) does not store them twice."""

    RETRY_MEMORY = 4096  # frames whose receive time is kept after a failed sink write

    def __init__(self, verifier, sink, clock=time.time, log=None):
        self.verifier = verifier
        self.sink = sink
        self.clock = clock
        self.log = log if log is not None else logging.getLogger("citynode.receiver")
        self.counters = collections.Counter()
        self._failed_rx = collections.OrderedDict()  # (node_id, seq) -> rx_time

    def datagram(self, data, rx_time=None):
        """Handle one datagram; return the ack to send back, or None."""
        return self.handle([(data, rx_time)])[0]

    def handle(self, batch):
        """Handle a batch of (datagram, rx_time or None); return the acks (bytes or None), in
        the batch's order. A copy of a frame already in the batch (two gateways) is a
        duplicate; if the sink write fails no frame of the batch is acked or marked seen."""
        acks = [None] * len(batch)
        accepted = []  # (index, frame, rx_time)
        rows = []
        in_batch = set()
        counters = self.counters
        for i, (data, rx_time) in enumerate(batch):
            try:
                received = self.verifier.check(data)
                key = (received.node_id, received.seq)
                if key in in_batch:
                    raise Rejected(
                        "duplicate",
                        "node %d seq %d already received" % key,
                        received.node_id,
                    )
            except Rejected as e:
                counters["rejected_" + e.reason] += 1
                node = "-" if e.node_id is None else e.node_id
                self.log.warning(
                    "frame rejected reason=%s node=%s len=%d: %s",
                    e.reason,
                    node,
                    len(data),
                    e.message,
                )
                continue
            in_batch.add(key)
            if self._failed_rx:
                rx_time = self._failed_rx.pop(key, rx_time)
            if rx_time is None:
                rx_time = self.clock()
            if not isinstance(received, uplink.Status):
                rows.extend(frame_rows(received, rx_time))
            accepted.append((i, received, rx_time))
        if rows:
            try:
                self.sink.write(rows)
            except Exception as e:  # any sink failure: not durable, so no ack; the node retries
                failed = [a for a in accepted if _is_data(a[1])]
                self._sink_failed([f for _, f, _ in failed], e)
                for _, f, rx_time in failed:
                    self._failed_rx[(f.node_id, f.seq)] = rx_time
                while len(self._failed_rx) > self.RETRY_MEMORY:
                    self._failed_rx.popitem(last=False)
                accepted = [a for a in accepted if not _is_data(a[1])]
        for i, received, rx_time in accepted:
            if _is_data(received):
                counters["frames_accepted"] += 1
                counters["readings_accepted"] += len(received.readings)
            else:
                self._status(received)
            acks[i] = self._accept(received, rx_time)
        if accepted:
            try:
                self.verifier.save()
            except (sqlite3.Error, OSError) as e:
                # The readings are durable, so the acks go out; after a restart this batch's
                # seqs would not be known as seen (SQLite's primary key still dedupes).
                counters["replay_state_error"] += 1
                self.log.error("replay state %s not saved: %s", self.verifier.store.path, e)
        return acks

    def _sink_failed(self, frames, e):
        self.counters["sink_error"] += len(frames)
        first = frames[0]
        more = " and %d more frames" % (len(frames) - 1) if len(frames) > 1 else ""
        self.log.error(
            "sink failed node=%d seq=%d%s: %s: %s; not acked",
            first.node_id,
            first.seq,
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

    def _accept(self, received, rx_time):
        self.verifier.accept(received)
        signer = self.verifier.signer(received.node_id)
        return uplink.encode_ack(
            signer, received.node_id, int(rx_time), [(received.seq, received.seq)]
        )

    def counters_line(self):
        """The counters as one log-friendly line: "frames_accepted=3 rejected_tag=1"."""
        return counters_line(self.counters)


def _is_data(received):
    return not isinstance(received, uplink.Status)


def counters_line(counters):
    """Counters as one log-friendly line, sorted by name; "(none)" if empty."""
    return " ".join("%s=%d" % kv for kv in sorted(counters.items())) or "(none)"


def serve_udp(sock, receiver, stop_event=None, poll_s=0.5, on_poll=None):
    """Receive datagrams on a bound UDP socket and send each ack back to its source, until
    stop_event is set (checked at least every poll_s seconds). on_poll(), if given, is called
    after every datagram or timeout (for periodic reports). One datagram at a time, on the
    calling thread; `citynode receive` uses UdpSource and serve() instead (batches)."""
    log = receiver.log
    sock.settimeout(poll_s)
    while stop_event is None or not stop_event.is_set():
        if on_poll is not None:
            on_poll()
        try:
            data, addr = sock.recvfrom(_MAX_DATAGRAM)
        except TimeoutError:
            continue
        except ConnectionResetError:  # ICMP port unreachable from an earlier ack (Windows)
            continue
        try:
            ack = receiver.datagram(data)
        except Exception:  # a bug, not bad input: keep serving the other nodes
            receiver.counters["internal_error"] += 1
            log.exception("internal error on a datagram from %s len=%d", addr, len(data))
            continue
        if ack is None:
            continue
        # Counted before the send: whoever got the ack can already see it counted.
        receiver.counters["acks_sent"] += 1
        try:
            sock.sendto(ack, addr)
        except OSError as e:
            receiver.counters["acks_sent"] -= 1
            receiver.counters["ack_send_error"] += 1
            log.warning("cannot send ack to %s: %s", addr, e)


# --- sources and the receive loop -------------------------------------------------------


class Intake:
    """Where every source puts its datagrams: a bounded queue that the receive loop drains.
    Full means the receiver is behind (a slow disk): the datagram is dropped and counted by its
    source, and the node, having no ack, sends it again."""

    def __init__(self, maxsize=20000):
        self._queue = queue.Queue(maxsize)

    def put(self, datagram, reply, rx_time=None):
        """Queue one datagram; False if the queue is full (the caller counts the drop)."""
        try:
            self._queue.put_nowait((datagram, reply, rx_time))
        except queue.Full:
            return False
        return True

    def get_batch(self, timeout, max_batch):
        """Up to max_batch queued items, waiting up to timeout for the first; [] if none."""
        try:
            first = self._queue.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first]
        get = self._queue.get_nowait
        try:
            while len(batch) < max_batch:
                batch.append(get())
        except queue.Empty:
            pass
        return batch

    def qsize(self):
        return self._queue.qsize()


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
            counters["acks_sent"] += 1  # before the send, as in serve_udp
            try:
                reply(ack)
            except OSError as e:
                counters["acks_sent"] -= 1
                counters["ack_send_error"] += 1
                log.warning("cannot send ack: %s", e)


class UdpSource:
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
                data, addr = sock.recvfrom(_MAX_DATAGRAM)
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
            self.counters["udp_datagrams"] += 1
            if not intake.put(data, lambda ack, addr=addr: sendto(ack, addr)):
                self.counters["intake_full"] += 1

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.poll_s + 1)
        self.sock.close()

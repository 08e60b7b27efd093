# Host receiver: verify a datagram (tag, replay window), timestamp its readings, store them in a
# sink and only then build the ack. Sans-IO core (Verifier, Receiver) plus a thin UDP loop.
#
# Timestamps (protocols/frame.py): a reading's UTC time = time the frame was received - its age.

import collections
import logging
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
            self.bitmap |= 1 << (self.highest - seq)


class Verifier:
    """Checks datagrams against the node keys and each node's replay window. check() does not
    change state: call accept() once the frame's readings are durable."""

    def __init__(self, keys, window=64):
        self.keys = dict(keys)
        self.window = window
        self._signers = {}
        self._windows = {}

    def signer(self, node_id):
        """The node's Signer (cached); KeyError for an unknown node."""
        signer = self._signers.get(node_id)
        if signer is None:
            signer = self._signers[node_id] = frame.Signer(self.keys[node_id])
        return signer

    def check(self, datagram):
        """The verified DataFrame (or Status: health frames share the DATA seq space, SPEC.md),
        or raise Rejected."""
        try:
            _, ftype, node_id = frame.peek(datagram)
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


def iter_readings(data, rx_time):
    """(age_s, ts, quantity, value) for each value of a DataFrame received at rx_time (unix
    seconds, UTC); ts rounded to milliseconds."""
    quantities = [frame.quantity(ch) for ch in data.channels]
    for raw_values, age in zip(data.readings, data.ages, strict=True):
        ts = round(rx_time - age, 3)
        for (name, scale), raw in zip(quantities, raw_values, strict=True):
            yield age, ts, name, raw / scale


def frame_rows(data, rx_time):
    """Sink rows (node_id, ts, quantity, value) of a DataFrame received at rx_time."""
    return [(data.node_id, ts, name, value) for _, ts, name, value in iter_readings(data, rx_time)]


class Receiver:
    """Datagram in, ack out: verify, store durably in the sink, then ack. Never raises for a bad
    datagram or a failing sink; counts and logs each instead."""

    def __init__(self, verifier, sink, clock=time.time, log=None):
        self.verifier = verifier
        self.sink = sink
        self.clock = clock
        self.log = log if log is not None else logging.getLogger("citynode.receiver")
        self.counters = collections.Counter()

    def datagram(self, data):
        """Handle one datagram; return the ack to send back, or None."""
        try:
            received = self.verifier.check(data)
        except Rejected as e:
            self.counters["rejected_" + e.reason] += 1
            node = "-" if e.node_id is None else e.node_id
            self.log.warning(
                "frame rejected reason=%s node=%s len=%d: %s", e.reason, node, len(data), e.message
            )
            return None
        rx_time = self.clock()
        if isinstance(received, uplink.Status):
            return self._status(received, rx_time)
        rows = frame_rows(received, rx_time)
        try:
            self.sink.write(rows)
        except Exception as e:  # any sink failure: not durable, so no ack; the node retries
            self.counters["sink_error"] += 1
            self.log.error(
                "sink failed node=%d seq=%d: %s: %s; not acked",
                received.node_id,
                received.seq,
                type(e).__name__,
                e,
            )
            return None
        self.counters["frames_accepted"] += 1
        self.counters["readings_accepted"] += len(received.readings)
        return self._accept(received, rx_time)

    def _status(self, status, rx_time):
        # Node health has no sink yet: the log line is its record. Acked so the node stops
        # re-sending it; it carries no readings, so nothing is acked before it is durable.
        fields = " ".join(
            "%s=%d" % (uplink.STATUS_FIELDS.get(f, "field_%d" % f), v)
            for f, v in sorted(status.fields.items())
        )
        self.log.info("status node=%d seq=%d %s", status.node_id, status.seq, fields)
        self.counters["status_accepted"] += 1
        return self._accept(status, rx_time)

    def _accept(self, received, rx_time):
        self.verifier.accept(received)
        signer = self.verifier.signer(received.node_id)
        return frame.encode_ack(
            signer, received.node_id, int(rx_time), [(received.seq, received.seq)]
        )

    def counters_line(self):
        """The counters as one log-friendly line: "frames_accepted=3 rejected_tag=1"."""
        return " ".join("%s=%d" % kv for kv in sorted(self.counters.items())) or "(none)"


def serve_udp(sock, receiver, stop_event=None, poll_s=0.5, on_poll=None):
    """Receive datagrams on a bound UDP socket and send each ack back to its source, until
    stop_event is set (checked at least every poll_s seconds). on_poll(), if given, is called
    after every datagram or timeout (for periodic reports)."""
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
        try:
            sock.sendto(ack, addr)
            receiver.counters["acks_sent"] += 1
        except OSError as e:
            receiver.counters["ack_send_error"] += 1
            log.warning("cannot send ack to %s: %s", addr, e)

# Receive source for LoRa gateways on serial lines (protocols/GATEWAY.md): reads gateway link
# messages from each line, maps the gateway's clock to UTC, merges the copies of one frame that
# several gateways heard, feeds the receiver's intake once per frame, and sends each ack back as a
# DOWNLINK through the gateway that heard the node best, timed for the node's receive window.
#
# Lines are opened with serial.serial_for_url(), so /dev/ttyUSB0, socket://host:port, loop:// and
# rfc2217:// all work; an unplugged or failing line is reopened with back-off and jitter. Follows
# the source interface in receiver.py's header (name, counters, start(intake), stop()).

import collections
import logging
import threading
import time

import serial

from host_tools.backoff import Backoff
from host_tools.receive.interfaces import Source
from protocols import gwlink

DEDUPE_S = 0.1  # how long the first copy of a frame waits for copies from other gateways
ACK_FREQ_KHZ = 869525  # EU868 869.4-869.65 MHz: 10 % duty cycle, room for many nodes' acks
ACK_POWER_DBM = 14
DRIFT = 100e-6  # the kept offset may rise this much a second: crystals drift < 100 ppm
JUMP_S = 10.0  # an offset or elapsed-time mismatch beyond this means the gateway rebooted
# Gateways whose clock and seq a line keeps, least recently heard forgotten first. A line holds
# one gateway or a short chain; the rest is a noisy or hostile line inventing ids (u32), which
# would otherwise grow the state without end (about 300 bytes an id).
MAX_GATEWAYS_PER_LINE = 256
_U32 = 1 << 32

log = logging.getLogger("citynode.gateway")


class GatewayClock:
    """One gateway's clock (ms since its boot, u32) against host UTC (GATEWAY.md "Timing"):
    the offset is the minimum of (arrival time - gateway time) over the messages seen, rising
    by DRIFT per second so that it follows a crystal that runs slow; a reboot (the gateway's
    time not advancing with the host's, beyond a 32-bit wrap) starts it afresh."""

    def __init__(self):
        self.offset = None  # host UTC (s) minus gateway time (s)
        self.resets = 0
        self._raw = None  # latest gateway ms seen (u32)
        self._ms = None  # the same, unwrapped
        self._host_at_raw = None  # host time it arrived
        self._last_host = None  # host time of the last message

    def observe(self, gw_ms, host_time):
        """A message stamped gw_ms by the gateway arrived at host_time (UTC s); returns the
        offset. A stamp a little older than the latest (a STATUS sent between a reception and
        its UPLINK) is fine; one that does not fit the host's elapsed time is a reboot."""
        delta = 0
        if self._raw is not None:
            delta = (gw_ms - self._raw) % _U32
            if delta >= _U32 // 2:
                delta -= _U32  # older than the latest stamp
            elapsed = host_time - self._host_at_raw
            if abs(delta / 1000 - elapsed) > JUMP_S + DRIFT * abs(elapsed):
                self._restart()
        if self._raw is None:
            ms = gw_ms
            self._raw, self._ms, self._host_at_raw = gw_ms, gw_ms, host_time
        else:
            ms = self._ms + delta
            if delta > 0:
                self._raw, self._ms, self._host_at_raw = gw_ms, ms, host_time
        sample = host_time - ms / 1000
        if self.offset is None:
            self.offset = sample
        else:
            self.offset += DRIFT * max(0.0, host_time - self._last_host)
            if sample < self.offset:
                self.offset = sample
            elif sample - self.offset > JUMP_S:  # the same boot, but a clock that jumped
                self.resets += 1
                self.offset = sample
        self._last_host = host_time
        return self.offset

    def _restart(self):
        self.resets += 1
        self._raw = None
        self.offset = None

    def utc(self, gw_ms):
        """UTC (s) of a gateway time at or shortly before the last one observed."""
        if self.offset is None:
            raise ValueError("no message observed yet")
        back = (self._raw - gw_ms) % _U32
        ms = self._ms - back if back < _U32 // 2 else self._ms + (_U32 - back)
        return ms / 1000 + self.offset


class _Gateway:
    """What a line keeps about one gateway heard on it."""

    __slots__ = ("clock", "seq")

    def __init__(self):
        self.clock = GatewayClock()
        self.seq = None  # the last message seq


class _Line:
    """One serial line to one gateway (or a chain of them sharing it)."""

    def __init__(self, url, source):
        self.url = url
        self.source = source
        self.port = None
        self.deframer = gwlink.Deframer()
        self._seen = dict.fromkeys(_DEFRAMER_COUNTERS, 0)
        self._write_lock = threading.Lock()
        self.log_quiet_until = 0.0
        self.evict_log_quiet_until = 0.0
        self.gateways = collections.OrderedDict()  # gw_id -> _Gateway, least recent first

    def send(self, data):
        with self._write_lock:
            port = self.port
            if port is None:
                raise OSError("serial %s is not connected" % self.url)
            try:
                port.write(data)
            except (serial.SerialException, OSError) as e:
                raise OSError("serial %s: write failed: %s" % (self.url, e)) from None

    def count_deframer(self):
        counters = self.source.counters
        for name in _DEFRAMER_COUNTERS:
            now = getattr(self.deframer, name)
            if now != self._seen[name]:
                counters["gateway_line_" + name] += now - self._seen[name]
                self._seen[name] = now


_DEFRAMER_COUNTERS = (
    "bad_crc",
    "bad_cobs",
    "oversize",
    "too_short",
    "bad_message",
    "garbage_bytes",
)


class _Pending:
    __slots__ = ("deadline", "copies")

    def __init__(self, deadline):
        self.deadline = deadline
        self.copies = []  # (line, Uplink, utc)


class SerialGatewaySource(Source):
    """Uplinks from gateways on serial lines, one thread per line plus one that hands merged
    frames to the intake. Counters (all in self.counters):
      serial_connects, serial_disconnects, serial_open_errors
      gateway_uplinks (copies received), gateway_uplinks_lora_crc (bad LoRa CRC, dropped),
      gateway_copies_merged, gateway_late_copies (dropped: the frame was already handed on),
      gateway_frames (handed to the intake), intake_full
      gateway_messages_lost (gaps in a gateway's message seq), gateway_clock_resets
      gateway_state_evicted (a gateway's clock and seq forgotten: more than
        max_gateways ids heard on one line)
      gateway_line_bad_crc, _bad_cobs, _oversize, _too_short, _bad_message, _garbage_bytes
      downlinks_sent, downlink_send_errors, downlink_<result> (the gateways' TX_RESULTs)
      gateway_status (status lines)"""

    def __init__(
        self,
        urls,
        baudrate=115200,
        clock=time.time,
        monotonic=time.monotonic,
        dedupe_s=DEDUPE_S,
        rx_delay_ms=gwlink.RX_DELAY_MS,
        ack_freq_khz=ACK_FREQ_KHZ,
        ack_power_dbm=ACK_POWER_DBM,
        poll_s=0.05,
        backoff=None,
        late_memory_s=10.0,
        max_gateways=MAX_GATEWAYS_PER_LINE,
    ):
        if isinstance(urls, str):
            urls = [urls]
        if not urls:
            raise ValueError("no serial line given")
        if max_gateways < 1:
            raise ValueError("max_gateways must be at least 1, got %d" % max_gateways)
        self.urls = list(urls)
        self.name = "serial " + ", ".join(self.urls)
        self.baudrate = baudrate
        self.clock = clock
        self.monotonic = monotonic
        self.dedupe_s = dedupe_s
        self.rx_delay_ms = rx_delay_ms
        self.ack_freq_khz = ack_freq_khz  # None: the channel the uplink came on
        self.ack_power_dbm = ack_power_dbm
        self.poll_s = poll_s
        self.late_memory_s = late_memory_s
        self.max_gateways = max_gateways
        self._backoff = backoff or (lambda: Backoff(0.5, 30.0))
        self.counters = collections.Counter()
        self.lines = [_Line(url, self) for url in self.urls]
        self._intake = None
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._pending = collections.OrderedDict()  # payload -> _Pending
        self._handed = collections.OrderedDict()  # payload -> monotonic time handed on
        self._msg_id = 0
        self._threads = []

    # --- lifecycle --------------------------------------------------------------------

    def start(self, intake):
        self._intake = intake
        self._stop.clear()
        for line in self.lines:
            t = threading.Thread(
                target=self._run_line, args=(line,), name="serial " + line.url, daemon=True
            )
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._run_merge, name=self.name + " merge", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self):
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5 * self.poll_s + 2)
        self._threads = []
        for line in self.lines:
            self._close(line)

    # --- a line -----------------------------------------------------------------------

    def _run_line(self, line):
        backoff = self._backoff()
        while not self._stop.is_set():
            try:
                port = serial.serial_for_url(
                    line.url, baudrate=self.baudrate, timeout=self.poll_s, write_timeout=1.0
                )
            except (serial.SerialException, OSError, ValueError) as e:
                self.counters["serial_open_errors"] += 1
                delay = backoff.next()
                if backoff.failures == 1 or backoff.failures % 20 == 0:
                    log.warning(
                        "serial %s: cannot open: %s; retrying in %.1f s (attempt %d)",
                        line.url,
                        e,
                        delay,
                        backoff.failures,
                    )
                self._stop.wait(delay)
                continue
            with line._write_lock:
                line.port = port
            self.counters["serial_connects"] += 1
            log.info("serial %s: connected", line.url)
            backoff.reset()
            try:
                self._read(line, port)
            except (serial.SerialException, OSError) as e:
                if self._stop.is_set():
                    break
                self.counters["serial_disconnects"] += 1
                delay = backoff.next()
                log.warning(
                    "serial %s: line lost: %s; %d bytes of a partial message dropped; "
                    "reconnecting in %.1f s",
                    line.url,
                    e,
                    line.deframer.pending(),
                    delay,
                )
                self._close(line)
                self._stop.wait(delay)
        self._close(line)

    def _close(self, line):
        with line._write_lock:
            port, line.port = line.port, None
        line.deframer.reset()
        line.count_deframer()
        if port is not None:
            try:
                port.close()
            except (serial.SerialException, OSError):
                pass

    def _read(self, line, port):
        while not self._stop.is_set():
            data = port.read(max(1, port.in_waiting))
            if not data:
                continue
            now = self.clock()
            messages = line.deframer.feed(data)
            line.count_deframer()
            why = line.deframer.last_error
            if why is not None:
                line.deframer.last_error = None
                if self.monotonic() >= line.log_quiet_until:  # one such line a minute
                    line.log_quiet_until = self.monotonic() + 60.0
                    log.warning(
                        "serial %s: dropped a bad frame (%s); line totals: %s",
                        line.url,
                        why,
                        " ".join(
                            "%s=%d" % (n, getattr(line.deframer, n)) for n in _DEFRAMER_COUNTERS
                        ),
                    )
            for msg in messages:
                try:
                    self._message(line, msg, now)
                except Exception:  # a bug, not bad input: keep the line alive
                    self.counters["internal_error"] += 1
                    log.exception("serial %s: internal error on %r", line.url, msg)

    def _message(self, line, msg, now):
        if isinstance(msg, gwlink.Downlink):
            self.counters["gateway_line_bad_message"] += 1  # a gateway does not send these
            log.warning("serial %s: a DOWNLINK from the gateway side, ignored", line.url)
            return
        gateway = self._gateway(line, msg.gw_id)
        self._check_seq(gateway, msg)
        clock = gateway.clock
        resets = clock.resets
        if isinstance(msg, gwlink.Uplink):
            clock.observe(msg.rx_ms, now)
        else:
            clock.observe(msg.now_ms, now)
        if clock.resets != resets:
            self.counters["gateway_clock_resets"] += 1
            log.info("gateway %d: clock restarted (rebooted?)", msg.gw_id)
        if isinstance(msg, gwlink.Uplink):
            self._uplink(line, msg, clock)
        elif isinstance(msg, gwlink.Status):
            self.counters["gateway_status"] += 1
            level = {68: logging.DEBUG, 87: logging.WARNING, 69: logging.ERROR}.get(
                msg.level, logging.INFO
            )
            log.log(level, "gateway %d: %s", msg.gw_id, msg.text)
        elif isinstance(msg, gwlink.TxResult):
            name = gwlink.result_name(msg.result)
            self.counters["downlink_" + name] += 1
            if msg.result != gwlink.SENT:
                log.warning("gateway %d: downlink %d not sent: %s", msg.gw_id, msg.msg_id, name)

    def _gateway(self, line, gw_id):
        """The state of gw_id on this line, made most recent; a new id beyond max_gateways
        forgets the least recently heard one (its next message starts its clock afresh)."""
        gateways = line.gateways
        gateway = gateways.get(gw_id)
        if gateway is not None:
            gateways.move_to_end(gw_id)
            return gateway
        if len(gateways) >= self.max_gateways:
            old_id, _ = gateways.popitem(last=False)
            self.counters["gateway_state_evicted"] += 1
            if self.monotonic() >= line.evict_log_quiet_until:  # one such line a minute
                line.evict_log_quiet_until = self.monotonic() + 60.0
                log.warning(
                    "serial %s: more than %d gateway ids heard (now %d); forgot gateway %d "
                    "(%d forgotten so far: a noisy line?)",
                    line.url,
                    self.max_gateways,
                    gw_id,
                    old_id,
                    self.counters["gateway_state_evicted"],
                )
        gateway = gateways[gw_id] = _Gateway()
        return gateway

    def _check_seq(self, gateway, msg):
        last, gateway.seq = gateway.seq, msg.seq
        if last is None:
            return
        gap = (msg.seq - last - 1) % 0x10000
        if 0 < gap < 0x8000:
            self.counters["gateway_messages_lost"] += gap
            log.warning("gateway %d: %d messages lost on the line", msg.gw_id, gap)

    # --- merging copies -----------------------------------------------------------------

    def _uplink(self, line, msg, clock):
        self.counters["gateway_uplinks"] += 1
        if not msg.flags & gwlink.FLAG_CRC_OK:
            self.counters["gateway_uplinks_lora_crc"] += 1
            return
        # the frame left the node airtime before the gateway's end-of-reception stamp
        utc = clock.utc(msg.rx_ms) - msg.airtime_us / 1e6
        key = msg.payload
        now = self.monotonic()
        with self._cond:
            handed = self._handed.get(key)
            if handed is not None and now - handed < self.late_memory_s:
                self.counters["gateway_late_copies"] += 1
                return
            pending = self._pending.get(key)
            if pending is None:
                pending = self._pending[key] = _Pending(now + self.dedupe_s)
                self._cond.notify()
            else:
                self.counters["gateway_copies_merged"] += 1
            pending.copies.append((line, msg, utc))

    def _run_merge(self):
        while not self._stop.is_set():
            with self._cond:
                now = self.monotonic()
                due = []
                while self._pending:
                    key, pending = next(iter(self._pending.items()))
                    if pending.deadline > now:
                        break
                    del self._pending[key]
                    self._handed[key] = now
                    due.append(pending)
                while self._handed:
                    key, t = next(iter(self._handed.items()))
                    if now - t < self.late_memory_s:
                        break
                    del self._handed[key]
                if not due:
                    wait = self.poll_s
                    if self._pending:
                        wait = min(wait, next(iter(self._pending.values())).deadline - now)
                    self._cond.wait(max(0.001, wait))
                    continue
            for pending in due:
                self._hand_on(pending.copies)

    def _hand_on(self, copies):
        # best first: highest RSSI (least path loss), then SNR, then who heard it first
        ranked = sorted(copies, key=lambda c: (-c[1].rssi, -c[1].snr_x4))
        line, msg, utc = ranked[0]
        if not self._intake.put(msg.payload, lambda ack: self._reply(ranked, ack), rx_time=utc):
            self.counters["intake_full"] += 1
            return
        self.counters["gateway_frames"] += 1

    def _reply(self, ranked, ack):
        """Send the ack through the best gateway whose line is up (OSError if none is)."""
        errors = []
        for line, msg, _ in ranked:
            with self._cond:
                self._msg_id = (self._msg_id + 1) & 0xFFFF
                msg_id = self._msg_id
            down = gwlink.Downlink(
                msg.gw_id,
                msg_id,
                (msg.rx_ms + self.rx_delay_ms) % _U32,
                self.ack_freq_khz if self.ack_freq_khz is not None else msg.freq_khz,
                self.ack_power_dbm,
                msg.sf,
                bytes(ack),
            )
            try:
                line.send(gwlink.encode(down))
            except OSError as e:
                self.counters["downlink_send_errors"] += 1
                errors.append(str(e))
                continue
            self.counters["downlinks_sent"] += 1
            return
        raise OSError("no gateway line could take the ack: " + "; ".join(errors))

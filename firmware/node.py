# The node role: sample the sensor, batch readings, send them as signed DATA frames, keep them
# until the host acknowledges them. Hardware (bus, clock, network) comes from the board.

from firmware import bme280
from protocols import frame

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


FW_VERSION = "0.1.0"
_RX_BUF = const(64)  # an ack with a few ranges is ~20 bytes


class Node:
    def __init__(self, cfg, board, log, sequence):
        self.cfg = cfg
        self.board = board
        self.log = log
        self.seq = sequence
        self.signer = frame.Signer(cfg.key)
        self.pending = []  # [(sample ticks_ms, (t_centi_c, h_centi_pct, p_pa))], oldest first
        self.sensor = None
        self.sock = None
        self.utc_offset_ms = None  # host UTC ms minus ticks_ms, once an ack has told us
        self.stats = {
            "sampled": 0,
            "sensor_faults": 0,
            "dropped": 0,
            "frames_sent": 0,
            "frames_acked": 0,
            "acks_rejected": 0,
            "bytes_sent": 0,
        }

    # --- sensor -------------------------------------------------------------------------

    def _open_sensor(self):
        try:
            self.sensor = bme280.BME280(
                self.board.i2c(), self.board.BME280_ADDRESS, sleep_ms=self.board.sleep_ms
            )
            self.log.info("sensor", "bme280 ready", address="0x%02x" % self.board.BME280_ADDRESS)
        except bme280.SensorError as e:
            self.sensor = None
            self.stats["sensor_faults"] += 1
            self.log.error("sensor", str(e))

    def sample(self):
        if self.sensor is None:
            self._open_sensor()
            if self.sensor is None:
                return False
        try:
            values = self.sensor.read()
        except bme280.SensorError as e:
            self.stats["sensor_faults"] += 1
            self.log.error("sensor", str(e))
            self.sensor = None  # re-probe next cycle: the chip may have been reset or re-seated
            return False
        self.pending.append((self.board.ticks_ms(), values))
        self.stats["sampled"] += 1
        self.log.debug("sensor", "sample", t=values[0], h=values[1], p=values[2])
        if len(self.pending) > self.cfg.max_pending:
            self.pending.pop(0)
            self.stats["dropped"] += 1
            self.log.warning("node", "buffer full, dropped oldest reading", dropped=1)
        return True

    # --- uplink -------------------------------------------------------------------------

    def _socket(self):
        if self.sock is None:
            self.sock = self.board.udp_socket()
        return self.sock

    def send_pending(self, flush=False):
        """Send full batches (every reading if flush); stop at the first unacknowledged one."""
        batch = self.cfg.batch
        while self.pending and (flush or len(self.pending) >= batch):
            if not self.board.network_up():
                self.log.warning(
                    "link", "network down, keeping readings", pending=len(self.pending)
                )
                return False
            chunk = self.pending[:batch]
            if not self._send(chunk):
                return False
            del self.pending[: len(chunk)]
        return True

    def _send(self, chunk):
        now = self.board.ticks_ms()
        ages = [(now - t + 500) // 1000 for t, _ in chunk]
        seq = self.seq.take()
        data = frame.encode_data(
            self.signer, self.cfg.node_id, seq, frame.BME280_CHANNELS, [v for _, v in chunk], ages
        )
        sock = self._socket()
        try:
            sock.sendto(data, self.board.uplink_address(self.cfg.uplink))
        except OSError as e:
            self.log.warning("link", "send failed", seq=seq, errno=_errno(e))
            return False
        self.stats["frames_sent"] += 1
        self.stats["bytes_sent"] += len(data)
        self.log.info("link", "sent frame", seq=seq, readings=len(chunk), bytes=len(data))
        if self._await_ack(seq):
            self.stats["frames_acked"] += 1
            return True
        self.log.warning("link", "no ack, will retry", seq=seq, pending=len(self.pending))
        return False

    def _await_ack(self, seq):
        deadline = self.board.ticks_ms() + self.cfg.ack_timeout_ms
        while True:
            left = deadline - self.board.ticks_ms()
            if left <= 0 or not self.board.wait_readable(self.sock, left):
                return False
            try:
                data = self.sock.recv(_RX_BUF)
            except OSError:
                continue
            if self._handle_ack(data, seq):
                return True

    def _handle_ack(self, data, seq):
        try:
            ack = frame.decode_ack(data, self.signer)
        except frame.FrameError as e:
            self.stats["acks_rejected"] += 1
            self.log.warning("link", "ack rejected", reason=e.reason, detail=str(e))
            return False
        if ack.node_id != self.cfg.node_id:
            self.stats["acks_rejected"] += 1
            self.log.warning("link", "ack for another node", node=ack.node_id)
            return False
        for first, last in ack.acked:
            if first <= seq <= last:
                self._sync_clock(ack.host_time)
                return True
        self.log.warning("link", "ack does not cover the frame sent", seq=seq)
        return False

    def _sync_clock(self, host_time):
        # Only acks of the frame just sent reach here, so the time is fresh (SPEC.md, ACK).
        offset = host_time * 1000 - self.board.ticks_ms()
        old = self.utc_offset_ms
        if old is None or abs(offset - old) > 2000:
            self.log.info(
                "clock",
                "synced to host",
                utc=host_time,
                step_ms=0 if old is None else offset - old,
            )
        self.utc_offset_ms = offset

    # --- main loop ----------------------------------------------------------------------

    def run(self):
        interval_ms = self.cfg.interval_s * 1000
        self.log.info(
            "node",
            "started",
            node=self.cfg.node_id,
            fw=FW_VERSION,
            board=self.board.NAME,
            interval_s=self.cfg.interval_s,
            batch=self.cfg.batch,
        )
        while True:
            start = self.board.ticks_ms()
            self.sample()
            self.send_pending()
            awake = self.board.ticks_ms() - start
            if not self.board.idle_ms(max(0, interval_ms - awake)):
                break  # only a simulated world ends
        self.send_pending(flush=True)
        self.log.info("node", "stopped", **self.stats)


def _errno(e):
    return e.args[0] if e.args else 0

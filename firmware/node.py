# The node role: sample the sensor, append each reading to the flash journal, send the oldest
# readings in signed DATA frames, forget them only when the host acknowledges them.
# Hardware (bus, clock, radio or network) comes from the board; the uplink from firmware/links.

import gc

from firmware import bme280
from protocols import frame

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


_MAX_AGE_MS = const(0x7FFFFFFF)
_HOUR_MS = const(3600000)


class Node:
    ROLE = "node"  # the log's subsystem for what app.py reports

    def __init__(
        self,
        cfg,
        board,
        log,
        sequence,
        journal,
        link,
        clock,
        boot,
        wake=None,
        buf=None,
        sensor=None,
    ):
        self.cfg = cfg
        self.board = board
        self.log = log
        self.seq = sequence  # (next seq, reserved bound): firmware/status.py takes them
        self.journal = journal
        self.link = link
        self.clock = clock
        # (boot count, reset cause, a deep-sleep wake?): one tuple, as the node's attributes
        # must stay few (a 17th makes the instance's table grow into a 368-byte block)
        self.boot = (boot[0], boot[1], wake is not None)
        self.signer = frame.Signer(cfg.key)
        # Frames are built in one buffer, allocated once (wiring.py allocates it early in boot,
        # while the heap still has holes that large).
        if buf is None or len(buf) < frame.STATUS_BUF:
            buf = bytearray(frame.STATUS_BUF)
        self._frame_buf = buf
        # the BME280 (None until it answers), or the sensor layer (firmware/sensors.py) of a node
        # with config "sensors", which counts its faults in the node's stats from now on
        self.sensor = sensor
        self.cycles = 0
        self.awake_ms_total = 0
        self._misses = 0  # frames in a row that went unacknowledged
        self._backoff = 0  # cycles to wait before the next try
        self.stats = {
            "sampled": 0,
            "sensor_faults": 0,
            "journal_errors": 0,
            "unplaceable": 0,
            "frames_sent": 0,
            "frames_acked": 0,
            "acks_rejected": 0,
            "bytes_sent": 0,
            "status_sent": 0,
        }
        # STATUS frames: 1 = due now (at boot, then every status_every_s), 2 = due at the next
        # full hour of the node's clock (a sensor faulted or readings were dropped since the
        # last one: a maintainer hears of it within the hour), 0 = not due
        self._status_due = 1
        if cfg.sensors:
            self.stats["sensor_faults"] = sensor.stats["sensor_faults"]
            sensor.stats = self.stats
        if wake is not None:  # a deep-sleep wake: the same boot, one more cycle
            from firmware import deep

            deep.restore(self, wake)

    # --- sensor -------------------------------------------------------------------------

    def sample(self):
        if self.sensor is None:  # a BME280 that failed: probe it again
            try:
                self.sensor = bme280.BME280(
                    self.board.i2c(), self.board.BME280_ADDRESS, sleep_ms=self.board.sleep_ms
                )
            except bme280.SensorError as e:
                self.stats["sensor_faults"] += 1
                self.log.error("sensor", str(e))
                return False
            self.log.info("sensor", "bme280 ready", address="0x%02x" % self.board.BME280_ADDRESS)
        try:
            values = self.sensor.read()
        except bme280.SensorError as e:
            self.stats["sensor_faults"] += 1
            self.log.error("sensor", str(e))
            self.sensor = None  # re-probe next cycle: the chip may have been reset or re-seated
            return False
        if values is None:  # sensors.py: no sensor gave anything (each fault counted there)
            return False
        dropped = self.journal.dropped
        try:
            self.journal.append(self.boot[0], self.board.ticks_ms(), values)
        except Exception as e:  # JournalError (full or broken flash): count, keep running
            self.stats["journal_errors"] += 1
            self.log.error("journal", "reading not stored", error=str(e))
            return False
        self.stats["sampled"] += 1
        if self.journal.dropped != dropped:
            self.log.warning(
                "journal", "full, dropped oldest readings", dropped=self.journal.dropped - dropped
            )
        return True

    # --- uplink -------------------------------------------------------------------------

    def send_pending(self, flush=False):
        """Send full batches (every reading if flush), oldest first; stop at the first one
        that is not acknowledged: the rest waits in the journal. After a frame goes
        unacknowledged the node waits 1, 2, 4 ... 32 cycles (with jitter) before trying again,
        and a backlog goes out in frames of up to the link's max_batch readings (a LoRa node
        packs a backlog into fewer, longer frames: less airtime per reading)."""
        batch = self.cfg.batch
        if self._backoff and not flush:
            return False
        if len(self.journal) > batch:
            batch = min(len(self.journal), self.link.max_batch or batch)
        before = self.stats["unplaceable"]
        try:
            return self._send_batches(batch, flush)
        finally:
            # one line for all the readings dropped in this call, not one a batch (a long
            # outage's backlog made 91 lines of it)
            if self.stats["unplaceable"] != before:
                self.log.error(
                    "clock",
                    "readings from a boot without time dropped",
                    count=self.stats["unplaceable"] - before,
                )

    def _send_batches(self, batch, flush):
        while len(self.journal) and (flush or len(self.journal) >= self.cfg.batch):
            if not self.link.up():
                self.log.warning("link", "down, keeping readings", pending=len(self.journal))
                return False
            self.link.prepare()  # e.g. LoRa's random delay: before the ages are taken
            records = self.journal.peek(batch)
            readings, ages, skip, channels = self._place(records)
            if skip:  # earlier boots that never learned the time: cannot be placed
                self.journal.ack(skip)
                self.stats["unplaceable"] += skip
                continue
            if not readings:
                # Earlier boots' readings wait until this boot knows the time: the ack of a
                # status frame tells it.
                if not self.send_status() or self.clock.offset() is None:
                    return False
                continue
            n = len(readings)
            first = self.journal.first  # the reading index of records[0] (SPEC.md, v2)
            data = frame.encode_data(
                self.signer,
                self.cfg.node_id,
                first,
                channels,
                readings,
                ages,
                self._frame_buf,
            )
            # The wait for the ack needs the heap more (the ack's HMAC): the readings and the
            # encoder's garbage go now, not at the next cycle (in 64 KB with a PM sensor, the
            # ack's SHA-256 object found no 128-byte hole without this collection).
            records = readings = ages = None
            gc.collect()
            if not self._transmit(data, first, n):
                return False
            self.journal.ack(n)
        return True

    def _place(self, records):
        """Readings and ages (s, non-increasing) for the oldest records; or how many leading
        records are unplaceable; or nothing if the time is not known yet. And their channels."""
        now = self.board.ticks_ms()
        readings = []
        ages = []
        last = _MAX_AGE_MS
        for i in range(len(records)):
            boot, ms, values = records[i]
            age = self.clock.age_ms(boot, ms, now)
            if age is None:
                if i:
                    break  # send what is placeable; the rest waits
                if self.clock.offset() is None:
                    return readings, ages, 0, None
                n = 0  # how many leading records no clock places
                for boot, ms, _ in records:
                    if self.clock.age_ms(boot, ms, 0) is not None:
                        break
                    n += 1
                return readings, ages, n, None
            age = min(max(0, age), last)  # clock offsets are +-1 s: keep the order
            last = age
            readings.append(values)
            ages.append((age + 500) // 1000)
        if self.cfg.sensors:  # a failed sensor's values are absent: a frame per channel set
            return self.sensor.frame(readings, ages)
        return readings, ages, 0, frame.BME280_CHANNELS

    def _troubles(self):
        """What a STATUS frame tells a maintainer had better be told soon: sensor faults and
        readings dropped (journal full, or from a boot without time)."""
        return self.stats["sensor_faults"] + self.journal.dropped + self.stats["unplaceable"]

    def send_status(self):
        # Rare (at boot, every status_every_s, after trouble): the frame's code and the sequence
        # counter's are loaded to build one and dropped after (firmware/README.md). The free
        # heap reported is the running node's, taken before they load.
        free = gc.mem_free()
        from firmware import status, unload

        try:
            data, seq = status.encode(self, free)
        finally:
            unload("status", "seq")
        return self._transmit(data, seq, 0)

    def _transmit(self, data, first, n):
        """Send a frame and wait for its ack. n readings from index first, or a STATUS frame
        of that seq (n = 0)."""
        if not self.link.send(data):
            # A link that said when it may send again (LoRa's airtime governor): no frame is
            # built before then (a STATUS frame would take a seq each cycle for nothing).
            self._backoff = self.link.wait_ms // (self.cfg.interval_s * 1000)
            return False
        self.stats["frames_sent"] += 1
        if not n:
            self.stats["status_sent"] += 1
        self.stats["bytes_sent"] += len(data)
        if n:
            self.log.info("link", "sent frame", first=first, readings=n, bytes=len(data))
        else:
            self.log.info("link", "sent status", seq=first, bytes=len(data))
        if self._await_ack(data, first, n):
            self.stats["frames_acked"] += 1
            self._misses = 0
            return True
        self._misses = min(self._misses + 1, 6)
        # wait 2^(misses-1) - 1 cycles, less one half the time (jitter): 0, 0..1, 2..3 ... 31
        self._backoff = (
            (1 << (self._misses - 1)) - 1 - (self.cycles & 1 if self._misses > 1 else 0)
        )
        self.log.warning(
            "link", "no ack, will retry", pending=len(self.journal), backoff=self._backoff
        )
        return False

    def _await_ack(self, sent, first, n):
        deadline = self.board.ticks_ms() + self.cfg.ack_timeout_ms
        while True:
            left = deadline - self.board.ticks_ms()
            if left <= 0:
                return False
            data = self.link.receive(left)
            if data is None:
                return False
            if self._handle_ack(data, sent, first, n):
                return True

    def _handle_ack(self, data, sent, first, n):
        """True for an ack of the frame just sent: it echoes that frame's tag (so its host time
        is fresh enough to set the clock by) and, for readings, acknowledges their indices."""
        try:
            _, host_time, acked, echo = frame.decode_ack(data, self.signer, self.cfg.node_id)
        except frame.FrameError as e:
            if e.reason == "other_node":
                return False  # on LoRa every node hears every ack: not ours, not an error
            self.stats["acks_rejected"] += 1
            self.log.warning("link", "ack rejected", reason=e.reason, detail=str(e))
            return False
        ok = echo == sent[len(sent) - frame.TAG_LEN :]  # (None for a v1 ack: not ours)
        if ok and n:
            ok = False
            for a, b in acked:
                if a <= first and first + n <= b + 1:
                    ok = True
        if not ok:  # an old ack replayed, or one for an earlier copy: its time may be stale
            self.stats["acks_rejected"] += 1
            self.log.warning("link", "ack for another frame", first=first)
            return False
        step = self.clock.sync(host_time, self.board.ticks_ms())
        if step is not None:
            self.log.info("clock", "synced to host", utc=host_time, step_ms=step)
        return True

    # --- main loop ----------------------------------------------------------------------

    def run(self, wdt=None):
        interval_ms = self.cfg.interval_s * 1000
        deep = getattr(self.board, "deep", False)
        # (a simulated board woken from deep sleep after its world ended only flushes and stops)
        while not getattr(self.board, "ended", False):
            if wdt is not None:
                wdt.feed()
            gc.collect()  # while the heap is quiet: keeps it from fragmenting between cycles
            start = self.board.ticks_ms()
            troubles = self._troubles()
            self.sample()
            self.send_pending()
            if self._status_due == 1 and not self._backoff and self.send_status():
                self._status_due = 0
            if self._backoff:
                self._backoff -= 1
            self.cycles += 1
            if not self._status_due and self._troubles() != troubles:
                self._status_due = 2
            # Due again once the node's clock passes a multiple of status_every_s (README "What a
            # node does"): by time, so a node sampling every 10 min sends no more of them.
            end = start + interval_ms
            every = self.cfg.status_every_s * 1000
            if every and end // every != start // every:
                self._status_due = 1
            elif self._status_due == 2 and end // _HOUR_MS != start // _HOUR_MS:
                self._status_due = 1
            awake = self.board.ticks_ms() - start
            self.awake_ms_total += awake
            if deep:  # never returns: the board wakes through a reset, app.py runs again
                from firmware import deep as sleeper

                self.board.deepsleep(max(0, interval_ms - awake), sleeper.state(self))
            wait = max(0, interval_ms - awake)
            # (sensors.py wakes a particulate sensor early enough to spin up)
            if not (self.sensor if self.cfg.sensors else self.board).idle_ms(wait):
                break  # only a simulated world ends
        # Only a simulated world ends: what the node still holds goes out first, then the
        # report's code loads (firmware/ending.py), not on the heap together.
        self.send_pending(flush=True)
        from firmware import ending

        ending.report(self)

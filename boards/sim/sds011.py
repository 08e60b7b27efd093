# A byte-level Nova SDS011 on a simulated UART (boards/sim/uart.py): the commands of the "Laser
# Dust Sensor Control Protocol V1.3" it understands, its replies, its 1 s reports in active
# mode (the factory default), sleep and work, and how long the fan has run.
# Simplifications: one sensor on the line (device id FFFF and its own id both address it);
# working period (3.5) and device id setting (3.3) are not modelled.

from boards.sim.uart import UartDevice, find, keep_tail

SPINUP_MS = 30000  # fan and laser need this long after waking for a sound reading (issue 11)
NO_DATA_MS = 3000  # right after waking the sensor has no measurement yet: it reports zeros
ID = (0xA1, 0x60)  # the device id of the datasheet's examples


def checksum(data):
    """The protocol's checksum: the low byte of the sum of data (3.x)."""
    return sum(data) & 0xFF


def command(cmd, d2=0, d3=0, device=(0xFF, 0xFF)):
    """The 19 bytes a host sends: AA B4 cmd d2 d3 0 x 10, device id, checksum, AB."""
    body = bytes([cmd, d2, d3] + [0] * 10 + list(device))
    return bytes([0xAA, 0xB4]) + body + bytes([checksum(body), 0xAB])


def reply(kind, data6):
    body = bytes(data6)
    return bytes([0xAA, kind]) + body + bytes([checksum(body), 0xAB])


class SimSDS011(UartDevice):
    """pm25, pm10: what the sensor senses, in ug/m3 (set_pm). Counters for tests: queries,
    early_queries (answered before SPINUP_MS of running), wakes, sleeps; awake_ms (how long
    its fan and laser have run: the power model's duty)."""

    def __init__(self, clock, fault=None, seed=1, awake=True, mode="active", fault_at=None):
        super().__init__(clock, fault, seed, fault_at)
        self.mode = mode
        self.awake = awake
        self.pm25 = 8.0
        self.pm10 = 14.0
        t = clock()
        self.woke_at = t - SPINUP_MS if awake else None  # on for long enough at the start
        self._next_report = t + 1000
        self._awake_since = t
        self.awake_ms = 0
        self.queries = 0
        self.early_queries = 0
        self.wakes = 0
        self.sleeps = 0

    def set_pm(self, pm25, pm10):
        self.pm25 = pm25
        self.pm10 = pm10

    def raw(self):
        """(PM2.5, PM10) as the sensor sends them: 0.1 ug/m3, 0..9999 (999.9 is its range)."""
        return (
            max(0, min(9999, int(round(self.pm25 * 10)))),
            max(0, min(9999, int(round(self.pm10 * 10)))),
        )

    def _data(self):
        now = self.clock()
        a, b = self.raw()
        if self.woke_at is not None and now - self.woke_at < NO_DATA_MS:
            a = b = 0
        return reply(0xC0, [a & 0xFF, a >> 8, b & 0xFF, b >> 8, ID[0], ID[1]])

    def parse(self, rx):
        while True:
            i = find(rx, 0xAA, 0xB4)
            if i < 0:
                self._rx = keep_tail(rx, 0xAA)
                return
            if len(rx) - i < 19:
                self._rx = rx[i:]
                return
            frame = rx[i : i + 19]
            rx = rx[i + 19 :]
            self._rx = rx
            if frame[18] != 0xAB or frame[17] != checksum(frame[2:17]):
                continue  # the sensor ignores a command with a bad checksum
            self.handle(frame[2], frame[3], frame[4])

    def handle(self, cmd, d2, d3):
        now = self.clock()
        if not self.awake and not (cmd == 6 and d2 == 1 and d3 == 1):
            return  # asleep: only "work" is heard
        self.commands += 1
        if cmd == 6:
            if d2 == 1:
                if d3 == 1 and not self.awake:
                    self.awake = True
                    self.woke_at = now
                    self._awake_since = now
                    self._next_report = now + 1000
                    self.wakes += 1
                elif d3 == 0 and self.awake:
                    self.awake = False
                    self.awake_ms += now - self._awake_since
                    self.sleeps += 1
            state = 1 if self.awake else 0
            self.send(reply(0xC5, [6, d2, state, 0, ID[0], ID[1]]))
        elif cmd == 2:
            if d2 == 1:
                self.mode = "query" if d3 == 1 else "active"
            self.send(reply(0xC5, [2, d2, 1 if self.mode == "query" else 0, 0, ID[0], ID[1]]))
        elif cmd == 4:
            self.queries += 1
            if self.woke_at is not None and now - self.woke_at < SPINUP_MS:
                self.early_queries += 1
            self.send(self._data())

    def tick(self, now):
        if self.awake and self.mode == "active" and not self.silent():
            if now - self._next_report > 30000:  # beyond the FIFO anyway
                self._next_report = now - 30000
            while self._next_report <= now:
                self.send(self._data(), at=self._next_report)
                self._next_report += 1000
        elif self.awake:
            self._next_report = now + 1000

    def running_ms(self, now):
        """ms the fan and laser have run in all."""
        return self.awake_ms + (now - self._awake_since if self.awake else 0)

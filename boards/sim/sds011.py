# A byte-level Nova SDS011 on a simulated UART (boards/sim/uart.py): the commands of the "Laser
# Dust Sensor Control Protocol V1.3" it understands, its replies, its 1 s reports in active
# mode (the factory default), sleep and work, and how long the fan has run.
# Simplifications: one sensor on the line (device id FFFF and its own id both address it);
# working period (3.5) and device id setting (3.3) are not modelled.

from boards.sim.uart import FanSensor

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


class SimSDS011(FanSensor):
    """pm25, pm10: what the sensor senses, in ug/m3 (set_pm). Counters for tests: queries,
    early_queries (answered before SPINUP_MS of running), wakes, sleeps; awake_ms (how long
    its fan and laser have run: the power model's duty)."""

    SPINUP_MS = SPINUP_MS
    HEAD = (0xAA, 0xB4)
    COMMAND_LEN = 19

    def __init__(self, clock, fault=None, seed=1, awake=True, mode="active", fault_at=None):
        super().__init__(clock, fault, seed, awake, mode, fault_at)
        self.queries = 0
        self.early_queries = 0

    def raw(self):
        """(PM2.5, PM10) as the sensor sends them: 0.1 ug/m3, 0..9999 (999.9 is its range)."""
        return (
            max(0, min(9999, int(round(self.pm25 * 10)))),
            max(0, min(9999, int(round(self.pm10 * 10)))),
        )

    def report(self):
        now = self.clock()
        a, b = self.raw()
        if self.woke_at is not None and now - self.woke_at < NO_DATA_MS:
            a = b = 0
        return reply(0xC0, [a & 0xFF, a >> 8, b & 0xFF, b >> 8, ID[0], ID[1]])

    def received(self, frame):
        if frame[18] != 0xAB or frame[17] != checksum(frame[2:17]):
            return  # the sensor ignores a command with a bad checksum
        self.handle(frame[2], frame[3], frame[4])

    def handle(self, cmd, d2, d3):
        now = self.clock()
        if not self.awake and not (cmd == 6 and d2 == 1 and d3 == 1):
            return  # asleep: only "work" is heard
        self.commands += 1
        if cmd == 6:
            if d2 == 1:
                if d3 == 1:
                    self.wake(now)
                elif d3 == 0:
                    self.sleep(now)
            state = 1 if self.awake else 0
            self.send(reply(0xC5, [6, d2, state, 0, ID[0], ID[1]]))
        elif cmd == 2:
            if d2 == 1:
                self.mode = "query" if d3 == 1 else "active"
            self.send(reply(0xC5, [2, d2, 1 if self.mode == "query" else 0, 0, ID[0], ID[1]]))
        elif cmd == 4:
            self.queries += 1
            if not self.spun_up(now):
                self.early_queries += 1
            self.send(self.report())

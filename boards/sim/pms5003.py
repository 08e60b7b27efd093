# A byte-level Plantower PMS5003 on a simulated UART (boards/sim/uart.py): active mode (its
# factory default: a frame every second) and passive mode, read/mode/sleep commands with their
# 8-byte answers, 32-byte data frames with their checksum, and how long its fan has run.
# Simplifications: particle counts are made from PM2.5 by fixed ratios; CF=1 values equal the
# atmospheric ones (the datasheet's factory-calibration distinction is not modelled).

from boards.sim.uart import FanSensor

SPINUP_MS = 30000  # data manual: stable data "at least 30 seconds after the sensor wakeup"
NO_DATA_MS = 3000  # right after waking its frames carry zeros


def checksum16(data):
    return sum(data) & 0xFFFF


def command(cmd, data=0):
    body = bytes([0x42, 0x4D, cmd, 0, data])
    s = checksum16(body)
    return body + bytes([s >> 8, s & 0xFF])


def data_frame(words):
    """The 32-byte frame for 13 data words (data 1..13 of the data manual)."""
    out = bytearray([0x42, 0x4D, 0, 28])
    for w in words:
        out += bytes([(w >> 8) & 0xFF, w & 0xFF])
    s = checksum16(out)
    return bytes(out + bytes([s >> 8, s & 0xFF]))


class SimPMS5003(FanSensor):
    """pm25, pm10 in ug/m3 (set_pm); it reports whole ug/m3 as the real part does. Counters
    for tests: reads, early_reads (before SPINUP_MS awake), wakes, sleeps."""

    SPINUP_MS = SPINUP_MS
    HEAD = (0x42, 0x4D)
    COMMAND_LEN = 7

    def __init__(self, clock, fault=None, seed=1, awake=True, mode="active", fault_at=None):
        super().__init__(clock, fault, seed, awake, mode, fault_at)
        self.reads = 0
        self.early_reads = 0

    def words(self):
        if self.woke_at is not None and self.clock() - self.woke_at < NO_DATA_MS:
            return [0] * 13
        a = max(0, min(999, int(self.pm25 + 0.5)))
        b = max(0, min(999, int(self.pm10 + 0.5)))
        pm1 = a * 2 // 3
        counts = [a * 150, a * 45, a * 12, a * 2, b - a if b > a else 0, 0]
        return [pm1, a, b, pm1, a, b] + [min(c, 0xFFFF) for c in counts] + [0x9100]

    def report(self):
        return data_frame(self.words())

    def received(self, c):
        if (c[5] << 8 | c[6]) != checksum16(c[:5]):
            return
        self.handle(c[2], c[4])

    def handle(self, cmd, data):
        now = self.clock()
        if not self.awake and cmd != 0xE4:
            return  # asleep: fan and laser off, only "wake up" is heard
        self.commands += 1
        if cmd == 0xE2:
            if self.mode == "passive":
                self.reads += 1
                if not self.spun_up(now):
                    self.early_reads += 1
                self.send(self.report())
            return
        if cmd == 0xE1:
            self.mode = "active" if data else "passive"
        elif cmd == 0xE4:
            (self.wake if data else self.sleep)(now)
        else:
            return
        body = bytes([0x42, 0x4D, 0, 4, cmd, data])
        s = checksum16(body)
        self.send(body + bytes([s >> 8, s & 0xFF]))

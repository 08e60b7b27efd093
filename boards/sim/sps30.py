# A byte-level Sensirion SPS30 on the simulated I2C bus (boards/sim/bme280.py's SimI2C): its
# command pointers, words with CRC-8, modes (sleep, idle, measuring), a new measurement every
# second, the unacknowledged first wake-up, and how long its fan has run.
# Simplifications: integer output (format 0x05) only (float format 0x03 answers NACK); number
# concentrations and typical size are made from PM2.5 by fixed ratios; no fan cleaning.

from firmware.sps30 import crc8

ADDRESS = 0x69
ENODEV = 19
SPINUP_MS = 30000


def words(values):
    """Words with their CRCs, as the SPS30 sends them."""
    out = bytearray()
    for v in values:
        w = bytes([(v >> 8) & 0xFF, v & 0xFF])
        out += w + bytes([crc8(w)])
    return bytes(out)


class SimSPS30:
    """pm25, pm10 in ug/m3 (set_pm). fault as boards/sim/uart.py's parts: "missing" (nobody
    acknowledges 0x69), "stuck" (the fan stopped: no new measurement is ever ready), "garbage"
    (one read in four has a byte changed). Counters: reads, early_reads, wakes, sleeps."""

    def __init__(self, clock, fault=None, seed=1, fault_at=None, mode="idle"):
        self.clock = clock
        self.fault = fault
        self.fault_at = fault_at
        self.mode = (
            mode  # "sleep", "waking" (interface up after the first pulse), "idle", "measuring"
        )
        self.pm25 = 8.0
        self.pm10 = 14.0
        self.pointer = None
        self._started = None
        self._last_read_s = -1
        self._reads = 0
        self.reads = 0
        self.early_reads = 0
        self.wakes = 0
        self.sleeps = 0
        self._running_since = None
        self.running = 0  # ms its fan has run

    def failing(self):
        if self.fault is None or (self.fault_at is not None and self.clock() < self.fault_at):
            return None
        return self.fault

    def set_pm(self, pm25, pm10):
        self.pm25 = pm25
        self.pm10 = pm10

    def i2c_write(self, data):
        if self.failing() == "missing":
            raise OSError(ENODEV)
        if self.mode == "sleep":
            self.mode = "waking"  # the first command only wakes the interface: no ACK
            raise OSError(ENODEV)
        if len(data) < 2:
            return  # an address probe
        cmd = data[0] << 8 | data[1]
        now = self.clock()
        self.pointer = cmd
        if self.mode == "waking":
            if cmd == 0x1103:
                self.mode = "idle"
                self.wakes += 1
            return
        if cmd == 0x0010:
            if self.mode != "idle" or len(data) != 5 or crc8(data, 2, 4) != data[4]:
                raise OSError(ENODEV)  # not in idle mode, or a bad argument: NACK
            if data[2] != 0x05:
                raise OSError(ENODEV)
            self.mode = "measuring"
            self._started = now
            self._last_read_s = -1
            self._running_since = now
        elif cmd == 0x0104:
            if self.mode == "measuring":
                self.running += now - self._running_since
            self.mode = "idle"
        elif cmd == 0x1001:
            if self.mode != "idle":
                raise OSError(ENODEV)
            self.mode = "sleep"
            self.sleeps += 1

    def i2c_read(self, n):
        if self.failing() == "missing" or self.mode in ("sleep", "waking"):
            raise OSError(ENODEV)
        now = self.clock()
        if self.pointer == 0x0202:
            out = words([self._ready(now)])
        elif self.pointer == 0x0300:
            self.reads += 1
            if self._started is not None and now - self._started < SPINUP_MS:
                self.early_reads += 1
            self._last_read_s = self._measurements(now)
            a = max(0, min(1000, int(self.pm25 + 0.5)))
            b = max(0, min(1000, int(self.pm10 + 0.5)))
            out = words(
                [a * 2 // 3, a, (a + b) // 2, b, a * 8, a * 9, a * 10, a * 10, a * 10, 600]
            )
            self._reads += 1
            if self.failing() == "garbage" and self._reads % 4 == 0:
                out = bytearray(out)
                out[4] ^= 0x40
                out = bytes(out)
        else:
            out = b""
        return (out + bytes(n))[:n]

    def _measurements(self, now):
        """Whole seconds of measuring: the count of measurements made so far."""
        if self.mode != "measuring" or self._started is None:
            return -1
        return (now - self._started) // 1000

    def _ready(self, now):
        if self.failing() == "stuck":
            return 0
        m = self._measurements(now)
        return 1 if m >= 1 and m != self._last_read_s else 0

    def running_ms(self, now):
        return self.running + (now - self._running_since if self.mode == "measuring" else 0)

    # register-style access (SimI2C.readfrom_mem): the SPS30 has no registers
    def read_reg(self, reg, n):
        raise OSError(ENODEV)

    def write_reg(self, reg, data):
        raise OSError(ENODEV)

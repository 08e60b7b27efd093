# Plantower PMS5003 particulate matter sensor on a UART (9600 8N1) in passive mode: it sends a
# frame only when asked, and sleeps between samples. read() returns (PM2.5, PM10) in 0.1 ug/m3.
#
# Sections cite the PMS5003 data manual (Plantower, "Digital universal particle concentration
# sensor PMS5003 series data manual", 2016, appendix I "transport protocol"). A data frame is 32
# bytes: 42 4D, frame length 28 (big-endian), 13 data words, a 16-bit checksum = the sum of the
# 30 bytes before it. Commands are 7 bytes: 42 4D cmd dataH dataL, checksum of those five.

# No frame, only garbage, a bad checksum: SensorError, its message starting with "pms5003:" (the
# BME280's class, which every node holds: one of its own would cost the heap a class).
from firmware.bme280 import SensorError

try:
    from micropython import const
except ImportError:  # CPython: host tests import this file unchanged

    def const(x):
        return x


_START1 = const(0x42)
_START2 = const(0x4D)
_FRAME = const(32)
_LENGTH = const(28)  # 2 x 13 data words + 2 checksum bytes
_READ = const(0xE2)  # read in passive mode
_MODE = const(0xE1)  # 0 passive, 1 active
_SLEEP = const(0xE4)  # 0 sleep, 1 wake up
# A frame is 32 ms on the line; the sensor answers within ~100 ms (bounded wait as the SDS011's)
_LINE_MS = const(40)  # a 32-byte frame's time on the line and the sensor's answer: wait it once
_POLL_MS = const(10)
_WAIT_MS = const(300)
# "at least 30 seconds after the sensor wakeup" (appendix I): firmware/sensors.py wakes it 30 s
# before a sample; channels 4, 5


class PMS5003:
    # A PMS5003 on a machine.UART-like object (write, readinto(buf, n) -> n or None).
    # read() gives the "atmospheric environment" concentrations (data 5 and 6, ug/m3), the ones
    # for ambient air; the CF=1 ones (data 1-3) are for factory calibration.

    def __init__(self, uart, sleep_ms, name="uart"):
        self._uart = uart
        self._sleep_ms = sleep_ms
        self._name = name
        self._cmd = bytearray(7)
        self._cmd[0] = _START1
        self._cmd[1] = _START2
        self._frame = bytearray(_FRAME)
        self._one = bytearray(1)
        self.wake()
        self.read()  # answers: it is there, and in passive mode

    def read(self):
        # (PM2.5, PM10) in 0.1 ug/m3 from one frame; asked once more after noise on the line.
        uart, one, f = self._uart, self._one, self._frame
        for _ in range(2):
            self._command(_READ, 0)
            pos = 0
            self._sleep_ms(_LINE_MS)
            waited = _LINE_MS
            skipped = 0
            bad = 0
            while True:
                if not uart.readinto(one, 1):
                    if waited >= _WAIT_MS:
                        break
                    self._sleep_ms(_POLL_MS)
                    waited += _POLL_MS
                    continue
                b = one[0]
                if (pos == 0 and b != _START1) or (pos == 1 and b != _START2):
                    skipped += pos + 1
                    pos = 1 if b == _START1 else 0
                    if pos:
                        f[0] = b
                        skipped -= 1
                    continue
                f[pos] = b
                pos += 1
                if pos == 4 and (f[2] << 8 | f[3]) != _LENGTH:
                    skipped += 4  # not a data frame (the answer to a command is 8 bytes): resync
                    pos = 0
                    continue
                if pos < _FRAME:
                    continue
                pos = 0
                s = 0
                for i in range(30):
                    s += f[i]
                if (f[30] << 8 | f[31]) != s:
                    bad += 1
                    continue
                return ((f[12] << 8) | f[13]) * 10, ((f[14] << 8) | f[15]) * 10
        if bad:
            why = "%d frame(s) with a bad checksum" % bad
        elif skipped:
            why = "%d byte(s) of garbage" % skipped
        else:
            why = "nothing"
        raise SensorError("pms5003: no frame on %s in %d ms (%s)" % (self._name, _WAIT_MS, why))

    def sleep(self):
        self._command(_SLEEP, 0)

    def wake(self):
        # after waking it may report on its own again: passive mode each time
        self._command(_SLEEP, 1)
        self._command(_MODE, 0)

    def _command(self, cmd, data):
        c = self._cmd
        c[2] = cmd
        c[3] = 0
        c[4] = data
        s = _START1 + _START2 + cmd + data
        c[5] = s >> 8
        c[6] = s & 0xFF
        uart, one = self._uart, self._one
        n = 0
        while uart.readinto(one, 1) and n < 128:  # whatever came before is not the answer
            n += 1  # (the 8-byte answers to mode and sleep commands, reports, noise)
        try:
            uart.write(c)
        except OSError as e:
            raise SensorError("pms5003: cannot write to %s (OSError %s)" % (self._name, e))

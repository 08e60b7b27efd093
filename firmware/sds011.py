# Nova Fitness SDS011 particulate matter sensor on a UART (9600 8N1): query mode, sleep between
# samples. read() returns (PM2.5, PM10) in 0.1 ug/m3, the sensor's own unit (channels 4, 5).
#
# Sections cite "Laser Dust Sensor Control Protocol V1.3" (Nova Fitness, 2015-07-20). Commands
# are 19 bytes: AA B4 cmd d1..d12 FF FF checksum AB, the checksum the low byte of the sum of
# bytes 2..16 (the data bytes and the device id FF FF: "all sensors"). Replies are 10 bytes:
# AA C0 (data) or AA C5 (command reply), six data bytes, checksum of those six, AB.

# No reply, only garbage, a bad checksum: SensorError, its message starting with "sds011:" (the
# BME280's class, which every node holds: one of its own would cost the heap a class).
from firmware.bme280 import SensorError

try:
    from micropython import const
except ImportError:  # CPython: host tests import this file unchanged

    def const(x):
        return x


_HEAD = const(0xAA)
_TAIL = const(0xAB)
_CMD = const(0xB4)
_DATA = const(0xC0)  # reply to a query, and every report in active mode
_REPLY = const(0xC5)  # reply to set-mode and sleep/work commands
_SET_MODE = const(2)  # 3.1) d1=2, d2=1 set, d3=1 query mode (kept through power-off)
_QUERY = const(4)  # 3.2) query data command
_SLEEP_WORK = const(6)  # 3.4) d1=6, d2=1 set, d3=0 sleep / 1 work
_FRAME = const(10)
# 9600 baud is ~1 ms a byte: a reply is on the line some 10 ms after the command; wait up to
# _WAIT_MS for it in _POLL_MS steps (bounded, so a missing sensor costs 300 ms a sample).
_LINE_MS = const(20)  # a 10-byte reply's time on the line and the sensor's answer: wait it once
_POLL_MS = const(10)
_WAIT_MS = const(300)
# fan and laser run 30 s before a sample (issue 11): firmware/sensors.py wakes it; channels 4, 5


class SDS011:
    # An SDS011 on a machine.UART-like object (write, readinto(buf, n) -> n or None).
    # Opening sets query mode, so the sensor speaks only when asked; sleep() stops its fan and
    # laser, wake() starts them (30 s before the next read(): firmware/sensors.py).

    def __init__(self, uart, sleep_ms, name="uart"):
        self._uart = uart
        self._sleep_ms = sleep_ms
        self._name = name
        self._cmd = bytearray(19)
        self._cmd[0] = _HEAD
        self._cmd[1] = _CMD
        self._cmd[15] = 0xFF  # device id FFFF: whichever sensor is on the line
        self._cmd[16] = 0xFF
        self._cmd[18] = _TAIL
        self._frame = bytearray(_FRAME)
        self._one = bytearray(1)
        # A sleeping SDS011 answers nothing but "work": wake it, then ask for query mode.
        self.wake()
        self._command(_SET_MODE, 1)

    def read(self):
        # (PM2.5, PM10) in 0.1 ug/m3 from one query.
        f = self._command(_QUERY, 0)
        return f[2] | (f[3] << 8), f[4] | (f[5] << 8)

    def sleep(self):
        self._command(_SLEEP_WORK, 0)

    def wake(self):
        self._command(_SLEEP_WORK, 1)

    def _command(self, cmd, data):
        # Send a command and return its answer, the next valid frame of its kind (a reply
        # echoes cmd); sent once more after noise on the line. (One method for command and
        # answer: each name costs the heap a qstr.)
        uart, one, f, c = self._uart, self._one, self._frame, self._cmd
        c[2] = cmd  # d1
        c[3] = 0 if cmd == _QUERY else 1  # d2: 1 "set" (3.1, 3.4)
        c[4] = data  # d3
        # the sum of bytes 2..16: d4..d13 are 0, the device id FF FF adds 0x1FE
        c[17] = (cmd + c[3] + data + 0x1FE) & 0xFF
        kind = _DATA if cmd == _QUERY else _REPLY
        for attempt in range(2):
            # Reports sent before query mode was set, and noise, are not the answer
            n = 0
            while uart.readinto(one, 1) and n < 64:
                n += 1
            try:
                uart.write(c)
            except OSError as e:
                if attempt:
                    raise SensorError("sds011: cannot write to %s (OSError %s)" % (self._name, e))
                continue
            # byte by byte: resyncs on AA after noise or a broken frame
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
                if pos == 0:
                    if b != _HEAD:
                        skipped += 1
                        continue
                elif pos == 1 and b != kind:
                    skipped += 2 if b != _HEAD else 1
                    pos = 1 if b == _HEAD else 0
                    continue
                f[pos] = b
                pos += 1
                if pos < _FRAME:
                    continue
                pos = 0
                s = 0
                for i in range(2, 8):
                    s += f[i]
                if f[9] != _TAIL or f[8] != s & 0xFF:
                    bad += 1
                    continue
                if kind == _REPLY and f[2] != cmd:
                    skipped += _FRAME
                    continue
                return f
        raise SensorError(
            "sds011: no reply to command %d on %s in %d ms (%d bad checksums, %d bytes of noise)"
            % (cmd, self._name, _WAIT_MS, bad, skipped)
        )

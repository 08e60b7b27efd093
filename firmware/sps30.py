# Sensirion SPS30 particulate matter sensor on I2C (address 0x69): measuring with integer
# output, sleeping between samples. read() returns (PM2.5, PM10) in 0.1 ug/m3 (channels 4, 5).
#
# Sections cite the SPS30 datasheet (Sensirion, version 1.0, March 2020), section 6 "Operation
# and communication through the I2C interface". A command is a 16-bit pointer, big-endian; data
# travel in 16-bit words, each followed by its CRC-8 (6.2: polynomial 0x31, init 0xFF, no final
# XOR; CRC(0xBEEF) = 0x92). Integer output (format 0x05) needs firmware 2.0 or later.

# No device, a CRC error, no measurement: SensorError, its message starting with "sps30:" (the
# BME280's class, which every node holds: one of its own would cost the heap a class).
from firmware.bme280 import SensorError

try:
    from micropython import const
except ImportError:  # CPython: host tests import this file unchanged

    def const(x):
        return x


_ADDRESS = const(0x69)
_START = const(0x0010)  # 6.3.1, argument: output format 0x05 (uint16), 0x00
_STOP = const(0x0104)  # 6.3.2
_READY = const(0x0202)  # 6.3.3: 0x00, flag, CRC
_VALUES = const(0x0300)  # 6.3.4: 10 words (mass PM1, PM2.5, PM4, PM10 ug/m3, numbers, size)
_SLEEP = const(0x1001)  # 6.3.5: from idle mode only
_WAKE = const(0x1103)  # 6.3.6: the first is a pulse the sleeping sensor does not acknowledge
_FORMAT_UINT16 = const(0x05)
_CMD_MS = const(20)  # execution time of start/stop (6.3); 5 ms for the others
_READY_POLLS = const(15)  # a new measurement every second (1.1): wait up to 1.5 s for one
_READY_MS = const(100)
# 1.1: start-up time up to 30 s at low concentrations: firmware/sensors.py wakes it 30 s before
# a sample


def crc8(data, start=0, end=None):
    # Sensirion's CRC-8 (6.2) over data[start:end].
    crc = 0xFF
    for i in range(start, len(data) if end is None else end):
        crc ^= data[i]
        for _ in range(8):
            crc = ((crc << 1) ^ 0x31) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


class SPS30:
    # An SPS30 on a machine.I2C-like bus (writeto, readfrom_into). Opening wakes it and starts
    # measuring; sleep() stops and sleeps it (fan and laser off); wake() starts it again.

    def __init__(self, i2c, sleep_ms, address=_ADDRESS):
        self._i2c = i2c
        self._sleep_ms = sleep_ms
        self.address = address
        self._cmd = bytearray(5)
        self._cmd[2] = _FORMAT_UINT16  # start's argument (6.3.1), the only one: 05 00, CRC
        self._cmd[4] = crc8(self._cmd, 2, 4)
        self._cmd2 = memoryview(self._cmd)[:2]  # a command without argument
        self._flag = bytearray(3)
        self._data = bytearray(30)
        self.wake()

    def wake(self):
        for _ in range(2):  # a sleeping sensor wakes at the first and acknowledges the second
            try:
                self._command(_WAKE)
            except SensorError:
                pass
        self._sleep_ms(5)
        try:
            self._command(_STOP)  # a sensor left measuring (the node reset) must stop first
        except SensorError:
            pass
        self._sleep_ms(_CMD_MS)
        self._command(_START)
        self._sleep_ms(_CMD_MS)

    def sleep(self):
        self._command(_STOP)
        self._sleep_ms(_CMD_MS)
        self._command(_SLEEP)
        self._sleep_ms(5)

    def read(self):
        # (PM2.5, PM10) in 0.1 ug/m3: the newest measurement.
        flag = self._flag
        for _ in range(_READY_POLLS):
            self._command(_READY, flag)
            if flag[1] == 1:
                break
            self._sleep_ms(_READY_MS)
        else:
            raise SensorError(
                "sps30: no measurement at 0x%02x in %d ms (fan or laser stopped?)"
                % (self.address, _READY_POLLS * (_READY_MS + 5))
            )
        d = self._data
        try:
            self._command(_VALUES, d)
        except SensorError:  # a CRC error (noise on the bus): read the values again
            self._command(_VALUES, d)
        return ((d[3] << 8) | d[4]) * 10, ((d[9] << 8) | d[10]) * 10

    def _command(self, cmd, buf=None):
        # Write a command (start with its argument) and read its answer into buf, if any,
        # checking each word's CRC; SensorError on a bus or CRC error.
        c = self._cmd
        c[0] = cmd >> 8
        c[1] = cmd & 0xFF
        try:
            self._i2c.writeto(self.address, c if cmd == _START else self._cmd2)
            if buf is not None:
                self._sleep_ms(5)
                self._i2c.readfrom_into(self.address, buf)
        except OSError as e:
            raise SensorError(
                "sps30: bus error at 0x%02x, command 0x%04x (OSError %s)"
                % (self.address, cmd, e.args[0] if e.args else "?")
            )
        if buf is not None:
            for i in range(0, len(buf), 3):
                if crc8(buf, i, i + 2) != buf[i + 2]:
                    raise SensorError(
                        "sps30: CRC error in word %d at 0x%02x (0x%02x%02x crc 0x%02x)"
                        % (i // 3, self.address, buf[i], buf[i + 1], buf[i + 2])
                    )

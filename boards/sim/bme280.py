# Register-level BME280 simulation and a simulated I2C bus, for tests on MicroPython and CPython.
# Serves firmware/bme280.py (machine.I2C API) and Adafruit's driver (busio.I2C API) alike.
#
# The compensation formulas are imported from firmware/bme280.py, so the Bosch arithmetic has one
# definition; Adafruit's float formulas are the independent oracle in tests/test_bme280.py.
# Simplifications: a measurement lasts a number of status reads, not a time; data always carry
# 20-bit resolution whatever the oversampling; the IIR filter and standby time are ignored.

import struct

try:
    from collections import namedtuple
except ImportError:  # pragma: no cover - very small ports
    from ucollections import namedtuple

# The trimming parameters by name, in the order of the firmware's calibration tuple
# (firmware/bme280.py indexes a plain tuple; this one reads better in tests)
Calibration = namedtuple(
    "Calibration",
    (
        "dig_T1",
        "dig_T2",
        "dig_T3",
        "dig_P1",
        "dig_P2",
        "dig_P3",
        "dig_P4",
        "dig_P5",
        "dig_P6",
        "dig_P7",
        "dig_P8",
        "dig_P9",
        "dig_H1",
        "dig_H2",
        "dig_H3",
        "dig_H4",
        "dig_H5",
        "dig_H6",
    ),
)

ENODEV = 19

# A real chip's trimming values (the T and P ones are the BMP280 datasheet's example, 3.12)
DEFAULT_CALIBRATION = {
    "dig_T1": 27504,
    "dig_T2": 26435,
    "dig_T3": -1000,
    "dig_P1": 36477,
    "dig_P2": -10685,
    "dig_P3": 3024,
    "dig_P4": 2855,
    "dig_P5": 140,
    "dig_P6": -7,
    "dig_P7": 15500,
    "dig_P8": -14600,
    "dig_P9": 6000,
    "dig_H1": 75,
    "dig_H2": 362,
    "dig_H3": 0,
    "dig_H4": 313,
    "dig_H5": 50,
    "dig_H6": 30,
}

# Raw values for 20.00 °C, 50.00 %RH, 1013.25 hPa with DEFAULT_CALIBRATION (from set_environment)
DEFAULT_RAW = (503680, 406662, 29125)

_ADC_SKIPPED = 0x80000
_ADC_H_SKIPPED = 0x8000
_DATA_RESET = b"\x80\x00\x00\x80\x00\x00\x80\x00"  # 0xF7..0xFE after reset, Table 18


class SimBME280:
    """A BME280 register map (datasheet 5.3) behind an I2C slave interface (6.2).

    measuring_reads: how many status reads report "measuring" after a forced-mode trigger;
    None means the measurement never finishes.
    """

    def __init__(self, calib=None, chip_id=0x60, measuring_reads=1):
        values = dict(DEFAULT_CALIBRATION)
        if calib:
            values.update(calib)
        if calib:
            from boards.sim.world import check_calibration

            check_calibration(values)
        self.calib = values
        self.calibration = Calibration(**values)
        self.chip_id = chip_id
        self.measuring_reads = measuring_reads
        self.regs = bytearray(256)
        self._write_calibration()
        self.adc_t, self.adc_p, self.adc_h = DEFAULT_RAW
        self.reset()

    def _write_calibration(self):
        c = self.calib
        struct.pack_into(
            "<HhhHhhhhhhhh",
            self.regs,
            0x88,
            c["dig_T1"],
            c["dig_T2"],
            c["dig_T3"],
            c["dig_P1"],
            c["dig_P2"],
            c["dig_P3"],
            c["dig_P4"],
            c["dig_P5"],
            c["dig_P6"],
            c["dig_P7"],
            c["dig_P8"],
            c["dig_P9"],
        )
        self.regs[0xA1] = c["dig_H1"]
        struct.pack_into("<h", self.regs, 0xE1, c["dig_H2"])
        self.regs[0xE3] = c["dig_H3"]
        h4 = c["dig_H4"] & 0xFFF
        h5 = c["dig_H5"] & 0xFFF
        self.regs[0xE4] = h4 >> 4
        self.regs[0xE5] = (h4 & 0x0F) | ((h5 & 0x0F) << 4)
        self.regs[0xE6] = h5 >> 4
        self.regs[0xE7] = c["dig_H6"] & 0xFF

    def reset(self):
        """Power-on / soft reset (5.4.2): control registers 0, data at reset values, sleep."""
        r = self.regs
        r[0xD0] = self.chip_id
        for reg in (0xE0, 0xF2, 0xF3, 0xF4, 0xF5):
            r[reg] = 0
        r[0xF7:0xFF] = _DATA_RESET
        self._osrs_h = 0  # the ctrl_hum value latched by the last ctrl_meas write
        self._measuring = 0
        self.pointer = 0

    # --- register access, as seen through the I2C interface

    def read_reg(self, reg, n):
        """Burst read of n registers from reg; the address auto-increments (6.2.2)."""
        out = bytearray(n)
        for i in range(n):
            out[i] = self._read_byte((reg + i) & 0xFF)
        self.pointer = (reg + n) & 0xFF
        return bytes(out)

    def write_reg(self, reg, data):
        """What follows the register address in one I2C write: data[0] goes to reg; any further
        bytes are (register, value) pairs, since the BME280 does not auto-increment on writes
        (6.2.1). A lone trailing register byte only sets the read pointer."""
        self.pointer = reg
        if not data:
            return
        self._write_byte(reg, data[0])
        i = 1
        while i + 1 < len(data):
            self._write_byte(data[i], data[i + 1])
            i += 2
        if i < len(data):
            self.pointer = data[i]

    def i2c_write(self, data):
        """A whole I2C write transaction (register pointer first); empty writes are probes."""
        if data:
            self.write_reg(data[0], data[1:])

    def i2c_read(self, n):
        """A whole I2C read transaction from the current register pointer."""
        return self.read_reg(self.pointer, n)

    def _read_byte(self, reg):
        if reg == 0xF3:
            status = self.regs[0xF3]
            if self._measuring is None:
                return status | 0x08
            if self._measuring > 0:
                self._measuring -= 1
                if self._measuring == 0:
                    self._finish()
                return status | 0x08
        return self.regs[reg]

    def _write_byte(self, reg, value):
        r = self.regs
        if reg == 0xE0:
            if value == 0xB6:
                self.reset()
        elif reg == 0xF2:
            r[0xF2] = value & 0x07
        elif reg == 0xF4:
            r[0xF4] = value
            self._osrs_h = r[0xF2]  # ctrl_hum takes effect now (5.4.3)
            mode = value & 0x03
            if mode == 0x01 or mode == 0x02:  # forced (3.3.3)
                self._measuring = self.measuring_reads
                if self._measuring == 0:
                    self._finish()
            elif mode == 0x03:  # normal: the sim keeps the data registers current
                self._measuring = 0
                self._update_data()
        elif reg == 0xF5:
            r[0xF5] = value & 0xFD  # bit 1 is reserved
        # everything else is read-only or reserved: ignored, as the chip does

    def _finish(self):
        self._update_data()
        if self.regs[0xF4] & 0x03 != 0x03:
            self.regs[0xF4] &= 0xFC  # forced mode returns to sleep

    def _update_data(self):
        ctrl = self.regs[0xF4]
        adc_t = self.adc_t if (ctrl >> 5) & 0x07 else _ADC_SKIPPED
        adc_p = self.adc_p if (ctrl >> 2) & 0x07 else _ADC_SKIPPED
        adc_h = self.adc_h if self._osrs_h else _ADC_H_SKIPPED
        r = self.regs
        r[0xF7] = adc_p >> 12
        r[0xF8] = (adc_p >> 4) & 0xFF
        r[0xF9] = (adc_p & 0x0F) << 4
        r[0xFA] = adc_t >> 12
        r[0xFB] = (adc_t >> 4) & 0xFF
        r[0xFC] = (adc_t & 0x0F) << 4
        r[0xFD] = adc_h >> 8
        r[0xFE] = adc_h & 0xFF

    # --- what the sensor senses

    def set_raw(self, adc_t, adc_p, adc_h):
        """Raw ADC values for the next measurement: 20-bit T and P, 16-bit H."""
        if not (0 <= adc_t <= 0xFFFFF and 0 <= adc_p <= 0xFFFFF and 0 <= adc_h <= 0xFFFF):
            raise ValueError("sim_bme280: raw value out of range")
        self.adc_t = adc_t
        self.adc_p = adc_p
        self.adc_h = adc_h
        if self.regs[0xF4] & 0x03 == 0x03:
            self._update_data()

    def set_environment(self, temperature_c, humidity_pct, pressure_hpa):
        """Set the raw values whose compensation comes closest to these conditions; returns
        (adc_t, adc_p, adc_h). The search lives in sim_world.py, off the board's heap."""
        from boards.sim.world import raw_for

        raw = raw_for(self.calibration, temperature_c, humidity_pct, pressure_hpa)
        self.set_raw(*raw)
        return raw


class SimI2C:
    """The machine.I2C methods drivers use, over a dict {address: simulated device}.

    An absent address raises OSError(ENODEV), as machine.I2C does when nobody ACKs.
    """

    def __init__(self, devices):
        self.devices = devices

    def _device(self, addr):
        device = self.devices.get(addr)
        if device is None:
            raise OSError(ENODEV)
        return device

    def scan(self):
        return sorted(self.devices)

    def readfrom_mem_into(self, addr, memaddr, buf, addrsize=8):
        data = self._device(addr).read_reg(memaddr, len(buf))
        for i in range(len(buf)):
            buf[i] = data[i]

    def readfrom_mem(self, addr, memaddr, nbytes, addrsize=8):
        return self._device(addr).read_reg(memaddr, nbytes)

    def writeto_mem(self, addr, memaddr, buf, addrsize=8):
        self._device(addr).write_reg(memaddr, bytes(buf))

    def writeto(self, addr, buf, stop=True):
        self._device(addr).i2c_write(bytes(buf))
        return len(buf)  # number of ACKs

    def readfrom_into(self, addr, buf, stop=True):
        data = self._device(addr).i2c_read(len(buf))
        for i in range(len(buf)):
            buf[i] = data[i]

    def readfrom(self, addr, nbytes, stop=True):
        return self._device(addr).i2c_read(nbytes)

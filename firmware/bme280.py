# Bosch BME280 driver: one forced measurement per read(), as ints (0.01 °C, 0.01 %RH, Pa).
# Takes an injected machine.I2C-like bus built by boards/; the node turns read() into frames.
#
# Section numbers cite the BME280 datasheet (BST-BME280-DS002, rev. 1.6 onwards).

try:
    from micropython import const
except ImportError:  # CPython: host tests import this file unchanged

    def const(x):
        return x


try:
    from time import sleep_ms as _sleep_ms
except ImportError:  # CPython has no time.sleep_ms; the simulator needs no delay
    _sleep_ms = None

_DEBUG = const(False)

# Memory map, section 5.3 (Table 18); register descriptions in section 5.4.
_REG_CALIB00 = const(0x88)  # calib00..calib25 = 0x88..0xA1: T1..T3, P1..P9, (0xA0 reserved), H1
_CALIB00_LEN = const(26)
_REG_ID = const(0xD0)  # 5.4.1 chip_id
_REG_CALIB26 = const(0xE1)  # calib26..calib32 = 0xE1..0xE7: H2..H6 (H4/H5 packed)
_CALIB26_LEN = const(7)
_REG_CTRL_HUM = const(0xF2)  # 5.4.3 osrs_h[2:0]; takes effect only after a ctrl_meas write
_REG_STATUS = const(0xF3)  # 5.4.4 measuring[3], im_update[0]
_REG_CTRL_MEAS = const(0xF4)  # 5.4.5 osrs_t[7:5], osrs_p[4:2], mode[1:0]
_REG_CONFIG = const(0xF5)  # 5.4.6 t_sb[7:5], filter[4:2], spi3w_en[0]
_REG_PRESS_MSB = const(0xF7)  # 5.4.7..5.4.9 press, temp, hum: 0xF7..0xFE, burst-read (section 4)
_DATA_LEN = const(8)

_CHIP_ID = const(0x60)
_CHIP_ID_BMP280 = const(0x58)  # BMP280 (no humidity) answers at the same addresses
_CTRL_HUM_X1 = const(0x01)  # osrs_h = x1
_CTRL_MEAS_FORCED_X1 = const(0x25)  # osrs_t = x1, osrs_p = x1, mode = 01 forced (section 3.3.3)
_CONFIG_FILTER_OFF = const(0x00)  # weather monitoring: filter off (section 3.5.1)
_STATUS_MEASURING = const(0x08)

# Section 9.1: t_measure,max = 1.25 + 2.3*osrs_t + (2.3*osrs_p + 0.575) + (2.3*osrs_h + 0.575) ms
# = 9.3 ms at x1; wait that long, then poll the status bit a bounded number of times.
_T_MEASURE_MAX_MS = const(10)
_POLL_MS = const(1)
_POLLS_MAX = const(20)

# Values of the data registers when no measurement was made: the reset values of Table 18.
_ADC_SKIPPED = const(0x80000)
_ADC_H_SKIPPED = const(0x8000)


class SensorError(Exception):
    """Any BME280 fault: no device, wrong chip, blank calibration, bad data, bus error, timeout.

    The message starts with "bme280:" and names the I2C address.
    """


# Trimming parameters dig_T1..dig_H6 (section 4.2.2, Table 16): a plain tuple of ints in this
# order (bme280_calib.parse_calibration builds it; boards/sim/bme280.py names them). A tuple,
# not an object with a dict: 160 bytes where the heap may have no 512-byte hole left to give;
# indexed by private consts, so the node's heap keeps no names for them.
_T1 = const(0)
_T2 = const(1)
_T3 = const(2)
_P1 = const(3)
_P2 = const(4)
_P3 = const(5)
_P4 = const(6)
_P5 = const(7)
_P6 = const(8)
_P7 = const(9)
_P8 = const(10)
_P9 = const(11)
_H1 = const(12)
_H2 = const(13)
_H3 = const(14)
_H4 = const(15)
_H5 = const(16)
_H6 = const(17)


# Integer compensation, section 4.2.3. Python ints do not overflow, so these equal Bosch's C code
# wherever the C code does not overflow (all plausible calibrations); `>>` floors like the
# arithmetic shift Bosch assumes. Shared with boards/sim/bme280.py, which inverts them.


def t_fine(cal, adc_t):
    """BME280_compensate_T_int32 up to t_fine: temperature in 1/5120 °C."""
    var1 = (((adc_t >> 3) - (cal[_T1] << 1)) * cal[_T2]) >> 11
    x = (adc_t >> 4) - cal[_T1]
    var2 = (((x * x) >> 12) * cal[_T3]) >> 14
    return var1 + var2


def temperature_centi(t_fine_value):
    """Rest of BME280_compensate_T_int32: temperature in 0.01 °C."""
    return (t_fine_value * 5 + 128) >> 8


def pressure_q24_8(cal, adc_p, t_fine_value):
    """BME280_compensate_P_int64: pressure in Pa as Q24.8 (1/256 Pa); 0 if dig_P1 makes it /0."""
    var1 = t_fine_value - 128000
    var2 = var1 * var1 * cal[_P6]
    var2 = var2 + ((var1 * cal[_P5]) << 17)
    var2 = var2 + (cal[_P4] << 35)
    var1 = ((var1 * var1 * cal[_P3]) >> 8) + ((var1 * cal[_P2]) << 12)
    var1 = (((1 << 47) + var1) * cal[_P1]) >> 33
    if var1 == 0:
        return 0
    p = 1048576 - adc_p
    num = ((p << 31) - var2) * 3125
    # C's int64 division truncates toward zero; Python's // floors
    p = abs(num) // abs(var1)
    if (num < 0) != (var1 < 0):
        p = -p
    var1 = (cal[_P9] * (p >> 13) * (p >> 13)) >> 25
    var2 = (cal[_P8] * p) >> 19
    return ((p + var1 + var2) >> 8) + (cal[_P7] << 4)


def humidity_q22_10(cal, adc_h, t_fine_value):
    """bme280_compensate_H_int32: relative humidity in %RH as Q22.10 (1/1024 %RH)."""
    v = t_fine_value - 76800
    v = ((((adc_h << 14) - (cal[_H4] << 20) - (cal[_H5] * v)) + 16384) >> 15) * (
        (((((v * cal[_H6]) >> 10) * (((v * cal[_H3]) >> 11) + 32768)) >> 10) + 2097152) * cal[_H2]
        + 8192
    ) >> 14
    v = v - (((((v >> 15) * (v >> 15)) >> 7) * cal[_H1]) >> 4)
    if v < 0:
        v = 0
    elif v > 419430400:  # 100 %RH in Q22.10, shifted by 12
        v = 419430400
    return v >> 12


class BME280:
    """A BME280 on an I2C bus (machine.I2C API: readfrom_mem_into, readfrom_mem, writeto_mem).

    sleep_ms(ms) waits for the conversion; default time.sleep_ms, or no wait where that is absent.
    Raises SensorError if the device is absent, is not a BME280 or has a blank calibration.
    """

    def __init__(self, i2c, address=0x76, sleep_ms=None):
        self._i2c = i2c
        self.address = address
        if sleep_ms is None:
            sleep_ms = _sleep_ms if _sleep_ms is not None else _no_sleep
        self._sleep_ms = sleep_ms
        # Buffers for read(), allocated once
        self._data = bytearray(_DATA_LEN)
        self._status = bytearray(1)
        self._ctrl_hum = bytes((_CTRL_HUM_X1,))
        self._ctrl_meas = bytes((_CTRL_MEAS_FORCED_X1,))
        from firmware import bme280_calib, unload  # chip id and calibration: at start only

        try:
            self.calibration = bme280_calib.probe(self)
        finally:
            unload("bme280_calib")

    def read(self):
        """One forced measurement: (temperature 0.01 °C, humidity 0.01 %RH, pressure Pa)."""
        self._measure()
        d = self._data
        adc_p = (d[0] << 12) | (d[1] << 4) | (d[2] >> 4)  # 5.4.7 press[19:0]
        adc_t = (d[3] << 12) | (d[4] << 4) | (d[5] >> 4)  # 5.4.8 temp[19:0]
        adc_h = (d[6] << 8) | d[7]  # 5.4.9 hum[15:0]
        if adc_t == _ADC_SKIPPED or adc_p == _ADC_SKIPPED or adc_h == _ADC_H_SKIPPED:
            # (not in a module loaded when needed: 0x80000 is a plausible temperature, ~26 degC,
            # and loading code at such a reading ran a full 64 KB heap out)
            self._check_not_skipped(adc_t, adc_p, adc_h)
        cal = self.calibration
        tf = t_fine(cal, adc_t)
        p_q8 = pressure_q24_8(cal, adc_p, tf)
        h_q10 = humidity_q22_10(cal, adc_h, tf)
        if _DEBUG:
            print("bme280: adc", adc_t, adc_p, adc_h, "t_fine", tf)
        # Round Q22.10 %RH to 0.01 %RH and Q24.8 Pa to Pa, half up
        return temperature_centi(tf), (h_q10 * 100 + 512) >> 10, (p_q8 + 128) >> 8

    def _check_not_skipped(self, adc_t, adc_p, adc_h):
        # A reset value (Table 18) is also a possible reading (0x80000 is ~26 degC): it means
        # "skipped" only if that measurement's oversampling is off, i.e. the chip lost its
        # settings (a reset or a dropped ctrl_hum write). Read them back to tell (5.4.3, 5.4.5).
        try:
            ctrl = self._i2c.readfrom_mem(self.address, _REG_CTRL_HUM, 3)  # 0xF2..0xF4
        except OSError as e:
            raise self._bus_error(e)  # noqa: B904
        osrs_h = ctrl[0] & 0x07
        osrs_t = ctrl[2] >> 5
        osrs_p = (ctrl[2] >> 2) & 0x07
        if (
            (adc_h == _ADC_H_SKIPPED and not osrs_h)
            or (adc_t == _ADC_SKIPPED and not osrs_t)
            or (adc_p == _ADC_SKIPPED and not osrs_p)
        ):
            raise SensorError(
                "bme280: measurement skipped at 0x%02x (ctrl_hum 0x%02x ctrl_meas 0x%02x; "
                "raw T 0x%05x P 0x%05x H 0x%04x)"
                % (self.address, ctrl[0], ctrl[2], adc_t, adc_p, adc_h)
            )

    def _measure(self):
        # Forced mode: ctrl_hum first, since it only latches on the following ctrl_meas write
        # (5.4.3); then wait t_measure,max (9.1), poll measuring (5.4.4), one burst read (4).
        i2c = self._i2c
        address = self.address
        try:
            i2c.writeto_mem(address, _REG_CTRL_HUM, self._ctrl_hum)
            i2c.writeto_mem(address, _REG_CTRL_MEAS, self._ctrl_meas)
            self._sleep_ms(_T_MEASURE_MAX_MS)
            polls = _POLLS_MAX
            while True:
                i2c.readfrom_mem_into(address, _REG_STATUS, self._status)
                if not self._status[0] & _STATUS_MEASURING:
                    break
                polls -= 1
                if polls == 0:
                    raise SensorError(
                        "bme280: measurement at 0x%02x not done after %d ms"
                        % (address, _T_MEASURE_MAX_MS + (_POLLS_MAX - 1) * _POLL_MS)
                    )
                self._sleep_ms(_POLL_MS)
            i2c.readfrom_mem_into(address, _REG_PRESS_MSB, self._data)
        except OSError as e:
            raise self._bus_error(e)  # noqa: B904
        first = self._data[0]
        if (first == 0x00 or first == 0xFF) and _all(self._data, first):
            raise SensorError(
                "bme280: data 0xF7..0xFE at 0x%02x reads all 0x%02x" % (address, first)
            )

    def _bus_error(self, e):
        return SensorError("bme280: bus error at 0x%02x (OSError %s)" % (self.address, _errno(e)))


def _all(buf, value):
    for i in range(len(buf)):
        if buf[i] != value:
            return False
    return True


def _no_sleep(ms):
    pass


def _errno(e):
    return e.args[0] if e.args else "?"

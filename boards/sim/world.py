# The host side of the simulated BME280: what conditions a raw reading stands for, checks of
# trimming values, and the busio-style adapter Adafruit's driver needs. Kept out of
# sim_bme280.py so the simulated board's 64 KB heap carries only the register model.

from firmware.bme280 import humidity_q22_10, pressure_q24_8, t_fine

# Value ranges of the trimming parameters, datasheet 4.2.2 Table 16 (H4, H5 are 12-bit signed)
_U8 = (0, 255)
_S8 = (-128, 127)
_U16 = (0, 65535)
_S16 = (-32768, 32767)
_S12 = (-2048, 2047)
CALIBRATION_RANGES = {
    "dig_T1": _U16,
    "dig_T2": _S16,
    "dig_T3": _S16,
    "dig_P1": _U16,
    "dig_P2": _S16,
    "dig_P3": _S16,
    "dig_P4": _S16,
    "dig_P5": _S16,
    "dig_P6": _S16,
    "dig_P7": _S16,
    "dig_P8": _S16,
    "dig_P9": _S16,
    "dig_H1": _U8,
    "dig_H2": _S16,
    "dig_H3": _U8,
    "dig_H4": _S12,
    "dig_H5": _S12,
    "dig_H6": _S8,
}


def check_calibration(values):
    for name, (lo, hi) in CALIBRATION_RANGES.items():
        if not lo <= values[name] <= hi:
            raise ValueError("sim_bme280: %s=%d outside %d..%d" % (name, values[name], lo, hi))


def raw_for(cal, temperature_c, humidity_pct, pressure_hpa):
    """(adc_t, adc_p, adc_h) whose integer compensation under cal comes closest to the given
    conditions. Temperature first (in t_fine units, 1/5120 degC), since t_fine feeds P and H;
    each compensation is monotone in its raw value for plausible calibrations, so a bisection
    finds the closest raw value."""
    adc_t = _closest(lambda a: t_fine(cal, a), round(temperature_c * 5120), 0xFFFFF, 1)
    tf = t_fine(cal, adc_t)
    adc_p = _closest(
        lambda a: pressure_q24_8(cal, a, tf), round(pressure_hpa * 25600), 0xFFFFF, -1
    )
    adc_h = _closest(lambda a: humidity_q22_10(cal, a, tf), round(humidity_pct * 1024), 0xFFFF, 1)
    return adc_t, adc_p, adc_h


def _closest(f, target, top, sign):
    """The a in 0..top with f(a) closest to target, f monotone (sign 1 rising, -1 falling)."""
    lo, hi = 0, top
    # smallest a with sign * f(a) >= sign * target (or top if none)
    while lo < hi:
        mid = (lo + hi) // 2
        if sign * f(mid) >= sign * target:
            hi = mid
        else:
            lo = mid + 1
    if lo > 0 and abs(f(lo - 1) - target) <= abs(f(lo) - target):
        return lo - 1
    return lo


class SimBusioI2C:
    """busio.I2C-style adapter over a SimI2C, as Adafruit's BusDevice expects: try_lock/unlock,
    writeto, readfrom_into, writeto_then_readfrom with start/end slices (incl. the empty probe)."""

    def __init__(self, i2c):
        self._i2c = i2c
        self._locked = False

    def try_lock(self):
        if self._locked:
            return False
        self._locked = True
        return True

    def unlock(self):
        self._locked = False

    def scan(self):
        return self._i2c.scan()

    def writeto(self, address, buffer, *, start=0, end=None):
        if end is None:
            end = len(buffer)
        self._i2c.writeto(address, memoryview(buffer)[start:end])

    def readfrom_into(self, address, buffer, *, start=0, end=None):
        if end is None:
            end = len(buffer)
        self._i2c.readfrom_into(address, memoryview(buffer)[start:end])

    def writeto_then_readfrom(
        self,
        address,
        buffer_out,
        buffer_in,
        *,
        out_start=0,
        out_end=None,
        in_start=0,
        in_end=None,
    ):
        self.writeto(address, buffer_out, start=out_start, end=out_end)
        self.readfrom_into(address, buffer_in, start=in_start, end=in_end)

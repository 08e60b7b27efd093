# What a BME280 needs only when it is opened (chip id, calibration: firmware/bme280.py's
# BME280()): loaded then and dropped again, so that a running node's heap does not carry it.
# Section numbers cite the BME280 datasheet.

import struct

from firmware.bme280 import SensorError, _all, _errno

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


# const() names are private to their module on MicroPython: these repeat bme280.py's values.
_REG_CALIB00 = const(0x88)
_CALIB00_LEN = const(26)
_REG_ID = const(0xD0)
_REG_CALIB26 = const(0xE1)
_CALIB26_LEN = const(7)
_REG_CONFIG = const(0xF5)
_CHIP_ID = const(0x60)
_CHIP_ID_BMP280 = const(0x58)  # BMP280 (no humidity) answers at the same addresses
_CONFIG_FILTER_OFF = const(0x00)  # weather monitoring: filter off (section 3.5.1)
_P1 = const(3)  # dig_P1's place in the calibration tuple (bme280.py)


def probe(sensor):
    """Check the chip at sensor.address and read its calibration (sections 5.4.1, 4.2.2);
    SensorError if it is absent, not a BME280 or blank."""
    i2c = sensor._i2c
    address = sensor.address
    try:
        chip_id = i2c.readfrom_mem(address, _REG_ID, 1)[0]
    except OSError as e:
        # No "raise ... from e" here or below: MicroPython warns that it ignores chaining
        message = "bme280: no device at 0x%02x (OSError %s)" % (address, _errno(e))
        raise SensorError(message)  # noqa: B904
    if chip_id != _CHIP_ID:
        if chip_id == _CHIP_ID_BMP280:
            hint = " (0x58 is a BMP280, no humidity)"
        else:
            hint = ""
        raise SensorError(
            "bme280: chip id 0x%02x at 0x%02x, expected 0x60%s" % (chip_id, address, hint)
        )
    try:
        calib00 = i2c.readfrom_mem(address, _REG_CALIB00, _CALIB00_LEN)
        calib26 = i2c.readfrom_mem(address, _REG_CALIB26, _CALIB26_LEN)
        i2c.writeto_mem(address, _REG_CONFIG, bytes((_CONFIG_FILTER_OFF,)))
    except OSError as e:
        raise sensor._bus_error(e)  # noqa: B904
    for blank in (0x00, 0xFF):
        if _all(calib00, blank):
            raise SensorError(
                "bme280: calibration 0x88..0xA1 at 0x%02x reads all 0x%02x" % (address, blank)
            )
    cal = parse_calibration(calib00, calib26)
    if cal[_P1] == 0:
        raise SensorError("bme280: calibration dig_P1 is 0 at 0x%02x" % address)
    return cal


def _s8(b):
    return b - 256 if b > 127 else b


def parse_calibration(calib00, calib26):
    """The calibration tuple (dig_T1..dig_H6, bme280.py) from the 26 bytes at 0x88 and the 7
    bytes at 0xE1 (Table 16)."""
    t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = struct.unpack_from(
        "<HhhHhhhhhhhh", calib00, 0
    )
    e4 = calib26[4]
    return (
        t1,
        t2,
        t3,
        p1,
        p2,
        p3,
        p4,
        p5,
        p6,
        p7,
        p8,
        p9,
        calib00[25],  # 0xA1 dig_H1, unsigned char
        struct.unpack_from("<h", calib26, 0)[0],  # 0xE1/0xE2 dig_H2, signed short
        calib26[2],  # 0xE3 dig_H3, unsigned char
        # dig_H4 = 0xE4[7:0] / 0xE5[3:0], dig_H5 = 0xE6[7:0] / 0xE5[7:4]: signed 12-bit, the MSB
        # byte carries the sign (as in Bosch's BME280_API parse_humidity_calib_data)
        (_s8(calib26[3]) << 4) | (e4 & 0x0F),
        (_s8(calib26[5]) << 4) | (e4 >> 4),
        _s8(calib26[6]),  # 0xE7 dig_H6, signed char
    )

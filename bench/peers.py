"""How peer systems encode one BME280 reading (T, RH, P), and what LoRa airtime costs.

Bench scripts compare our frames against these; nothing here is used on the node.
"""

import math
import struct

from cayennelpp import LppFrame

# CayenneLPP channels and types (IPSO id - 3200), as FIELD.md lists them.
_LPP_TEMPERATURE = 103  # int16, 0.1 °C, signed
_LPP_HUMIDITY = 104  # uint8, 0.5 %RH
_LPP_BAROMETER = 115  # uint16, 0.1 hPa
_LPP_CHANNELS = {_LPP_TEMPERATURE: 1, _LPP_HUMIDITY: 2, _LPP_BAROMETER: 3}
CAYENNE_LPP_SIZE = 11  # 4 + 3 + 4 bytes (FIELD.md)


def cayenne_lpp(t_c: float, rh: float, p_hpa: float) -> bytes:
    """One reading as CayenneLPP, built by pycayennelpp (truncates, like the Arduino library)."""
    frame = LppFrame()
    frame.add_temperature(_LPP_CHANNELS[_LPP_TEMPERATURE], t_c)
    frame.add_humidity(_LPP_CHANNELS[_LPP_HUMIDITY], rh)
    frame.add_pressure(_LPP_CHANNELS[_LPP_BAROMETER], p_hpa)
    payload = bytes(frame)
    if len(payload) != CAYENNE_LPP_SIZE:
        raise ValueError(f"CayenneLPP reading is {len(payload)} bytes, expected 11")
    return payload


def cayenne_decode(payload: bytes) -> tuple[float, float, float]:
    """(temperature_c, humidity_pct, pressure_hpa) from a CayenneLPP payload, by pycayennelpp."""
    try:
        frame = LppFrame.from_bytes(bytes(payload))
    # pycayennelpp 2.4 raises AttributeError for an unknown type byte
    except (AttributeError, BufferError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"bad CayenneLPP payload: {exc!r}") from None
    values = []
    for lpp_type, name in (
        (_LPP_TEMPERATURE, "temperature"),
        (_LPP_HUMIDITY, "humidity"),
        (_LPP_BAROMETER, "barometer"),
    ):
        items = frame.get_by_type(lpp_type)
        if len(items) != 1:
            raise ValueError(f"CayenneLPP payload has {len(items)} {name} items, expected 1")
        values.append(items[0].value[0])
    return values[0], values[1], values[2]


# Sensor.Community (airRohr) firmware, opendata-stuttgart/sensors-software,
# airrohr-firmware/airrohr-firmware.ino at commit 713e3ffe1710982232dead62d445d99ec4d3260e:
# - data_first_part = "{\"software_version\": \"" SOFTWARE_VERSION_STR "\", \"sensordatavalues\":["
# - fetchSensorBMX280() appends BME280_temperature (°C), BME280_pressure (Pa, not hPa!),
#   BME280_humidity (%RH), in that order, with add_Value2Json() from airrohr-firmware/utils.cpp:
#   {"value_type":"<type>","value":"<String(float)>"}, -- String(float) is "%.2f" of the float.
# - sendSensorCommunity(result, BME280_API_PIN, ..., "BME280_") drops the last comma, strips the
#   "BME280_" prefix from the whole body, appends "]}", and POSTs it with headers
#   X-Sensor: esp8266-<chip id> and X-PIN: 11: the chip id is not in the body.
# - sendDataToOptionalApis() sends the unstripped body to a "custom API" with
#   {"esp8266id": "<chip id>", first (and node statistics we leave out, see below).
AIRROHR_SOFTWARE_VERSION = "NRZ-2020-130-B5"  # SOFTWARE_VERSION_STR in the commit above
_BME280_API_PIN = 11
_SENSOR_BASENAME = "esp8266-"


def _arduino_float(value: float) -> str:
    """Arduino String(float): the value as a 32-bit float, printed "%.2f" (ESP8266 core)."""
    (as_float32,) = struct.unpack("<f", struct.pack("<f", value))
    return f"{as_float32:.2f}"


def sensor_community_json(
    t_c: float,
    rh: float,
    p_hpa: float,
    esp_id: str | None = None,
    *,
    software_version: str = AIRROHR_SOFTWARE_VERSION,
) -> bytes:
    """The JSON body the airRohr firmware posts for one BME280 reading.

    Without esp_id: the body POSTed to api.sensor.community (value types "temperature",
    "pressure", "humidity"; the node is named in the X-Sensor header, see
    sensor_community_headers). With esp_id: the body the firmware sends to a custom API, which
    keeps the "BME280_" types and names the node in the body; the node statistics the firmware
    appends there ("samples", "min_micro", "max_micro", "signal") are left out, as they are not
    part of the reading.
    """
    values = (
        ("BME280_temperature", _arduino_float(t_c)),
        ("BME280_pressure", _arduino_float(p_hpa * 100.0)),  # the firmware sends Pa
        ("BME280_humidity", _arduino_float(rh)),
    )
    items = "".join(f'{{"value_type":"{kind}","value":"{text}"}},' for kind, text in values)
    body = '{"software_version": "' + software_version + '", "sensordatavalues":[' + items
    body = body[:-1] + "]}"
    if esp_id is None:
        body = body.replace("BME280_", "")
    else:
        body = '{"esp8266id": "' + str(esp_id) + '", ' + body[1:]
    return body.encode("ascii")


def sensor_community_headers(esp_id: str) -> dict[str, str]:
    """The headers that name the node and sensor on a POST to api.sensor.community."""
    return {"X-Sensor": _SENSOR_BASENAME + str(esp_id), "X-PIN": str(_BME280_API_PIN)}


def time_on_air_s(
    payload_len: int,
    sf: int,
    bw_hz: int = 125000,
    cr: int = 1,
    preamble: int = 8,
    explicit_header: bool = True,
    crc: bool = True,
    low_data_rate_optimize: bool | None = None,
) -> float:
    """LoRa time on air in seconds (Semtech SX1276 datasheet section 4.1.1.7, AN1200.13).

    cr is 1..4 for 4/5..4/8. Low data rate optimisation defaults to on when a symbol lasts
    more than 16 ms (SF11 and SF12 at 125 kHz), as LoRaWAN and the datasheet require.
    """
    if not 0 <= payload_len <= 255:
        raise ValueError(f"payload_len must be 0..255, got {payload_len}")
    if not 6 <= sf <= 12:
        raise ValueError(f"sf must be 6..12, got {sf}")
    if not 1 <= cr <= 4:
        raise ValueError(f"cr must be 1..4 (4/5..4/8), got {cr}")
    if bw_hz <= 0 or preamble < 0:
        raise ValueError("bw_hz must be positive and preamble not negative")
    t_sym = (1 << sf) / bw_hz
    if low_data_rate_optimize is None:
        low_data_rate_optimize = t_sym > 0.016
    de = 1 if low_data_rate_optimize else 0
    ih = 0 if explicit_header else 1
    crc_on = 1 if crc else 0
    t_preamble = (preamble + 4.25) * t_sym
    bits = 8 * payload_len - 4 * sf + 28 + 16 * crc_on - 20 * ih
    n_payload = 8 + max(math.ceil(bits / (4 * (sf - 2 * de))) * (cr + 4), 0)
    return t_preamble + n_payload * t_sym

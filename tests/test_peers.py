"""Tests for bench/peers.py: peer encodings of one reading and LoRa time on air.

Checks the sizes and airtimes that FIELD.md quotes.
"""

import json
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from peers import (  # noqa: E402
    cayenne_decode,
    cayenne_lpp,
    sensor_community_headers,
    sensor_community_json,
    time_on_air_s,
)

# FIELD.md: BW 125 kHz, CR 4/5, 8-symbol preamble, explicit header, CRC on (ms).
FIELD_TABLE = [
    (10, 41.2, 991),
    (20, 56.6, 1319),
    (24, 61.7, 1483),
    (51, 102.7, 2466),
    (100, 174.3, 3940),
]
# The same, exactly: (preamble 8 + 4.25 + payload symbols) x 2^SF / 125 kHz.
SYMBOLS = {(10, 7): 40.25, (10, 12): 30.25, (51, 7): 100.25, (51, 12): 75.25}


def test_cayenne_lpp_is_11_bytes_as_field_md_says():
    payload = cayenne_lpp(21.37, 55.2, 1013.25)
    assert len(payload) == 11
    # channel 1 temperature 103, channel 2 humidity 104, channel 3 barometer 115
    assert payload == bytes.fromhex("0167 00d5 0268 6e 0373 2794".replace(" ", ""))


@given(
    st.floats(-40.0, 85.0),
    st.floats(0.0, 100.0),
    st.floats(300.0, 1100.0),
)
def test_cayenne_round_trip_within_resolution(t_c, rh, p_hpa):
    payload = cayenne_lpp(t_c, rh, p_hpa)
    assert len(payload) == 11
    t2, rh2, p2 = cayenne_decode(payload)
    # pycayennelpp truncates toward zero: the error stays below one step
    assert abs(t2 - t_c) < 0.1 + 1e-9
    assert abs(rh2 - rh) < 0.5 + 1e-9
    assert abs(p2 - p_hpa) < 0.1 + 1e-9


def test_cayenne_negative_temperature():
    assert cayenne_decode(cayenne_lpp(-3.5, 80.0, 990.0)) == (-3.5, 80.0, 990.0)


@pytest.mark.parametrize("payload", [b"", b"\x01\x67\x00", b"\x01\x67\x00\xd5", b"\x01\xff\x00"])
def test_cayenne_decode_rejects(payload):
    with pytest.raises(ValueError):
        cayenne_decode(payload)


@given(st.binary(max_size=40))
def test_cayenne_decode_fuzz(payload):
    try:
        cayenne_decode(payload)
    except ValueError:
        pass


def test_sensor_community_body_exactly():
    body = sensor_community_json(21.37, 55.2, 1013.25, esp_id=None)
    assert body == (
        b'{"software_version": "NRZ-2020-130-B5", "sensordatavalues":['
        b'{"value_type":"temperature","value":"21.37"},'
        b'{"value_type":"pressure","value":"101325.00"},'
        b'{"value_type":"humidity","value":"55.20"}]}'
    )
    assert len(body) == 194
    assert sensor_community_headers("12345678") == {"X-Sensor": "esp8266-12345678", "X-PIN": "11"}


def test_custom_api_body_names_the_node():
    body = sensor_community_json(21.37, 55.2, 1013.25, esp_id="12345678")
    doc = json.loads(body)
    assert doc["esp8266id"] == "12345678"
    assert [v["value_type"] for v in doc["sensordatavalues"]] == [
        "BME280_temperature",
        "BME280_pressure",
        "BME280_humidity",
    ]
    assert len(body) == 240


@given(st.floats(-40.0, 85.0), st.floats(0.0, 100.0), st.floats(300.0, 1100.0))
def test_json_sizes(t_c, rh, p_hpa):
    # FIELD.md: "about 230 B"; the Sensor.Community body itself is a little smaller.
    body = sensor_community_json(t_c, rh, p_hpa)
    assert 185 <= len(body) <= 200
    custom = sensor_community_json(t_c, rh, p_hpa, esp_id="12345678")
    assert 225 <= len(custom) <= 250
    values = [float(v["value"]) for v in json.loads(body)["sensordatavalues"]]
    assert values == pytest.approx([t_c, p_hpa * 100, rh], abs=0.01)


def test_json_in_field_md_range_for_typical_readings():
    sizes = [
        len(sensor_community_json(t, rh, p, esp_id=esp))
        for t, rh, p in [(-3.2, 95.0, 990.1), (12.5, 70.0, 1015.0), (31.0, 40.5, 1008.3)]
        for esp in (None, "12345678")
    ]
    assert 190 <= min(sizes) and max(sizes) <= 260


@pytest.mark.parametrize(("payload", "sf7_ms", "sf12_ms"), FIELD_TABLE)
def test_time_on_air_matches_field_md(payload, sf7_ms, sf12_ms):
    # The table gives SF7 to 0.1 ms and SF12 to 1 ms: match to half its last digit.
    assert time_on_air_s(payload, 7) * 1000 == pytest.approx(sf7_ms, abs=0.05)
    assert time_on_air_s(payload, 12) * 1000 == pytest.approx(sf12_ms, abs=0.5)


@pytest.mark.parametrize(("key", "symbols"), SYMBOLS.items())
def test_time_on_air_exact(key, symbols):
    payload, sf = key
    expected = symbols * (1 << sf) / 125000
    assert time_on_air_s(payload, sf) == pytest.approx(expected, abs=1e-7)  # well under 0.1 ms


def test_time_on_air_options():
    base = time_on_air_s(10, 12)
    # without low-data-rate optimisation SF12 packs more bits per symbol
    assert time_on_air_s(51, 12, low_data_rate_optimize=False) < time_on_air_s(51, 12)
    # micropython-lib's 12-symbol default costs 4 symbols: 131 ms at SF12 (FIELD.md)
    assert (time_on_air_s(10, 12, preamble=12) - base) * 1000 == pytest.approx(131.072)
    assert time_on_air_s(10, 7, crc=False) < time_on_air_s(10, 7)
    assert time_on_air_s(10, 7, explicit_header=False) < time_on_air_s(10, 7)
    assert time_on_air_s(10, 7, cr=4) > time_on_air_s(10, 7)
    assert time_on_air_s(10, 7, bw_hz=250000) == pytest.approx(time_on_air_s(10, 7) / 2)
    for bad in ({"payload_len": 256, "sf": 7}, {"payload_len": 10, "sf": 13}):
        with pytest.raises(ValueError):
            time_on_air_s(**bad)
    with pytest.raises(ValueError):
        time_on_air_s(10, 7, cr=5)

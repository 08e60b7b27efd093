# Regenerates the frame format test vectors (protocols/vectors/*.json) from protocols/frame.py,
# cross-checked against an encoder written from SPEC.md alone. CPython only, host side. v1 files
# (data_single, data_batch, ack, status) stay as devices in the field send them; *_v2.json hold
# format v2 (a DATA frame carries the reading index of its first reading, an ACK echoes the tag
# of the frame it acknowledges).
#
#     python protocols/vectors/make_vectors.py           rewrite the five JSON files
#     python protocols/vectors/make_vectors.py --check   exit 1 if any file is not up to date
#
# Output is deterministic: fixed keys, hand-written readings, no clock and no unseeded randomness,
# so a rerun on an unchanged codec rewrites identical files (tests/test_frame.py checks this).
#
# Every valid case is encoded twice, by frame.py and by spec_encode_data() below (a bit-level
# transcription of SPEC.md "DATA frame"), and must agree byte for byte. The spec leaves two
# encoder choices open on ties (the commonest gap, and the cheapest Rice k), so the cases are
# chosen to have no interval tie; among equally cheap k the smallest is taken. That way the
# vectors hold for any implementation that follows SPEC.md, not just for this one.
#
# invalid.json frames are built by hand with Bits and signed with frame.Signer, so that the check
# named by `reason` fires rather than the tag check. Each invalid case has a `decode` field: "any"
# for frame.decode(), or "data"/"ack"/"status" for the typed decoder.

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protocols import frame, uplink  # noqa: E402

# Keys: a counting key, and the FIPS-197 AES example key, both easy to recognise in a hex dump.
KEY = bytes(range(16))
KEY2 = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
U32 = 0xFFFFFFFF
I32_MIN = -(1 << 31)
I32_MAX = (1 << 31) - 1
INTERVALS = (10, 30, 60, 120, 300, 600, 900, 3600)  # SPEC.md "Timing"
BASES = {1: (1500, 11), 2: (5000, 12), 3: (101325, 13)}  # SPEC.md "Channels": id -> (base, k0)
GENERIC = (0, 8)

FILES = (
    "data_single.json",
    "data_batch.json",
    "ack.json",
    "status.json",
    "invalid.json",
    "data_v2.json",
    "ack_v2.json",
    "status_v2.json",
)


class Ambiguous(ValueError):
    """SPEC.md leaves this encoder choice open (a tie); the bytes are not fixed by the spec."""


# --- the spec's codes, bit by bit -----------------------------------------------------------


class Bits:
    """MSB-first bit string, for building frames by hand (SPEC.md "Conventions")."""

    def __init__(self):
        self.bits = []

    def u(self, value, n):
        for i in range(n - 1, -1, -1):
            self.bits.append((value >> i) & 1)
        return self

    def ue(self, value, k=0):
        m = (value >> k) + 1
        b = m.bit_length()
        self.u(0, b - 1)
        self.u(m, b)
        return self.u(value & ((1 << k) - 1), k)

    def rice(self, value, k):
        q = value >> k
        if q < 12:
            self.u((1 << (q + 1)) - 2, q + 1)
            return self.u(value & ((1 << k) - 1), k)
        self.u(0xFFF, 12)
        return self.ue(value)

    def __len__(self):
        return len(self.bits)

    def to_bytes(self, padding=0):
        """The bits padded to a whole byte; `padding` gives the pad bits' value (0 is valid)."""
        bits = list(self.bits)
        npad = -len(bits) % 8
        for i in range(npad - 1, -1, -1):
            bits.append((padding >> i) & 1)
        out = bytearray()
        for i in range(0, len(bits), 8):
            byte = 0
            for b in bits[i : i + 8]:
                byte = (byte << 1) | b
            out.append(byte)
        return bytes(out)


def varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def zigzag(v):
    return 2 * v if v >= 0 else -2 * v - 1


def sign(key, body):
    """body + its tag: HMAC-SHA256(key, body)[0:4], via the codec's Signer."""
    return bytes(body) + frame.Signer(key).tag(bytes(body))


def rice_cost(zz, k):
    """Bits that rice(k) spends on the zigzagged values zz (SPEC.md "Conventions")."""
    total = 0
    for z in zz:
        q = z >> k
        total += q + 1 + k if q < 12 else 12 + 2 * (z + 1).bit_length() - 1
    return total


def best_k(zz):
    """The Rice parameter 0..15 with the fewest bits; the smallest one on a tie."""
    costs = [rice_cost(zz, k) for k in range(16)]
    return costs.index(min(costs))


def commonest_gap(gaps):
    counts = {}
    for g in gaps:
        counts[g] = counts.get(g, 0) + 1
    top = max(counts.values())
    winners = sorted(g for g in counts if counts[g] == top)
    if len(winners) > 1:
        raise Ambiguous("gaps %s tie as the commonest: %s" % (gaps, winners))
    return winners[0]


def gcd_of_deltas(deltas):
    g = 0
    for d in deltas:
        a, b = g, abs(d)
        while b:
            a, b = b, a % b
        g = a
    return g or 1


def data_bits(channels, readings, ages):
    """The DATA bitstream (SPEC.md "DATA frame") with the encoder choices SPEC.md describes."""
    n = len(readings)
    w = Bits().ue(n - 1)
    if tuple(channels) == (1, 2, 3):
        w.u(1, 1)
    else:
        w.u(0, 1).ue(len(channels) - 1)
        for ch in channels:
            w.ue(ch)
    if n == 1 and ages[0] == 0:
        w.u(0, 1)
    else:
        w.u(1, 1).ue(ages[-1])
        if n > 1:
            gaps = [ages[i - 1] - ages[i] for i in range(1, n)]
            interval = commonest_gap(gaps)
            if interval in INTERVALS:
                w.u(1, 1).u(INTERVALS.index(interval), 3)
            else:
                w.u(0, 1).ue(interval, 5)
            irregular = any(g != interval for g in gaps)
            w.u(int(irregular), 1)
            if irregular:
                for g in gaps:
                    w.ue(zigzag(g - interval))
    for c, ch in enumerate(channels):
        base, k0 = BASES.get(ch, GENERIC)
        w.ue(zigzag(readings[0][c] - base), k0)
        if n > 1:
            deltas = [readings[i][c] - readings[i - 1][c] for i in range(1, n)]
            g = gcd_of_deltas(deltas)
            zz = [zigzag(d // g) for d in deltas]
            k = best_k(zz)
            w.u(k, 4).ue(g - 1)
            for z in zz:
                w.rice(z, k)
    return w


def spec_encode_data(key, node_id, seq, channels, readings, ages, version=1):
    """A DATA frame built from SPEC.md alone (no frame.py code but the HMAC). seq: the v1
    frame's seq, or the v2 frame's reading index of its first reading."""
    body = bytes([version << 4 | 1]) + varint(node_id) + varint(seq)
    body += data_bits(channels, readings, ages).to_bytes()
    return sign(key, body)


# --- valid cases ----------------------------------------------------------------------------


def data_case(name, node_id, seq, channels, readings, ages, key=KEY, note=None, version=1):
    readings = [list(r) for r in readings]
    got = frame.encode_data(
        frame.Signer(key), node_id, seq, channels, readings, ages, version=version
    )
    want = spec_encode_data(key, node_id, seq, channels, readings, ages, version)
    if got != want:
        raise SystemExit(
            "case %s: frame.py gives %s, SPEC.md gives %s" % (name, got.hex(), want.hex())
        )
    case = {"name": name}
    if note:
        case["note"] = note
    case.update(key=key.hex(), node_id=node_id)
    case["seq" if version == 1 else "index"] = seq
    case.update(
        channels=list(channels),
        readings=readings,
        ages=list(ages),
        frame=got.hex(),
    )
    return case


BME = (1, 2, 3)


def single_cases():
    return [
        data_case(
            "bme280_sampled_now",
            4242,
            123456,
            BME,
            [(2150, 4520, 101325)],
            [0],
            note="SPEC.md 'Sizes': node id < 16384, seq < 2^21, sent as sampled: 16 bytes",
        ),
        data_case("bme280_age_42s", 4242, 123457, BME, [(2153, 4517, 101318)], [42]),
        data_case("bme280_at_bases", 0, 0, BME, [(1500, 5000, 101325)], [0]),
        data_case("below_freezing", 7, 99, BME, [(-1234, 9830, 98765)], [0]),
        data_case(
            "pm_battery_and_unknown_channel_300",
            300,
            5,
            (4, 5, 6, 300),
            [(123, 187, 3987, -42)],
            [3],
            note="channel 300 has no table entry: base 0, k0 8, decoded as channel_300",
        ),
        data_case(
            "largest_node_id_and_seq",
            U32,
            U32,
            BME,
            [(2150, 4520, 101325)],
            [0],
        ),
        data_case(
            "i32_extremes",
            1,
            2,
            BME,
            [(I32_MIN, I32_MAX, I32_MIN)],
            [U32],
            note="largest age, smallest and largest raw values",
        ),
        data_case("other_key", 4242, 123456, BME, [(2150, 4520, 101325)], [0], key=KEY2),
    ]


def _long_walk():
    # A deterministic 60-reading temperature walk (0.01 degC), no randomness needed.
    values = []
    v = 1850
    for i in range(60):
        v += (i * 7 % 5) - 2
        values.append((v,))
    return values


def batch_cases():
    return [
        data_case(
            "regular_10s_bme280",
            17,
            1001,
            BME,
            [
                (2150, 4520, 101325),
                (2152, 4518, 101327),
                (2155, 4515, 101326),
                (2153, 4517, 101330),
                (2151, 4521, 101331),
                (2150, 4522, 101329),
            ],
            [50, 40, 30, 20, 10, 0],
        ),
        data_case(
            "regular_300s_newest_15s_old",
            17,
            1002,
            BME,
            [
                (1980, 6010, 100990),
                (1975, 6033, 100985),
                (1971, 6051, 100979),
                (1968, 6070, 100981),
            ],
            [915, 615, 315, 15],
        ),
        data_case(
            "regular_45s_not_a_standard_interval",
            18,
            40,
            BME,
            [
                (2301, 3900, 101500),
                (2302, 3899, 101502),
                (2304, 3897, 101501),
                (2303, 3898, 101503),
            ],
            [140, 95, 50, 5],
            note="interval coded as ue(5) 45",
        ),
        data_case(
            "irregular_gaps",
            18,
            41,
            BME,
            [
                (2301, 3900, 101500),
                (2299, 3902, 101498),
                (2297, 3905, 101499),
                (2296, 3904, 101497),
                (2294, 3907, 101497),
                (2290, 3910, 101495),
                (2289, 3911, 101496),
                (2288, 3911, 101494),
            ],
            [543, 483, 423, 362, 303, 243, 63, 3],
            note="gaps 60 60 61 59 60 180 60: interval 60, one correction a gap",
        ),
        data_case(
            "irregular_zero_gap",
            18,
            42,
            BME,
            [
                (2301, 3900, 101500),
                (2302, 3900, 101500),
                (2302, 3901, 101501),
                (2303, 3901, 101501),
            ],
            [20, 10, 10, 0],
            note="two readings sampled in the same second",
        ),
        data_case(
            "custom_channels_with_unknown_id_77",
            300,
            6,
            (4, 5, 6, 77),
            [(123, 187, 3987, -5), (131, 190, 3986, 0), (128, 201, 3986, 12), (119, 176, 3985, 7)],
            [360, 240, 120, 0],
            note="channel 77 has no table entry: base 0, k0 8, decoded as channel_77",
        ),
        data_case(
            "temperature_only",
            301,
            7,
            (1,),
            [(2150,), (2149,), (2149,), (2148,), (2150,)],
            [2400, 1800, 1200, 600, 0],
            note="a custom set of one known channel keeps that channel's base and k0",
        ),
        data_case(
            "escape_sized_delta",
            19,
            500,
            BME,
            [
                (2150, 4520, 101325),
                (2151, 4521, 101326),
                (2150, 4519, 101325),
                (8150, 4518, 101324),
                (8151, 4520, 101325),
            ],
            [120, 90, 60, 30, 0],
            note="temperature jumps by +6000 (a sensor glitch): that delta takes the escape",
        ),
        data_case(
            "i32_jumps_unknown_channel",
            19,
            501,
            (200,),
            [(I32_MIN,), (I32_MAX,), (I32_MIN,), (0,)],
            [30, 20, 10, 0],
            note="deltas of +-(2^32 - 1): the largest possible, all escapes",
        ),
        data_case(
            "common_factor",
            20,
            77,
            BME,
            [
                (2100, 5000, 101300),
                (2106, 5000, 101325),
                (2097, 5000, 101275),
                (2103, 5000, 101350),
                (2094, 5000, 101350),
            ],
            [40, 30, 20, 10, 0],
            note="temperature deltas share g = 3, pressure g = 25, humidity is flat (g = 1)",
        ),
        data_case(
            "largest_node_id_and_seq",
            U32,
            U32,
            BME,
            [(2150, 4520, 101325), (2151, 4520, 101324)],
            [U32, 0],
            note="and the largest age: one gap of 2^32 - 1 seconds",
        ),
        data_case(
            "long_batch_60s",
            21,
            9000,
            (1,),
            _long_walk(),
            [60 * (59 - i) for i in range(60)],
        ),
        data_case(
            "other_key",
            17,
            1003,
            BME,
            [(2150, 4520, 101325), (2152, 4518, 101327)],
            [10, 0],
            key=KEY2,
        ),
    ]


def ack_case(name, node_id, host_time, acked, key=KEY, note=None, echo=None):
    got = uplink.encode_ack(frame.Signer(key), node_id, host_time, acked, echo=echo)
    if echo is None:
        body = bytes([0x12]) + varint(node_id) + varint(host_time) + varint(len(acked))
    else:
        body = bytes([0x22]) + varint(node_id) + varint(host_time) + echo + varint(len(acked))
    nxt = 0
    for first, last in acked:
        body += varint(first - nxt) + varint(last - first)
        nxt = last + 1
    if got != sign(key, body):
        raise SystemExit("ack case %s: frame.py disagrees with SPEC.md" % name)
    case = {"name": name}
    if note:
        case["note"] = note
    case.update(key=key.hex(), node_id=node_id, host_time=host_time)
    if echo is not None:
        case["echo"] = echo.hex()
    case.update(acked=[list(r) for r in acked], frame=got.hex())
    return case


def ack_cases():
    t = 1767225600  # 2026-01-01T00:00:00Z
    return [
        ack_case("no_ranges", 17, t, [], note="a time-only ack"),
        ack_case("one_seq", 17, t + 5, [(1001, 1001)]),
        ack_case("several_ranges", 17, t + 9, [(5, 9), (12, 12), (20, 40)]),
        ack_case("from_seq_zero", 0, 0, [(0, 0), (2, 3)]),
        ack_case("largest_values", U32, U32, [(U32 - 5, U32)]),
        ack_case(
            "thirty_two_ranges",
            300,
            t,
            [(3 * i, 3 * i + 1) for i in range(32)],
            note="the most an ack carries",
        ),
        ack_case("other_key", 17, t, [(1001, 1003)], key=KEY2),
    ]


def status_case(name, node_id, seq, fields, key=KEY, note=None, version=1):
    got = frame.encode_status(frame.Signer(key), node_id, seq, fields, version=version)
    body = bytes([version << 4 | 3]) + varint(node_id) + varint(seq) + varint(len(fields))
    for fid in sorted(fields):
        body += varint(fid) + varint(zigzag(fields[fid]))
    if got != sign(key, body):
        raise SystemExit("status case %s: frame.py disagrees with SPEC.md" % name)
    case = {"name": name}
    if note:
        case["note"] = note
    case.update(
        key=key.hex(),
        node_id=node_id,
        seq=seq,
        fields={str(fid): fields[fid] for fid in sorted(fields)},
        frame=got.hex(),
    )
    return case


def status_cases():
    return [
        status_case(
            "all_known_fields",
            17,
            1004,
            {1: 12, 2: 1, 3: 41232, 4: 37, 5: 0, 6: -87, 7: 10203, 8: 2, 9: 86400},
        ),
        status_case("no_fields", 17, 1005, {}),
        status_case("unknown_field_42", 300, 8, {1: 3, 42: -1}, note="kept as field 42"),
        status_case("i32_extremes", U32, U32, {1: I32_MAX, 6: I32_MIN}),
        status_case("other_key", 17, 1006, {9: 60}, key=KEY2),
    ]


def data_v2_cases():
    def v2(name, node_id, index, channels, readings, ages, **kw):
        return data_case(name, node_id, index, channels, readings, ages, version=2, **kw)

    return [
        v2(
            "bme280_sampled_now",
            4242,
            123456,
            BME,
            [(2150, 4520, 101325)],
            [0],
            note="SPEC.md 'Sizes': node id < 16384, reading index < 2^21: 16 bytes, as v1",
        ),
        v2("bme280_age_42s", 4242, 123457, BME, [(2153, 4517, 101318)], [42]),
        v2("from_index_zero", 0, 0, BME, [(1500, 5000, 101325)], [0]),
        v2(
            "regular_60s_ten_readings",
            17,
            40310,
            BME,
            [(2150 + i % 3, 4520 - i, 101325 + 2 * i) for i in range(10)],
            [60 * (9 - i) for i in range(10)],
            note="readings 40310..40319",
        ),
        v2(
            "last_index_is_u32_max",
            U32,
            U32 - 1,
            BME,
            [(2150, 4520, 101325), (2151, 4520, 101324)],
            [10, 0],
            note="the second reading has index 2^32 - 1, the largest",
        ),
        v2("other_key", 17, 1003, BME, [(2150, 4520, 101325)], [5], key=KEY2),
    ]


def ack_v2_cases():
    t = 1767225600  # 2026-01-01T00:00:00Z
    echo = bytes.fromhex("0badcafe")
    return [
        ack_case("status_frame", 17, t, [], echo=echo, note="acks a STATUS frame: no readings"),
        ack_case("ten_readings", 17, t + 5, [(40310, 40319)], echo=echo),
        ack_case("several_ranges", 17, t + 9, [(5, 9), (12, 12), (20, 40)], echo=echo),
        ack_case("largest_values", U32, U32, [(U32 - 5, U32)], echo=bytes(4)),
        ack_case("other_key", 17, t, [(1001, 1003)], key=KEY2, echo=echo),
    ]


def status_v2_cases():
    return [
        status_case(
            "all_known_fields",
            17,
            104,
            {1: 12, 2: 1, 3: 41232, 4: 37, 5: 0, 6: -87, 7: 10203, 8: 2, 9: 86400},
            version=2,
        ),
        status_case("no_fields", 17, 105, {}, version=2),
        status_case("unknown_field_42", 300, 8, {1: 3, 42: -1}, version=2),
        status_case("i32_extremes", U32, U32, {1: I32_MAX, 6: I32_MIN}, version=2),
        status_case("other_key", 17, 106, {9: 60}, key=KEY2, version=2),
    ]


# --- invalid frames -------------------------------------------------------------------------


def invalid_case(name, reason, frame_bytes, note, decode="any", key=KEY):
    case = {
        "name": name,
        "note": note,
        "key": key.hex(),
        "decode": decode,
        "reason": reason,
        "frame": bytes(frame_bytes).hex(),
    }
    return case


def _data_body(bits, node_id=1, seq=1, padding=0):
    return bytes([0x11]) + varint(node_id) + varint(seq) + bits.to_bytes(padding)


def _one_bme_reading():
    # count 1, BME set, no timing, first values at the bases: 3 + 12 + 13 + 14 = 42 bits
    return Bits().ue(0).u(1, 1).u(0, 1).ue(0, 11).ue(0, 12).ue(0, 13)


def invalid_cases():
    good = frame.encode_data(frame.Signer(KEY), 1, 1, BME, [(2150, 4520, 101325)], [0], version=1)
    good_status = frame.encode_status(frame.Signer(KEY), 1, 2, {1: 3}, version=1)
    cases = []
    add = cases.append

    # truncated
    add(invalid_case("five_bytes", "truncated", good[:5], "shorter than the 6-byte minimum"))
    add(
        invalid_case(
            "ends_inside_node_id",
            "truncated",
            sign(KEY, b"\x11\x80\x80"),
            "node id varint still continues where the tag begins",
        )
    )
    add(
        invalid_case(
            "ends_inside_readings",
            "truncated",
            sign(KEY, _data_body(Bits().ue(0).u(1, 1).u(0, 1).ue(0, 11))),
            "one BME reading, but only the temperature is present",
        )
    )
    add(
        invalid_case(
            "ends_inside_ack_ranges",
            "truncated",
            sign(KEY, b"\x12\x11\x00\x02\x05\x00"),
            "ack announces 2 ranges and carries 1",
        )
    )

    # too_long
    body = _data_body(_one_bme_reading()) + bytes(256 - 4 - len(_data_body(_one_bme_reading())))
    add(invalid_case("256_bytes", "too_long", sign(KEY, body), "signed, but over 255 bytes"))

    # version
    add(
        invalid_case(
            "version_0", "version", sign(KEY, b"\x01" + good[1:-4]), "byte 0 = 0x01, signed"
        )
    )
    add(
        invalid_case(
            "version_3", "version", sign(KEY, b"\x31" + good[1:-4]), "byte 0 = 0x31, signed"
        )
    )

    # type
    for t in (0, 4, 15):
        add(
            invalid_case(
                "type_%d" % t,
                "type",
                sign(KEY, bytes([0x10 | t]) + good[1:-4]),
                "byte 0 = 0x%02x, signed" % (0x10 | t),
            )
        )
    add(
        invalid_case(
            "data_given_to_decode_ack",
            "type",
            good,
            "a valid DATA frame, where an ACK is expected",
            decode="ack",
        )
    )
    add(
        invalid_case(
            "status_given_to_decode_data",
            "type",
            good_status,
            "a valid STATUS frame, where a DATA frame is expected",
            decode="data",
        )
    )

    # tag
    add(
        invalid_case(
            "tag_bit_flipped",
            "tag",
            good[:-1] + bytes([good[-1] ^ 1]),
            "a valid frame, last bit of the tag flipped",
        )
    )
    add(
        invalid_case(
            "body_bit_flipped",
            "tag",
            good[:3] + bytes([good[3] ^ 0x10]) + good[4:],
            "a valid frame, one bit of the readings flipped",
        )
    )
    add(invalid_case("wrong_key", "tag", good, "a valid frame under the other key", key=KEY2))
    add(
        invalid_case(
            "status_retyped_as_ack",
            "tag",
            b"\x12" + good_status[1:],
            "a valid STATUS frame with its type changed to ACK: the type is authenticated",
        )
    )

    # structure: each frame is signed, so only the named rule can reject it
    add(
        invalid_case(
            "nonzero_padding",
            "structure",
            sign(KEY, _data_body(_one_bme_reading(), padding=1)),
            "one BME reading (42 bits), last padding bit 1",
        )
    )
    add(
        invalid_case(
            "spare_byte_before_tag",
            "structure",
            sign(KEY, _data_body(_one_bme_reading()) + b"\x00"),
            "one BME reading, then a whole zero byte",
        )
    )
    bits = Bits().ue(2).u(1, 1).u(1, 1).ue(0)  # 3 readings, BME, newest age 0
    bits.u(1, 1).u(0, 3).u(1, 1).ue(zigzag(0)).ue(zigzag(-11))  # interval 10, irregular: 10, -1
    for k0 in (11, 12, 13):
        bits.ue(0, k0).u(0, 4).ue(0).rice(0, 0).rice(0, 0)
    add(
        invalid_case(
            "negative_gap",
            "structure",
            sign(KEY, _data_body(bits)),
            "3 readings, interval 10, gap corrections 0 and -11: second gap -1",
        )
    )
    bits = Bits().ue(1).u(1, 1).u(0, 1)  # 2 readings, BME, no timing
    for k0 in (11, 12, 13):
        bits.ue(0, k0).u(0, 4).ue(0).rice(0, 0)
    add(
        invalid_case(
            "two_readings_without_timing",
            "structure",
            sign(KEY, _data_body(bits)),
            "timing bit 0 is allowed for a single reading only",
        )
    )
    add(
        invalid_case(
            "256_readings",
            "structure",
            sign(KEY, _data_body(Bits().ue(255).u(1, 1).u(1, 1).ue(0))),
            "count - 1 = 255",
        )
    )
    bits = Bits().ue(0).u(0, 1).ue(32)  # 33 channels
    for _ in range(33):
        bits.ue(4)
    add(
        invalid_case(
            "33_channels",
            "structure",
            sign(KEY, _data_body(bits)),
            "custom channel set of 33 ids",
        )
    )
    bits = Bits().ue(0).u(1, 1).u(0, 1).ue(zigzag(I32_MAX + 1 - 1500), 11).ue(0, 12).ue(0, 13)
    add(
        invalid_case(
            "first_value_over_i32",
            "structure",
            sign(KEY, _data_body(bits)),
            "temperature 2^31 (0.01 degC)",
        )
    )
    bits = Bits().ue(1).u(0, 1).ue(0).ue(4).u(1, 1).ue(0).u(1, 1).u(0, 3).u(0, 1)
    bits.ue(zigzag(I32_MAX), 8).u(0, 4).ue(0).rice(zigzag(1), 0)
    add(
        invalid_case(
            "delta_over_i32",
            "structure",
            sign(KEY, _data_body(bits)),
            "channel 4, 2^31 - 1 then a delta of +1",
        )
    )
    add(
        invalid_case(
            "exp_golomb_35_zeros",
            "structure",
            sign(KEY, _data_body(Bits().u(0, 35).u(1, 36))),
            "the reading count's ue(0) starts with 35 zero bits",
        )
    )
    bits = Bits().ue(1).u(1, 1).u(1, 1).ue(U32).u(1, 1).u(0, 3).u(0, 1)  # newest 2^32-1, 10 s
    for k0 in (11, 12, 13):
        bits.ue(0, k0).u(0, 4).ue(0).rice(0, 0)
    add(
        invalid_case(
            "age_over_u32",
            "structure",
            sign(KEY, _data_body(bits)),
            "newest age 2^32 - 1, interval 10: the older reading's age overflows",
        )
    )
    add(
        invalid_case(
            "varint_6_bytes",
            "structure",
            sign(KEY, b"\x11\x80\x80\x80\x80\x80\x00\x01" + _one_bme_reading().to_bytes()),
            "node id varint of 6 bytes",
        )
    )
    add(
        invalid_case(
            "varint_over_u32",
            "structure",
            sign(KEY, b"\x11\x80\x80\x80\x80\x10\x01" + _one_bme_reading().to_bytes()),
            "node id 2^32 in 5 varint bytes",
        )
    )
    add(
        invalid_case(
            "ack_33_ranges",
            "structure",
            sign(KEY, b"\x12\x11\x00\x21" + b"\x00\x00" * 33),
            "the range count is 33",
        )
    )
    add(
        invalid_case(
            "ack_seq_over_u32",
            "structure",
            sign(KEY, b"\x12\x11\x00\x01" + varint(U32) + varint(1)),
            "range first 2^32 - 1, span 1",
        )
    )
    add(
        invalid_case(
            "ack_trailing_byte",
            "structure",
            sign(KEY, b"\x12\x11\x00\x01\x05\x00\x00"),
            "one range, then a spare byte",
        )
    )
    add(
        invalid_case(
            "status_trailing_byte",
            "structure",
            sign(KEY, good_status[:-4] + b"\x00"),
            "one field, then a spare byte",
        )
    )
    add(
        invalid_case(
            "v2_index_over_u32",
            "structure",
            sign(KEY, b"\x21\x01" + varint(U32) + Bits().ue(1).u(1, 1).u(1, 1).ue(0).to_bytes()),
            "v2, first reading index 2^32 - 1 and 2 readings: the second overflows",
            decode="data",
        )
    )
    add(
        invalid_case(
            "v2_ack_ends_inside_echo",
            "truncated",
            sign(KEY, b"\x22\x11\x00\x0b\xad"),
            "v2 ack with 2 of the 4 bytes of its echoed tag",
        )
    )
    add(
        invalid_case(
            "status_value_over_u32",
            "structure",
            sign(KEY, b"\x13\x01\x02\x01\x01\x80\x80\x80\x80\x10"),
            "field 1 with zigzag value 2^32",
        )
    )
    return cases


# --- files ----------------------------------------------------------------------------------

DESCRIPTIONS = {
    "data_single.json": "DATA frames (SPEC.md type 1) of one reading. Encode with "
    "encode_data(Signer(key), node_id, seq, channels, readings, ages) and compare with frame; "
    "decoding frame gives the same fields back. Readings are raw integers (SPEC.md 'Channels').",
    "data_batch.json": "DATA frames (SPEC.md type 1) of several readings, oldest first; ages "
    "are whole seconds before sending. Encode and compare with frame, decode and compare back.",
    "ack.json": "ACK frames (SPEC.md type 2). acked lists inclusive [first, last] seq ranges.",
    "status.json": "STATUS frames (SPEC.md type 3). fields maps a field id (as a string: JSON "
    "keys are strings) to a signed 32-bit value.",
    "data_v2.json": "DATA frames of format v2 (byte 0 = 0x21): index is the reading index of "
    "the first reading (reading i has index + i). Encode with encode_data(Signer(key), node_id, "
    "index, channels, readings, ages) and compare with frame; decode and compare back.",
    "ack_v2.json": "ACK frames of format v2 (byte 0 = 0x22): echo is the tag of the uplink frame "
    "acknowledged; acked lists inclusive [first, last] reading-index ranges.",
    "status_v2.json": "STATUS frames of format v2 (byte 0 = 0x23), laid out as v1's.",
    "invalid.json": "Frames a decoder must reject, with the FrameError reason it must give "
    "(SPEC.md 'Errors'). decode: 'any' for decode(), else the typed decoder to call. Frames "
    "rejected by a rule behind the tag carry a valid tag under key, so the rule, not the tag "
    "check, rejects them.",
}


def build_all():
    """{file name: JSON document} for every vector file."""
    cases = {
        "data_single.json": single_cases(),
        "data_batch.json": batch_cases(),
        "ack.json": ack_cases(),
        "status.json": status_cases(),
        "invalid.json": invalid_cases(),
        "data_v2.json": data_v2_cases(),
        "ack_v2.json": ack_v2_cases(),
        "status_v2.json": status_v2_cases(),
    }
    return {name: {"description": DESCRIPTIONS[name], "cases": cases[name]} for name in FILES}


def render(doc):
    """JSON with one case field a line: readable in a diff, and still plain JSON."""
    lines = ["{", '  "description": %s,' % json.dumps(doc["description"]), '  "cases": [']
    for i, case in enumerate(doc["cases"]):
        fields = ['      "%s": %s' % (k, json.dumps(v)) for k, v in case.items()]
        lines.append("    {")
        lines.append(",\n".join(fields))
        lines.append("    }" + ("," if i < len(doc["cases"]) - 1 else ""))
    lines.append("  ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv):
    check = "--check" in argv
    stale = []
    for name, doc in build_all().items():
        text = render(doc)
        path = HERE / name
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print("%s: %d cases" % (path.relative_to(ROOT), len(doc["cases"])))
    if stale:
        print("out of date: %s (run %s)" % (", ".join(stale), Path(__file__).name))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

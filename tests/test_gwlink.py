# protocols/gwlink.py: the gateway <-> host framing. Golden bytes built from GATEWAY.md's tables
# with struct, COBS checked against PyPI's `cobs` and the CRC against zlib; property tests for
# round trips, garbage, split points and corruption; a fuzz; the same on the MicroPython port.

import json
import random
import struct
import zlib

import pytest
from cobs import cobs
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import gwlink
from protocols.gwlink import Deframer, Downlink, Status, TxResult, Uplink, encode

U16 = st.integers(0, 0xFFFF)
U32 = st.integers(0, 0xFFFFFFFF)
U8 = st.integers(0, 255)

uplinks = st.builds(
    Uplink,
    U32,
    U16,
    U32,
    U32,
    U32,
    st.integers(-32768, 32767),
    st.integers(-128, 127),
    U8,
    U8,
    st.binary(max_size=255),
)
downlinks = st.builds(
    Downlink, U32, U16, U32, U32, st.integers(-128, 127), U8, st.binary(min_size=1, max_size=255)
)
statuses = st.builds(
    Status,
    U32,
    U16,
    U32,
    st.sampled_from(list(b"DIWE")),
    st.text(max_size=60).filter(lambda t: len(t.encode()) <= 240),
)
results = st.builds(TxResult, U32, U16, U32, U16, U8)
messages = st.one_of(uplinks, downlinks, statuses, results)

ERRORS = ("bad_crc", "bad_cobs", "oversize", "too_short", "bad_message")


def errors(d):
    return sum(getattr(d, name) for name in ERRORS)


# --- golden bytes from the spec's tables ----------------------------------------------------


def framed(body):
    body += struct.pack(">I", zlib.crc32(body))
    return b"\x00" + cobs.encode(body) + b"\x00"


def test_uplink_layout():
    m = Uplink(7, 513, 123456, 1482752, 868100, -117, -29, 12, 1, b"\x11\x00\x22")
    body = bytes([0x11]) + struct.pack(
        ">IHIIIhbBB", 7, 513, 123456, 1482752, 868100, -117, -29, 12, 1
    )
    assert encode(m) == framed(body + b"\x11\x00\x22")


def test_downlink_status_and_tx_result_layouts():
    d = Downlink(9, 77, 0xFFFFFFFF, 869525, 14, 9, b"\x12\x34")
    assert encode(d) == framed(
        bytes([0x12]) + struct.pack(">IHIIbB", 9, 77, 0xFFFFFFFF, 869525, 14, 9) + b"\x12\x34"
    )
    s = Status(9, 3, 1000, ord("W"), "gateway rx frames=1 µ")
    assert encode(s) == framed(
        bytes([0x13]) + struct.pack(">IHIB", 9, 3, 1000, ord("W")) + s.text.encode()
    )
    r = TxResult(9, 4, 2000, 77, gwlink.TOO_LATE)
    assert encode(r) == framed(bytes([0x14]) + struct.pack(">IHIHB", 9, 4, 2000, 77, 1))
    assert gwlink.result_name(1) == "too_late" and gwlink.result_name(9) == "result_9"


def test_crc_check_value_and_fallback(monkeypatch):
    assert gwlink.crc32(b"123456789") == 0xCBF43926
    monkeypatch.setattr(gwlink, "_crc32", None)  # a port without binascii.crc32
    assert gwlink.crc32(b"123456789") == 0xCBF43926
    assert gwlink.crc32(bytes(range(256)) * 3) == zlib.crc32(bytes(range(256)) * 3)


def test_largest_message_fits_the_buffers():
    m = Uplink(1, 1, 1, 1, 1, 1, 1, 1, 1, b"\xff" * 255)
    wire = encode(m)
    assert len(wire) - 2 == gwlink.MAX_ENCODED
    assert Deframer().feed(wire) == [m]


# --- COBS against PyPI's cobs ---------------------------------------------------------------


def _encode(data):
    out = bytearray(len(data) + len(data) // 254 + 2)
    return bytes(out[: gwlink.cobs_encode(data, len(data), out, 0)])


@settings(max_examples=500)
@given(
    st.one_of(
        st.binary(max_size=600),
        st.lists(
            st.sampled_from([b"\x00", b"\x01" * 253, b"\x02" * 254, b"\x03" * 255]), max_size=4
        ).map(b"".join),
    )
)
def test_cobs_matches_the_reference(data):
    enc = _encode(data)
    assert enc == cobs.encode(data)
    assert b"\x00" not in enc
    out = bytearray(len(enc) + 1)
    n = gwlink.cobs_decode(enc, len(enc), out)
    assert bytes(out[:n]) == data


def test_cobs_decode_refuses_bad_input():
    out = bytearray(20)
    assert gwlink.cobs_decode(b"\x05ab", 3, out) == -1  # code points past the end
    assert gwlink.cobs_decode(b"\x02a\x00", 3, out) == -1  # a zero inside
    assert gwlink.cobs_decode(b"\xff" + b"a" * 254, 255, bytearray(10)) == -1  # does not fit


# --- round trips and streams ----------------------------------------------------------------


@settings(max_examples=300)
@given(messages)
def test_round_trip(m):
    wire = encode(m)
    assert wire[0] == 0 and wire[-1] == 0 and b"\x00" not in wire[1:-1]
    d = Deframer()
    assert d.feed(wire) == [m]
    assert d.messages == 1 and errors(d) == 0 and d.garbage_bytes == 0 and d.pending() == 0


@settings(max_examples=200, deadline=None)
@given(
    msgs=st.lists(messages, max_size=8),
    garbage=st.lists(st.binary(max_size=40), min_size=9, max_size=9),
    cuts=st.lists(st.integers(0, 5000), max_size=12),
)
def test_every_intact_message_survives_garbage_and_any_split(msgs, garbage, cuts):
    # garbage before, between and after the messages; the stream cut anywhere
    stream = garbage[0] + b"".join(encode(m) + g for m, g in zip(msgs, garbage[1:], strict=False))
    d = Deframer()
    got = []
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        got += d.feed(stream[a:b])
    assert got == msgs
    assert d.messages == len(msgs)


@settings(max_examples=200, deadline=None)
@given(
    msgs=st.lists(messages, min_size=2, max_size=6),
    victim=st.integers(0, 5),
    where=st.integers(0, 10_000),
    flip=st.integers(1, 255),
)
def test_a_corrupted_message_is_counted_and_the_others_survive(msgs, victim, where, flip):
    victim %= len(msgs)
    wires = [encode(m) for m in msgs]
    w = bytearray(wires[victim])
    i = 1 + where % (len(w) - 2)  # a byte between the delimiters
    w[i] ^= flip
    wires[victim] = bytes(w)
    d = Deframer()
    got = d.feed(b"".join(wires))
    assert got == msgs[:victim] + msgs[victim + 1 :]
    assert errors(d) >= 1 and d.garbage_bytes > 0 and d.last_error in ERRORS


def test_a_gateway_that_stops_mid_frame():
    a, b = Uplink(1, 1, 10, 100, 868100, -80, 20, 7, 1, b"first"), Status(1, 2, 20, 73, "boot")
    d = Deframer()
    half = encode(a)[: len(encode(a)) // 2]
    assert d.feed(half) == [] and d.pending() > 0
    # the gateway resets and starts over: its next message's leading zero ends the half frame
    assert d.feed(b"ets Jun  8 2016 00:22:57\r\nrst:0x1" + encode(b)) == [b]
    assert d.bad_cobs + d.bad_crc + d.too_short == 1
    # the host closes the line with a partial frame held: reset() drops it as garbage
    d.feed(half)
    garbage = d.garbage_bytes
    d.reset()
    assert d.pending() == 0 and d.garbage_bytes == garbage + len(half) - 1
    assert d.feed(encode(a)) == [a]


def test_oversize_frames_are_skipped_without_buffering():
    m = TxResult(1, 1, 1, 1, 0)
    d = Deframer()
    assert d.feed(b"\x01" * 5000) == []
    assert d.pending() == 0 and d.oversize == 1
    assert d.feed(b"\x01" * 5000 + encode(m)) == [m]
    assert d.oversize == 1 and d.garbage_bytes == 10000


def test_good_crc_but_no_message():
    def raw(body):
        return framed(body)

    d = Deframer()
    assert d.feed(raw(b"\x21" + bytes(30))) == []  # version 2
    assert d.feed(raw(b"\x15" + bytes(30))) == []  # type 5
    assert d.feed(raw(b"\x14" + bytes(5))) == []  # TX_RESULT too short
    assert d.feed(raw(b"\x13" + bytes(11) + b"\xff\xfe")) == []  # STATUS text not UTF-8
    assert d.feed(raw(b"\x11" + bytes(23) + bytes(256))) == []  # UPLINK payload of 256 bytes
    assert d.bad_message == 5 and d.messages == 0
    assert d.feed(raw(b"\x11")) == [] and d.too_short == 0 and d.bad_message == 6
    assert d.feed(b"\x00\x01\x01\x01\x00") == [] and d.too_short == 1


@settings(max_examples=500)
@given(st.lists(st.binary(max_size=400), max_size=10))
def test_fuzz_random_bytes_never_raise(chunks):
    d = Deframer()
    for c in chunks:
        assert d.feed(c) == []  # a CRC-32 over random bytes does not match
    assert d.messages == 0
    assert d.garbage_bytes + d.pending() <= sum(len(c) for c in chunks)


def test_feed_takes_memoryview_and_refuses_other_types():
    m = TxResult(1, 1, 1, 1, 0)
    assert Deframer().feed(memoryview(encode(m))) == [m]
    with pytest.raises(TypeError, match="feed\\(\\) takes bytes"):
        Deframer().feed("text")


@pytest.mark.parametrize(
    "msg, message",
    [
        (Uplink(-1, 0, 0, 0, 0, 0, 0, 0, 0, b""), "gw_id must be an integer 0..4294967295"),
        (Uplink(0, 0, 0, 0, 0, 0, 128, 0, 0, b""), "snr_x4 must be an integer -128..127"),
        (Uplink(0, 0, 0, 0, 0, 0, 0, 0, 0, bytes(256)), "payload is 256 bytes, at most 255"),
        (Uplink(0, 0, 0, 0, 0, 0, 0, 0, 0, "text"), "payload must be bytes"),
        (Downlink(0, 65536, 0, 0, 0, 0, b"x"), "msg_id must be an integer 0..65535"),
        (Status(0, 0, 0, 73, "x" * 241), "text is 241 bytes, at most 240"),
        (TxResult(0, 0, 0, 0, 256), "result must be an integer 0..255"),
    ],
)
def test_encode_refuses_out_of_range_fields(msg, message):
    with pytest.raises(ValueError, match=message):
        encode(msg)
    with pytest.raises(TypeError):
        encode((1, 2, 3))


# --- on MicroPython -------------------------------------------------------------------------

MP_SCRIPT = """
import json, sys
from protocols import gwlink
KINDS = {"Uplink": gwlink.Uplink, "Downlink": gwlink.Downlink, "Status": gwlink.Status,
         "TxResult": gwlink.TxResult}


def plain(m):
    out = [type(m).__name__]
    for v in m:
        out.append(v.hex() if isinstance(v, bytes) else v)
    return out


d = gwlink.Deframer()
while True:
    line = sys.stdin.readline()
    if not line:
        break
    c = json.loads(line)
    if c["do"] == "encode":
        f = c["msg"]
        kind = KINDS[f[0]]
        args = f[1:]
        if f[0] in ("Uplink", "Downlink"):
            args[-1] = bytes.fromhex(args[-1])
        print(json.dumps({"wire": gwlink.encode(kind(*args)).hex()}))
    elif c["do"] == "feed":
        if c.get("no_binascii"):
            gwlink._crc32 = None
        got = d.feed(bytes.fromhex(c["data"]))
        bad = d.bad_crc + d.bad_cobs + d.oversize + d.too_short + d.bad_message
        print(json.dumps({"msgs": [plain(m) for m in got], "errors": bad,
                          "garbage": d.garbage_bytes}))
"""


def plain(m):
    return [type(m).__name__] + [v.hex() if isinstance(v, bytes) else v for v in m]


def test_micropython_encodes_and_decodes_the_same_bytes(run_mp):
    rng = random.Random(3)
    msgs = []
    for i in range(60):
        payload = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 50, 254, 255])))
        msgs.append(
            Uplink(
                i,
                i * 7,
                rng.randrange(2**32),
                61696,
                868100 + i,
                -120 + i,
                -40 + i,
                7 + i % 6,
                1,
                payload,
            )
        )
        msgs.append(Downlink(i, i, rng.randrange(2**32), 869525, 14, 12, payload or b"\x00"))
        msgs.append(Status(i, i, rng.randrange(2**32), 73, "line %d µs" % i))
        msgs.append(TxResult(i, i, i, i, i % 6))
    lines = [json.dumps({"do": "encode", "msg": plain(m)}) for m in msgs]
    stream = b"".join(
        encode(m) + bytes(rng.randrange(256) for _ in range(rng.randrange(30))) for m in msgs
    )
    chunks = []
    pos = 0
    while pos < len(stream):
        n = rng.randrange(1, 200)
        chunks.append(stream[pos : pos + n])
        pos += n
    lines += [
        json.dumps({"do": "feed", "data": c.hex(), "no_binascii": k > len(chunks) // 2})
        for k, c in enumerate(chunks)
    ]
    out = [
        json.loads(x)
        for x in run_mp(
            "\n".join([MP_SCRIPT]), input="\n".join(lines) + "\n", timeout=120
        ).splitlines()
    ]
    wires = [o["wire"] for o in out[: len(msgs)]]
    assert wires == [encode(m).hex() for m in msgs]
    got = [m for o in out[len(msgs) :] for m in o["msgs"]]
    assert got == [plain(m) for m in msgs]
    d = Deframer()
    d.feed(stream)
    assert out[-1]["errors"] == errors(d) and out[-1]["garbage"] == d.garbage_bytes

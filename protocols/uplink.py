# citynode frame codec, formats v1 and v2, the part a host needs: verify and decode DATA and
# STATUS frames (uplink), any frame by type, read a frame's header unverified (peek) and encode
# ACKs (v1 for a v1 frame, v2 for a v2 one). Shares every primitive with frame.py (the node's
# half); see SPEC.md.

try:
    from collections import namedtuple
except ImportError:  # pragma: no cover - very small ports
    from ucollections import namedtuple

from protocols import frame as _frame
from protocols.arguments import check_u32 as _check_u32
from protocols.frame import (
    _FIRST_CODES,
    _INTERVALS,
    BME280_CHANNELS,
    MAX_FRAME,
    MAX_READINGS,
    MAX_U32,
    RICE_ESCAPE,
    TAG_LEN,
    TYPE_ACK,
    TYPE_DATA,
    TYPE_STATUS,
    VERSION,
    FrameError,
    _bit_length,
    _finish,
    _get_varint,
    _put_varint,
)

# frame.py's version 1 and a raw value's bounds are const()s, private to it on MicroPython
_V1 = 1
_I32_MIN = -(1 << 31)
_I32_MAX = (1 << 31) - 1
MAX_UE_ZEROS = 34  # an Exp-Golomb code longer than this is malformed
# index: the reading index of readings[0] (v2; reading i has index + i), None in a v1 frame;
# seq: the v1 frame's sequence number, None in a v2 frame. version: 1 or 2.
DataFrame = namedtuple(
    "DataFrame", ("node_id", "seq", "channels", "readings", "ages", "index", "version")
)
Status = namedtuple("Status", ("node_id", "seq", "fields", "version"))
# echo: the tag of the uplink frame a v2 ack acknowledges; None in a v1 ack.
Ack = namedtuple("Ack", ("node_id", "host_time", "acked", "echo"))

# Status frame fields (SPEC.md "Status frame"): id -> name.
STATUS_FIELDS = {
    1: "boot_count",
    2: "reset_cause",
    3: "free_heap",
    4: "journal_fill",
    5: "readings_dropped",
    6: "rssi_dbm",
    7: "fw_version",
    8: "sensor_faults",
    9: "uptime_s",
    10: "bme280_faults",  # per sensor, on nodes with config "sensors" (firmware/sensors.py)
    11: "sds011_faults",
    12: "pms5003_faults",
    13: "sps30_faults",
}


def _channel_coding(ch):
    """(base, k0) of the code of a channel's first value, as the encoder has them."""
    return _FIRST_CODES[ch] if ch < len(_FIRST_CODES) else _FIRST_CODES[0]


# Channel ids (SPEC.md "Channels"): id -> (quantity, scale, base, k0).
# value = raw / scale; the first value of a frame is coded as EG_k0(zigzag(raw - base)).
# Ids without an entry decode with base 0, k0 8 and scale 1, so a v1 decoder can carry a
# channel added later (as "channel_<id>") without a format change.
CHANNELS = {
    ch: (name, scale) + _channel_coding(ch)
    for ch, name, scale in (
        (1, "temperature_c", 100),  # 0.01 degC
        (2, "humidity_pct", 100),  # 0.01 %RH
        (3, "pressure_hpa", 100),  # 1 Pa = 0.01 hPa
        (4, "pm2_5_ugm3", 10),  # 0.1 ug/m3
        (5, "pm10_ugm3", 10),  # 0.1 ug/m3
        (6, "battery_v", 1000),  # 1 mV
    )
}


def quantity(ch):
    """(name, scale) of a channel id; unknown ids are carried as raw integers."""
    entry = CHANNELS.get(ch)
    if entry is None:
        return ("channel_%d" % ch, 1)
    return (entry[0], entry[1])


def _unzigzag(z):
    return (z >> 1) if not (z & 1) else -((z + 1) >> 1)


def _check_frame(buf, ftype_expected=None):
    n = len(buf)
    if n > MAX_FRAME:
        raise FrameError("too_long", "frame is %d bytes, at most %d allowed" % (n, MAX_FRAME))
    if n < 2 + TAG_LEN:
        raise FrameError("truncated", "frame is %d bytes, too short for any frame" % n)
    version = buf[0] >> 4
    ftype = buf[0] & 0x0F
    if version != VERSION and version != _V1:
        raise FrameError("version", "unsupported frame version %d (reads 1, 2)" % version)
    if ftype not in (TYPE_DATA, TYPE_ACK, TYPE_STATUS):
        raise FrameError("type", "unknown frame type %d" % ftype)
    if ftype_expected is not None and ftype != ftype_expected:
        raise FrameError("type", "expected frame type %d, got %d" % (ftype_expected, ftype))
    return ftype


def peek(buf):
    """(version, frame type, node id) from the header, unverified: for picking the key."""
    ftype = _check_frame(buf)
    node_id, _ = _get_varint(buf, 1, len(buf) - TAG_LEN, "node id")
    return buf[0] >> 4, ftype, node_id


def decode_ack(buf, signer):
    """Verify and decode an ACK frame (frame.decode_ack, as an Ack)."""
    _check_frame(buf, TYPE_ACK)  # what is wrong with a header, as the other decoders say it
    return Ack(*_frame.decode_ack(buf, signer))


def encode_ack(signer, node_id, host_time, acked, echo=None):
    """Signed ACK frame: host_time in unix seconds (UTC), acked a list of inclusive
    (first, last) ranges, sorted and disjoint. With echo (the 4-byte tag of the uplink frame
    acknowledged) a v2 ack whose ranges are reading indices; without, a v1 ack of seqs."""
    _check_u32(node_id, "node_id")
    _check_u32(host_time, "host_time")
    if len(acked) > 32:
        raise ValueError("an ack carries at most 32 ranges, got %d" % len(acked))
    buf = bytearray(20 + 32 * 10)  # header, time, echo, count, 32 ranges of two varints
    buf[0] = ((_V1 if echo is None else VERSION) << 4) | TYPE_ACK  # then node id, a varint
    pos = _put_varint(buf, 1, node_id)
    pos = _put_varint(buf, pos, host_time)
    if echo is not None:
        if len(echo) != TAG_LEN:
            raise ValueError("echo must be the %d-byte tag of a frame" % TAG_LEN)
        buf[pos : pos + TAG_LEN] = echo
        pos += TAG_LEN
    pos = _put_varint(buf, pos, len(acked))
    nxt = 0
    for first, last in acked:
        _check_u32(first, "acked seq")
        _check_u32(last, "acked seq")
        if first < nxt or last < first:
            raise ValueError("ack ranges must be sorted, disjoint and first <= last")
        pos = _put_varint(buf, pos, first - nxt)
        pos = _put_varint(buf, pos, last - first)
        nxt = last + 1
    return _finish(signer, buf, pos)


class _BitReader:
    """MSB-first bit reader over buf[start:end], held as one integer of the unread bits."""

    __slots__ = ("v", "left")

    def __init__(self, buf, start, end):
        self.v = int.from_bytes(bytes(buf[start:end]), "big")
        self.left = 8 * (end - start)  # bits not yet read

    def bits(self, n):
        left = self.left - n
        if left < 0:
            raise FrameError("truncated", "frame ends inside its readings")
        self.left = left
        value = self.v >> left
        self.v ^= value << left
        return value

    def ue(self, k=0):
        zeros = self.left - _bit_length(self.v)
        if zeros > MAX_UE_ZEROS:
            raise FrameError("structure", "Exp-Golomb code longer than 34 bits")
        # zeros, then m in zeros + 1 bits, then k low bits: value = ((m - 1) << k) | low
        return self.bits(2 * zeros + 1 + k) - (1 << k)

    def rice(self, k):
        left = self.left
        window = RICE_ESCAPE + 1 if left > RICE_ESCAPE else left
        head = self.v >> (left - window)  # the next bits, to count leading ones
        q = window - _bit_length(head ^ ((1 << window) - 1))
        if q >= RICE_ESCAPE:
            self.bits(RICE_ESCAPE)
            return self.ue()
        # q ones, a zero and k remainder bits in one read
        return (q << k) | (self.bits(q + 1 + k) & ((1 << k) - 1))

    def padding_ok(self):
        # Fewer than 8 bits may be left, and they must be zero.
        return self.left < 8 and self.v == 0


def decode(buf, signer):
    """Verify and decode any v1 or v2 frame: DataFrame, Ack or Status."""
    ftype = _check_frame(buf)
    if ftype == TYPE_DATA:
        return decode_data(buf, signer)
    if ftype == TYPE_ACK:
        return decode_ack(buf, signer)
    return decode_status(buf, signer)


def decode_data(buf, signer):
    _check_frame(buf, TYPE_DATA)
    end = signer.verify(buf)
    version = buf[0] >> 4
    node_id, pos = _get_varint(buf, 1, end, "node id")
    if version == _V1:
        seq, pos = _get_varint(buf, pos, end, "sequence number")
        index = None
    else:
        index, pos = _get_varint(buf, pos, end, "reading index")
        seq = None
    r = _BitReader(buf, pos, end)
    # The header's fields are read inline, over local copies of the reader's state (a method
    # call per field was a fifth of the time); rare shapes go through the reader's methods.
    v, left = r.v, r.left
    zeros = left - _bit_length(v)  # ue(0): count - 1
    if zeros > MAX_UE_ZEROS:
        raise FrameError("structure", "Exp-Golomb code longer than 34 bits")
    left -= 2 * zeros + 3  # the code, then the channel-set and timing flags
    if left < 0:
        raise FrameError("truncated", "frame ends inside its readings")
    x = v >> left
    v ^= x << left
    n = x >> 2  # m = count - 1 + 1
    flags = x & 3
    if n > MAX_READINGS:
        raise FrameError("structure", "reading count %d exceeds %d" % (n, MAX_READINGS))
    if index is not None and index + n - 1 > MAX_U32:
        raise FrameError("structure", "reading index exceeds 32 bits")
    r.v, r.left = v, left
    if flags & 2:
        channels = BME280_CHANNELS
    else:
        # the timing flag was read as part of the channel list: put it back
        r.v, r.left = v | ((flags & 1) << left), left + 1
        nch = r.ue() + 1
        if nch > 32:
            raise FrameError("structure", "channel count %d exceeds 32" % nch)
        channels = tuple(r.ue() for _ in range(nch))
        for ch in channels:
            if ch > MAX_U32:
                raise FrameError("structure", "channel id exceeds 32 bits")
        flags = r.bits(1)
    if flags & 1:
        newest = r.ue()
        if newest > MAX_U32:
            raise FrameError("structure", "reading age exceeds 32 bits")
        ages = _decode_times(r, n, newest) if n > 1 else [newest]
    else:
        if n != 1:
            raise FrameError("structure", "%d readings without timing" % n)
        ages = [0]
    columns = []
    for ch in channels:
        base, k0 = _channel_coding(ch)
        z = r.ue(k0)
        column = [base + ((z >> 1) ^ -(z & 1))]
        if n > 1:
            _rice_deltas(r, column, n - 1)
        if min(column) < _I32_MIN or max(column) > _I32_MAX:
            raise FrameError("structure", "value of channel %d overflows 32 bits" % ch)
        columns.append(column)
    if not r.padding_ok():
        raise FrameError("structure", "unexpected bytes after the readings")
    readings = list(zip(*columns))  # noqa: B905 - MicroPython's zip has no strict
    return DataFrame(node_id, seq, channels, readings, ages, index, version)


def _rice_deltas(r, column, count):
    """Read a channel's Rice parameter k (4 bits) and common factor g (ue), then append count
    values, each the previous plus g * a Rice(k)-coded zigzag delta.

    The hot loop of decoding, over local variables (CPython spends most of a 10-reading frame
    here): leading one bits are counted on the inverted stream, computed once."""
    k = r.bits(4)
    g = r.ue() + 1
    value = column[0]
    v = r.v
    nv = ~v  # its bits inverted, once: leading ones of v are leading zeros of nv
    left = r.left
    kmask = (1 << k) - 1
    wmask = (1 << (RICE_ESCAPE + 1)) - 1
    for _ in range(count):
        if left > RICE_ESCAPE:
            window = RICE_ESCAPE + 1
            q = window - _bit_length((nv >> (left - window)) & wmask)  # leading one bits
        else:
            window = left
            q = window - _bit_length(nv & ((1 << window) - 1))
        if q >= RICE_ESCAPE:
            r.v, r.left = v & ((1 << left) - 1), left
            z = r.rice(k)
            v, left = r.v, r.left
            nv = ~v
        else:
            left -= q + 1 + k
            if left < 0:
                raise FrameError("truncated", "frame ends inside its readings")
            z = (q << k) | ((v >> left) & kmask)
        value += g * ((z >> 1) ^ -(z & 1))  # zigzag back to signed
        column.append(value)
    r.v = v & ((1 << left) - 1)
    r.left = left


def _gap_corrections(r, count, interval):
    """count gaps, each interval + an ue(0)-coded zigzag correction (BitReader.ue inlined)."""
    v = r.v
    left = r.left
    gaps = []
    for _ in range(count):
        window = MAX_UE_ZEROS + 1 if left > MAX_UE_ZEROS else left
        head = (v >> (left - window)) & ((1 << window) - 1)
        zeros = window - _bit_length(head)
        if zeros > MAX_UE_ZEROS:
            raise FrameError("structure", "Exp-Golomb code longer than 34 bits")
        nbits = 2 * zeros + 1
        left -= nbits
        if left < 0:
            raise FrameError("truncated", "frame ends inside its readings")
        z = ((v >> left) & ((1 << nbits) - 1)) - 1
        gaps.append(interval + ((z >> 1) if not (z & 1) else -((z + 1) >> 1)))
    r.v = v & ((1 << left) - 1)
    r.left = left
    return gaps


def _decode_times(r, n, newest):
    if r.bits(1):
        interval = _INTERVALS[r.bits(3)]
    else:
        interval = r.ue(5)
    if r.bits(1):
        gaps = _gap_corrections(r, n - 1, interval)
    else:
        gaps = [interval] * (n - 1)
    ages = [0] * n
    age = newest
    ages[n - 1] = age
    for i in range(n - 2, -1, -1):
        gap = gaps[i]
        if gap < 0:
            raise FrameError("structure", "negative gap between readings")
        age += gap
        if age > MAX_U32:
            raise FrameError("structure", "reading age exceeds 32 bits")
        ages[i] = age
    return ages


def decode_status(buf, signer):
    _check_frame(buf, TYPE_STATUS)
    end = signer.verify(buf)
    node_id, pos = _get_varint(buf, 1, end, "node id")
    seq, pos = _get_varint(buf, pos, end, "sequence number")
    count, pos = _get_varint(buf, pos, end, "field count")
    fields = {}
    for _ in range(count):
        fid, pos = _get_varint(buf, pos, end, "status field id")
        z, pos = _get_varint(buf, pos, end, "status field value")
        fields[fid] = _unzigzag(z)
    if pos != end:
        raise FrameError("structure", "unexpected bytes after the status fields")
    return Status(node_id, seq, fields, buf[0] >> 4)

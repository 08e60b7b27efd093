# citynode frame codec, formats v1 and v2, the part a node needs: encode DATA and STATUS, decode
# ACK. A node writes v2 (every reading carries its index); v1 is written only for the vectors.
# With uplink.py (decode DATA and STATUS) the one implementation of protocols/SPEC.md; pure,
# sans-IO, and unchanged on MicroPython (ESP32, RP2, unix port) and CPython 3.11+. Split in
# two so that a node's 64 KB heap holds only the half it runs: what only a host needs (channel
# names and scales, the decoders' tables) lives in uplink.py.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


import hashlib

try:  # CPython: OpenSSL's one-shot HMAC
    import hmac as _hmac
except ImportError:  # MicroPython: HMAC (RFC 2104) built on hashlib.sha256 below
    _hmac = None

VERSION = const(2)  # what this codec writes (SPEC.md "Versions"); it reads 1 and 2
_V1 = const(1)
TYPE_DATA = const(1)
TYPE_ACK = const(2)
TYPE_STATUS = const(3)
KEY_LEN = const(16)
TAG_LEN = const(4)
MAX_FRAME = const(255)  # raw LoRa's largest payload; the same bound on every link
MAX_READINGS = const(255)
# encode_status writes one field past MAX_FRAME, then checks: its buffer is MAX_FRAME + 16
STATUS_BUF = const(271)
MAX_U32 = const(0xFFFFFFFF)
_I32_MIN = const(-(1 << 31))
_I32_MAX = const((1 << 31) - 1)
RICE_ESCAPE = const(12)  # a Rice quotient this large is sent as an Exp-Golomb escape
_MAX_K = const(15)  # Rice parameter fits 4 bits
# Sampling intervals (s) common enough to get a 3-bit code (SPEC.md "Timing").
_INTERVALS = (10, 30, 60, 120, 300, 600, 900, 3600)
# How a frame codes a channel's first value, EG_k0(zigzag(raw - base)) (SPEC.md "Channels"):
# (base, k0) of ids 0..3. Every other id, those of the PM sensors and the battery among them,
# has base 0 and k0 8. uplink.CHANNELS adds names and scales.
_FIRST_CODES = ((0, 8), (1500, 11), (5000, 12), (101325, 13))
BME280_CHANNELS = (1, 2, 3)


class FrameError(ValueError):
    """The codec's one error type. `reason` is a short code to count by; str() says what."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


# --- authentication ---------------------------------------------------------------------


class Signer:
    """Computes and checks tags: HMAC-SHA256 under a node's 128-bit key, first 4 bytes."""

    def __init__(self, key):
        ok = isinstance(key, (bytes, bytearray))
        if not ok or len(key) != KEY_LEN:
            got = len(key) if ok else type(key).__name__
            raise FrameError("key", "key must be 16 bytes, got %s" % got)
        self._key = bytes(key)
        if _hmac is None:  # the key, zero-padded to SHA-256's 64-byte block, xor 0x36 and 0x5C
            self._ipad = ipad = bytearray(64)
            self._opad = opad = bytearray(64)
            for i in range(64):
                b = key[i] if i < KEY_LEN else 0
                ipad[i] = b ^ 0x36
                opad[i] = b ^ 0x5C

    def tag(self, data):
        if _hmac is not None:
            return _hmac.digest(self._key, data, "sha256")[:TAG_LEN]
        h = hashlib.sha256(self._ipad)
        h.update(data)
        inner = h.digest()
        # Dropped before the outer hash is made: in a full heap the collection that allocation
        # may need frees the inner one's block, which the outer one then takes.
        h = None
        h = hashlib.sha256(self._opad)
        h.update(inner)
        return h.digest()[:TAG_LEN]

    def verify(self, buf):
        """Check the tag at the end of buf; return the length of the authenticated part."""
        end = len(buf) - TAG_LEN
        mv = memoryview(buf)
        expected = self.tag(mv[:end])
        diff = 0
        for i in range(TAG_LEN):
            diff |= expected[i] ^ buf[end + i]
        if diff:
            raise FrameError("tag", "bad tag (wrong key or corrupted frame)")
        return end


# --- bit and byte primitives ------------------------------------------------------------


class _BitWriter:
    """MSB-first bit writer into a frame's buffer; the accumulator stays a small int. Bytes
    past the room the tag leaves are counted, not written: _finish says the frame is too long."""

    def __init__(self, buf, pos):
        self.buf = buf
        self.pos = pos  # byte position of the next whole byte
        self.acc = 0
        self.fill = 0  # bits pending in acc (0..7)

    def bits(self, value, n):
        """The low n bits of value."""
        acc = self.acc
        fill = self.fill
        while n > 0:
            take = 8 - fill
            if take > n:
                take = n
            n -= take
            acc = (acc << take) | ((value >> n) & ((1 << take) - 1))
            fill += take
            if fill == 8:
                if self.pos < MAX_FRAME - TAG_LEN:
                    self.buf[self.pos] = acc
                self.pos += 1
                acc = 0
                fill = 0
        self.acc = acc
        self.fill = fill

    def ue(self, value, k=0):
        """Exp-Golomb code of order k for value >= 0."""
        m = (value >> k) + 1
        nbits = _bit_length(m)
        self.bits(0, nbits - 1)
        self.bits(m, nbits)
        self.bits(value, k)


try:
    _bit_length = int.bit_length
except AttributeError:  # MicroPython ints have no bit_length()

    def _bit_length(n):
        b = 0
        while n:
            n >>= 1
            b += 1
        return b


def _zigzag(v):
    return (v << 1) if v >= 0 else ((-v << 1) - 1)


def _put_varint(buf, pos, value):
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            buf[pos] = byte | 0x80
            pos += 1
        else:
            buf[pos] = byte
            return pos + 1


def _get_varint(buf, pos, end, what):
    value = 0
    shift = 0
    while True:
        if pos >= end:
            raise FrameError("truncated", "frame ends inside %s" % what)
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
        if shift > 28:
            raise FrameError("structure", "%s is longer than 5 bytes" % what)
    if value > MAX_U32:
        raise FrameError("structure", "%s exceeds 32 bits" % what)
    return value, pos


def _u32(v):
    return isinstance(v, int) and 0 <= v <= MAX_U32


def _i32(v):
    return isinstance(v, int) and _I32_MIN <= v <= _I32_MAX


# --- frames -----------------------------------------------------------------------------


def _finish(signer, buf, pos):
    if pos + TAG_LEN > MAX_FRAME:
        raise FrameError("too_long", "frame would exceed %d bytes" % MAX_FRAME)
    buf[pos : pos + TAG_LEN] = signer.tag(memoryview(buf)[:pos])
    return bytes(memoryview(buf)[: pos + TAG_LEN])


def encode_data(signer, node_id, index, channels, readings, ages, buf=None, version=VERSION):
    """Encode readings (oldest first; one tuple of raw ints per reading, one int per channel)
    with their ages (whole seconds before sending, oldest first, non-increasing) into a
    signed DATA frame. index: the reading index of the first reading (v2; readings i has index
    + i), or the frame's seq with version=1. Raises ValueError on bad arguments,
    FrameError("too_long") if the batch does not fit in MAX_FRAME bytes. buf: a bytearray of
    MAX_FRAME bytes to build the frame in (a node allocates it once)."""
    # The arguments are checked here without words; what is wrong is told by
    # protocols/arguments.py, loaded then (a node never passes bad ones: its heap does not
    # carry the messages).
    n = len(readings)
    nch = len(channels)
    ok = _u32(node_id) and _u32(index) and 0 < n <= MAX_READINGS and len(ages) == n and nch
    ok = ok and (version < 2 or _u32(index + n - 1))
    for ch in channels:
        ok = ok and _u32(ch)
    prev = MAX_U32
    for a in ages:
        ok = ok and _u32(a) and a <= prev
        prev = a
    for r in readings:
        ok = ok and len(r) == nch
        for v in r:
            ok = ok and _i32(v)
    if not ok:
        from protocols import arguments

        arguments.check_data(node_id, index, channels, readings, ages, version)

    if buf is None:
        buf = bytearray(MAX_FRAME)
    buf[0] = (version << 4) | TYPE_DATA  # then node id and index (v1: seq), varints
    w = _BitWriter(buf, _put_varint(buf, _put_varint(buf, 1, node_id), index))
    w.ue(n - 1)
    if tuple(channels) == BME280_CHANNELS:
        w.bits(1, 1)
    else:
        w.bits(0, 1)
        w.ue(nch - 1)
        for ch in channels:
            w.ue(ch)
    newest = ages[n - 1]
    if n == 1 and newest == 0:
        w.bits(0, 1)
    else:
        w.bits(1, 1)
        w.ue(newest)
        if n > 1:
            _encode_times(w, ages, n)
    for c in range(nch):
        ch = channels[c]
        base, k0 = _FIRST_CODES[ch] if ch < len(_FIRST_CODES) else _FIRST_CODES[0]
        w.ue(_zigzag(readings[0][c] - base), k0)
        if n > 1:
            _encode_deltas(w, readings, c, n)
    w.bits(0, -w.fill & 7)  # zero bits up to a whole byte
    return _finish(signer, buf, w.pos)


def _encode_times(w, ages, n):
    # The interval is the commonest gap, of equally common ones the smallest (SPEC.md);
    # irregular frames add one signed correction a reading.
    gaps = []
    for i in range(1, n):
        gaps.append(ages[i - 1] - ages[i])
    interval = gaps[0]
    most = 0  # how many gaps are the interval
    for g in gaps:
        count = gaps.count(g)
        if count > most or (count == most and g < interval):
            interval = g
            most = count
    if interval in _INTERVALS:
        w.bits(0b1000 | _INTERVALS.index(interval), 4)
    else:
        w.bits(0, 1)
        w.ue(interval, 5)
    if most == n - 1:
        w.bits(0, 1)  # regular
    else:
        w.bits(1, 1)
        for g in gaps:
            w.ue(_zigzag(g - interval))


def _encode_deltas(w, readings, c, n):
    # Channel c's deltas, divided by their greatest common factor g, are Rice coded with the
    # parameter k 0..15 that takes the fewest bits; ties keep the smaller k (SPEC.md).
    zz = []
    g = 0
    for i in range(1, n):
        d = readings[i][c] - readings[i - 1][c]
        zz.append(d)
        d = abs(d)
        while d:  # Euclid: g = gcd(g, d)
            g, d = d, g % d
    if g == 0:
        g = 1
    for i in range(n - 1):
        zz[i] = _zigzag(zz[i] // g)
    k = 0
    best_bits = -1
    for kk in range(_MAX_K + 1):
        total = 0
        for z in zz:
            q = z >> kk
            if q < RICE_ESCAPE:
                total += q + 1 + kk
            else:
                total += RICE_ESCAPE + 2 * _bit_length(z + 1) - 1
        if best_bits < 0 or total < best_bits:
            k = kk
            best_bits = total
    w.bits(k, 4)
    w.ue(g - 1)
    for z in zz:
        q = z >> k
        if q < RICE_ESCAPE:
            w.bits((1 << (q + 1)) - 2, q + 1)  # q ones then a zero
            w.bits(z, k)
        else:
            w.bits((1 << RICE_ESCAPE) - 1, RICE_ESCAPE)
            w.ue(z)


def decode_ack(buf, signer, node_id=None):
    """Verify and decode an ACK frame: (node id, host time, acked ranges, echo). v2: the ranges
    are reading indices and echo is the tag of the uplink frame acknowledged; v1: seq ranges and
    echo None. With node_id, an ack addressed to another node raises FrameError("other_node")
    before the tag is computed (on LoRa every node hears every ack)."""
    # uplink._check_frame's checks, in its order, with one message: a node only logs it
    n = len(buf)
    head = buf[0] if n else 0
    if n > MAX_FRAME:
        reason = "too_long"
    elif n < 2 + TAG_LEN:
        reason = "truncated"
    elif head >> 4 != VERSION and head >> 4 != _V1:
        reason = "version"
    elif head & 0x0F != TYPE_ACK:
        reason = "type"
    else:
        reason = None
    if reason:
        raise FrameError(reason, "not a v1 or v2 ack frame: %d bytes, header 0x%02x" % (n, head))
    if node_id is not None:
        to, _ = _get_varint(buf, 1, n - TAG_LEN, "node id")
        if to != node_id:
            raise FrameError("other_node", "ack for node %d" % to)
    end = signer.verify(buf)
    node_id, pos = _get_varint(buf, 1, end, "node id")
    host_time, pos = _get_varint(buf, pos, end, "host time")
    echo = None
    if head >> 4 != _V1:
        echo = bytes(buf[pos : pos + TAG_LEN])
        pos += TAG_LEN
        if pos > end:
            raise FrameError("truncated", "frame ends inside the echoed tag")
    count, pos = _get_varint(buf, pos, end, "range count")
    if count > 32:
        raise FrameError("structure", "ack range count %d exceeds 32" % count)
    acked = []
    nxt = 0
    for _ in range(count):
        gap, pos = _get_varint(buf, pos, end, "acked seq")
        span, pos = _get_varint(buf, pos, end, "acked span")
        first = nxt + gap
        last = first + span
        if last > MAX_U32:
            raise FrameError("structure", "acked seq exceeds 32 bits")
        acked.append((first, last))
        nxt = last + 1
    if pos != end:
        raise FrameError("structure", "unexpected bytes after the ack ranges")
    return node_id, host_time, acked, echo


def encode_status(signer, node_id, seq, fields, buf=None, version=VERSION):
    """Signed STATUS frame: fields a dict {field id: signed int} (see uplink.STATUS_FIELDS).
    buf: a bytearray of at least STATUS_BUF bytes to build it in (a node allocates it once)."""
    ok = _u32(node_id) and _u32(seq)
    for fid in fields:
        ok = ok and _u32(fid) and _i32(fields[fid])
    if not ok:  # what is wrong: protocols/arguments.py, as for encode_data
        from protocols import arguments

        arguments.check_status(node_id, seq, fields)
    if buf is None or len(buf) < STATUS_BUF:
        buf = bytearray(STATUS_BUF)
    buf[0] = (version << 4) | TYPE_STATUS  # then node id, seq and field count, varints
    pos = _put_varint(buf, _put_varint(buf, 1, node_id), seq)
    pos = _put_varint(buf, pos, len(fields))
    for fid in sorted(fields):
        v = fields[fid]
        pos = _put_varint(buf, pos, fid)  # buf has room for one more field past MAX_FRAME
        pos = _put_varint(buf, pos, _zigzag(v))
        if pos + TAG_LEN > MAX_FRAME:
            break  # too long: _finish raises
    return _finish(signer, buf, pos)

# Gateway <-> host link (protocols/GATEWAY.md): the messages a LoRa gateway node and the host
# exchange over USB serial or UDP, COBS-framed with a CRC-32 each. Sans-IO, on MicroPython and
# CPython: the gateway firmware and the host's serial source both import it.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


import struct

try:
    from binascii import crc32 as _crc32
except ImportError:  # a port built without binascii.crc32
    _crc32 = None

try:
    from collections import namedtuple
except ImportError:  # pragma: no cover - very small ports
    from ucollections import namedtuple

VERSION = const(1)
UPLINK = const(1)  # gateway -> host: a LoRa frame received
DOWNLINK = const(2)  # host -> gateway: transmit this frame to a node
STATUS = const(3)  # gateway -> host: a status or log line
TX_RESULT = const(4)  # gateway -> host: what became of a DOWNLINK

# TX_RESULT codes (GATEWAY.md "Downlinks")
SENT = const(0)
TOO_LATE = const(1)
TOO_EARLY = const(2)
DUTY_CYCLE = const(3)
BUSY = const(4)
REJECTED = const(5)
RESULTS = ("sent", "too_late", "too_early", "duty_cycle", "busy", "rejected")

FLAG_CRC_OK = const(1)  # UPLINK flags bit 0: the LoRa payload CRC was valid
RX_DELAY_MS = const(2000)  # ack starts this long after the uplink ended (GATEWAY.md "Timing")
MAX_AHEAD_MS = const(60000)  # a DOWNLINK further ahead than this is answered too_early
LEVELS = b"DIWE"  # STATUS level bytes, as the node log's levels

MAX_PAYLOAD = const(255)  # raw LoRa's largest payload
MAX_TEXT = const(240)  # STATUS text, UTF-8 bytes
CRC_LEN = const(4)
# the largest body: an UPLINK, 24 bytes of fields before its payload, then the CRC
MAX_BODY = const(24 + 255 + 4)
MAX_ENCODED = const(MAX_BODY + 2)  # COBS adds one byte per 254, and one

_UPLINK = ">IHIIIhbBB"  # gw_id seq rx_ms airtime_us freq_khz rssi snr_x4 sf flags
_DOWNLINK = ">IHIIbB"  # gw_id msg_id tx_at_ms freq_khz tx_power_dbm sf
_STATUS = ">IHIB"  # gw_id seq now_ms level
_TX_RESULT = ">IHIHB"  # gw_id seq now_ms msg_id result
_UPLINK_LEN = const(23)
_DOWNLINK_LEN = const(16)
_STATUS_LEN = const(11)
_TX_RESULT_LEN = const(13)

Uplink = namedtuple(
    "Uplink",
    (
        "gw_id",
        "seq",
        "rx_ms",
        "airtime_us",
        "freq_khz",
        "rssi",
        "snr_x4",
        "sf",
        "flags",
        "payload",
    ),
)
Downlink = namedtuple(
    "Downlink", ("gw_id", "msg_id", "tx_at_ms", "freq_khz", "tx_power_dbm", "sf", "payload")
)
Status = namedtuple("Status", ("gw_id", "seq", "now_ms", "level", "text"))
TxResult = namedtuple("TxResult", ("gw_id", "seq", "now_ms", "msg_id", "result"))


# --- CRC-32 (IEEE 802.3, as zlib and binascii) ------------------------------------------

_table = []


def crc32(data):
    """CRC-32 of data: binascii's where the port has it, else bitwise with a 1 KB table."""
    if _crc32 is not None:
        return _crc32(data) & 0xFFFFFFFF
    table = _table
    if not table:
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
            table.append(c)
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# --- COBS (Cheshire and Baker, IEEE/ACM ToN 7(2), 1999) ---------------------------------


def cobs_encode(src, n, dst, d):
    """COBS-encode src[:n] into dst from index d; returns the index after the last byte.
    A run of 254 non-zero bytes at the very end takes no extra code byte."""
    code_at = d
    d += 1
    code = 1
    for i in range(n):
        b = src[i]
        if b:
            dst[d] = b
            d += 1
            code += 1
            if code == 0xFF and i + 1 < n:
                dst[code_at] = code
                code_at = d
                d += 1
                code = 1
        else:
            dst[code_at] = code
            code_at = d
            d += 1
            code = 1
    dst[code_at] = code
    return d


def cobs_decode(src, n, dst):
    """Decode src[:n] (no zero bytes) into dst; returns the length, or -1 if a code byte
    points past the end or the output would not fit in dst."""
    i = 0
    d = 0
    cap = len(dst)
    while i < n:
        code = src[i]
        if code == 0:
            return -1
        end = i + code
        if end > n or d + code > cap:
            return -1
        i += 1
        while i < end:
            dst[d] = src[i]
            d += 1
            i += 1
        if code < 0xFF and i < n:
            dst[d] = 0
            d += 1
    return d


# --- messages ---------------------------------------------------------------------------


def _check(value, lo, hi, what):
    if not isinstance(value, int) or value < lo or value > hi:
        raise ValueError("%s must be an integer %d..%d, got %r" % (what, lo, hi, value))


def encode(msg):
    """One message as it goes on the line: 0x00, COBS(body + CRC-32), 0x00. ValueError if a
    field is out of range (the sender's bug: nothing is truncated silently)."""
    body = bytearray(MAX_BODY)
    if isinstance(msg, Uplink):
        _check(msg.gw_id, 0, 0xFFFFFFFF, "gw_id")
        _check(msg.seq, 0, 0xFFFF, "seq")
        _check(msg.rx_ms, 0, 0xFFFFFFFF, "rx_ms")
        _check(msg.airtime_us, 0, 0xFFFFFFFF, "airtime_us")
        _check(msg.freq_khz, 0, 0xFFFFFFFF, "freq_khz")
        _check(msg.rssi, -32768, 32767, "rssi")
        _check(msg.snr_x4, -128, 127, "snr_x4")
        _check(msg.sf, 0, 255, "sf")
        _check(msg.flags, 0, 255, "flags")
        body[0] = (VERSION << 4) | UPLINK
        struct.pack_into(
            _UPLINK,
            body,
            1,
            msg.gw_id,
            msg.seq,
            msg.rx_ms,
            msg.airtime_us,
            msg.freq_khz,
            msg.rssi,
            msg.snr_x4,
            msg.sf,
            msg.flags,
        )
        pos = _put(body, 1 + _UPLINK_LEN, msg.payload, MAX_PAYLOAD, "payload")
    elif isinstance(msg, Downlink):
        _check(msg.gw_id, 0, 0xFFFFFFFF, "gw_id")
        _check(msg.msg_id, 0, 0xFFFF, "msg_id")
        _check(msg.tx_at_ms, 0, 0xFFFFFFFF, "tx_at_ms")
        _check(msg.freq_khz, 0, 0xFFFFFFFF, "freq_khz")
        _check(msg.tx_power_dbm, -128, 127, "tx_power_dbm")
        _check(msg.sf, 0, 255, "sf")
        body[0] = (VERSION << 4) | DOWNLINK
        struct.pack_into(
            _DOWNLINK,
            body,
            1,
            msg.gw_id,
            msg.msg_id,
            msg.tx_at_ms,
            msg.freq_khz,
            msg.tx_power_dbm,
            msg.sf,
        )
        pos = _put(body, 1 + _DOWNLINK_LEN, msg.payload, MAX_PAYLOAD, "payload")
    elif isinstance(msg, Status):
        _check(msg.gw_id, 0, 0xFFFFFFFF, "gw_id")
        _check(msg.seq, 0, 0xFFFF, "seq")
        _check(msg.now_ms, 0, 0xFFFFFFFF, "now_ms")
        _check(msg.level, 0, 255, "level")
        body[0] = (VERSION << 4) | STATUS
        struct.pack_into(_STATUS, body, 1, msg.gw_id, msg.seq, msg.now_ms, msg.level)
        text = msg.text.encode("utf-8") if isinstance(msg.text, str) else msg.text
        pos = _put(body, 1 + _STATUS_LEN, text, MAX_TEXT, "text")
    elif isinstance(msg, TxResult):
        _check(msg.gw_id, 0, 0xFFFFFFFF, "gw_id")
        _check(msg.seq, 0, 0xFFFF, "seq")
        _check(msg.now_ms, 0, 0xFFFFFFFF, "now_ms")
        _check(msg.msg_id, 0, 0xFFFF, "msg_id")
        _check(msg.result, 0, 255, "result")
        body[0] = (VERSION << 4) | TX_RESULT
        struct.pack_into(
            _TX_RESULT, body, 1, msg.gw_id, msg.seq, msg.now_ms, msg.msg_id, msg.result
        )
        pos = 1 + _TX_RESULT_LEN
    else:
        raise TypeError("not a gateway link message: %r" % (msg,))
    struct.pack_into(">I", body, pos, crc32(memoryview(body)[:pos]))
    pos += CRC_LEN
    out = bytearray(pos + pos // 254 + 3)
    out[0] = 0
    end = cobs_encode(body, pos, out, 1)
    out[end] = 0
    return bytes(memoryview(out)[: end + 1])


def _put(body, pos, data, limit, what):
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError("%s must be bytes, got %s" % (what, type(data).__name__))
    n = len(data)
    if n > limit:
        raise ValueError("%s is %d bytes, at most %d allowed" % (what, n, limit))
    body[pos : pos + n] = data
    return pos + n


class Deframer:
    """Bytes from the line in, messages out: feed() takes any chunk (a partial message, many
    messages, garbage) and returns the messages completed by it. Never raises on what the
    line brings; counts instead:
        messages       intact messages returned
        bad_crc        frames whose CRC-32 did not match (corrupted, or garbage)
        bad_cobs       frames that are not valid COBS
        oversize       frames longer than any message (discarded up to the next 0x00)
        too_short      frames shorter than a header and a CRC
        bad_message    frames with a good CRC that are no message of this version
        garbage_bytes  bytes of every discarded frame
    Only a non-bytes argument raises (TypeError). RAM: two buffers of MAX_ENCODED bytes."""

    def __init__(self):
        self._buf = bytearray(MAX_ENCODED)
        self._body = bytearray(MAX_ENCODED)
        self._n = 0
        self._discarding = False
        self.messages = 0
        self.bad_crc = 0
        self.bad_cobs = 0
        self.oversize = 0
        self.too_short = 0
        self.bad_message = 0
        self.garbage_bytes = 0
        self.last_error = None  # what the last discarded frame was, for a log line

    def reset(self):
        """Forget a partial frame (the line was closed); its bytes count as garbage."""
        self.garbage_bytes += self._n
        self._n = 0
        self._discarding = False

    def pending(self):
        """Bytes of an unfinished frame held."""
        return self._n

    def feed(self, data):
        if isinstance(data, memoryview):
            data = bytes(data)
        elif not isinstance(data, (bytes, bytearray)):
            raise TypeError("feed() takes bytes, got %s" % type(data).__name__)
        out = []
        buf = self._buf
        cap = len(buf)
        n = len(data)
        pos = 0
        mv = memoryview(data)
        while pos < n:
            z = data.find(b"\x00", pos)
            end = n if z < 0 else z
            chunk = end - pos
            if self._discarding:
                self.garbage_bytes += chunk
            elif self._n + chunk > cap:
                self.oversize += 1
                self.last_error = "oversize"
                self.garbage_bytes += self._n + chunk
                self._n = 0
                self._discarding = True
            elif chunk:
                buf[self._n : self._n + chunk] = mv[pos:end]
                self._n += chunk
            if z < 0:
                break
            if self._discarding:
                self._discarding = False
            elif self._n:
                msg = self._frame(self._n)
                if msg is not None:
                    out.append(msg)
            self._n = 0
            pos = z + 1
        return out

    def _drop(self, n, why):
        self.garbage_bytes += n
        self.last_error = why
        return None

    def _frame(self, n):
        body = self._body
        m = cobs_decode(self._buf, n, body)
        if m < 0:
            self.bad_cobs += 1
            return self._drop(n, "bad_cobs")
        if m < 1 + CRC_LEN:
            self.too_short += 1
            return self._drop(n, "too_short")
        mv = memoryview(body)
        (crc,) = struct.unpack_from(">I", body, m - CRC_LEN)
        if crc32(mv[: m - CRC_LEN]) != crc:
            self.bad_crc += 1
            return self._drop(n, "bad_crc")
        msg = _parse(body, m - CRC_LEN)
        if msg is None:
            self.bad_message += 1
            return self._drop(n, "bad_message")
        self.messages += 1
        return msg


def _parse(body, m):
    """The message in body[:m] (CRC already checked), or None if it is none of this version."""
    head = body[0]
    if head >> 4 != VERSION:
        return None
    kind = head & 0x0F
    if kind == UPLINK:
        if m < 1 + _UPLINK_LEN or m - 1 - _UPLINK_LEN > MAX_PAYLOAD:
            return None
        f = struct.unpack_from(_UPLINK, body, 1)
        payload = bytes(body[1 + _UPLINK_LEN : m])
        return Uplink(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], payload)
    if kind == DOWNLINK:
        if m < 1 + _DOWNLINK_LEN or m - 1 - _DOWNLINK_LEN > MAX_PAYLOAD:
            return None
        f = struct.unpack_from(_DOWNLINK, body, 1)
        payload = bytes(body[1 + _DOWNLINK_LEN : m])
        return Downlink(f[0], f[1], f[2], f[3], f[4], f[5], payload)
    if kind == STATUS:
        if m < 1 + _STATUS_LEN or m - 1 - _STATUS_LEN > MAX_TEXT:
            return None
        f = struct.unpack_from(_STATUS, body, 1)
        try:
            text = bytes(body[1 + _STATUS_LEN : m]).decode("utf-8")
        except UnicodeError:
            return None
        return Status(f[0], f[1], f[2], f[3], text)
    if kind == TX_RESULT:
        if m != 1 + _TX_RESULT_LEN:
            return None
        f = struct.unpack_from(_TX_RESULT, body, 1)
        return TxResult(f[0], f[1], f[2], f[3], f[4])
    return None


def result_name(code):
    """ "sent", "too_late", ... for a TX_RESULT code; "result_<n>" for an unknown one."""
    if 0 <= code < len(RESULTS):
        return RESULTS[code]
    return "result_%d" % code

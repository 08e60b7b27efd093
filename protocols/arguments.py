# Why frame.encode_data or frame.encode_status refused their arguments: the ValueError that
# names what is wrong. frame.py checks its arguments without words and loads this module only
# when they are bad (a caller's mistake, never a frame from the air): a node, which passes only
# its own readings, does not carry these messages on its heap. Same checks, same order.

from protocols.frame import MAX_READINGS, MAX_U32

_I32_MIN = -(1 << 31)
_I32_MAX = (1 << 31) - 1


def check_u32(value, what):
    if not isinstance(value, int) or value < 0 or value > MAX_U32:
        raise ValueError("%s must be an integer 0..4294967295, got %r" % (what, value))


def check_data(node_id, index, channels, readings, ages, version):
    check_u32(node_id, "node_id")
    check_u32(index, "seq")  # v1; in v2 the first reading's index
    n = len(readings)
    if n < 1 or n > MAX_READINGS:
        raise ValueError("a frame holds 1..%d readings, got %d" % (MAX_READINGS, n))
    if version > 1:
        check_u32(index + n - 1, "last reading index")
    if len(ages) != n:
        raise ValueError("%d readings but %d ages" % (n, len(ages)))
    nch = len(channels)
    if nch < 1:
        raise ValueError("a frame needs at least one channel")
    for ch in channels:
        check_u32(ch, "channel id")
    prev = MAX_U32
    for a in ages:
        check_u32(a, "age")
        if a > prev:
            raise ValueError("ages must not increase (readings oldest first)")
        prev = a
    for r in readings:
        if len(r) != nch:
            raise ValueError("reading has %d values for %d channels" % (len(r), nch))
        for v in r:
            if not isinstance(v, int) or v < _I32_MIN or v > _I32_MAX:
                raise ValueError("raw value %r is not a 32-bit signed integer" % (v,))
    raise ValueError("frame.encode_data: arguments refused")  # the two checks disagree: a bug


def check_status(node_id, seq, fields):
    check_u32(node_id, "node_id")
    check_u32(seq, "seq")
    for fid in sorted(fields):
        check_u32(fid, "status field id")
        v = fields[fid]
        if not isinstance(v, int) or v < _I32_MIN or v > _I32_MAX:
            raise ValueError("status field %d: %r is not a 32-bit signed integer" % (fid, v))
    raise ValueError("frame.encode_status: arguments refused")  # the two checks disagree: a bug

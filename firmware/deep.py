# Deep sleep (config "idle": "deep", boards/hw.py): the node runs one cycle a wake and keeps
# in RTC memory what the next wake needs to go on as the same boot: the boot count, the sequence
# numbers' state (no flash write a wake) and the node's counters. Loaded only by such nodes.

import struct

# Counters a deep-sleeping node keeps in RTC memory (after the boot count and the sequence
# state): a wake goes on where the last cycle stopped.
_KEPT = (
    "sampled",
    "sensor_faults",
    "journal_errors",
    "unplaceable",
    "frames_sent",
    "frames_acked",
    "acks_rejected",
    "bytes_sent",
    "status_sent",
)


_HEAD = "<HII"  # boot count, the sequence counter's next value and reserved bound
_HEAD_LEN = 10


def state(node):
    """What the node keeps through a deep sleep, as bytes (bringup.prepare reads the boot count,
    wiring.py the sequence state, restore() the rest)."""
    vals = [node.boot[0]] + list(node.seq)
    vals += [node.cycles, node.awake_ms_total, node._misses, node._backoff, node._status_due]
    vals += [node.stats[k] for k in _KEPT]
    return struct.pack(_HEAD + "%dI" % (len(vals) - 3), *vals)


def restore(node, wake):
    """The node's counters from a kept state (after the head bringup.py and wiring.py read)."""
    vals = struct.unpack_from("<%dI" % ((len(wake) - _HEAD_LEN) // 4), wake, _HEAD_LEN)
    node.cycles, node.awake_ms_total, node._misses, node._backoff = vals[:4]
    node._status_due = vals[4]
    for i in range(min(len(_KEPT), len(vals) - 5)):
        node.stats[_KEPT[i]] = vals[5 + i]

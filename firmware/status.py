# A node's STATUS frame (protocols/SPEC.md "STATUS frame"): boot count, reset cause, free heap,
# readings waiting and dropped, firmware version, faults, uptime. Sent at boot, every
# status_every_s and within the hour after trouble (firmware/node.py), so rarely that this code
# is loaded to build one frame and unloaded after. A running node keeps only the sequence
# counter's state, node.seq = (next seq, reserved bound), and loads the counter's code
# (firmware/seq.py) only to reserve more seqs on flash.

from firmware import FW_VERSION
from protocols import frame


def encode(node, free_heap):
    """(the node's STATUS frame, its seq). STATUS frames alone take seqs (format v2: a reading
    has its index); a seq is reserved on flash before it is used (firmware/seq.py), RESERVE at
    a time."""
    fields = {
        1: node.boot[0],
        2: node.boot[1],
        3: free_heap,
        4: len(node.journal),
        5: node.journal.dropped + node.stats["unplaceable"],
        6: node.link.rssi,
        7: 0,
        8: node.stats["sensor_faults"],
        9: node.board.ticks_ms() // 1000,
    }
    # the firmware version as major * 10000 + minor * 100 + patch (SPEC.md, status field 7)
    for v in FW_VERSION.split("."):
        fields[7] = fields[7] * 100 + int(v)
    seq, bound = node.seq
    if seq >= bound:  # not reserved on flash yet: firmware/seq.py reserves more (every 64th)
        from firmware.seq import Sequence

        counter = Sequence(resume=node.seq)
        seq = counter.take()
        bound = counter.state()[1]
    node.seq = (seq + 1, bound)
    if node.cfg.sensors:  # faults per sensor (firmware/sensors.py, SPEC.md fields 10-13)
        node.sensor.update(fields)
    return frame.encode_status(node.signer, node.cfg.node_id, seq, fields, node._frame_buf), seq

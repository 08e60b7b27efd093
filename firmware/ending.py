# The end of a simulated world (boards/sim/board.py says so; hardware never ends): once the node
# has sent what it still holds (Node.run), it logs its counters, which the fleet simulator reads
# (host_tools/sim/fleet.py). Its own module so that a running node's heap does not carry it.

import gc


def report(node):
    """The node's counters, once it has sent what it held (Node.run)."""
    extra = {
        "pending": len(node.journal),
        "dropped": node.journal.dropped,
        # awake time per cycle on the board's clock (simulated: sensor conversion, radio, acks)
        "awake_ms_per_cycle": node.awake_ms_total // max(1, node.cycles),
    }
    governor = getattr(node.link, "governor", None)
    if governor is not None:
        extra["airtime_ms"] = governor.airtime_ms
        extra["deferred"] = node.link.deferred
    gc.collect()
    extra["free_heap"] = gc.mem_free()
    for fields in (node.stats, extra):
        # In lines of at most 4 fields: one line of them all needs a 250-byte hole in the heap.
        keys = sorted(fields)
        for i in range(0, len(keys), 4):
            node.log.info("node", "stopped", **{k: fields[k] for k in keys[i : i + 4]})

# The application's entry: build the node or gateway (firmware/wiring.py, then unloaded), run it;
# report, never halt. On a board, the root /main.py does `from firmware import app; app.run()`.

import gc
import sys

from firmware import unload

LAST_LOG = "lastlog.txt"


def run():
    from firmware import wiring

    role, log, board, wdt_ms = wiring.build()
    wiring = None
    unload("wiring")
    if role is None:
        return
    wdt = board.wdt(wdt_ms)
    try:
        if type(role) is tuple:  # a node's parts: built now that wiring's code is off the heap
            gc.collect()
            from firmware.node import Node

            role = Node(*role)
        role.run(wdt)
    except Exception as e:  # the last resort: log, keep the evidence, reset
        log.error(getattr(role, "ROLE", "node"), "crashed", exc=type(e).__name__, error=str(e))
        if hasattr(sys, "print_exception"):
            sys.print_exception(e)
        log.save(LAST_LOG, "crash")
        board.reset()

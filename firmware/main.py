# Boot entry: build the node or gateway (firmware/start.py, then dropped), run it; report, never
# halt. On a board, /main.py does `from firmware import main; main.run()`.

import sys

LAST_LOG = "lastlog.txt"


def run():
    from firmware import start

    role, log, board, wdt_ms = start.build()
    start.drop(("start",))
    start = None
    if role is None:
        return
    wdt = board.wdt(wdt_ms)
    try:
        role.run(wdt)
    except Exception as e:  # the last resort: log, keep the evidence, reset
        log.error(role.ROLE, "crashed", exc=type(e).__name__, error=str(e))
        if hasattr(sys, "print_exception"):
            sys.print_exception(e)
        log.save(LAST_LOG, "crash")
        board.reset()

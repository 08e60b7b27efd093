# Boot entry: prepare (firmware/boot.py), build the node, run it; report, never halt.
# On a board, /main.py does `from firmware import main; main.run()`.

import gc
import sys

LAST_LOG = "lastlog.txt"
_RETRY_MS = 10000


def _drop(package, names):
    """Forget modules that are done, so their code leaves the heap (a 64 KB board needs it)."""
    for name in names:
        sys.modules.pop(package.__name__ + "." + name, None)
        if hasattr(package, name):
            delattr(package, name)
    gc.collect()


def run():
    import firmware
    from firmware import boot

    cfg, board, log, boot_no, cause = boot.prepare()
    boot = None
    _drop(firmware, ("boot", "config"))
    if cfg.role == "gateway":
        from firmware.gateway import Gateway

        Gateway(cfg, board, log).run(board.wdt(cfg.wdt_ms))
        return

    # The journal opens before the node's code is loaded: its boot-time code (journal_boot)
    # and the node's code are never on the heap together.
    from firmware.journal import Journal
    from firmware.seq import Sequence

    try:
        sequence = Sequence()
        journal = Journal(capacity=cfg.journal_capacity, log=log)
    except Exception as e:  # a corrupt counter or a broken filesystem: say so, do not send
        log.error("node", "cannot start", error=str(e))
        while board.idle_ms(_RETRY_MS):
            log.error("node", "not sending: flash state unusable", error=str(e))
        return
    _drop(firmware, ("journal_boot",))

    from firmware.clock import Clock
    from firmware.node import Node

    if cfg.link == "lora":
        from firmware.airtime import Governor
        from firmware.lora_link import LoraLink

        governor = Governor(board.ticks_ms, daily_budget_ms=cfg.airtime_budget_ms)
        link = LoraLink(board, cfg.lora, log, governor)  # type: object
    else:
        from firmware.links import UdpLink

        link = UdpLink(board, cfg.uplink, log)
    node = Node(cfg, board, log, sequence, journal, link, Clock(boot_no), (boot_no, cause))
    gc.collect()
    wdt = board.wdt(cfg.wdt_ms)
    try:
        node.run(wdt)
    except Exception as e:  # the last resort: log, keep the evidence, reset
        log.error("node", "crashed", exc=type(e).__name__, error=str(e))
        if hasattr(sys, "print_exception"):
            sys.print_exception(e)
        log.save(LAST_LOG, "crash")
        board.reset()

# Boot-time wiring of a node or a gateway: prepare the board (firmware/boot.py), open the journal,
# build the role's parts. main.py drops this module once the role runs: its code is not needed
# again until the next boot.

import gc
import sys


def drop(names):
    """Forget firmware modules that are done, so their code leaves the heap."""
    import firmware

    for name in names:
        sys.modules.pop("firmware." + name, None)
        if hasattr(firmware, name):
            delattr(firmware, name)
    gc.collect()


_RETRY_MS = 10000


def build():
    """(role object with run(wdt), log, board, watchdog ms); role None if it cannot start."""
    from firmware import boot

    cfg, board, log, boot_no, cause, wake = boot.prepare()
    boot = None
    drop(("boot", "config"))
    if cfg.role == "gateway":
        from firmware.gateway import Gateway

        return Gateway(cfg, board, log), log, board, cfg.wdt_ms

    # The journal opens before the node's code is loaded: its boot-time code (journal_boot)
    # and the node's code are never on the heap together.
    from firmware.journal import Journal
    from firmware.seq import Sequence

    try:
        sequence = Sequence(resume=_seq_state(wake))
        journal = Journal(capacity=cfg.journal_capacity, log=log)
    except Exception as e:  # a corrupt counter or a broken filesystem: say so, do not send
        log.error("node", "cannot start", error=str(e))
        while board.idle_ms(_RETRY_MS):
            log.error("node", "not sending: flash state unusable", error=str(e))
        return None, log, board, cfg.wdt_ms
    drop(("journal_boot",))

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
    node = Node(cfg, board, log, sequence, journal, link, Clock(boot_no), (boot_no, cause), wake)
    return node, log, board, cfg.wdt_ms


def _seq_state(wake):
    if wake is None:
        return None
    import struct

    return struct.unpack_from("<II", wake, 2)  # after the boot count (node.py _wake_state)

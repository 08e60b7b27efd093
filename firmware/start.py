# Boot-time wiring of a node or a gateway: prepare the board (firmware/boot.py), open the journal,
# build the role's parts. main.py drops this module once the role runs: its code is not needed
# again until the next boot.

import gc


def drop(names):
    """Forget firmware modules that are done, so their code leaves the heap."""
    import firmware

    firmware.forget(*names)
    gc.collect()


_RETRY_MS = 10000


def build():
    """(role object with run(wdt), log, board, watchdog ms); role None if it cannot start."""
    from firmware import boot

    cfg, board, log, boot_no, cause, wake = boot.prepare()
    boot = None
    drop(("boot", "config"))
    try:
        return _build(cfg, board, log, boot_no, cause, wake)
    except Exception as e:  # a MemoryError, a bug: reset and try again, never stop at the REPL
        from firmware.main import LAST_LOG

        log.error("node", "cannot start", exc=type(e).__name__, error=str(e))
        log.save(LAST_LOG, "boot")
        board.reset()
        raise


def _build(cfg, board, log, boot_no, cause, wake):
    if cfg.role == "gateway":
        from firmware.gateway import Gateway

        return Gateway(cfg, board, log), log, board, cfg.wdt_ms

    # The node's frame buffer (protocols/frame.py STATUS_BUF bytes), while the heap is emptiest.
    buf = bytearray(271)
    # The sensor is opened first, while the heap is emptiest: its probing code (bme280_probe)
    # leaves a hole that the modules loaded next fill. If it fails, the node probes again at
    # its first sample and logs why.
    from firmware import bme280

    try:
        sensor = bme280.BME280(board.i2c(), board.BME280_ADDRESS, sleep_ms=board.sleep_ms)
        if wake is None:  # not again at every deep-sleep wake
            log.info("sensor", "bme280 ready", address="0x%02x" % board.BME280_ADDRESS)
    except bme280.SensorError:
        sensor = None

    # The journal opens before the node's code is loaded: its boot-time code (journal_boot)
    # and the node's code are never on the heap together.
    from firmware.journal import Journal
    from firmware.seq import Sequence

    try:
        sequence = Sequence(resume=_seq_state(wake))
        journal = Journal(capacity=cfg.journal_capacity, log=log)
    except MemoryError:
        raise  # not the flash's fault: build() logs it and resets
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
    elif cfg.link == "mqtt":
        from firmware.mqtt_link import MqttLink

        link = MqttLink(board, cfg.uplink, cfg.node_id, cfg.interval_s * cfg.batch, log)
    else:
        from firmware.links import UdpLink

        link = UdpLink(board, cfg.uplink, log)
    gc.collect()  # then the node's objects fill the lowest holes
    clock = Clock(boot_no)
    node = Node(cfg, board, log, sequence, journal, link, clock, (boot_no, cause), wake, buf)
    node.sensor = sensor
    return node, log, board, cfg.wdt_ms


def _seq_state(wake):
    if wake is None:
        return None
    import struct

    return struct.unpack_from("<II", wake, 2)  # after the boot count (deep.py _HEAD)

# Boot-time wiring of a node or a gateway: bring the board up (firmware/bringup.py), open the
# journal, build the role's parts. firmware/app.py unloads this module once the role is built: its
# code is not needed again until the next boot.

import gc

from firmware import FW_VERSION, unload

_RETRY_MS = 10000


def build():
    """(role, log, board, watchdog ms): role a Gateway, the arguments of a Node (app.py builds
    it), or None if it cannot start."""
    from firmware import bringup

    cfg, board, log, boot_no, cause, wake = bringup.prepare()
    bringup = None
    unload("bringup", "config")
    gc.collect()
    try:
        return _build(cfg, board, log, boot_no, cause, wake)
    except Exception as e:  # a MemoryError, a bug: reset and try again, never stop at the REPL
        from firmware.app import LAST_LOG

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
    # The sensor is opened first, while the heap is emptiest: its calibration code (bme280_calib)
    # leaves a hole that the modules loaded next fill. If it fails, the node probes again at
    # its first sample and logs why.
    group = None
    if cfg.sensors:  # more than the BME280 (config "sensors"): firmware/sensors.py
        from firmware import sensors

        group = sensors.Sensors(cfg, board, log, {"sensor_faults": 0})
        sensor = None
    else:
        from firmware import bme280

        try:
            sensor = bme280.BME280(board.i2c(), board.BME280_ADDRESS, sleep_ms=board.sleep_ms)
            if wake is None:  # not again at every deep-sleep wake
                log.info("sensor", "bme280 ready", address="0x%02x" % board.BME280_ADDRESS)
        except bme280.SensorError:
            sensor = None

    # The journal opens before the node's code is loaded: its opening code (journal_open)
    # and the node's code are never on the heap together.
    from firmware.journal import Journal
    from firmware.seq import Sequence

    try:
        # the counter's state only: its code loads again to send a STATUS frame (status.py)
        sequence = Sequence(resume=_seq_state(wake)).state()
        journal = Journal(
            capacity=cfg.journal_capacity,
            record_channels=3 if group is None else len(group.channels),
            log=log,
        )
    except MemoryError:
        raise  # not the flash's fault: build() logs it and resets
    except Exception as e:  # a corrupt counter or a broken filesystem: say so, do not send
        log.error("node", "cannot start", error=str(e))
        while board.idle_ms(_RETRY_MS):
            log.error("node", "not sending: flash state unusable", error=str(e))
        return None, log, board, cfg.wdt_ms
    unload("journal_open", "seq")
    gc.collect()

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
    # a new boot's place on the RTC (firmware/clock.py), once: not at a deep-sleep wake
    rtc = None if wake is not None else board.rtc_ms() - board.ticks_ms()
    clock = open_clock(boot_no, rtc, cause in board.RTC_KEEPS)
    if wake is None:  # the node's first line of a boot (boot-time code: not in node.py)
        log.info(
            "node",
            "started",
            node=cfg.node_id,
            fw=FW_VERSION,
            board=board.NAME,
            link=cfg.link,
            # where frames go: the first thing to check on a node that gets no acks
            uplink="%s:%d" % cfg.uplink if cfg.uplink else "-",
            boot=boot_no,
            reset_cause=cause,
            pending=len(journal),
            idle="deep" if getattr(board, "deep", False) else "light",
        )
    # The node's parts: app.run() builds the Node once this module's code has left the heap
    # (the boot's peak: firmware/README.md).
    parts = (cfg, board, log, sequence, journal, link, clock, (boot_no, cause), wake, buf)
    return parts + (sensor if group is None else group,), log, board, cfg.wdt_ms


def _seq_state(wake):
    if wake is None:
        return None
    import struct

    return struct.unpack_from("<II", wake, 2)  # after the boot count (deep.py _HEAD)


def open_clock(boot, rtc, kept, path="clock.dat"):
    """The Clock of this boot from clock.dat (firmware/clock.py), here because it runs once a
    boot (a module of its own would cost the heap its name's qstrs for good). rtc (ms) is the
    RTC time at which this boot's ms clock read 0 (None on a deep-sleep wake: the same boot,
    already placed), kept whether the RTC counted on through the reset that started this boot.
    The boot joins the previous boot's RTC epoch when kept, the previous boot recorded one and
    the RTC did not go back; otherwise a new epoch starts."""
    from firmware.clock import Clock

    offsets = {}
    rtcs = {}
    try:
        with open(path) as f:
            for line in f:
                p = line.split()
                try:  # "<boot> <offset or -> [<rtc or -> <epoch or ->]"; the first format had two
                    b = int(p[0])
                    offset = None if p[1] == "-" else int(p[1])
                    r = (int(p[2]), int(p[3])) if len(p) == 4 and p[2] != "-" else None
                except (ValueError, IndexError):
                    continue  # a torn or foreign line: that boot is simply not known
                if offset is not None:
                    offsets[b] = offset
                if r is not None:
                    rtcs[b] = r
    except OSError:
        pass  # no file yet
    clock = Clock(boot, path, offsets, rtcs)
    if rtc is not None:
        prev = rtcs.get(boot - 1)
        if kept and prev is not None and rtc >= prev[0]:
            epoch = prev[1]
        else:
            epoch = 0
            for r in rtcs.values():
                epoch = max(epoch, r[1] + 1)
        rtcs[boot] = (rtc, epoch)
        clock._save()
    return clock

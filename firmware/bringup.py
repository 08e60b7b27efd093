# What a node does once at boot: read config.json, build the board, count the boot, show the log
# saved before the last reset (firmware/wiring.py calls it, then unloads it and config.py).

import gc
import os
import time

from firmware import config
from firmware import log as logmod

_RETRY_S = 10
LAST_LOG = "lastlog.txt"  # the last lines before the previous reset
_BOOT_FILE = "boot.dat"


def _boot_log():
    if hasattr(time, "ticks_ms"):
        start = time.ticks_ms()
        return logmod.Log(lambda: time.ticks_diff(time.ticks_ms(), start))
    return logmod.Log(lambda: 0)


def load_board(name, raw):
    try:
        module = __import__("boards." + name, None, None, ("Board",))
        if not hasattr(module, "Board"):  # a board with parts of its own: boards/<name>/board.py
            module = __import__("boards.%s.board" % name, None, None, ("Board",))
    except ImportError:
        raise config.ConfigError("config: unknown board %r (no boards/%s.py)" % (name, name))
    return module.Board(raw)


def next_boot():
    """Count this boot (one small flash write per boot)."""
    try:
        with open(_BOOT_FILE) as f:
            count = int(f.read().strip() or 0)
    except (OSError, ValueError):
        count = 0
    count = (count + 1) & 0xFFFF
    with open(_BOOT_FILE + ".tmp", "w") as f:
        f.write("%d\n" % count)
    os.rename(_BOOT_FILE + ".tmp", _BOOT_FILE)
    return count


def dump_log(path=LAST_LOG):
    """Print what the node logged before a reset: `mpremote exec "from firmware import bringup;
    bringup.dump_log()"` (the file is lastlog.txt, or lastlog.txt.old once it has been shown)."""
    for name in (path, path + ".old"):
        try:
            with open(name) as f:
                for line in f:
                    print("> " + line.rstrip())
            return
        except OSError:
            pass
    print("> (no saved log)")


def _show_last_log(log):
    try:
        os.stat(LAST_LOG)
    except OSError:
        return
    log.info("node", "log saved before the previous reset follows")
    dump_log()
    try:
        os.rename(LAST_LOG, LAST_LOG + ".old")  # shown once; kept until the next one
    except OSError:
        pass


def prepare(config_path=config.PATH):
    """Read the config (waiting for a good one), build the board, count the boot.
    Returns (cfg, board, log, boot count, reset cause, wake): wake is what the node kept
    through a deep sleep (firmware/node.py), None after any other reset. A wake is not a new
    boot: the count stays, the clock counts on, nothing is written."""
    log = _boot_log()
    while True:
        try:
            cfg = config.load(config_path)
            gc.collect()
            board = load_board(cfg.board, cfg.raw)
            break
        except (config.ConfigError, ValueError) as e:
            # Stay up with the REPL reachable so a technician can fix the file with mpremote.
            log.error("config", str(e), retry_s=_RETRY_S)
            time.sleep(_RETRY_S)
    cfg.raw = None  # the parsed dict is not needed any more
    log = logmod.Log(board.ticks_ms)
    cause = board.reset_cause()
    if getattr(board, "deep", False):
        wake = board.wake_state(cause)
        if wake is not None and len(wake) >= 10:
            return cfg, board, log, wake[0] | wake[1] << 8, cause, wake
    _show_last_log(log)
    return cfg, board, log, next_boot(), cause, None

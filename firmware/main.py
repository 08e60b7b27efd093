# Boot entry: read config.json, build the board it names, run the node; report, never halt.
# On a board, /main.py does `from firmware import main; main.run()`.

import gc
import time

from firmware import config
from firmware import log as logmod
from firmware.seq import SeqError, Sequence

_RETRY_S = 10


def _boot_log():
    start = time.ticks_ms() if hasattr(time, "ticks_ms") else 0
    if hasattr(time, "ticks_ms"):
        return logmod.Log(lambda: time.ticks_diff(time.ticks_ms(), start))
    return logmod.Log(lambda: 0)


def load_board(name, raw):
    try:
        module = getattr(__import__("boards." + name), name)
    except ImportError:
        raise config.ConfigError("config: unknown board %r (no boards/%s.py)" % (name, name))
    return module.Board(raw)


def run(config_path=config.PATH):
    log = _boot_log()
    # The node's code is imported first, while the heap is still in one piece.
    from firmware.node import Node

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
    log = logmod.Log(board.ticks_ms)
    try:
        sequence = Sequence()
    except SeqError as e:
        log.error("node", str(e))
        while board.idle_ms(_RETRY_S * 1000):
            log.error("node", "not sending: sequence counter unusable")
        return
    node = Node(cfg, board, log, sequence)
    node.run()

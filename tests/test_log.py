# The node's log keeps its last lines for the post-mortem file (firmware/log.py), on MicroPython.

import json


def test_last_lines_are_kept_in_order_and_long_ones_cut_at_a_character(run_mp):
    out = run_mp(
        r"""
import json
from firmware.log import Log
shown = []
log = Log(lambda: 1500, out=shown.append)
for k in range(10):
    log.info("node", "line %d" % k, n=k)
log.warning("sensor", "x" * 100 + "\u00b0" * 20)  # cut inside a 2-byte degree sign
log.debug("node", "below the level, neither shown nor kept")
print(json.dumps({"kept": log.lines(), "shown": shown}))
"""
    )
    r = json.loads(out.strip().splitlines()[-1])
    long_line = "W 1.500 sensor " + "x" * 100 + "\u00b0" * 20
    assert r["shown"][-1] == long_line  # the console gets the whole line
    assert r["kept"][:-1] == ["I 1.500 node line %d n=%d" % (k, k) for k in range(3, 10)]
    kept = r["kept"][-1]
    assert long_line.startswith(kept) and len(kept.encode()) == 119  # 15 + 100 + 2 x 2
    assert len(r["kept"]) == 8

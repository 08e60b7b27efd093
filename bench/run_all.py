"""Run every benchmark in bench/ in sequence and print their output (`make bench`).

Each script runs in its own interpreter so one cannot warm or skew another; exits non-zero if
any of them fails (a failed codec check voids the figures; a FAIL on a target does not).
"""

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# The benchmark scripts, in order; peers.py is a library they import, not a benchmark.
SCRIPTS = (
    "frame_size.py",
    "decode_speed.py",
    "receiver_speed.py",
    "flash_wear.py",
    "node_cycle.py",
    "mpy_sizes.py",
    "airtime.py",
    "pg_speed.py",
    "pm_power.py",
)


def main():
    failed = []
    for name in SCRIPTS:
        print("$ python bench/%s" % name, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(BENCH / name)], cwd=BENCH.parent)
        print("(%s: exit %d, %.1f s)\n" % (name, proc.returncode, time.perf_counter() - t0))
        if proc.returncode != 0:
            failed.append(name)
    if failed:
        sys.exit("run_all: failed: %s" % ", ".join(failed))


if __name__ == "__main__":
    main()

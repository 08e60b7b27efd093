"""Flash wear of the store-and-forward journal: bytes programmed and blocks erased per reading.

A node sampling once a minute for a simulated week (10 080 readings) keeps every reading in
firmware/journal.py until the host acknowledges it, in frames of 10. The journal runs on the
MicroPython unix port, on littlefs (vfs.VfsLfs2) over boards/sim/flash.py, a 1 MiB NOR flash of
4 KB blocks that counts what littlefs programs and erases. Beside it, in the same run:
  rewrite - the naive way: one file holding every unacknowledged reading, rewritten whole on
            each reading and each ack (as if the node's RAM list were saved after each change);
  append  - an append-only log file (open "ab", write, close per reading) with the ack position
            in a second file; both removed when everything is acknowledged.
Two littlefs settings: progsize 32 (ESP32, `VfsLfs2(bdev)`) and 256 (RP2, its _boot.py). Two
link patterns: always up, and a 24-hour outage on day 4 (readings pile up, then go out).
Every run checks that each reading reached the "host" once, in order, or its figures are void.

    python bench/flash_wear.py            (about a minute; `--quick` for one simulated day)
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from host_tools import build  # noqa: E402

BLOCKS = 256  # 1 MiB: the ESP32's default filesystem is ~2 MB, the Pico W's 848 KB
BATCH = 10
PROGSIZES = ((32, "ESP32"), (256, "RP2"))
DESIGNS = ("journal", "rewrite", "append")
NOR_CYCLES = 100_000  # erase cycles a NOR sector is specified for (W25Q series datasheets)

WORKLOAD = r"""
import gc, json, os, vfs
from boards.sim.flash import SimFlash
from firmware.journal import Journal

dev = SimFlash(blocks=BLOCKS)
vfs.VfsLfs2.mkfs(dev, progsize=PROG)
vfs.mount(vfs.VfsLfs2(dev, progsize=PROG), "/fl")
REC = bytearray(22)


class JournalStore:
    def __init__(self):
        self.j = Journal("/fl/journal", capacity=10080)

    def append(self, k):
        self.j.append(1, k * 60000, (k, 5000, 101325))

    def pending(self):
        return len(self.j)

    def peek(self, n):
        return [r[2][0] for r in self.j.peek(n)]

    def ack(self, n):
        self.j.ack(n)

    def files(self):
        return self.j.stats()["bytes"]


class RewriteStore:
    # The naive way: the whole list of unacknowledged readings, saved after every change.
    def __init__(self):
        self.ids = []

    def _save(self):
        with open("/fl/pending.bin", "wb") as f:
            for k in self.ids:
                REC[0] = k & 0xFF  # 22 bytes a reading, as the journal's records
                f.write(REC)

    def append(self, k):
        self.ids.append(k)
        self._save()

    def pending(self):
        return len(self.ids)

    def peek(self, n):
        return self.ids[:n]

    def ack(self, n):
        del self.ids[:n]
        self._save()

    def files(self):
        return 22 * len(self.ids)


class AppendStore:
    # An append-only log and an ack position; both go when everything is acknowledged.
    def __init__(self):
        self.first = 0
        self.acked = 0
        self.count = 0

    def append(self, k):
        if self.count == 0:
            self.first = k
        with open("/fl/log.bin", "ab") as f:
            f.write(REC)
        self.count += 1

    def pending(self):
        return self.count - self.acked

    def peek(self, n):
        return list(range(self.first + self.acked, self.first + min(self.count, self.acked + n)))

    def ack(self, n):
        self.acked += n
        if self.acked == self.count:
            os.remove("/fl/log.bin")
            try:
                os.remove("/fl/ackpos")
            except OSError:
                pass
            self.acked = self.count = 0
        else:
            with open("/fl/ackpos", "w") as f:
                f.write("%d" % self.acked)

    def files(self):
        return 22 * self.count


store = {"journal": JournalStore, "rewrite": RewriteStore, "append": AppendStore}[DESIGN]()
dev.reset_counters()
expect = 0
peak = 0
peak_bytes = 0
for k in range(READINGS):
    store.append(k)
    if not OUTAGE_FROM <= k < OUTAGE_TO:
        while store.pending() >= BATCH:
            got = store.peek(BATCH)
            if got != list(range(expect, expect + len(got))):
                raise SystemExit("FAIL %s: host got %r, expected from %d" % (DESIGN, got, expect))
            store.ack(len(got))
            expect += len(got)
    if store.pending() > peak:
        peak = store.pending()
        peak_bytes = store.files()
print(json.dumps({"programmed": dev.programmed, "erased": dev.erased, "prog_ops": dev.prog_ops,
                  "readings": READINGS, "delivered": expect, "peak_pending": peak,
                  "peak_bytes": peak_bytes}))
"""


def run_case(micropython, build_dir, prog, design, readings, outage):
    head = "BLOCKS = %d\nPROG = %d\nDESIGN = %r\nREADINGS = %d\nBATCH = %d\n" % (
        BLOCKS,
        prog,
        design,
        readings,
        BATCH,
    )
    head += "OUTAGE_FROM = %d\nOUTAGE_TO = %d\n" % outage
    env = dict(os.environ, MICROPYPATH=str(build_dir))
    proc = subprocess.run(
        [micropython, "-X", "heapsize=8M", "-c", head + WORKLOAD],
        capture_output=True,
        text=True,
        cwd=build_dir,
        env=env,
        timeout=1800,
    )
    if proc.returncode != 0:
        sys.exit("flash_wear: %s/%d failed:\n%s%s" % (design, prog, proc.stdout, proc.stderr))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Every reading reached the host once and in order, or the figures mean nothing.
    if result["delivered"] != readings - readings % BATCH:
        sys.exit(
            "flash_wear: %s/%d: %d of %d delivered" % (design, prog, result["delivered"], readings)
        )
    return result


def main(argv):
    quick = "--quick" in argv
    days = 1 if quick else 7
    readings = days * 1440
    # 24 h outage from the start of day 4 (in --quick: 8 h in the middle of the day)
    outage = (480, 960) if quick else (3 * 1440, 4 * 1440)
    micropython = build.tool("micropython")
    build_dir = ROOT / "build" / "bench-unix"
    build.build(build_dir)
    patterns = (("link always up", (0, 0)), ("24 h outage", outage))
    if quick:
        patterns = (("link always up", (0, 0)), ("8 h outage", outage))
    print(
        "Flash wear per reading, 1 reading/min for %d day(s) (%d readings), frames of %d acked,"
        " littlefs on a simulated %d x 4 KB NOR flash" % (days, readings, BATCH, BLOCKS)
    )
    print()
    print(
        "| board (progsize) | link | design | B programmed / reading | blocks erased / reading "
        "| erases / day | peak pending (KB) |"
    )
    print("|---|---|---|---:|---:|---:|---:|")
    rows = []
    t0 = time.perf_counter()
    for prog, board in PROGSIZES:
        for link, window in patterns:
            for design in DESIGNS:
                r = run_case(micropython, build_dir, prog, design, readings, window)
                b = r["programmed"] / readings
                e = r["erased"] / readings
                rows.append((board, prog, link, design, b, e))
                print(
                    "| %s (%d) | %s | %s | %.0f | %.3f | %.0f | %d (%.1f) |"
                    % (
                        board,
                        prog,
                        link,
                        design,
                        b,
                        e,
                        e * 1440,
                        r["peak_pending"],
                        r["peak_bytes"] / 1024,
                    ),
                    flush=True,
                )
    print()
    for board, prog, link, design, b, e in rows:
        if design != "journal":
            continue
        base = {d: (bb, ee) for bo, p, li, d, bb, ee in rows if p == prog and li == link}
        per_block_year = e * 525_600 / BLOCKS
        print(
            "%s, %s: journal %.0f B and %.3f erases a reading; rewrite x%.1f bytes, x%.1f "
            "erases; append x%.1f bytes, x%.1f erases; %.0f erase cycles a block a year "
            "(NOR sectors take %d: %.0f years)"
            % (
                board,
                link,
                b,
                e,
                base["rewrite"][0] / b,
                base["rewrite"][1] / e if e else float("inf"),
                base["append"][0] / b,
                base["append"][1] / e if e else float("inf"),
                per_block_year,
                NOR_CYCLES,
                NOR_CYCLES / per_block_year if per_block_year else float("inf"),
            )
        )
    print("\n(%.1f s)" % (time.perf_counter() - t0))


if __name__ == "__main__":
    main(sys.argv[1:])

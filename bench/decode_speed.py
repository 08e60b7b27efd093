"""Host decode+verify and encode throughput of citynode DATA frames on one core, beside
pycayennelpp on the same readings; optionally encode time on the MicroPython unix port.

Run as `python bench/decode_speed.py` (or `make bench`); figures go to bench/RESULTS.md.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: protocols/ and host_tools/
    sys.path.insert(0, str(ROOT))

from cayennelpp import LppFrame  # noqa: E402
from frame_size import KEY, SETTINGS, SHARED_DATA, quantise  # noqa: E402
from peers import cayenne_decode, cayenne_lpp  # noqa: E402

from host_tools.sim.weather import read_trace  # noqa: E402
from protocols.frame import BME280_CHANNELS, Signer, encode_data  # noqa: E402
from protocols.uplink import decode_data  # noqa: E402

TRACE = "bme280_indoor_1min.csv"
DISTINCT = 4000  # distinct frames a case, cycled: a few thousand, as a gateway sees them
REPEATS = 5
MIN_SECONDS = 1.0
TARGET_FRAMES_S = 50_000
MP_ENCODES = 2000  # encodes timed on the MicroPython unix port


def make_cases(rows, size, signer):
    """DISTINCT (frame, readings, ages, raw values) cases of `size` readings: windows starting
    at every reading of the trace, each sent as its newest reading is sampled."""
    node_id, seq0 = SETTINGS["typical"]
    cases = []
    for i in range(DISTINCT):
        batch = [quantise(r) for r in rows[i : i + size]]
        newest = batch[-1][0]
        ages = [newest - ts for ts, _ in batch]
        readings = [raw for _, raw in batch]
        frame = encode_data(signer, node_id, seq0 + i, BME280_CHANNELS, readings, ages)
        cases.append((frame, readings, ages, rows[i : i + size]))
    return cases


def best_rate(work, items):
    """Best of REPEATS runs of work() (one pass over `items` things), each repeated until it
    has run at least MIN_SECONDS; returns items per second."""
    passes = 1
    while True:  # calibrate, like timeit's autorange
        t0 = time.perf_counter()
        for _ in range(passes):
            work()
        if time.perf_counter() - t0 >= MIN_SECONDS / 5:
            break
        passes *= 2
    best = 0.0
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        n = 0
        while True:
            for _ in range(passes):
                work()
            n += passes
            elapsed = time.perf_counter() - t0
            if elapsed >= MIN_SECONDS:
                break
        best = max(best, n * items / elapsed)
    return best


def host_figures(rows):
    signer = Signer(KEY)
    node_id, seq0 = SETTINGS["typical"]
    out = {}
    for size in (1, 10):
        cases = make_cases(rows, size, signer)
        frames = [c[0] for c in cases]
        for frame, readings, ages, _ in cases:  # the timed decoder must be a correct one
            got = decode_data(frame, signer)
            if [tuple(r) for r in got.readings] != readings or list(got.ages) != ages:
                raise AssertionError("decode_data does not round-trip a %d-reading frame" % size)

        def decode(frames=frames):
            for f in frames:
                decode_data(f, signer)

        def verify(frames=frames):
            for f in frames:
                signer.verify(f)

        args = [(seq0 + i, c[1], c[2]) for i, c in enumerate(cases)]

        def encode(args=args):
            for seq, readings, ages in args:
                encode_data(signer, node_id, seq, BME280_CHANNELS, readings, ages)

        # pycayennelpp on the same readings: one 11-byte payload a reading, and for frames of
        # 10 the 10 payloads concatenated (CayenneLPP's batching), decoded in one call.
        lpp = [b"".join(cayenne_lpp(*r[1:]) for r in c[3]) for c in cases]

        def lpp_parse(lpp=lpp):
            for p in lpp:
                LppFrame.from_bytes(p)

        def lpp_values(lpp=lpp):
            for p in lpp:
                cayenne_decode(p)

        raw_rows = [c[3] for c in cases]

        def lpp_encode(raw_rows=raw_rows):
            for batch in raw_rows:
                for r in batch:
                    cayenne_lpp(r[1], r[2], r[3])

        n = len(frames)
        out[size] = {
            "decode": best_rate(decode, n),
            "verify": best_rate(verify, n),
            "encode": best_rate(encode, n),
            "lpp_parse": best_rate(lpp_parse, n),
            # peers.cayenne_decode expects one reading a payload
            "lpp_values": best_rate(lpp_values, n) if size == 1 else None,
            "lpp_encode": best_rate(lpp_encode, n),
            "mean_bytes": sum(map(len, frames)) / n,
        }
    return out


_MP_SCRIPT = """
import time
from protocols.frame import BME280_CHANNELS, Signer, encode_data
signer = Signer(bytes(range(16)))
for readings, ages in %r:
    encode_data(signer, 1234, 52560, BME280_CHANNELS, readings, ages)
    t0 = time.ticks_us()
    for i in range(%d):
        encode_data(signer, 1234, 52560 + i, BME280_CHANNELS, readings, ages)
    print("%%d %%.1f" %% (len(readings), time.ticks_diff(time.ticks_us(), t0) / %d))
msg = bytes(32)
t0 = time.ticks_us()
for i in range(%d):
    signer.tag(msg)
print("tag %%.1f" %% (time.ticks_diff(time.ticks_us(), t0) / %d))
"""


_MP_VERSION = (
    "import sys; print('%d.%d.%d (%s)' % (sys.implementation.version[:3] + (sys.version,)))"
)


def micropython_figures(rows):
    """µs per encode_data on the MicroPython unix port (64 KB heap, .mpy build), or None."""
    try:
        from host_tools import build

        micropython = build.tool("micropython")
    except Exception as exc:  # no unix port here: the host figures stand alone
        return None, "skipped (%s)" % exc
    cases = []
    for size in (1, 10):
        batch = [quantise(r) for r in rows[:size]]
        cases.append(([raw for _, raw in batch], [batch[-1][0] - ts for ts, _ in batch]))
    script = _MP_SCRIPT % (cases, MP_ENCODES, MP_ENCODES, MP_ENCODES, MP_ENCODES)
    with tempfile.TemporaryDirectory() as tmp:
        build.build(tmp)
        proc = subprocess.run(
            [micropython, "-X", "heapsize=64K", "-c", script],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, MICROPYPATH=tmp),
            cwd=tmp,  # not the repo: its .py sources would shadow the .mpy
        )
    if proc.returncode != 0:
        return None, "failed: %s" % proc.stderr.strip()[-500:]
    version = subprocess.run(
        [micropython, "-c", _MP_VERSION], capture_output=True, text=True
    ).stdout.strip()
    out = {}
    for line in proc.stdout.split("\n"):
        if line.strip():
            what, us = line.split()
            out[what] = float(us)
    return out, version


def verdict(ok):
    return "PASS" if ok else "FAIL"


def main():
    path = SHARED_DATA / TRACE
    if not path.exists():
        sys.exit("decode_speed: %s not found (the shared traces live in ../shared/data)" % path)
    rows = read_trace(path)
    print("# decode_speed: one core, %s, %d distinct frames a case, cycled" % (TRACE, DISTINCT))
    print(
        "(best of %d runs of >= %.0f s each, time.perf_counter; Python %s; "
        "1-min load average at start %.2f on %d CPUs, preceding bench scripts included: "
        "other work on the machine lowers these figures)\n"
        % (REPEATS, MIN_SECONDS, sys.version.split()[0], os.getloadavg()[0], os.cpu_count())
    )
    figs = host_figures(rows)
    print("| readings/frame | mean frame B | operation | frames/s | readings/s |")
    print("|---:|---:|---|---:|---:|")
    for size in (1, 10):
        f = figs[size]
        lines = [
            ("citynode decode_data (tag check included)", f["decode"]),
            ("citynode tag check alone (Signer.verify)", f["verify"]),
            ("citynode encode_data (tag included)", f["encode"]),
            ("pycayennelpp LppFrame.from_bytes", f["lpp_parse"]),
        ]
        if f["lpp_values"] is not None:
            lines.append(("pycayennelpp via peers.cayenne_decode", f["lpp_values"]))
        lines.append(("pycayennelpp encode (peers.cayenne_lpp)", f["lpp_encode"]))
        for name, rate in lines:
            mean = "%.2f" % f["mean_bytes"] if name.startswith("citynode") else "%d" % (11 * size)
            print("| %d | %s | %s | %.0f | %.0f |" % (size, mean, name, rate, rate * size))
    print(
        "\npycayennelpp rows: 'frames' are CayenneLPP payloads of the same readings "
        "(10-reading rows: 10 x 11 B concatenated, parsed in one call); they have no tag "
        "to check.\n"
    )
    print("## Target: decode+verify >= %d frames/s on one core\n" % TARGET_FRAMES_S)
    for size in (1, 10):
        rate = figs[size]["decode"]
        print(
            "- frames of %d: %.0f frames/s (%.0f readings/s) -> %s"
            % (size, rate, rate * size, verdict(rate >= TARGET_FRAMES_S))
        )
    mp, note = micropython_figures(rows)
    print("\n## Encode on the MicroPython unix port (-X heapsize=64K, .mpy build)\n")
    if mp is None:
        print("MicroPython: %s" % note)
        return
    print("MicroPython %s; %d encodes a case\n" % (note, MP_ENCODES))
    print("| operation | us each |")
    print("|---|---:|")
    for size in (1, 10):
        print("| encode_data, %d reading(s), tag included | %.1f |" % (size, mp[str(size)]))
    print("| Signer.tag of 32 B alone (HMAC-SHA256 on hashlib) | %.1f |" % mp["tag"])
    print(
        "\nx86-64 host figures: a 240 MHz ESP32 or 133 MHz RP2040 runs the same bytecode many "
        "times slower; measure on a board before budgeting awake time from these."
    )


if __name__ == "__main__":
    main()

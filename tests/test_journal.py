# firmware/journal.py on the MicroPython unix port: littlefs (vfs.VfsLfs2) on the simulated NOR
# flash of boards/sim/flash.py, random power cuts, corrupt and missing files, a full flash, heap.
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
REC = 22  # bytes of a 3-channel record: boot u16, ms u32, 3 x i32, crc32
HDR = 12  # segment header

# Shared by the MicroPython scripts below: mount a fresh or existing flash image at /fl.
PRELUDE = """
import gc, os, sys, vfs, json
from boards.sim.flash import SimFlash
from firmware.journal import Journal, JournalError
from firmware.log import Log
LINES = []
LOG = Log(lambda: 0, level=0, out=LINES.append)

def mount(data=None, blocks=64, prog=32):
    try:
        vfs.umount("/fl")
    except OSError:
        pass
    dev = SimFlash(blocks=blocks, data=data)
    if data is None:
        vfs.VfsLfs2.mkfs(dev, progsize=prog)
    vfs.mount(vfs.VfsLfs2(dev, progsize=prog), "/fl")
    return dev

def reading(k):
    return (1, k * 60000, (k, -k, 100000 + k))

def ids(j):
    return [r[2][0] for r in j.peek(len(j) + 1)]

def drain(j, n=10):
    # Peek and ack until the journal is empty: [(index, reading k)] of every row returned.
    got = []
    while len(j):
        rows = j.peek(n)
        got += [(j.first + i, rows[i][2][0]) for i in range(len(rows))]
        if rows:
            j.ack(len(rows))
        elif len(j):
            raise Exception("peek returned nothing, %d pending" % len(j))
    return got

def logged(level, text):
    return [l for l in LINES if l[0] == level and text in l]

def put(name, data, mode="wb"):
    with open(name, mode) as f:
        f.write(data)

def get(name):
    with open(name, "rb") as f:
        return f.read()
"""


def mp(run_mp, body, heap="4M", **kw):
    return run_mp(PRELUDE + body, heap=heap, **kw)


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


# --- basics -----------------------------------------------------------------------------------


def test_append_peek_ack_in_order_and_after_remount(run_mp):
    out = mp(
        run_mp,
        """
dev = mount()
j = Journal("/fl/journal", capacity=1000, log=LOG)
for k in range(23):
    j.append(*reading(k))
r = {"len": len(j), "peek3": j.peek(3), "n_all": len(j.peek(100))}
j.ack(4)
r["after_ack"] = ids(j)[:3]
r["len2"] = len(j)
dev = mount(dev.data)
j = Journal("/fl/journal", capacity=1000, log=LOG)
r["remount"] = ids(j)
j.append(*reading(23))
r["last"] = j.peek(100)[-1]
r["stats"] = j.stats()
print(json.dumps(r))
""",
    )
    r = last_json(out)
    assert r["len"] == 23 and r["n_all"] == 23
    assert r["peek3"] == [[1, k * 60000, [k, -k, 100000 + k]] for k in range(3)]
    assert r["after_ack"] == [4, 5, 6] and r["len2"] == 19
    assert r["remount"] == list(range(4, 23))
    assert r["last"] == [1, 23 * 60000, [23, -23, 100023]]
    s = r["stats"]
    assert s["pending"] == 20 and s["dropped"] == 0 and s["corrupt"] == 0
    assert s["small_files"] == 5 and s["segments"] == 0  # 0..23 in files of 5; 4 is unacked


def test_full_journal_drops_oldest_counts_and_persists(run_mp):
    out = mp(
        run_mp,
        """
dev = mount()
j = Journal("/fl/journal", capacity=40, log=LOG)
for k in range(57):
    j.append(*reading(k))
r = {"len": len(j), "dropped": j.dropped, "first": ids(j)[0]}
dev = mount(dev.data)
j = Journal("/fl/journal", capacity=40, log=LOG)
r["dropped2"] = j.dropped
r["ids"] = ids(j)
print(json.dumps(r))
""",
    )
    r = last_json(out)
    # full at 40: each append past it drops the oldest 5 (one small file) at once
    assert r["dropped"] == r["first"] == 20 and r["len"] == 37
    assert r["dropped2"] == 20
    assert r["ids"] == list(range(20, 57))


def test_long_outage_merges_into_segments_and_all_come_back(run_mp):
    out = mp(
        run_mp,
        """
dev = mount(blocks=128)
j = Journal("/fl/journal", capacity=10080, log=LOG)
for k in range(600):
    j.append(*reading(k))
r = {"merges": j.merges, "stats": j.stats()}
j.ack(3)
dev = mount(dev.data, blocks=128)
j = Journal("/fl/journal", capacity=10080, log=LOG)
got = ids(j)
r["ok"] = got == list(range(3, 600))
while len(j):
    n = len(j.peek(10))
    j.ack(n)
r["after"] = j.stats()
print(json.dumps(r))
""",
    )
    r = last_json(out)
    assert r["merges"] == 3 and r["ok"]
    s = r["stats"]
    # 3 segments of 185 records (one 4 KB block each), the rest in small files of 5
    assert s["segments"] == 3 and s["small_files"] == (600 - 555 + 4) // 5
    assert s["bytes"] == 3 * (HDR + 185 * REC) + 45 * REC + 24  # + one state copy
    assert r["after"]["segments"] == 0 and r["after"]["small_files"] == 0
    assert r["after"]["pending"] == 0


def test_bad_values_are_refused_with_a_precise_message(run_mp):
    out = mp(
        run_mp,
        """
mount()
j = Journal("/fl/journal", log=LOG)
msgs = []
for args in ((1, 0, (1, 2)), (70000, 0, (1, 2, 3)), (1, -1, (1, 2, 3)), (1, 0, (1, 2, 2**31))):
    try:
        j.append(*args)
        msgs.append(None)
    except ValueError as e:
        msgs.append(str(e))
print(json.dumps({"msgs": msgs, "len": len(j)}))
""",
    )
    r = last_json(out)
    assert r["len"] == 0
    assert r["msgs"][0] == "journal: 3 values expected, got 2"
    assert "boot 70000 or ms 0 out of range" in r["msgs"][1]
    assert "ms -1 out of range" in r["msgs"][2]
    assert r["msgs"][3] == "journal: value 2147483648 out of the signed 32-bit range"


def test_runs_on_cpython_too(tmp_path):
    code = """
import sys
sys.path.insert(0, %r)
from firmware.journal import Journal
j = Journal(%r, capacity=100, segment_bytes=256)
for k in range(60):
    j.append(1, k, (k, -k, 7))
j.ack(7)
j = Journal(%r, capacity=100, segment_bytes=256)
rows = j.peek(100)
assert [r[2][0] for r in rows] == list(range(7, 60)), rows
assert j.merges == 0 and j.stats()["segments"] > 0
print("ok")
""" % (str(ROOT), str(tmp_path / "j"), str(tmp_path / "j"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# --- reading indices --------------------------------------------------------------------------
# The host de-duplicates readings by (node, index) for ever: an index handed out twice for
# another reading is a reading lost without a trace.


def test_an_ack_that_empties_the_journal_does_not_let_a_reboot_reuse_its_indices(run_mp):
    out = mp(
        run_mp,
        """
dev = mount()
J = "/fl/journal"
j = Journal(J, capacity=1000, log=LOG)
for k in range(10):
    j.append(*reading(k))
rows = j.peek(10)
r = {"first": j.first, "n": len(rows)}
gen = j._gen
j.ack(10)  # ends where a small file starts and empties the journal
r["state_written"] = j._gen != gen
r["files"] = sorted(os.listdir(J))
dev = mount(dev.data)
j = Journal(J, capacity=1000, log=LOG)
j.append(*reading(10))
r["rows"] = j.peek(10)
r["after"] = j.first
print(json.dumps(r))
""",
    )
    r = last_json(out)
    assert r["first"] == 0 and r["n"] == 10
    # the ack was not written to the state (it still says 0) and no record is left ...
    assert not r["state_written"] and r["files"] == ["state1"]
    # ... so the boot starts past where such an ack can have gone: 0 + 64, rounded up to a
    # small file of 5 (before: at 0 again, handing out 0..9 a second time)
    assert r["rows"] == [[1, 10 * 60000, [10, -10, 100010]]] and r["after"] == 65


def test_indices_only_grow_over_many_append_ack_reopen_cycles(run_mp):
    out = mp(
        run_mp,
        """
J = "/fl/journal"
dev = mount()
index = {}  # reading c -> its index
top = -1
fail = []
gaps = []
boot_writes = 0
gen = None

def look(j):
    # every waiting reading keeps its index; a new one gets an index above all before it
    global top
    rows = j.peek(len(j) + 1)
    for i in range(len(rows)):
        c = rows[i][2][0]
        if c in index:
            if index[c] != j.first + i:
                fail.append("reading %d moved %d -> %d" % (c, index[c], j.first + i))
        else:
            if j.first + i <= top:
                fail.append("index %d reused (top %d)" % (j.first + i, top))
            gaps.append(j.first + i - top - 1)
            index[c] = top = j.first + i
    return len(rows)

count = 0
for cycle in range(80):
    dev = mount(dev.data)
    j = Journal(J, capacity=1000, log=LOG)
    if gen is not None and j._gen != gen:
        boot_writes += 1
    look(j)
    for k in range((cycle * 7) % 13):
        j.append(*reading(count))
        count += 1
        look(j)
    n = look(j)
    j.ack(n - (cycle % 3 if cycle % 4 == 0 else 0))  # now and then some wait for a reboot
    gen = j._gen
print(json.dumps({"fail": fail, "gaps": gaps, "count": count, "boot_writes": boot_writes}))
""",
    )
    r = last_json(out)
    assert r["fail"] == [] and len(r["gaps"]) == r["count"]
    # a boot that finds no record skips at most RESERVE + T - 1 indices; most readings follow
    # the one before
    assert max(r["gaps"]) <= 64 + 4 and r["gaps"].count(0) > r["count"] * 3 // 4, r["gaps"]
    assert r["boot_writes"] == 0  # opening a journal writes no state


def test_acks_at_small_file_boundaries_write_the_state_once_per_reserve(run_mp):
    # Flash wear: with the link up, frames of 10 end at small-file boundaries and empty the
    # journal; such acks skip the state write while within RESERVE (64) of the state.
    out = mp(
        run_mp,
        """
mount(blocks=128)
j = Journal("/fl/journal", capacity=1000, log=LOG)
gen = j._gen
for k in range(1400):
    j.append(*reading(k))
    if len(j) == 10:
        rows = j.peek(10)
        j.ack(len(rows))
print(json.dumps({"writes": j._gen - gen, "len": len(j), "next": j._next}))
""",
    )
    r = last_json(out)
    assert r["len"] == 0 and r["next"] == 1400
    assert 0 < r["writes"] <= 1400 // 64, r  # 20: one every 70 readings (before: none)


# A journal as the firmware before v2 left it (written on CPython by that journal.py): state1
# (position 0, generation 1), state0 (position 7, generation 2), readings 5..11 of
# (1, k, (k, -k, 7)) in small files r00000005 and r0000000a.
OLD_JOURNAL = {
    "state0": "434a01160500b9000700000000000000020000009db195d8",
    "state1": "434a01160500b900000000000000000001000000fcf7b8be",
    "r00000005": "01000500000005000000fbffffff07000000124c486d01000600000006000000faffffff07000000"
    "ce87ccc601000700000007000000f9ffffff070000001339a66a01000800000008000000f8ffffff0700000086"
    "d9e88601000900000009000000f7ffffff0700000014722d7d",
    "r0000000a": "01000a0000000a000000f6ffffff07000000c8b9a9d601000b0000000b000000f5ffffff07000000"
    "1507c37a",
}


def test_a_journal_from_before_v2_opens_and_goes_on(run_mp):
    out = mp(
        run_mp,
        """
import binascii
dev = mount()
J = "/fl/journal"
os.mkdir(J)
for name, data in OLD.items():
    put(J + "/" + name, binascii.unhexlify(data))
j = Journal(J, capacity=1000, log=LOG)
r = {"rows": j.peek(10), "first": j.first, "e": logged("E", "") + logged("W", "")}
j.append(1, 12, (12, -12, 7))
r["new"] = [j.first + len(j.peek(10)) - 1, j.peek(10)[-1]]
j.ack(len(j.peek(10)))
dev = mount(dev.data)
j = Journal(J, capacity=1000, log=LOG)
j.append(1, 13, (13, -13, 7))
j.peek(1)
r["after"] = j.first
print(json.dumps(r))
""".replace("OLD.items()", repr(OLD_JOURNAL) + ".items()"),
    )
    r = last_json(out)
    assert r["rows"] == [[1, k, [k, -k, 7]] for k in range(7, 12)] and r["first"] == 7
    assert r["e"] == []
    assert r["new"] == [12, [1, 12, [12, -12, 7]]]
    assert r["after"] > 12


# --- power cuts -------------------------------------------------------------------------------

# One MicroPython process cuts power CFG["cuts"] times at a random program/erase, "reboots"
# (remounts littlefs on the same bytearray) and checks the journal and the sequence counter
# against a model of what the node was told. Workload per boot: online (appends, acks of 1..12,
# sequence numbers, peeks) or outage (no acks, so readings pile up, merge and get dropped);
# a twenty-boot outage in every hundred cuts makes sure the journal overflows.
POWER_CUT = """
import time
from boards.sim.flash import Rng, PowerCut
from firmware.seq import Sequence, SeqError

MNT = "/pc"
T = 5  # records per small file (3 channels): the most one drop can take
odd = []
counts = {"I": 0, "W": 0, "E": 0, "D": 0}
dev = None

def out(line):
    if dev is not None and dev.dead:
        return  # what code says after the power is gone never happened
    counts[line[0]] += 1
    if line[0] in "WE":
        odd.append(line)

log = Log(lambda: 0, level=0, out=out)

if CFG["mutant"] == "state":
    # Broken on purpose: the old state is removed before the new one is written.
    real_write_state = Journal._write_state
    def write_state(self, pos, dropped):
        for slot in (0, 1):
            try:
                os.remove("%s/state%d" % (self.path, slot))
            except OSError:
                pass
        real_write_state(self, pos, dropped)
    Journal._write_state = write_state
if CFG["mutant"] == "index":
    # Broken on purpose: an empty journal starts where its state says (the boot before v2).
    real_init = Journal.__init__
    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        if not [n for n in os.listdir(self.path) if len(n) == 9]:  # no record file left
            p = self._spos + (T - self._spos % T) % T
            self._pos = self._next = self.first = p
    Journal.__init__ = init
if CFG["mutant"] == "seq":
    # Broken on purpose: the counter is saved after the numbers are handed out.
    def take(self):
        seq = self._next
        self._next += 1
        if self._next % 8 == 0:
            with open(self._path + ".tmp", "w") as f:
                f.write("%d\\n" % self._next)
            os.rename(self._path + ".tmp", self._path)
        return seq
    Sequence.take = take

image = bytearray(b"\\xff" * (CFG["blocks"] * 4096))
vfs.VfsLfs2.mkfs(SimFlash(data=image), progsize=CFG["prog"])

def reading(k):
    return (k & 0xFFFF, (k * 60000) & 0xFFFFFFFF, (k, -k, 100000 + k % 5000))

class Fail(Exception):
    pass

def check(cond, what):
    if not cond:
        raise Fail(what)

rng = Rng(CFG["seed"])
idx = {}  # reading k -> its journal index, while the journal may still hold it
top = -1  # the highest index any reading ever got: a new one must get a higher one
lo = 0  # oldest reading the node may still have to send
appended = 0  # appends that returned: readings 0 .. appended - 1
dropped = 0
max_seq = -1
last_op = None
last_arg = 0
st = {"appends": 0, "acks": 0, "takes": 0, "resent": 0, "max_resent": 0, "dropped": 0,
      "merges": 0, "cleaning_boots": 0, "max_pending": 0, "cut_in": {}, "overprogrammed": 0,
      "max_gap": 0}

def indexed(k, i):
    # Reading k has index i: the same as before, or (a new one) above every index used.
    global top
    if k in idx:
        check(idx[k] == i, "reading %d had index %d, now %d" % (k, idx[k], i))
        return
    check(i > top, "reading index %d reused (up to %d handed out)" % (i, top))
    st["max_gap"] = max(st["max_gap"], i - top - 1)
    idx[k] = top = i

t0 = time.ticks_ms()
for cut in range(CFG["cuts"]):
    dev = SimFlash(data=image, seed=CFG["seed"] * 100003 + cut, raises=CFG["raises"])
    op = "mount"
    arg = 0
    j = None
    checked = False
    try:
        vfs.mount(vfs.VfsLfs2(dev, progsize=CFG["prog"]), MNT)
        dev.cut_after(1 + rng.below(CFG["max_ops"]))
        op = "boot"
        j = Journal(MNT + "/journal", capacity=CFG["cap"], log=log, segment_bytes=CFG["seg"])
        rows = j.peek(len(j) + 1)
        n = len(rows)
        check(n == len(j), "len() %d but %d readable" % (len(j), n))
        if n:
            lo2 = rows[0][2][0]
            hi2 = lo2 + n
            for i in range(n):
                check(rows[i] == reading(lo2 + i), "row %d: %r" % (i, rows[i]))
                indexed(lo2 + i, j.first + i)
            check(hi2 == appended or (last_op == "append" and hi2 == appended + 1),
                  "newest is %d after %d appends (cut in %s)" % (hi2 - 1, appended, last_op))
        else:
            lo2 = hi2 = appended
        new_drops = j.dropped - dropped
        check(new_drops >= 0, "dropped count went down %d -> %d" % (dropped, j.dropped))
        check(new_drops == 0 or (last_op == "append" and new_drops <= T),
              "dropped +%d in a cut during %s" % (new_drops, last_op))
        check(lo2 >= lo, "acknowledged readings %d..%d came back" % (lo2, lo - 1))
        allowed = new_drops + (last_arg if last_op == "ack" else 0)
        check(lo2 - lo <= allowed, "readings %d..%d lost (%d may go)" % (lo, lo2 - 1, allowed))
        if last_op == "ack" and lo2 < lo + last_arg:
            again = lo + last_arg - lo2  # acked by the host, sent again after the reboot
            st["resent"] += again
            st["max_resent"] = max(st["max_resent"], again)
        lo = lo2
        appended = hi2
        dropped = j.dropped
        for k in [k for k in idx if k < lo]:
            del idx[k]
        if j.cleaned:
            st["cleaning_boots"] += 1
        checked = True
        op = "seq"
        seq = Sequence(MNT + "/seq.dat", reserve=CFG["reserve"])
        # 60 % of boots are online; cuts 80-99 of every hundred are a long outage, so the
        # journal fills up and drops whatever path the random cuts take
        online = rng.below(10) < 6 and cut % 100 < 80
        while True:
            r = rng.below(100)
            if r < (45 if online else 80):
                op = "append"
                j.append(*reading(appended))
                indexed(appended, j._next - 1)
                appended += 1
                d = j.dropped - dropped
                lo += d
                dropped = j.dropped
                st["appends"] += 1
                st["dropped"] += d
            elif r < 75 and online:
                op = "ack"
                arg = min(1 + rng.below(12), appended - lo)
                j.ack(arg)
                lo += arg
                st["acks"] += 1
            elif r < 90:
                op = "seq"
                s = seq.take()
                check(s > max_seq, "sequence number %d handed out again (had %d)" % (s, max_seq))
                max_seq = s
                st["takes"] += 1
            else:
                op = "peek"
                rows = j.peek(1 + rng.below(12))
                for i in range(len(rows)):
                    check(rows[i] == reading(lo + i), "peek row %d: %r" % (i, rows[i]))
                    indexed(lo + i, j.first + i)
            check(len(j) == appended - lo, "len() %d, expected %d" % (len(j), appended - lo))
            st["max_pending"] = max(st["max_pending"], len(j))
            last_op = op
            last_arg = arg
    except (OSError, JournalError, SeqError, PowerCut) as e:
        if not dev.dead:
            print("FAIL error without a power cut, cut %d during %s: %r" % (cut, op, e))
            sys.exit(1)
        if checked:
            last_op = op
            last_arg = arg
        st["cut_in"][op] = st["cut_in"].get(op, 0) + 1
    except Fail as e:
        print("FAIL after cut %d (previous cut during %s): %s" % (cut, last_op, e))
        sys.exit(1)
    if j is not None:
        st["merges"] += j.merges
    st["overprogrammed"] += dev.overprogrammed
    try:
        vfs.umount(MNT)
    except OSError:
        pass
    j = seq = None
    gc.collect()
st["cuts"] = CFG["cuts"]
st["ms"] = time.ticks_diff(time.ticks_ms(), t0)
st["log"] = counts
st["odd"] = [l for l in odd if "dropping" not in l][:10]
print(json.dumps(st))
"""

POWER_CUT_CONFIGS = {
    # ESP32: VfsLfs2(bdev) defaults (progsize 32); small segments so that merges happen often
    "esp32": dict(prog=32, seg=1024, cap=150, blocks=48, max_ops=100, reserve=8),
    # RP2: VfsLfs2(bdev, progsize=256) as ports/rp2/modules/_boot.py; default 4 KB segments
    "rp2": dict(prog=256, seg=4096, cap=250, blocks=64, max_ops=150, reserve=8),
}


def power_cuts(run_mp, board, cuts, seed, mutant=None, raises=False, check=True):
    cfg = dict(POWER_CUT_CONFIGS[board], cuts=cuts, seed=seed, mutant=mutant, raises=raises)
    script = PRELUDE + "CFG = %r\n" % cfg + POWER_CUT
    return run_mp(script, heap="8M", timeout=3600, check=check)


def assert_power_cut_run(out, cuts):
    st = last_json(out)
    assert st["cuts"] == cuts
    assert st["log"]["E"] == 0 and st["odd"] == [], st["odd"]  # littlefs: never a torn file
    assert st["overprogrammed"] == 0  # littlefs never programs bits that are not erased
    # the cuts hit every kind of operation, and the workload exercised all of the journal
    assert {"append", "ack", "seq"} <= set(st["cut_in"]), st["cut_in"]
    assert st["merges"] > 0 and st["dropped"] > 0 and st["cleaning_boots"] > 0, st
    assert st["max_resent"] <= 12  # at most the one ack that was cut short is sent again
    # no reading index handed out twice (checked in the run); a boot on an empty journal
    # skips at most RESERVE + T - 1 of them
    assert 0 < st["max_gap"] <= 64 + 4, st
    return st


@pytest.mark.parametrize("board,cuts,seed", [("esp32", 1000, 1), ("rp2", 300, 2)])
def test_power_cuts(run_mp, board, cuts, seed):
    st = assert_power_cut_run(power_cuts(run_mp, board, cuts, seed), cuts)
    print(board, json.dumps(st))


def test_power_cuts_raising_from_the_block_device(run_mp):
    # The cut raises PowerCut out of littlefs's C code instead of returning -EIO.
    st = assert_power_cut_run(power_cuts(run_mp, "esp32", 300, 3, raises=True), 300)
    print(json.dumps(st))
    assert st["cut_in"]


@pytest.mark.slow
@pytest.mark.parametrize("board,seed", [("esp32", 11), ("rp2", 12)])
def test_power_cuts_soak(run_mp, board, seed):
    assert_power_cut_run(power_cuts(run_mp, board, 10000, seed), 10000)


@pytest.mark.parametrize(
    "mutant,message",
    [
        ("state", "came back"),  # or "dropped count went down": both are losses the check sees
        ("seq", "handed out again"),
        ("index", "reading index"),  # "reading index 40 reused (up to 44 handed out)"
    ],
)
def test_power_cut_check_catches_a_broken_implementation(run_mp, mutant, message):
    proc = power_cuts(run_mp, "esp32", 1000, 5, mutant=mutant, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    fail = proc.stdout.strip().splitlines()[-1]
    assert fail.startswith("FAIL after cut"), fail
    if mutant == "state":
        assert "came back" in fail or "dropped count went down" in fail, fail
    else:
        assert message in fail, fail


# --- bad input: corrupt, truncated, missing files ---------------------------------------------

# A journal of 120 readings (segments of 45 with segment_bytes=1024) with the first 7 acked:
# s00000000 (0..44: 0..6 acked), s0000002d (45..89), small files r0000005a.. (90..119).
CORRUPT_SETUP = """
dev = mount()
J = "/fl/journal"
j = Journal(J, capacity=1000, log=LOG, segment_bytes=1024)
for k in range(120):
    j.append(*reading(k))
j.ack(7)
assert j.merges == 2, j.merges
del LINES[:]

def reopen(**kw):
    global dev
    dev = mount(dev.data)
    return Journal(J, capacity=1000, log=LOG, segment_bytes=1024, **kw)
"""


def corrupt(run_mp, body):
    return last_json(mp(run_mp, CORRUPT_SETUP + body))


def test_torn_last_record_is_cut_off_and_appends_continue(run_mp):
    r = corrupt(
        run_mp,
        """
put(J + "/r00000078", b"\\x01\\x02\\x03\\x04\\x05\\x06\\x07")  # half a record in a new file
put(J + "/r00000073", b"\\xaa" * 9, "ab")  # a torn tail on the last full file
j = reopen()
a = ids(j)
j.append(*reading(120))
b = ids(j)
print(json.dumps({"a": a, "b": b, "w": logged("W", "torn record") + logged("W", "repairing"),
                  "e": logged("E", ""), "corrupt": j.corrupt}))
""",
    )
    assert r["a"] == list(range(7, 120))
    assert r["b"] == list(range(7, 121))  # the new reading went where it belongs
    assert any("bytes=9 file=/fl/journal/r00000073" in w for w in r["w"]), r["w"]
    assert any("bytes=7 file=/fl/journal/r00000078" in w for w in r["w"]), r["w"]
    assert r["e"] == [] and r["corrupt"] == 0


def test_flipped_byte_skips_one_reading_counts_and_logs_it(run_mp):
    r = corrupt(
        run_mp,
        """
name = J + "/s0000002d"
data = bytearray(get(name))
data[12 + 10 * 22 + 5] ^= 0x10  # reading 55
put(name, data)
j = reopen()
a = ids(j)
fa = j.first
j.ack(len(a))
c = j.corrupt
b = ids(j)
fb = j.first
j.ack(5)
print(json.dumps({"a": a, "fa": fa, "c": c, "b": b, "fb": fb, "corrupt": j.corrupt,
                  "e": logged("E", ""), "next": ids(j)[0], "fn": j.first}))
""",
    )
    # peek stops before the unreadable reading: its rows are contiguous from `first`
    assert r["a"] == list(range(7, 55)) and r["fa"] == 7 and r["c"] == 0
    # the next peek skips it; ack counts and logs it
    assert r["b"] == list(range(56, 120)) and r["fb"] == 56
    assert r["corrupt"] == 1 and r["next"] == r["fn"] == 61
    assert r["e"] == ["E 0.000 journal skipped unreadable readings first=55 last=60 n=1"]


def test_peek_returns_contiguous_runs_and_ack_counts_from_first(run_mp):
    r = corrupt(
        run_mp,
        """
name = J + "/r0000005a"
data = bytearray(get(name))
data[2 * 22 + 3] ^= 0x01  # reading 92
put(name, data)
os.remove(J + "/r00000064")  # 100..104
j = reopen()
j.ack(80)  # no peek: the 80 oldest, 7..86
steps = []
for n in (3, 20, 20, 20, 20):
    rows = j.peek(n)
    steps.append([j.first, [row[2][0] for row in rows], len(j)])
    j.ack(len(rows))
    steps[-1].append(j.corrupt)
print(json.dumps({"steps": steps, "len": len(j), "e": logged("E", "")}))
""",
    )
    assert r["steps"] == [
        # [first, readings (index k holds reading k), len() before the ack, corrupt after]
        [87, [87, 88, 89], 33, 0],
        [90, [90, 91], 30, 0],  # ends before the unreadable 92
        [93, list(range(93, 100)), 28, 1],  # 92 skipped and counted; ends before 100..104
        [105, list(range(105, 120)), 20, 6],
        [120, [], 0, 6],
    ]
    assert r["len"] == 0
    assert r["e"] == [
        "E 0.000 journal skipped unreadable readings first=92 last=99 n=1",
        "E 0.000 journal skipped unreadable readings first=100 last=119 n=5",
    ]


def test_ack_beyond_the_peeked_run_counts_the_unreadable_readings_it_passes(run_mp):
    r = corrupt(
        run_mp,
        """
name = J + "/s0000002d"
data = bytearray(get(name))
data[12 + 10 * 22 + 5] ^= 0x10  # reading 55
put(name, data)
j = reopen()
rows = j.peek(100)
j.ack(60)  # more than the peek returned: 7..66
print(json.dumps({"n": len(rows), "corrupt": j.corrupt, "next": ids(j)[0], "first": j.first,
                  "e": logged("E", "")}))
""",
    )
    assert r["n"] == 48 and r["corrupt"] == 1 and r["next"] == r["first"] == 67
    assert r["e"] == ["E 0.000 journal skipped unreadable readings first=7 last=66 n=1"]


def test_bad_segment_header_is_logged_and_its_readings_kept(run_mp):
    r = corrupt(
        run_mp,
        """
name = J + "/s00000000"
data = bytearray(get(name))
data[0:12] = b"garbage....!"
put(name, data)
j = reopen()
print(json.dumps({"a": ids(j), "e": logged("E", "")}))
""",
    )
    assert r["a"] == list(range(7, 120))
    assert len(r["e"]) == 1
    assert "bad segment, records checked one by one" in r["e"][0]
    assert "file=/fl/journal/s00000000" in r["e"][0] and 'why="header CRC mismatch"' in r["e"][0]


def test_truncated_segment_and_missing_file_lose_only_their_readings(run_mp):
    r = corrupt(
        run_mp,
        """
name = J + "/s0000002d"
put(name, get(name)[: 12 + 30 * 22 + 11])  # 45..74 kept, 75 torn, 76..89 gone
os.remove(J + "/r00000064")  # 100..104
j = reopen()
first = ids(j)
got = drain(j)
print(json.dumps({"first": first, "a": [k for i, k in got], "at": all(i == k for i, k in got),
                  "corrupt": j.corrupt, "e": logged("E", "")}))
""",
    )
    gone = set(range(75, 90)) | set(range(100, 105))
    assert r["first"] == list(range(7, 75))  # a peek ends at the first gap
    assert r["a"] == [k for k in range(7, 120) if k not in gone] and r["at"]
    assert r["corrupt"] == len(gone)
    assert any("bad segment" in e and "file=/fl/journal/s0000002d" in e for e in r["e"]), r["e"]
    skipped = [e for e in r["e"] if "skipped unreadable" in e]
    assert sum(int(e.rsplit("n=", 1)[1]) for e in skipped) == len(gone), skipped


def test_corrupt_state_copy_resends_never_loses(run_mp):
    r = corrupt(
        run_mp,
        """
j = reopen()
j.ack(10)  # 17 is now the oldest; the newer state copy says so
gen = j._gen
newest = J + "/state%d" % (gen & 1)
data = bytearray(get(newest))
data[9] ^= 0xFF
put(newest, data)
j = reopen()
print(json.dumps({"a": ids(j), "w": logged("W", "state copy"), "e": logged("E", "")}))
""",
    )
    assert r["a"] == list(range(7, 120))  # the older copy: 10 readings sent again, none lost
    assert len(r["w"]) == 1 and "state copy unreadable, using the other one" in r["w"][0]
    assert r["e"] == []


def test_lost_state_resends_everything_stored(run_mp):
    r = corrupt(
        run_mp,
        """
os.remove(J + "/state0")
os.remove(J + "/state1")
j = reopen()
a = ids(j)
j2 = reopen()
print(json.dumps({"a": a, "e": logged("E", ""), "a2": ids(j2), "dropped": j2.dropped}))
""",
    )
    assert r["a"] == list(range(0, 120))  # 0..6 were acked: sent again, the host de-duplicates
    assert r["e"] == [
        "E 0.000 journal state lost, re-sending every stored reading; dropped count restarts "
        "first=0"
    ]
    assert r["a2"] == list(range(0, 120)) and r["dropped"] == 0


def test_leftovers_are_removed_and_strangers_left_alone(run_mp):
    r = corrupt(
        run_mp,
        """
put(J + "/s0000005a.tmp", b"half a merge")
put(J + "/state0.tmp", b"x")
put(J + "/r00000000", b"\\x00" * 22)  # below the merged segments: a leftover
put(J + "/notes.txt", b"hello")
j = reopen()
names = sorted(os.listdir(J))
print(json.dumps({"a": ids(j), "names": names, "w": logged("W", ""), "cleaned": j.cleaned}))
""",
    )
    assert r["a"] == list(range(7, 120))
    assert "notes.txt" in r["names"] and not [n for n in r["names"] if n.endswith(".tmp")]
    assert "r00000000" not in r["names"] and r["cleaned"] == 3
    assert r["w"] == ["W 0.000 journal unknown file left alone file=/fl/journal/notes.txt"]


def test_other_layout_is_refused_precisely(run_mp):
    r = corrupt(
        run_mp,
        """
dev = mount(dev.data)
try:
    Journal(J, record_channels=4, segment_bytes=1024)
    msg = None
except JournalError as e:
    msg = str(e)
print(json.dumps({"msg": msg}))
""",
    )
    assert r["msg"] == (
        "journal: /fl/journal/state0 holds 22-byte records (3 channels) in files of 5/45; "
        "configured 4 channels: re-provision the node or keep the old channel count"
    )


def test_all_unreadable_does_not_stall_the_node(run_mp):
    r = corrupt(
        run_mp,
        """
j = reopen()
while len(j) > 3:
    j.ack(min(20, len(j) - 3))
name = J + "/r00000073"
data = bytearray(get(name))
for k in range(len(data)):
    data[k] ^= 0x55
put(name, data)
j = reopen()
a = j.peek(10)
print(json.dumps({"a": a, "len": len(j), "corrupt": j.corrupt, "e": logged("E", "")}))
""",
    )
    assert r["a"] == [] and r["len"] == 0 and r["corrupt"] == 3
    assert r["e"] == ["E 0.000 journal skipped unreadable readings first=117 last=119 n=3"]


# Property test: any corruption of any journal file (flipped bytes, truncation, removal) opens
# without a crash, and every reading whose bytes were untouched comes back, once, in order.
FUZZ_BUILD = """
j = Journal(JPATH, capacity=1000, segment_bytes=1024)
for k in range(120):
    j.append(*reading(k))
j.ack(7)
print(json.dumps(j.stats()))
"""

FUZZ_OPEN = """
lines = []
try:
    j = Journal(JPATH, capacity=1000, segment_bytes=1024, log=Log(lambda: 0, out=lines.append))
    n = len(j)
    ids = []
    ok = True
    while len(j):
        rows = j.peek(1000)  # one contiguous run from j.first
        for i in range(len(rows)):
            k = rows[i][2][0]
            ok = ok and rows[i] == reading(k) and j.first + i == k  # index k holds reading k
            ids.append(k)
        j.ack(len(rows))
    print(json.dumps({"ids": ids, "ok": ok, "len": n}))
except JournalError as e:
    print(json.dumps({"error": str(e)}))
"""


@pytest.fixture(scope="module")
def fuzz_base(run_mp, tmp_path_factory):
    base = tmp_path_factory.mktemp("journal-fuzz") / "journal"
    run_mp(PRELUDE + "JPATH = %r\n" % str(base) + FUZZ_BUILD, heap="2M")
    return base


def affected(name, size, changes):
    """Readings that changes to one file may take away (by index), from its layout on flash:
    a flipped byte takes its record; a truncation the records from there on; a removal all.
    A segment with a damaged header is located by its size, so truncating it as well may
    misplace all of its records."""
    if len(name) != 9 or name[0] not in "rs":
        return set()  # a state copy: the other copy or a re-send covers it
    base = int(name[1:], 16)
    hdr = HDR if name[0] == "s" else 0
    first = base + 45 - (size - HDR) // REC if hdr else base
    count = (size - hdr) // REC
    lost = set()
    header_damaged = cut = False
    for what, at in changes:
        k = max(0, (at - hdr) // REC)
        if what == "remove":
            lost |= set(range(first, first + count))
        elif what == "truncate":
            lost |= set(range(first + k, first + count))
            cut = True
        elif at >= hdr:
            lost.add(first + k)
        header_damaged |= hdr > 0 and at < hdr
    if header_damaged and cut:
        lost |= set(range(first, first + count))
    return lost


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_any_corruption_opens_and_keeps_untouched_readings(run_mp, fuzz_base, tmp_path, data):
    work = tmp_path / "j"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(fuzz_base, work)
    names = sorted(os.listdir(work))
    sizes = {name: (work / name).stat().st_size for name in names}
    changes = {}
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        name = data.draw(st.sampled_from(names), label="file")
        path = work / name
        if not path.exists():
            continue
        raw = bytearray(path.read_bytes())
        if not raw:
            continue  # truncated to nothing already
        what = data.draw(st.sampled_from(["flip", "truncate", "remove"]), label="what")
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        changes.setdefault(name, []).append((what, at))
        if what == "remove":
            path.unlink()
        elif what == "truncate":
            path.write_bytes(raw[:at])
        else:
            raw[at] ^= data.draw(st.integers(1, 255), label="xor")
            path.write_bytes(raw)
    lost = set()
    for name, done in changes.items():
        lost |= affected(name, sizes[name], done)
    out = run_mp(PRELUDE + "JPATH = %r\n" % str(work) + FUZZ_OPEN, heap="2M")
    r = last_json(out)
    assert "error" not in r, r
    assert r["ok"], r  # every reading returned is exactly what was appended
    got = r["ids"]
    assert got == sorted(set(got))  # in order, no duplicates
    assert set(range(7, 120)) - lost <= set(got), sorted(set(range(7, 120)) - lost - set(got))
    if not any(name.startswith("state") for name in changes):
        assert min(got, default=7) >= 7  # acknowledged ones stay gone
    assert r["len"] >= len(got)


# --- full flash -------------------------------------------------------------------------------


def test_full_flash_raises_journal_error_and_loses_nothing(run_mp):
    out = mp(
        run_mp,
        """
dev = mount(blocks=16)
j = Journal("/fl/journal", capacity=100000, log=LOG)
k = 0
err = None
while k < 5000:
    try:
        j.append(*reading(k))
    except JournalError as e:
        err = e
        break
    k += 1
r = {"stored": k, "msg": str(err), "errno": err.errno if err else None, "len": len(j)}
r["before"] = ids(j) == list(range(k))
dev = mount(dev.data, blocks=16)
j = Journal("/fl/journal", capacity=100000, log=LOG)
r["after_remount"] = ids(j) == list(range(k))
j.ack(400)
try:
    j.append(*reading(k))
    r["append_after_ack"] = ids(j)[-1]
except JournalError as e:
    r["append_after_ack"] = str(e)
r["dead"] = dev.dead
print(json.dumps(r))
""",
    )
    r = last_json(out)
    assert r["errno"] == 28, r
    assert r["msg"].startswith("journal: cannot store reading %d in /fl/journal/r" % r["stored"])
    assert "ENOSPC (errno 28); %d stored readings kept" % r["stored"] in r["msg"]
    assert r["stored"] > 500 and r["len"] == r["stored"]
    assert r["before"] and r["after_remount"]
    assert r["append_after_ack"] == r["stored"]


# --- RAM --------------------------------------------------------------------------------------


def test_heap_64k_beside_the_node_and_independent_of_capacity(run_mp, tmp_path):
    out = run_mp(
        """
import gc, json, os
import firmware.node, firmware.links, firmware.clock, firmware.seq, protocols.frame
from firmware.journal import Journal
gc.collect()
free0 = gc.mem_free()
J = %r

def size_of_open(path):
    import firmware
    gc.collect()
    before = gc.mem_alloc()
    j = Journal(path)
    # the opening code is unloaded once the journal is open, as firmware/wiring.py does
    firmware.unload("journal_open")
    gc.collect()
    return j, gc.mem_alloc() - before

# once before measuring: the first open interns the opening code's names, for good (which may
# take a new qstr pool, a few KB: firmware/README.md "the qstr pool has a cliff")
j, _ = size_of_open(J + "-warm")
j = None
j, empty = size_of_open(J)
low = gc.mem_free()
for k in range(1200):  # a long outage: merges into 4 KB segments
    j.append(1, k * 60000, (2000 + k, 5000, 101325))
    if k %% 50 == 0:
        gc.collect()
        low = min(low, gc.mem_free())
merges = j.merges
j = None
j, full = size_of_open(J)
n = 0
while len(j):
    rows = j.peek(10)
    j.ack(len(rows))
    n += len(rows)
    gc.collect()
    low = min(low, gc.mem_free())
print(json.dumps({"free0": free0, "low": low, "empty": empty, "full": full, "n": n,
                  "merges": merges}))
"""
        % str(tmp_path / "journal"),
        heap="64K",
    )
    r = last_json(out)
    assert r["n"] == 1200 and r["merges"] == 6
    assert r["full"] - r["empty"] <= 64, r  # a journal of 1 200 readings costs what an empty does
    assert r["empty"] < 1500, r  # the journal object and its buffers
    # It ran beside the node's modules in 64 KB; the lowest free heap it left is printed.
    assert r["low"] > 4 * 1024, r
    print(r)


# --- the bench --------------------------------------------------------------------------------


def test_flash_wear_bench_runs_and_the_journal_spares_the_flash(board_build):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "flash_wear.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[2] in ("journal", "rewrite", "append"):
            rows[(cells[0], cells[1], cells[2])] = (float(cells[3]), float(cells[4]))
    assert len(rows) == 12, proc.stdout
    for board in ("ESP32 (32)", "RP2 (256)"):
        outage = {d: rows[(board, "8 h outage", d)] for d in ("journal", "rewrite", "append")}
        assert outage["journal"][0] < outage["append"][0] < outage["rewrite"][0], outage
    up = {d: rows[("ESP32 (32)", "link always up", d)] for d in ("journal", "rewrite")}
    assert up["journal"][1] * 10 < up["rewrite"][1], up  # inline small files: 10x fewer erases

"""What each firmware module costs a node's heap once imported, on the MicroPython unix port.

A node's heap is mostly code and qstrs (bench/RESULTS.md "Node cycle and node heap"): this
imports the modules a running node holds, one by one and in the order a node loads them, from
the .mpy build (host_tools/build.py, as on a board), and prints for each the bytes it leaves on
the heap after a collection and the qstrs it interns for good. The qstr pool is grown first, so
that no module is charged for a new pool that the one before it made necessary (MicroPython
grows the pool by doubling: bench/RESULTS.md "A cliff to know about"); each new qstr's pool
entry costs about 11 bytes more than shown, on 64-bit.

    .venv/bin/python bench/module_heap.py               # a BME280 node, then a PM node's extras
    .venv/bin/python bench/module_heap.py firmware.log  # some modules only

The totals are not the node's heap (its objects, buffers and garbage come on top: bench/
node_cycle.py measures the whole node); they say where a cut would count.
"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from host_tools import build  # noqa: E402

# What a running UDP node holds, in load order (firmware/wiring.py), then what a PM node adds
# (firmware/seq.py and status.py load only to send a STATUS frame).
NODE = (
    "firmware",
    "firmware.log",
    "boards.sim.board",
    "firmware.bme280",
    "firmware.journal",
    "protocols.frame",
    "firmware.node",
    "firmware.links",
    "firmware.clock",
    "firmware.app",
)
PM_NODE = ("firmware.sensors", "firmware.sds011", "boards.sim.uart_bridge")

SCRIPT = r"""
import gc, sys, micropython
# Intern names (getattr interns its argument) until the pool grows by a block of 8 KB or
# more: the new pool has room for every qstr the imports below make, so none is charged for it.
i = 0
while True:
    before = gc.mem_alloc()
    getattr(gc, "pad%d" % i, None)
    i += 1
    if gc.mem_alloc() - before > 8000:
        break
micropython.qstr_info()
for name in sys.argv[1:]:
    gc.collect()
    before = gc.mem_alloc()
    __import__(name)
    gc.collect()
    after = gc.mem_alloc()
    micropython.qstr_info()  # "qstr pool: ... n_qstr=N ...": the host takes the difference
    print("module %s %d" % (name, after - before))
"""


def costs(modules, build_dir):
    """{module: (heap bytes, new qstrs)}, importing modules in order in one unix-port process."""
    out = subprocess.run(
        [build.tool("micropython"), "-X", "heapsize=512K", "-c", SCRIPT, *modules],
        cwd=build_dir,
        env={"MICROPYPATH": ".frozen:."},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        sys.exit("module_heap: %s" % (out.stderr.strip() or out.stdout.strip()))
    found = {}
    n_qstr = None
    for line in out.stdout.splitlines():
        if line.startswith("qstr pool:"):
            n = int(line.split("n_qstr=")[1].split(",")[0])
            new, n_qstr = (None if n_qstr is None else n - n_qstr), n
        elif line.startswith("module "):
            _, name, cost = line.split()
            found[name] = (int(cost), new)
    return found


def main():
    build_dir = build.default_build_dir()
    build.build(build_dir)
    mods = tuple(sys.argv[1:]) or NODE + PM_NODE
    found = costs(mods, build_dir)
    print("## Heap per module, imported in a node's order (bench/module_heap.py)\n")
    print("| module | .mpy bytes | heap bytes | new qstrs |")
    print("|---|---:|---:|---:|")
    total = qstrs = 0
    for name in mods:
        mpy = build_dir / (name.replace(".", "/") + ".mpy")
        if not mpy.exists():
            mpy = build_dir / name.replace(".", "/") / "__init__.mpy"
        size = mpy.stat().st_size if mpy.exists() else 0
        cost, new = found[name]
        total += cost
        qstrs += new
        print("| %s | %d | %d | %d |" % (name, size, cost, new))
        if name == mods[-1] or (not sys.argv[1:] and name == NODE[-1]):
            print("| **total so far** | | **%d** | **%d** |" % (total, qstrs))


if __name__ == "__main__":
    main()

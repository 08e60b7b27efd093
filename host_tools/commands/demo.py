# `citynode demo`: a simulated fleet end to end (the work is in host_tools/sim/demo.py). Each
# option's range is checked here as it is parsed; what options say together, and the files
# they name, by demo.check_args() before anything runs.

import argparse
import math
import re

from host_tools.commands import CliError

# the boards whose radio the simulator has as a chip (boards/sim/lora_hw.py PCB)
LORA_BOARDS = ("heltec_v3", "lilygo_t3_v161", "pico_lora_sx1262")

# Every node is a MicroPython process answered in lockstep by one simulator thread: 128 nodes
# run, at 200 the simulator falls so far behind that nodes give up waiting for its replies
# (boards/sim/board.py) and the run fails after 10 minutes (2 CPUs). 100 leaves room for a slower
# machine; node ids 1000 and up are the LoRa gateways', so nodes could never pass 999.
MAX_NODES = 100
MAX_HOURS = 366 * 24  # a year; demo.MAX_READINGS bounds nodes x hours
MAX_INTERVAL_S = 86400  # as a node's config allows (firmware/config.py)
# A node's heap: NODE_MIN_HEAP (host_tools/sim/fleet.py) is the smallest it runs in, but smaller
# ones may be tried (bench/node_cycle.py does: the node resets and the demo says so); under
# MIN_HEAP MicroPython cannot even load the firmware. No board has more than an ESP32 with 4 MB
# of PSRAM, and a hundred nodes of 4 MB still fit in memory.
MIN_HEAP = 32 * 1024
MAX_HEAP = 4 * 1024 * 1024
_HEAP = re.compile(r"(\d+)([kKmM]?)")  # MicroPython's -X heapsize (decimal here)


def _whole(low, high, unit=""):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError("expected a whole number, got %r" % text) from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError("must be %d..%d%s, got %s" % (low, high, unit, text))
        return value

    return parse


def _hours(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected hours, got %r" % text) from None
    if not 0 < value <= MAX_HOURS:  # also NaN
        raise argparse.ArgumentTypeError(
            "must be more than 0 and at most %d (a year), got %s" % (MAX_HOURS, text)
        )
    return value


def heap_bytes(text):
    """Bytes in a heap size as MicroPython's -X heapsize takes it: 80K, 1M, 81920."""
    m = _HEAP.fullmatch(text)
    if not m:
        raise ValueError("expected bytes, or K or M, e.g. 80K, got %r" % text)
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def _heap(text):
    from host_tools.sim.fleet import NODE_MIN_HEAP

    try:
        size = heap_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if size < MIN_HEAP:
        raise argparse.ArgumentTypeError(
            "%s is less than %dK: the firmware cannot even load (the node runs in %s, "
            "NODE_MIN_HEAP)" % (text, MIN_HEAP // 1024, NODE_MIN_HEAP)
        )
    if size > MAX_HEAP:
        raise argparse.ArgumentTypeError(
            "%s is more than %dM, the most any board has" % (text, MAX_HEAP // (1024 * 1024))
        )
    return text


def _airtime_budget(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected seconds, got %r" % text) from None
    # The node takes 1..86400000 ms a day (firmware/config.py); 0 or less would never send.
    if not (0.001 <= value <= 86400 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be 0.001..86400 seconds a day, got %s" % text)
    return value


def add_arguments(p):
    p.add_argument(
        "--nodes",
        type=_whole(1, MAX_NODES),
        default=3,
        metavar="N",
        help="simulated nodes (3, at most %d)" % MAX_NODES,
    )
    p.add_argument("--hours", type=_hours, default=24.0, metavar="H", help="simulated hours (24)")
    p.add_argument("--trace", metavar="CSV", help="sensor trace to replay")
    p.add_argument(
        "--batch", type=_whole(1, 64), default=10, metavar="N", help="readings per frame (10)"
    )
    p.add_argument("--db", default="./citynode.db", metavar="PATH", help="SQLite file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--interval",
        type=_whole(1, MAX_INTERVAL_S, " s"),
        default=60,
        metavar="S",
        help="sampling interval, s (60)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (0)")
    p.add_argument(
        "--link",
        choices=("udp", "lora"),
        default="udp",
        help="udp: nodes on Wi-Fi; lora: raw LoRa through simulated gateway nodes",
    )
    p.add_argument(
        "--sf",
        type=int,
        default=7,
        choices=range(7, 13),
        metavar="SF",
        help="LoRa spreading factor 7..12 (7)",
    )
    p.add_argument(
        "--gateways", type=_whole(1, 16), default=1, metavar="N", help="LoRa gateways (1)"
    )
    p.add_argument(
        "--board",
        choices=LORA_BOARDS,
        help="LoRa: every node and gateway runs this board's radio set-up (boards/hw.py) with "
        "micropython-lib's driver on a register-level chip; default: the faster API-level modem",
    )
    p.add_argument(
        "--airtime-budget",
        type=_airtime_budget,
        metavar="S",
        help="LoRa: airtime budget per node per day, s (public networks: 30)",
    )
    p.add_argument(
        "--heap",
        type=_heap,
        help="each node's MicroPython heap (default 80K, see host_tools/sim/fleet.py)",
    )
    p.add_argument(
        "--idle",
        choices=("light", "deep"),
        default="light",
        help="how nodes sleep between samples: light (default) or deep (ESP32; one run a wake)",
    )
    p.add_argument("--workdir", metavar="DIR", help="keep node filesystems and console logs here")
    p.add_argument(
        "--sensors",
        type=_sensors,
        default=("bme280",),
        metavar="LIST",
        help="sensors each node has: bme280 and at most one of sds011, pms5003, sps30 "
        "(bme280; e.g. bme280,sds011: PM2.5 and PM10 from a trace made from the weather)",
    )


def _sensors(text):
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    known = ("bme280", "sds011", "pms5003", "sps30")
    for n in names:
        if n not in known:
            raise argparse.ArgumentTypeError(
                "unknown sensor %r (known: %s)" % (n, ", ".join(known))
            )
    if not names or len(set(names)) != len(names) or len([n for n in names if n != "bme280"]) > 1:
        raise argparse.ArgumentTypeError(
            "must list bme280 and/or one particulate sensor once each, got %r" % text
        )
    return names


def run(args):
    from host_tools.sim import demo
    from host_tools.sim.fleet import FleetError

    try:
        return demo.main(demo.DemoOptions.from_namespace(args))
    except (demo.DemoError, FleetError) as e:
        raise CliError(str(e)) from None

# `citynode demo`: a simulated fleet end to end. Real firmware on the MicroPython unix port and
# the simulated board -> binary frames over loopback UDP -> receiver (verify) -> SQLite.

import bisect
import json
import logging
import math
import os
import random
import secrets
import sqlite3
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from host_tools.receive.receiver import Receiver, Verifier
from host_tools.receive.sinks import SqliteSink
from host_tools.sim import pm, weather
from host_tools.sim.fleet import (
    LORA_DRIVER_HEAP,
    LORA_NODE_HEAP,
    NODE_HEAP,
    PM_NODE_HEAP,
    Fleet,
    NodeSpec,
)

KOPER_START = 1782864000  # 2026-07-01T00:00:00Z: a summer day on the coast
QUANTITIES = ("temperature_c", "humidity_pct", "pressure_hpa")
PM_QUANTITIES = ("pm2_5_ugm3", "pm10_ugm3")
PM_SENSORS = ("sds011", "pms5003", "sps30")
TS_TOLERANCE_S = 2.0  # a stored reading is "this row" if its timestamp is within this
# Every node's rows are in memory (about 170 bytes a reading) before the run, and the simulator
# runs about 1 000 readings a wall second: 2 million is some 350 MB and half an hour.
MAX_READINGS = 2_000_000
PROGRESS_EVERY_S = 5.0  # wall time between progress lines on stderr


class DemoError(Exception):
    pass


@dataclass
class DemoOptions:
    """What a demo run is asked for: `citynode demo`'s options (host_tools/commands/demo.py
    parses and range-checks each; check_args() checks them together)."""

    nodes: int = 3
    hours: float = 24.0
    interval: int = 60  # s between samples (a --trace brings its own)
    batch: int = 10  # readings per frame
    seed: int = 0
    trace: str | None = None  # a sensor trace (CSV) to replay instead of generated weather
    link: str = "udp"  # "udp" (Wi-Fi) or "lora" (through simulated gateway nodes)
    sf: int = 7
    gateways: int = 1
    board: str | None = None  # LoRa: this board's real radio set-up and driver, not the API modem
    airtime_budget: float | None = None  # LoRa: s per node per day
    idle: str = "light"
    sensors: tuple = ("bme280",)
    heap: str | None = None  # each node's MicroPython heap; None: what the run needs
    db: str = "./citynode.db"
    workdir: str | None = None  # keep node filesystems and console logs here
    json: bool = False

    @classmethod
    def from_namespace(cls, ns):
        """From argparse's namespace: every field it has (what it lacks keeps its default)."""
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls) if hasattr(ns, f.name)})

    @property
    def lora(self):
        return self.link == "lora"

    @property
    def pm(self):
        return any(n in PM_SENSORS for n in self.sensors)


def world_rows(opts, node_index):
    """The conditions each node senses: a slice of a real trace, or generated Koper weather."""
    span_s = int(opts.hours * 3600)
    if opts.trace:
        try:
            rows = weather.read_trace(opts.trace)
        except OSError as e:
            raise DemoError("cannot read trace %s: %s" % (opts.trace, e.strerror)) from None
        if not rows:
            raise DemoError("trace %s has no rows" % opts.trace)
        end = rows[0][0] + span_s
        return [r for r in rows if r[0] < end]
    count = max(1, span_s // opts.interval)
    return weather.generate(KOPER_START, opts.interval, count, seed=opts.seed * 1000 + node_index)


def check_args(opts):
    """What the options say together, and the files they name: DemoError with one line
    before anything runs (each option's own range is checked by its parser)."""
    if opts.nodes < 1:
        raise DemoError("--nodes: must be at least 1, got %d" % opts.nodes)
    if opts.batch < 1 or opts.batch > 64:
        raise DemoError("--batch: must be 1..64, got %d" % opts.batch)
    lora = opts.lora
    if lora and not 1 <= opts.gateways <= 16:
        raise DemoError("--gateways: must be 1..16, got %d" % opts.gateways)
    board = opts.board
    if board and not lora:
        raise DemoError("--board %s: a board's LoRa radio needs --link lora" % board)
    if lora and opts.idle == "deep":
        raise DemoError(
            "--idle deep is for Wi-Fi nodes (a LoRa node's airtime account would not survive it)"
        )
    budget = opts.airtime_budget
    if budget is not None and not 0.001 <= budget <= 86400:  # the node's config: 1..86400000 ms
        raise DemoError("--airtime-budget: must be 0.001..86400 s a day, got %g" % budget)
    if not opts.hours > 0 or not math.isfinite(opts.hours):
        raise DemoError("--hours: must be more than 0, got %s" % opts.hours)
    if not opts.trace and opts.interval < 1:
        raise DemoError("--interval: must be at least 1 s, got %d" % opts.interval)
    per_node = _trace_rows(opts) if opts.trace else max(1, int(opts.hours * 3600) // opts.interval)
    if per_node * opts.nodes > MAX_READINGS:
        raise DemoError(
            "%d nodes x %d readings each is %d; the demo simulates at most %d readings "
            "(fewer --nodes or --hours%s)"
            % (
                opts.nodes,
                per_node,
                per_node * opts.nodes,
                MAX_READINGS,
                "" if opts.trace else ", or a longer --interval",
            )
        )
    _check_output("--db", Path(opts.db), directory=False)
    if opts.workdir:
        _check_output("--workdir", Path(opts.workdir), directory=True)


def _trace_rows(opts):
    """The rows of the trace a node replays in --hours; DemoError if the file is not a trace."""
    path = Path(opts.trace)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DemoError("--trace %s: cannot read: %s" % (opts.trace, e.strerror)) from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DemoError(
            "--trace: %s line %d: not UTF-8 text (byte 0x%02x); a trace is a CSV file with the "
            "header %s" % (path.name, line, data[e.start], weather.HEADER)
        ) from None
    try:
        rows = weather.read_trace(path)
    except ValueError as e:
        raise DemoError("--trace: %s" % e) from None
    if not rows:
        raise DemoError("--trace: %s has no rows" % path.name)
    end = rows[0][0] + int(opts.hours * 3600)
    return sum(1 for r in rows if r[0] < end)


def _check_output(option, path, directory):
    """path can be written: a folder (directory=True) that is there or can be made, or a
    file that is not a folder, in a folder that is there."""
    if directory:
        if path.exists() and not path.is_dir():
            raise DemoError("%s %s: exists and is not a directory" % (option, path))
        there = path
        while not there.exists():  # the nearest folder that is there; mkdir makes the rest
            there = there.parent
        if not there.is_dir():
            raise DemoError("%s %s: %s is not a directory" % (option, path, there))
        if not os.access(there, os.W_OK | os.X_OK):
            raise DemoError("%s %s: %s is not writable" % (option, path, there))
        return
    if path.is_dir():
        raise DemoError("%s %s: is a directory" % (option, path))
    folder = path.parent
    if not folder.is_dir():
        raise DemoError("%s %s: no such directory %s" % (option, path, folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DemoError("%s %s: directory %s is not writable" % (option, path, folder))


class Progress:
    """While the fleet runs, a line on stderr every PROGRESS_EVERY_S of wall time: how far the
    simulation is and what is stored. A thread of its own, so a quiet stretch (nodes in deep
    sleep, or deferring their frames) still shows; it only reads the fleet's clock and the
    receiver's counters."""

    def __init__(self, fleet, receiver, sensors, stream=None, every_s=PROGRESS_EVERY_S):
        self.fleet = fleet
        self.receiver = receiver
        self.start_s = min(s.rows[0][0] for s in sensors)
        self.hours = max(s.rows[-1][0] - s.rows[0][0] for s in sensors) / 3600
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self.every_s):
            done = min(self.hours, max(0.0, (self.fleet.clock() - self.start_s) / 3600))
            stored = self.receiver.counters.get("readings_accepted", 0)
            self.stream.write(
                "citynode demo: %.1f of %.1f simulated hours, %d readings stored\n"
                % (done, self.hours, stored)
            )
            self.stream.flush()


def run(opts, workdir):
    """Run the fleet opts asks for, storing into opts.db; the summary (summarize())."""
    sensors = node_specs(opts)
    specs = sensors + (gateway_specs(opts) if opts.lora else [])
    db = Path(opts.db)
    for stale in (db, Path(str(db) + "-wal"), Path(str(db) + "-shm")):
        stale.unlink(missing_ok=True)  # the demo's file: each run starts from an empty table
    sink = SqliteSink(db)
    fleet = Fleet(workdir, specs, receiver=None, heap=node_heap(opts), seed=opts.seed)
    receiver = Receiver(Verifier({s.node_id: s.key for s in sensors}), sink, clock=fleet.clock)
    fleet.receiver = receiver
    t0 = time.monotonic()
    try:
        with Progress(fleet, receiver, sensors):
            results = fleet.run()
    finally:
        sink.close()
    elapsed = time.monotonic() - t0
    summary = summarize(
        sensors, [r for r in results if r["node_id"] < 1000], receiver, db, elapsed
    )
    if opts.lora:
        summary.update(lora_summary(opts, fleet, sensors, results, summary))
    return summary


def node_specs(opts):
    """The sensor nodes, ids 1..opts.nodes: each its world's rows, config and place."""
    specs = []
    rng = random.Random(opts.seed)
    for i in range(opts.nodes):
        rows = world_rows(opts, i)
        interval = opts.interval
        if opts.trace and len(rows) > 1:
            gaps = sorted(b[0] - a[0] for a, b in zip(rows, rows[1:], strict=False))
            interval = max(1, gaps[len(gaps) // 2])  # the trace's own cadence
        extra, position = {}, (0.0, 0.0)
        if opts.lora:
            # Nodes are not switched on in the same second: stagger them over one interval,
            # or they would all transmit at once every time (a shared gateway hears one).
            offset = rng.randrange(interval)
            rows = [(r[0] + offset,) + tuple(r[1:]) for r in rows]
            extra = {"link": "lora", "lora": {"sf": opts.sf}}
            if opts.board:  # its real radio set-up, driver and chip
                extra["sim"] = {"radio": opts.board}
            if opts.airtime_budget:
                extra["airtime_budget_ms"] = int(opts.airtime_budget * 1000)
            # nodes on lamp posts 200 m .. 1.5 km around the gateways (Koper's centre is ~1 km)
            angle, radius = rng.uniform(0, 2 * math.pi), rng.uniform(200, 1500)
            position = (radius * math.cos(angle), radius * math.sin(angle))
        if opts.idle == "deep":
            extra["idle"] = "deep"
        if opts.pm:  # config "sensors"; PM made from the weather
            extra["sensors"] = [
                {"type": n, "uart": 1} if n in ("sds011", "pms5003") else {"type": n}
                for n in opts.sensors
            ]
            if "bme280" not in opts.sensors:
                extra.setdefault("sim", {})["bme280"] = False
            rows = pm.add_pm(rows, seed=opts.seed * 1000 + i)
        specs.append(
            NodeSpec(i + 1, secrets.token_bytes(16), rows, interval, opts.batch, extra, position)
        )
    return specs


def gateway_specs(opts):
    """The LoRa gateway nodes, ids 1000..: the first at the centre, the others on a circle."""
    specs = []
    for g in range(opts.gateways):
        angle = 2 * math.pi * g / opts.gateways
        position = (0.0, 0.0) if g == 0 else (600 * math.cos(angle), 600 * math.sin(angle))
        gw = {"role": "gateway", "lora": {"sf": opts.sf}}
        if opts.board:
            gw["sim"] = {"radio": opts.board}
        specs.append(NodeSpec(1000 + g, b"", [], 60, 1, gw, position))
    return specs


def node_heap(opts):
    """--heap, or what a node of this run needs (host_tools/sim/fleet.py)."""
    if opts.heap:
        return opts.heap
    if opts.lora:
        return LORA_DRIVER_HEAP if opts.board else LORA_NODE_HEAP
    return PM_NODE_HEAP if opts.pm else NODE_HEAP


def lora_summary(opts, fleet, sensors, results, summary):
    nodes = [r["stats"] for r in results if r["node_id"] < 1000]
    gateways = [r["stats"] for r in results if r["node_id"] >= 1000]
    airtime_us = sum(fleet.airtime_us.get(s.node_id, 0) for s in sensors)
    stored = summary["readings_stored"] or 1
    return {
        "link": "lora",
        "spreading_factor": opts.sf,
        # which radio: a board's real set-up and micropython-lib's driver on a chip model, or
        # the API-level modem (boards/README.md "Two LoRa radios")
        "radio": opts.board or "api-modem",
        "gateways": len(gateways),
        "airtime_s": round(airtime_us / 1e6, 3),
        "airtime_ms_per_reading": round(airtime_us / 1000 / stored, 2),
        "frames_lost_to_collisions": fleet.air.stats.get("collision", 0),
        "frames_below_sensitivity": fleet.air.stats.get("below_sensitivity", 0),
        "retransmissions": sum(n.get("frames_sent", 0) - n.get("frames_acked", 0) for n in nodes),
        "duty_cycle_deferrals": sum(n.get("deferred", 0) for n in nodes),
        "gateway_frames_forwarded": sum(g.get("forwarded", 0) for g in gateways),
        "gateway_acks_sent": sum(g.get("acks_sent", 0) for g in gateways),
    }


def summarize(specs, results, receiver, db, elapsed):
    stats = [r["stats"] for r in results]
    sampled = sum(s.get("sampled", 0) for s in stats)
    pending = sum(s.get("pending", 0) for s in stats)  # still in the nodes' journals at the end
    status_sent = sum(s.get("status_sent", 0) for s in stats)
    frames_sent = sum(s.get("frames_sent", 0) for s in stats) - status_sent  # DATA frames
    uplink_bytes = sum(s.get("bytes_sent", 0) for s in stats)
    con = sqlite3.connect(db)
    try:
        stored = 0
        unmatched = 0
        max_ts_error = 0.0
        max_diff = {q: 0.0 for q in QUANTITIES}
        pm_stored = 0
        for spec in specs:
            by_ts = {}
            for ts, q, v in con.execute(
                "SELECT ts, quantity, value FROM readings WHERE node_id = ?", (spec.node_id,)
            ):
                by_ts.setdefault(ts, {})[q] = v
            stored += len(by_ts)
            times = sorted(by_ts)
            for row in spec.rows:
                # The stored reading nearest to the moment the node sensed this row.
                i = bisect.bisect_left(times, row[0])
                near = [t for t in times[max(0, i - 1) : i + 1]]
                if not near:
                    continue
                ts = min(near, key=lambda t: abs(t - row[0]))
                if abs(ts - row[0]) > TS_TOLERANCE_S:
                    continue
                max_ts_error = max(max_ts_error, abs(ts - row[0]))
                got = by_ts[ts]
                for q, expected in zip(QUANTITIES, row[1:4], strict=True):
                    if q in got:
                        max_diff[q] = max(max_diff[q], abs(got[q] - expected))
                    else:
                        unmatched += 1
                if len(row) > 5 and PM_QUANTITIES[0] in got:  # (a PM sensor spinning up: none)
                    pm_stored += 1
                    for q, expected in zip(PM_QUANTITIES, row[4:6], strict=True):
                        if q in got:
                            max_diff[q] = max(max_diff.get(q, 0.0), abs(got[q] - expected))
    finally:
        con.close()
    counters = receiver.counters
    rejected = sum(v for k, v in counters.items() if k.startswith("rejected_"))
    return {
        "nodes": len(specs),
        "readings_sampled": sampled,
        "readings_stored": stored,
        # sampled but neither stored nor still waiting on a node (a pending reading may also
        # be stored already: its ack was lost)
        "readings_lost": max(0, sampled - stored - pending),
        "readings_pending_on_nodes": pending,
        "frames_sent": frames_sent,
        "frames_accepted": counters.get("frames_accepted", 0),
        "frames_rejected": rejected,
        "status_frames_sent": status_sent,
        "awake_ms_per_cycle": max((s.get("awake_ms_per_cycle", 0) for s in stats), default=0),
        "status_frames_accepted": counters.get("status_accepted", 0),
        "node_resets": sum(r.get("resets", 0) for r in results),
        # the particulate sensors' fan-and-laser time over the simulated time (bench/pm_power.py)
        "pm_fan_duty": _pm_duty(specs, results),
        "uplink_bytes": uplink_bytes,
        "bytes_per_reading": round(uplink_bytes / stored, 2) if stored else None,
        "max_abs_diff": {q: round(v, 4) for q, v in max_diff.items()},
        "pm_readings_stored": pm_stored,
        "max_ts_error_s": round(max_ts_error, 3),
        "missing_values": unmatched,
        "simulated_hours": round(max((s.rows[-1][0] - s.rows[0][0]) for s in specs) / 3600, 2),
        "wall_seconds": round(elapsed, 2),
        "db": str(db),
        "node_exit_codes": [r["exit_code"] for r in results],
        "node_logs": [r["log"] for r in results],
    }


def _pm_duty(specs, results):
    running = [r["pm_running_ms"] for r in results if r.get("pm_running_ms") is not None]
    if not running:
        return None
    span_ms = sum((s.rows[-1][0] - s.rows[0][0]) * 1000 for s in specs) or 1
    return round(sum(running) / span_ms, 4)


def render(summary):
    d = summary["max_abs_diff"]
    lines = [
        "citynode demo: %d nodes, %.1f simulated hours in %.1f s"
        % (summary["nodes"], summary["simulated_hours"], summary["wall_seconds"]),
        "  readings: %d sampled, %d stored, %d lost, %d still in the nodes' journals"
        % (
            summary["readings_sampled"],
            summary["readings_stored"],
            summary["readings_lost"],
            summary["readings_pending_on_nodes"],
        ),
        "  frames:   %d sent, %d accepted, %d rejected; status frames %d sent, %d accepted; "
        "node resets %d"
        % (
            summary["frames_sent"],
            summary["frames_accepted"],
            summary["frames_rejected"],
            summary["status_frames_sent"],
            summary["status_frames_accepted"],
            summary["node_resets"],
        ),
        "  uplink:   %d bytes, %s bytes per reading; awake %d ms a cycle (the longest node)"
        % (summary["uplink_bytes"], summary["bytes_per_reading"], summary["awake_ms_per_cycle"]),
        "  largest difference stored - sensed: %.2f degC, %.2f %%RH, %.4f hPa, %.3f s"
        % (d["temperature_c"], d["humidity_pct"], d["pressure_hpa"], summary["max_ts_error_s"]),
        "  readings in %s (table readings)" % summary["db"],
    ]
    if "pm2_5_ugm3" in d:
        lines.insert(
            -1,
            "  particulate: %d readings with PM2.5 and PM10 stored; largest difference stored - "
            "sensed %.2f / %.2f ug/m3"
            % (summary["pm_readings_stored"], d["pm2_5_ugm3"], d["pm10_ugm3"]),
        )
    if summary.get("link") == "lora":
        lines.append(
            "  lora:     %s, SF%d, %d gateway(s), %.1f ms airtime a reading, %d frames lost to "
            "collisions, %d retransmissions, %d duty-cycle deferrals"
            % (
                summary.get("radio", "api-modem"),
                summary["spreading_factor"],
                summary["gateways"],
                summary["airtime_ms_per_reading"],
                summary["frames_lost_to_collisions"],
                summary["retransmissions"],
                summary["duty_cycle_deferrals"],
            )
        )
    if summary.get("workdir"):
        lines.append("  node consoles (serial logs): %s/node-*/console.log" % summary["workdir"])
    return "\n".join(lines)


def main(opts):
    """Run the demo opts (DemoOptions) asks for, print its summary; exit status 0 when every
    node finished cleanly and no reading was lost."""
    check_args(opts)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    keep = opts.workdir
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        summary = run(opts, Path(keep))
        summary["workdir"] = str(keep)
    else:
        with tempfile.TemporaryDirectory(prefix="citynode-demo-") as tmp:
            summary = run(opts, Path(tmp))
        summary["node_logs"] = None  # removed with the temporary folder: --workdir keeps them
    if opts.json:
        json.dump(summary, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(render(summary))
    healthy = all(code == 0 for code in summary["node_exit_codes"])
    if not healthy:
        print(
            "citynode demo: a node did not finish cleanly; its console log says why"
            + ("" if summary.get("workdir") else " (keep it with --workdir DIR)"),
            file=sys.stderr,
        )
    ok = healthy and summary["readings_sampled"] > 0 and summary["readings_lost"] == 0
    return 0 if ok else 1

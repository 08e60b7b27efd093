# Fleet simulator: runs real firmware on the MicroPython unix port, one process per node, on the
# simulated board, in lockstep with a virtual clock, and feeds their UDP frames to a receiver.
#
# Each node's board asks this simulator for time (boards/sim.py): "H <id>" at boot, "S <ms>" for
# a short wait, "C <ms>" to sleep until its next sample (the world's next row), "R <ms>" to wait
# for a downlink. Virtual time advances only when
# every node is waiting, after the receiver has handled every datagram already sent, so a day of
# readings takes seconds and every timestamp is exact. Replies: "W <ms since boot> [raw ADC]"
# or "E" (the world, i.e. the trace, has ended: flush and stop).

import json
import os
import select
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from boards.sim_bme280 import SimBME280
from host_tools import build
from protocols import frame

BOOT = "from firmware import main; main.run()"


class FleetError(Exception):
    pass


@dataclass
class NodeSpec:
    node_id: int
    key: bytes
    rows: list  # [(unix_ts, temperature_c, humidity_pct, pressure_hpa)], sorted
    interval_s: int = 60
    batch: int = 10
    extra_config: dict = field(default_factory=dict)


@dataclass
class _Node:
    spec: NodeSpec
    proc: subprocess.Popen
    log_path: Path
    addr: tuple = None
    boot_ms: int = 0
    row: int = 0  # index of the next row the sensor will sense
    waiting: str = None  # "S", "C" or "R" while blocked on the simulator
    deadline_ms: int = 0
    delivered: bool = False  # a downlink arrived for it while it waited
    ended: bool = False


class Fleet:
    def __init__(self, workdir, specs, receiver, heap="64K", build_dir=None):
        self.workdir = Path(workdir)
        self.specs = specs
        self.receiver = receiver
        self.heap = heap
        self.build_dir = Path(build_dir) if build_dir else build.default_build_dir()
        self.now_ms = min(s.rows[0][0] for s in specs) * 1000 if specs else 0
        self.sensor = SimBME280()  # the same register model the boards run: raw ADC values
        self.datagrams = 0

    def clock(self):
        """The receiver's clock: the virtual UTC time, in unix seconds."""
        return self.now_ms / 1000

    def run(self, timeout_s=600):
        build.build(self.build_dir)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as uplink,
        ):
            control.bind(("127.0.0.1", 0))
            uplink.bind(("127.0.0.1", 0))
            uplink.setblocking(False)
            self._control, self._uplink = control, uplink
            nodes = [self._start(spec, control, uplink) for spec in self.specs]
            self._by_addr = {}
            self._by_id = {n.spec.node_id: n for n in nodes}
            try:
                self._loop(nodes, time.monotonic() + timeout_s)
            finally:
                for n in nodes:
                    if n.proc.poll() is None:
                        n.proc.kill()
                    n.proc.wait()
                    n.log_file.close()
        return [self._node_result(n) for n in nodes]

    # --- processes -----------------------------------------------------------------------

    def _start(self, spec, control, uplink):
        home = self.workdir / ("node-%d" % spec.node_id)
        home.mkdir(parents=True, exist_ok=True)
        config = {
            "node_id": spec.node_id,
            "key": spec.key.hex(),
            "board": "sim",
            "interval_s": spec.interval_s,
            "batch": spec.batch,
            "uplink": "127.0.0.1:%d" % uplink.getsockname()[1],
            "sim": {"clock": "127.0.0.1:%d" % control.getsockname()[1]},
        }
        extra = dict(spec.extra_config)
        config["sim"].update(extra.pop("sim", {}))
        config.update(extra)
        (home / "config.json").write_text(json.dumps(config, indent=1))
        log_path = home / "console.log"
        log_file = open(log_path, "w")
        env = dict(os.environ, MICROPYPATH=".frozen:%s" % self.build_dir)
        proc = subprocess.Popen(
            [build.tool("micropython"), "-X", "heapsize=" + self.heap, "-c", BOOT],
            cwd=home,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        node = _Node(spec, proc, log_path)
        node.log_file = log_file
        return node

    # --- lockstep ------------------------------------------------------------------------

    def _loop(self, nodes, give_up):
        alive = nodes
        while alive:
            if time.monotonic() > give_up:
                raise FleetError("fleet: simulation did not finish in time")
            if all(n.waiting for n in alive):
                self._advance(alive)
            ready, _, _ = select.select([self._control], [], [], 0.05)
            if ready:
                self._request(*self._control.recvfrom(256))
            else:  # quiet: has a node exited (finished, or crashed)?
                alive = [n for n in alive if n.proc.poll() is None]

    def _request(self, data, addr):
        words = data.decode().split()
        kind = words[0]
        if kind == "H":
            node = self._by_id.get(int(words[1]))
            if node is None:
                raise FleetError("fleet: unknown node %s said hello" % words[1])
            node.addr = addr
            self._by_addr[addr] = node
            node.boot_ms = node.spec.rows[0][0] * 1000
            self.now_ms = max(self.now_ms, node.boot_ms)
            self._wake(node, sense=True)  # boots at its first row's time and samples it
            return
        node = self._by_addr[addr]
        ms = int(words[1])
        node.waiting = kind
        node.delivered = False
        if kind == "C":
            if node.row >= len(node.spec.rows) or node.ended:
                node.deadline_ms = self.now_ms  # the trace is over: end now
                node.ended = True
            else:
                node.deadline_ms = max(self.now_ms, node.spec.rows[node.row][0] * 1000)
        else:
            node.deadline_ms = self.now_ms + ms

    def _advance(self, alive):
        self._drain()
        due = [n for n in alive if n.waiting == "R" and n.delivered]
        if not due:
            t = min(n.deadline_ms for n in alive)
            self.now_ms = max(self.now_ms, t)
            due = [n for n in alive if n.deadline_ms <= self.now_ms]
        for n in due:
            if n.waiting == "C" and n.ended:
                n.waiting = None
                self._control.sendto(b"E", n.addr)
            else:
                self._wake(n, sense=n.waiting == "C")

    def _wake(self, node, sense):
        node.waiting = None
        reply = "W %d" % (self.now_ms - node.boot_ms)
        if sense:
            _, t, h, p = node.spec.rows[node.row]
            node.row += 1
            reply += " %d %d %d" % self.sensor.set_environment(t, h, p)
        self._control.sendto(reply.encode(), node.addr)

    def _drain(self):
        """Hand every datagram the nodes have sent to the receiver; send its acks back."""
        while True:
            try:
                data, addr = self._uplink.recvfrom(2048)
            except BlockingIOError:
                return
            self.datagrams += 1
            ack = self.receiver.datagram(data)
            if ack is None:
                continue
            self._uplink.sendto(ack, addr)
            try:
                node = self._by_id.get(frame.peek(ack)[2])
            except frame.FrameError:
                node = None
            if node is not None:
                node.delivered = True

    # --- results -------------------------------------------------------------------------

    def _node_result(self, node):
        log = node.log_path.read_text(errors="replace")
        stats = {}
        for line in log.splitlines():
            parts = line.split()
            if len(parts) > 3 and parts[2] == "node" and parts[3] == "stopped":
                stats = dict(p.split("=", 1) for p in parts[4:] if "=" in p)
        return {
            "node_id": node.spec.node_id,
            "exit_code": node.proc.returncode,
            "stats": {k: int(v) for k, v in stats.items() if v.lstrip("-").isdigit()},
            "log": str(node.log_path),
            "log_tail": log.splitlines()[-5:],
        }

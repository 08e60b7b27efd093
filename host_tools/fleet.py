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

from boards.sim_bme280 import SimBME280, SimI2C
from host_tools import build
from protocols import frame

BOOT = "from firmware import main; main.run()"
# The node's MicroPython heap. 80 KB on this 64-bit unix port, where pointers and object
# headers are twice a 32-bit board's: less than an ESP32's ~100 KB free heap holds (FIELD.md).
# The node with its flash journal runs 10 000 cycles in 72 KB here but fails to boot in 64 KB;
# 80 KB leaves room for the littlefs buffers of a real filesystem (bench/RESULTS.md).
NODE_HEAP = "80K"
RESET_EXIT = 3  # boards/sim.py: the node asked for a reset (crash, watchdog, machine.reset)
MAX_RESETS = 20  # per node: a node that keeps resetting is a failed test, not a loop


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
    booted: bool = False
    resets: int = 0


class Fleet:
    def __init__(self, workdir, specs, receiver, heap=NODE_HEAP, build_dir=None):
        self.workdir = Path(workdir)
        self.specs = specs
        self.receiver = receiver
        self.heap = heap
        self.build_dir = Path(build_dir) if build_dir else build.default_build_dir()
        self.now_ms = min(s.rows[0][0] for s in specs) * 1000 if specs else 0
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
        node = _Node(spec, None, log_path)
        node.home = home
        # The node's I2C bus and the chips on it live here; the board bridges transactions.
        hw = dict(config["sim"])
        node.bme280 = (
            SimBME280(chip_id=hw.get("chip_id", 0x60)) if hw.get("bme280", True) else None
        )
        address = hw.get("bme280_address", 0x76)
        node.i2c = SimI2C({address: node.bme280} if node.bme280 else {})
        node.log_file = open(log_path, "w")
        self._spawn(node)
        return node

    def _spawn(self, node):
        env = dict(os.environ, MICROPYPATH=".frozen:%s" % self.build_dir)
        node.proc = subprocess.Popen(
            [build.tool("micropython"), "-X", "heapsize=" + self.heap, "-c", BOOT],
            cwd=node.home,
            env=env,
            stdout=node.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        node.waiting = None

    def _reaped(self, node):
        """A node process ended: a reset (restart it, like the hardware would) or the end."""
        if node.proc.returncode != RESET_EXIT or node.ended:
            return True
        node.resets += 1
        if node.resets > MAX_RESETS:
            raise FleetError("fleet: node %d reset %d times" % (node.spec.node_id, node.resets))
        node.log_file.flush()
        self._spawn(node)
        return False

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
            else:  # quiet: has a node exited (finished, or reset)?
                alive = [n for n in alive if n.proc.poll() is None or not self._reaped(n)]

    def _request(self, data, addr):
        words = data.decode().split()
        kind = words[0]
        if kind[0] == "I":  # a bus transaction: answered at once, time does not move
            self._control.sendto(self._bus(self._by_addr[addr], words), addr)
            return
        if kind == "H":
            node = self._by_id.get(int(words[1]))
            if node is None:
                raise FleetError("fleet: unknown node %s said hello" % words[1])
            node.addr = addr
            self._by_addr[addr] = node
            if node.booted:  # a reset: the board restarts now, sensing what is there now
                node.boot_ms = self.now_ms
                self._wake(node, sense="again")
                return
            node.booted = True
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

    def _bus(self, node, words):
        addr, reg = int(words[1]), int(words[2])
        try:
            if words[0] == "IR":
                return b"D " + node.i2c.readfrom_mem(addr, reg, int(words[3])).hex().encode()
            node.i2c.writeto_mem(addr, reg, bytes.fromhex(words[3]))
            return b"A"
        except OSError:
            return b"N"

    def _wake(self, node, sense):
        """Reply to a waiting node: the time, and with sense=True the next row's conditions
        ("again": the current row's, for a board that just restarted)."""
        node.waiting = None
        reply = "W %d" % (self.now_ms - node.boot_ms)
        if sense:
            if sense is True:
                node.row += 1
            _, t, h, p = node.spec.rows[node.row - 1]
            if node.bme280 is not None:
                node.bme280.set_environment(t, h, p)
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
            "resets": node.resets,
            "stats": {k: int(v) for k, v in stats.items() if v.lstrip("-").isdigit()},
            "log": str(node.log_path),
            "log_tail": log.splitlines()[-5:],
        }

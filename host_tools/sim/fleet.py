# Fleet simulator: runs real firmware on the MicroPython unix port, one process per node, on the
# simulated board, in lockstep with a virtual clock, and feeds their UDP frames to a receiver.
#
# Each node's board asks this simulator for time (boards/sim/board.py): "H <id>" at boot, "S <ms>"
# for a short wait, "C <ms>" to sleep until its next sample (the world's next row), "R <ms>" to
# wait for a downlink, "D <ms>" before it exits into deep sleep (it is started again at its next
# sample, its clock counting on). Virtual time advances only when every node is waiting, after the
# receiver has handled every datagram already sent, so a day of readings takes seconds and every
# timestamp is exact. Replies: "W <ms since boot> [raw ADC]" or "E" (the world, i.e. the trace, has
# ended: flush and stop; "E <ms>" to a node woken from deep sleep after the end). A node with a
# real board's radio ("sim": {"radio": ...}) also sends "X" (its pins and SPI bytes, answered at
# once by the chip model, boards/sim/lora_hw.py) and "Q <ms>" (a wait its radio's DIO can end).

import bisect
import json
import os
import select
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from boards.sim import uart as sim_uart
from boards.sim.bme280 import SimBME280, SimI2C
from boards.sim.lora_hw import FleetRadios, link_mip
from host_tools import build
from host_tools.sim.air import Medium
from protocols import frame, gwlink, uplink

BOOT = "from firmware import app; app.run()"
# The node's MicroPython heap. 80 KB on this 64-bit unix port, where pointers and object
# headers are twice a 32-bit board's: less than an ESP32's ~100 KB free heap holds (FIELD.md);
# it leaves room for the littlefs buffers of a real filesystem (bench/RESULTS.md).
# NODE_MIN_HEAP: the smallest heap bench/node_cycle.py runs 10 000 cycles in without heap
# growth. The promise is 64K (issue 3); since the heap work of 2026-12-03 (bench/RESULTS.md
# "The node in 64 KB again") a BME280-only node holds in 56K, with 4 KB free.
# tests/test_node.py runs them with 2 KB of margin.
NODE_HEAP = "80K"
NODE_MIN_HEAP = "56K"
LORA_NODE_HEAP = "96K"  # + the airtime governor and the radio (micropython-lib's on a board)
# A node with a particulate sensor (config "sensors", firmware/sensors.py): the sensor layer,
# the driver and the sim board's UART bridge. PM_NODE_MIN_HEAP is the smallest heap in which
# each pair (BME280 with an SDS011, a PMS5003 or an SPS30) runs a simulated day without a reset
# (bench/node_cycle.py --sensors): issue 11's 64 KB budget, with nothing to spare (62K fails);
# tests/test_pm_sensors.py runs it with 2 KB of margin. PM_NODE_HEAP keeps NODE_HEAP's margin.
PM_NODE_MIN_HEAP = "64K"
PM_NODE_HEAP = "80K"
# A node or gateway with a real board's radio ("sim": {"radio": ...}): micropython-lib's driver,
# boards/hw.py and the SPI bridge loaded too (bench/RESULTS.md "LoRa with ... real drivers").
LORA_DRIVER_HEAP = "160K"
ACK_FREQ_KHZ = 869525  # acks in the 10 % sub-band (FIELD.md), where the nodes listen for them
RESET_EXIT = 3  # boards/sim/board.py: the node asked for a reset (crash, watchdog, machine.reset)
DEEPSLEEP_EXIT = 4  # boards/sim/deep.py: the node went into deep sleep ("D <ms>" said when)
POWER_CUT_EXIT = 5  # boards/sim/faults.py: the node's power was cut (it restarts at power-on)
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
    position: tuple = (0.0, 0.0)  # metres, on the simulated air (LoRa)

    @property
    def role(self):
        return self.extra_config.get("role", "node")

    @property
    def lora(self):
        return self.extra_config.get("link") == "lora" or self.role == "gateway"


@dataclass
class _Node:
    spec: NodeSpec
    proc: subprocess.Popen
    log_path: Path
    addr: tuple = None
    boot_ms: int = 0
    row: int = 0  # index of the next row the sensor will sense
    waiting: str = None  # "B", "S", "C", "R", "T" or "L" while blocked on the simulator
    deadline_ms: int = 0
    delivered: bool = False  # a downlink arrived for it while it waited
    ended: bool = False
    booted: bool = False
    asleep: bool = False  # in deep sleep: no process until its wake
    wakes: int = 0  # deep-sleep wakes
    resets: int = 0
    power_cuts: int = 0
    rtc_on_ms: int = None  # world time at which its RTC started (power-on); None: at its boot
    home: Path = None  # its filesystem (a folder)
    log_file: object = None  # its serial console, kept
    bme280: SimBME280 = None  # the chip on its I2C bus, None if absent
    uarts: dict = None  # {uart id: SimUART} its serial parts (a particulate sensor)
    pm: object = None  # its particulate sensor (boards/sim/sds011.py ...), None if none
    early: bool = False  # its "C" sleep ends before the next row (a PM sensor spins up)
    i2c: SimI2C = None
    radio: object = None  # a real board's radio chip (boards/sim/lora_hw.py), None if none


class Fleet:
    def __init__(self, workdir, specs, receiver, heap=NODE_HEAP, build_dir=None, seed=0):
        self.workdir = Path(workdir)
        self.specs = specs
        self.receiver = receiver
        self.heap = heap
        self.build_dir = Path(build_dir) if build_dir else build.default_build_dir()
        starts = [s.rows[0][0] for s in specs if s.rows]
        self.now_ms = min(starts) * 1000 if starts else 0
        self.air = None
        if any(s.lora for s in specs):
            self.air = Medium(seed=seed)
            for s in specs:
                if s.lora:
                    self.air.add_radio(s.node_id, *s.position)
        self._tx_ends = []  # end (ms) of every transmission not yet resolved
        self.airtime_us = {}  # node id -> total time on air
        self.radios = FleetRadios(self)  # chips of "sim": {"radio": <board>} nodes
        self.datagrams = 0

    def clock(self):
        """The receiver's clock: the virtual UTC time, in unix seconds."""
        return self.now_ms / 1000

    def run(self, timeout_s=600):
        build.build(self.build_dir)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as control,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as uplink,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gateways,
        ):
            control.bind(("127.0.0.1", 0))
            uplink.bind(("127.0.0.1", 0))
            uplink.setblocking(False)
            gateways.bind(("127.0.0.1", 0))  # gateway nodes' link to the host (gwlink)
            gateways.setblocking(False)
            self._control, self._uplink, self._gateways = control, uplink, gateways
            self._deframers = {}
            self.downlinks = 0
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
                    if n.proc.stdin is not None:  # a serial gateway: the rest of its console
                        self._read_console(n)
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
            "uplink": "127.0.0.1:%d"
            % (self._gateways if spec.role == "gateway" else uplink).getsockname()[1],
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
        if hw.get("radio"):  # a real board's radio chip; its driver on the node reaches it by SPI
            try:
                node.radio = self.radios.add(spec.node_id, hw["radio"])
            except ValueError as e:  # no such board
                raise FleetError("fleet: node %d: %s" % (spec.node_id, e)) from None
        if config.get("sensors"):  # a particulate sensor: on a UART or the I2C bus
            base = spec.rows[0][0] * 1000 if spec.rows else self.now_ms
            clock = lambda: self.now_ms - base  # noqa: E731  (ms since the node's first row)
            uarts, i2c_parts = sim_uart.parts(config, clock)
            node.uarts = {k: sim_uart.SimUART(d, clock) for k, d in uarts.items()}
            node.i2c.devices.update(i2c_parts)
            node.pm = next(iter(list(uarts.values()) + list(i2c_parts.values())), None)
        node.log_file = open(log_path, "w")
        self._spawn(node)
        return node

    def _spawn(self, node):
        # The node imports its modules from "lib" (a link to the build), as a board does from
        # its /lib: MicroPython keeps every module's path as a qstr on the heap, so a long
        # host path would take heap a board does not spend (and vary with the folder's name).
        lib = Path(node.home) / "lib"
        if not lib.is_symlink():
            lib.symlink_to(Path(self.build_dir).resolve(), target_is_directory=True)
        path = ".frozen:lib"
        if node.radio is not None:  # micropython-lib's lora packages, as mip puts them on it
            mpy_cross = build.tool("mpy-cross")
            path += ":" + link_mip(node.home, self.build_dir, node.radio.board, mpy_cross)
        env = dict(os.environ, MICROPYPATH=path)
        serial = node.spec.extra_config.get("uplink") == "serial"
        node.proc = subprocess.Popen(
            [build.tool("micropython"), "-X", "heapsize=" + self.heap, "-c", BOOT],
            cwd=node.home,
            env=env,
            # A gateway on "USB serial": its console is a pipe the simulator reads gwlink
            # messages from (and copies to its log); downlinks go to its stdin.
            stdout=subprocess.PIPE if serial else node.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if serial else subprocess.DEVNULL,
        )
        if serial:
            os.set_blocking(node.proc.stdout.fileno(), False)
        node.waiting = None

    def _reaped(self, node):
        """A node process ended: a reset (restart it, like the hardware would) or the end."""
        if node.asleep:
            return False  # its wake is scheduled ("D"): _advance starts it again
        if node.proc.returncode == DEEPSLEEP_EXIT and node.waiting == "D":
            node.asleep = True
            node.log_file.flush()
            return False
        if node.proc.returncode == POWER_CUT_EXIT and not node.ended:
            node.power_cuts += 1  # boards/sim/faults.py: the RTC restarts with the power
            node.rtc_on_ms = None
        elif node.proc.returncode != RESET_EXIT or node.ended:
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
                self._request(*self._control.recvfrom(2048))
            else:  # quiet: has a node exited (finished, or reset)?
                alive = [n for n in alive if n.proc.poll() is None or not self._reaped(n)]

    def _request(self, data, addr):
        """One request of a node's board (the protocol in this file's header): answered at
        once (buses, radio pins, RTC) or left waiting until the simulated time it names."""
        words = data.decode().split()
        kind = words[0]
        if kind[0] == "I" or kind in ("X", "UW", "UR", "RTC"):  # time does not move
            self._control.sendto(self._answer_now(self._by_addr[addr], kind, words), addr)
        elif kind == "H":
            self._hello(int(words[1]), addr)
        elif kind == "TX":
            self._transmit(self._by_addr[addr], words)
        elif kind == "RX":
            self._listen(self._by_addr[addr], words)
        else:
            self._wait_for(self._by_addr[addr], kind, words)

    def _answer_now(self, node, kind, words):
        if kind[0] == "I":  # a bus transaction
            return self._bus(node, words)
        if kind == "X":  # a radio chip's pins and SPI (boards/sim/spi.py)
            try:
                return self.radios.request(node.spec.node_id, words, self.now_ms)
            except ValueError as e:  # the chip or the circuit refuses it: name the node, stop
                raise FleetError("fleet: node %d: %s" % (node.spec.node_id, e)) from None
        if kind in ("UW", "UR"):  # a UART: bytes to the part, or those it has sent by now
            return self._uart(node, words)
        # "RTC": the board's RTC counts from its last power-on, through resets
        if node.rtc_on_ms is None:
            node.rtc_on_ms = node.boot_ms
        return b"T %d" % (self.now_ms - node.rtc_on_ms)

    def _hello(self, node_id, addr):
        """ "H <id>": a board has booted (a power-on, a reset or a deep-sleep wake)."""
        node = self._by_id.get(node_id)
        if node is None:
            raise FleetError("fleet: unknown node %s said hello" % node_id)
        node.addr = addr
        self._by_addr[addr] = node
        if node.asleep:  # a deep-sleep wake: its clock counted on, it senses the next row
            node.asleep = False
            node.wakes += 1
            if node.ended:
                self._control.sendto(b"E %d" % (self.now_ms - node.boot_ms), addr)
                node.waiting = None
            else:
                self._wake(node, sense=True)
            return
        if node.booted:  # a reset: the board restarts now, sensing what is there now
            node.boot_ms = self.now_ms
            self._wake(node, sense="again" if node.spec.rows else False)
            return
        node.booted = True
        if not node.spec.rows:  # a gateway: nothing to sense, it boots now
            node.boot_ms = self.now_ms
            self._wake(node, sense=False)
            return
        # It boots at its first row's time and samples it: until then it waits.
        node.waiting, node.deadline_ms = "B", max(self.now_ms, node.spec.rows[0][0] * 1000)

    def _transmit(self, node, words):
        """ "TX <freq> <sf> <power> <hex>" (the API-level modem): on the air now; the radio is
        busy until the frame has left."""
        freq, sf, power = int(words[1]), int(words[2]), int(words[3])
        tx = self.air.transmit(
            node.spec.node_id, self.now_ms * 1000, freq, sf, 125, bytes.fromhex(words[4]), power
        )
        end_ms = -(-tx.t_end // 1000)
        bisect.insort(self._tx_ends, end_ms)
        node.waiting, node.deadline_ms, node.delivered = "T", end_ms, False
        self.airtime_us[node.spec.node_id] = self.airtime_us.get(node.spec.node_id, 0) + (
            tx.t_end - tx.t_start
        )

    def _listen(self, node, words):
        """ "RX <freq> <sf> <timeout ms>" (the API-level modem): a receive window."""
        freq, sf, timeout = int(words[1]), int(words[2]), int(words[3])
        if self._world_over(node):
            node.waiting = None
            self._control.sendto(b"E", node.addr)
            return
        now_us = self.now_ms * 1000
        self.air.listen(node.spec.node_id, freq, sf, 125, now_us, now_us + timeout * 1000)
        node.waiting, node.deadline_ms, node.delivered = "L", self.now_ms + timeout, False

    def _wait_for(self, node, kind, words):
        """ "S <ms>", "R <ms>", "C <ms> [<early>]", "D <ms>": the node waits in simulated time."""
        ms = int(words[1])
        node.waiting = kind
        node.delivered = False
        if kind in ("C", "D"):
            # "C <ms> <early>": wake early ms before the next row, without sensing it yet
            early = int(words[2]) if len(words) > 2 else 0
            node.early = bool(early)
            if node.row >= len(node.spec.rows) or node.ended:
                node.deadline_ms = self.now_ms  # the trace is over: end now
                node.ended = True
            else:
                row_ms = node.spec.rows[node.row][0] * 1000
                node.deadline_ms = max(self.now_ms, row_ms - early)
        else:
            node.deadline_ms = self.now_ms + ms

    def _advance(self, alive):
        self._drain()
        self._drain_gateways()
        due = [n for n in alive if n.waiting == "R" and n.delivered]
        if not due:
            t = min(n.deadline_ms for n in alive)
            if self._tx_ends and self._tx_ends[0] < t:
                t = self._tx_ends[0]  # a frame ends first: someone may hear it
            chip_t = self.radios.next_event_ms()  # a radio chip's TX end or RX timeout
            if chip_t is not None and chip_t < t:
                t = chip_t
            self.now_ms = max(self.now_ms, t)
            self.radios.run(self.now_ms)
            while self._tx_ends and self._tx_ends[0] <= self.now_ms:
                self._tx_ends.pop(0)
            due = [n for n in alive if n.deadline_ms <= self.now_ms]
            if self.air is not None:
                due = self._hear(alive, due)
            due += [  # "Q": a node waiting for its radio's interrupt (boards/sim/spi.py)
                n
                for n in alive
                if n.waiting == "Q" and n not in due and self.radios.edge(n.spec.node_id)
            ]
        for n in due:
            if n.waiting is None:
                continue  # woken by a frame heard
            if n.waiting == "L" and self._world_over(n):
                n.waiting = None
                self._control.sendto(b"E", n.addr)
            elif n.waiting == "D":
                if n.asleep:
                    self._spawn(n)  # the wake: it says hello, then senses or hears "E"
            elif n.waiting == "B":
                n.boot_ms = self.now_ms
                self._wake(n, sense=True)
            elif n.waiting == "C" and n.ended:
                n.waiting = None
                self._control.sendto(b"E", n.addr)
            else:
                self._wake(n, sense=n.waiting == "C" and not n.early)

    def _hear(self, alive, due):
        """Resolve the air up to now: a radio in a receive window that heard a frame wakes
        with it ("P <ms> <rssi> <snr x4> <hex>"); its window closes."""
        heard = self.air.deliveries(self.now_ms * 1000)
        for radio_id, deliveries in heard.items():
            if self.radios.deliver(radio_id, deliveries, self.now_ms):
                continue  # a radio chip: its driver reads the frame over SPI
            node = self._by_id.get(radio_id)
            if node is None or node.waiting != "L":
                continue
            d = deliveries[0]
            self.air.stop_listening(radio_id, self.now_ms * 1000)
            node.waiting = None
            reply = "P %d %d %d %s" % (
                self.now_ms - node.boot_ms,
                round(d.rssi),
                max(-128, min(127, round(d.snr * 4))),
                bytes(d.payload).hex(),
            )
            self._control.sendto(reply.encode(), node.addr)
        return [n for n in due if n.waiting is not None]

    def _world_over(self, node):
        """A gateway's world ends when every node it serves has finished."""
        return node.spec.role == "gateway" and all(
            n.proc.poll() is not None or n.ended
            for n in self._by_id.values()
            if n.spec.role != "gateway"
        )

    def _drain_gateways(self):
        """Uplinks from gateway nodes: the LoRa frame goes to the receiver, stamped with the
        simulator's clock (the frame ended now); its ack goes back as a DOWNLINK for the node's
        receive window, 2 s after the uplink ended (GATEWAY.md). Gateways speak over UDP, or
        over their serial console (a pipe here), where the framing skips their log lines."""
        while True:
            try:
                data, addr = self._gateways.recvfrom(4096)
            except BlockingIOError:
                break
            deframer = self._deframers.setdefault(addr, gwlink.Deframer())
            for m in deframer.feed(data):
                self._gateway_message(m, lambda b, a=addr: self._gateways.sendto(b, a))
        for node in self._by_id.values():
            if node.proc is None or node.proc.stdin is None:
                continue
            data = self._read_console(node)
            if data:
                deframer = self._deframers.setdefault(node.spec.node_id, gwlink.Deframer())
                for m in deframer.feed(data):
                    self._gateway_message(m, lambda b, n=node: self._write_console(n, b))

    def _read_console(self, node):
        chunks = []
        while True:
            try:
                chunk = os.read(node.proc.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        if data:
            node.log_file.write(data.decode("utf-8", "replace"))
        return data

    def _write_console(self, node, data):
        try:
            node.proc.stdin.write(data)
            node.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the gateway reset: the node will send again

    def _gateway_message(self, m, reply):
        if not isinstance(m, gwlink.Uplink):
            return
        self.datagrams += 1
        # The gateway stamps the end of reception; the frame left the node one time on air
        # earlier, and its ages count from that moment (SPEC.md "Timing").
        sent = self.now_ms / 1000 - m.airtime_us / 1e6
        ack = self.receiver.datagram(bytes(m.payload), rx_time=sent)
        gw = self._by_id.get(m.gw_id)
        if gw is not None:
            gw.delivered = True  # its wait for the host's answer is over either way
        if ack is None:
            return
        self.downlinks += 1
        down = gwlink.Downlink(
            m.gw_id,
            self.downlinks & 0xFFFF,
            m.rx_ms + gwlink.RX_DELAY_MS,
            ACK_FREQ_KHZ,
            14,
            m.sf,
            ack,
        )
        reply(gwlink.encode(down))

    def _uart(self, node, words):
        uart = (node.uarts or {}).get(int(words[1]))
        if words[0] == "UW":
            if uart is not None:
                uart.write(bytes.fromhex(words[2] if len(words) > 2 else ""))
            return b"A"
        return b"D " + (uart.take(64).hex().encode() if uart is not None else b"")

    def _bus(self, node, words):
        if words[0] in ("IT", "IF"):  # a whole write or read transaction (an SPS30's)
            addr = int(words[1])
            try:
                if words[0] == "IT":
                    node.i2c.writeto(addr, bytes.fromhex(words[2] if len(words) > 2 else ""))
                    return b"A"
                return b"D " + node.i2c.readfrom(addr, int(words[2])).hex().encode()
            except OSError:
                return b"N"
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
            row = node.spec.rows[node.row - 1]
            if node.bme280 is not None:
                node.bme280.set_environment(*row[1:4])
            if node.pm is not None and len(row) > 5:  # (ts, T, RH, P, PM2.5, PM10)
                node.pm.set_pm(row[4], row[5])
        data = reply.encode()
        if node.radio is not None:  # what its radio chip drives; "E": a gateway's world is over
            if node.spec.role == "gateway" and self._world_over(node):
                data = b"E" + data[1:]
            data += self.radios.lines(node.spec.node_id, self.now_ms)
        self._control.sendto(data, node.addr)

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
                node = self._by_id.get(uplink.peek(ack)[2])
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
            if len(parts) > 3 and parts[2] in ("node", "gateway") and parts[3] == "stopped":
                stats.update(p.split("=", 1) for p in parts[4:] if "=" in p)  # several lines
        return {
            "node_id": node.spec.node_id,
            "exit_code": node.proc.returncode,
            "resets": node.resets,
            "power_cuts": node.power_cuts,
            # ms its particulate sensor's fan and laser ran (the power model's duty), or None
            "pm_running_ms": node.pm.running_ms(node.pm.clock()) if node.pm else None,
            "wakes": node.wakes,
            "stats": {k: int(v) for k, v in stats.items() if v.lstrip("-").isdigit()},
            "log": str(node.log_path),
            "log_tail": log.splitlines()[-5:],
        }

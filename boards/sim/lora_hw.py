# The host side of a simulated LoRa board: the printed circuit (which GPIO of the MCU reaches
# which pin of the radio chip), the chip model on it (boards/sim/sx1262.py, sx1276.py), and the
# bridge that takes the node's pin and SPI operations (boards/sim/spi.py, "X" requests to the
# fleet simulator) to the chip in lockstep and tells the node what the chip drives (BUSY, DIO).
# Also builds the micropython-lib LoRa packages a board's MIP_PACKAGES name, as mip would.
#
# The wiring here is the boards' schematics, written down independently of boards/<name>.py
# (same sources, boards/README.md): a board module that passes the driver another pin fails
# here as it would on the bench (tests/test_lora_chips.py mutates one to show it).

import math

from boards.sim.sx1262 import SX1262
from boards.sim.sx1276 import SX1276, ChipError

try:  # the host's; on MicroPython (boards/sim/mcu.py) only PCB and RadioHardware are used
    import ast
    import bisect
    import subprocess
    from pathlib import Path

    ROOT = Path(__file__).resolve().parent.parent.parent
    VENDOR_LORA = ROOT.parent / "shared" / "vendor" / "micropython-lib" / "micropython" / "lora"
except ImportError:  # pragma: no cover
    pass

# The boards' radio wiring: GPIO numbers of the MCU. Sources as in boards/README.md:
# Heltec's pins_arduino.h (arduino-esp32 variants/heltec_wifi_lora_32_V3) and Meshtastic's
# variant.h for the Heltec V3 and the Waveshare Pico-LoRa-SX1262 (TCXO 1.8 V on DIO3, RF switch
# on DIO2); LilyGO's utilities.h block T3_V1_6_SX1276 (PA_BOOST is the antenna's only path).
PCB = {
    "heltec_v3": {
        "chip": "sx1262",
        "spi": (9, 10, 11),  # SCK, MOSI, MISO
        "nss": 8,
        "nreset": 12,
        "busy": 13,
        "dio": (14,),  # DIO1
        "tcxo_mv": 1800,
        "rf_switch_dio2": True,
    },
    "pico_lora_sx1262": {
        "chip": "sx1262",
        "spi": (10, 11, 12),
        "nss": 3,
        "nreset": 15,
        "busy": 2,
        "dio": (20,),
        "tcxo_mv": 1800,
        "rf_switch_dio2": True,
    },
    "lilygo_t3_v161": {
        "chip": "sx1276",
        "spi": (5, 27, 19),
        "nss": 18,
        "nreset": 23,
        "busy": None,
        "dio": (26, 33),  # DIO0, DIO1
        "pa_boost_only": True,
    },
}
IDLE_CAP_MS = 1000  # boards/sim/spi.py: machine.idle() returns at a DIO edge or after this


class WiringError(ValueError):
    """The node drives or listens on pins the board's circuit does not connect that way."""


def board_names():
    return sorted(PCB)


class RadioHardware:
    """One board's radio: its chip, and the MCU pins as the circuit connects them."""

    def __init__(self, board, port, label):
        if board not in PCB:
            raise WiringError(
                "sim radio %r: no such LoRa board (known: %s)" % (board, ", ".join(board_names()))
            )
        self.board = board
        self.pcb = pcb = PCB[board]
        self.label = label
        if pcb["chip"] == "sx1262":
            self.chip = SX1262(port, pcb["tcxo_mv"], pcb["rf_switch_dio2"], label)
        else:
            self.chip = SX1276(port, pcb["pa_boost_only"], label)
        self.out = {}  # GPIO -> level the MCU drives
        self.bus = None  # (sck, mosi, miso) of the MCU's SPI
        self.reported = (0,) * len(pcb["dio"])  # DIO levels the node was last told
        self.requests = 0

    def _fail(self, what):
        raise WiringError("%s on %s: %s" % (self.label, self.board, what))

    def nss_low(self):
        return self.out.get(self.pcb["nss"], 1) == 0  # pulled up until the MCU drives it

    def request(self, tokens, t_us):
        """Apply the node's operations (boards/sim/spi.py) in order; the reply's MISO is the
        last read transfer's. Returns the reply bytes: "D <hex|-> <lines>"."""
        self.requests += 1
        miso = b"-"
        for tok in tokens:
            kind = tok[0]
            if kind == "o":
                gpio, _, v = tok[1:].partition("=")
                self._drive(int(gpio), int(v), t_us)
            elif kind == "b":
                spi_id, sck, mosi, miso_pin, baud, pol, pha = (int(x) for x in tok[1:].split(","))
                if (pol, pha) != (0, 0):
                    self._fail(
                        "SPI mode %d,%d: the chip samples on mode 0 (CPOL 0, CPHA 0)" % (pol, pha)
                    )
                limit = 16000000 if self.pcb["chip"] == "sx1262" else 10000000
                if baud > limit:
                    self._fail(
                        "SPI at %d Hz: the %s takes at most %d Hz" % (baud, self.chip.NAME, limit)
                    )
                self.bus = (sck, mosi, miso_pin)
            elif kind == "q":
                gpio = int(tok[1:])
                if gpio not in self.pcb["dio"]:
                    self._fail(
                        "an interrupt handler on GPIO %d, which no DIO of the radio drives "
                        "(DIO lines on GPIO %s)"
                        % (gpio, ", ".join(str(g) for g in self.pcb["dio"]))
                    )
            elif kind in "wr":
                data = bytes.fromhex(tok[1:])
                got = self._transfer(data, t_us)
                if kind == "r":
                    miso = got.hex().encode()
            else:
                raise ValueError("sim radio: unknown operation %r" % tok)
        return b"D " + miso + self.lines(t_us)

    def _drive(self, gpio, v, t_us):
        old = self.out.get(gpio)
        self.out[gpio] = v
        if gpio == self.pcb["nss"] and old != v:
            self.chip.nss(v, t_us)
        elif gpio == self.pcb["nreset"] and v and old == 0:
            self.chip.reset(t_us)  # NRESET released after a low pulse

    def _transfer(self, data, t_us):
        if self.bus != self.pcb["spi"]:
            return b"\xff" * len(data)  # clocks and data go to pins the chip is not on
        if not self.nss_low():
            return b"\xff" * len(data)  # the chip is not selected: MISO floats (pulled up)
        return self.chip.transfer(data, t_us)

    def dio(self):
        return self.chip.dio()

    def edge(self):
        """A DIO line rose since the node was last told the lines."""
        pairs = zip(self.dio(), self.reported, strict=True)
        return any(now and not before for now, before in pairs)

    def lines(self, t_us):
        """What the chip drives, for the node: " L<gpio>=<level>" per DIO line and
        " B<gpio>=<us>" for BUSY (how long it stays high; -1 until the chip is woken)."""
        levels = self.dio()
        self.reported = levels
        dio = self.pcb["dio"]  # (MicroPython's zip takes no strict=)
        out = b"".join(b" L%d=%d" % (dio[i], v) for i, v in enumerate(levels))
        if self.pcb["busy"] is not None:
            out += b" B%d=%d" % (self.pcb["busy"], math.ceil(self.chip.busy(t_us)))
        return out


class AirPort:
    """The chip's antenna on the fleet simulator's air (host_tools/sim/air.py Medium)."""

    def __init__(self, fleet, radio_id):
        self.fleet = fleet
        self.radio_id = radio_id

    def transmit(self, chip, t_us, p, payload):
        f = self.fleet
        tx = f.air.transmit(
            self.radio_id,
            t_us,
            p["freq_khz"],
            p["sf"],
            p["bw"],
            payload,
            p["power_dbm"],
            coding_rate=p["coding_rate"],
            preamble_len=p["preamble_len"],
            implicit_header=p["implicit_header"],
            crc_en=p["crc_en"],
        )
        meta = f.radios.meta
        meta[tx.id] = {"syncword": p["syncword"], "invert_iq": p["invert_iq"]}
        if len(meta) > 4096:  # long runs: forget the oldest frames' settings, long delivered
            for old in list(meta)[:2048]:
                del meta[old]
        bisect.insort(f._tx_ends, -(-tx.t_end // 1000))  # the fleet resolves the air then
        f.airtime_us[self.radio_id] = f.airtime_us.get(self.radio_id, 0) + tx.t_end - tx.t_start
        return tx.t_end

    def listen(self, chip, t_us, p):
        self.fleet.air.listen(self.radio_id, p["freq_khz"], p["sf"], p["bw"], t_us, None)

    def stop(self, chip, t_us):
        self.fleet.air.stop_listening(self.radio_id, t_us)

    def locked(self, chip, t_us):
        return self.fleet.air.locked(self.radio_id, t_us)


class FleetRadios:
    """The chips of a fleet's sim-radio nodes (config "sim": {"radio": "<board>"})."""

    def __init__(self, fleet):
        self.fleet = fleet
        self.chips = {}  # node id -> RadioHardware
        self.meta = {}  # transmission id -> {"syncword", "invert_iq"}

    def add(self, node_id, board):
        hw = RadioHardware(board, AirPort(self.fleet, node_id), "node %d's radio" % node_id)
        self.chips[node_id] = hw
        return hw

    def request(self, node_id, words, now_ms):
        """An "X <us> <ops...>" request: the node's pins and SPI, at now_ms + us."""
        hw = self.chips[node_id]
        return hw.request(words[2:], now_ms * 1000 + int(words[1]))

    def next_event_ms(self):
        times = [hw.chip.next_event_us() for hw in self.chips.values()]
        times = [t for t in times if t is not None]
        return -(-min(times) // 1000) if times else None

    def run(self, now_ms):
        for hw in self.chips.values():
            hw.chip.run_until(now_ms * 1000)

    def deliver(self, radio_id, deliveries, now_ms):
        """Frames the air delivered to radio_id by now_ms: True if it is a chip (they are its
        business; one in RX single mode takes the first), else False."""
        hw = self.chips.get(radio_id)
        if hw is None:
            return False
        for d in deliveries:
            meta = self.meta.get(d.tx_id, {})  # several receivers may hear one frame
            hw.chip.deliver(d.payload, d.rssi, d.snr, True, meta, now_ms * 1000)
        return True

    def edge(self, node_id):
        hw = self.chips.get(node_id)
        return hw is not None and hw.edge()

    def lines(self, node_id, now_ms):
        hw = self.chips.get(node_id)
        return b"" if hw is None else hw.lines(now_ms * 1000)


# --- micropython-lib's LoRa packages, as `mip install` puts them on a board --------------------


def mip_packages(board):
    """MIP_PACKAGES of boards/<board>.py, read with ast (a board module imports machine)."""
    tree = ast.parse((ROOT / "boards" / (board + ".py")).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "MIP_PACKAGES" for t in node.targets
        ):
            return tuple(ast.literal_eval(node.value))
    return ()


def link_mip(home, build_dir, board, mpy_cross):
    """The node's "mip" folder (a link to the board's lora packages, built once in build_dir
    with the mpy-cross command given), for MICROPYPATH; returns its name, relative to home."""
    target = build_mip(Path(build_dir) / ("mip-" + board), board, mpy_cross)
    link = Path(home) / "mip"
    if link.is_symlink() and link.resolve() != target.resolve():
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(target.resolve(), target_is_directory=True)
    return "mip"


def build_mip(dest, board, mpy_cross):
    """Compile the vendored lora packages the board installs (and `lora`, which each requires)
    into dest/lora/*.mpy; returns dest. Unmodified sources, from ../shared/vendor."""
    dest = Path(dest)
    if not VENDOR_LORA.is_dir():
        raise FileNotFoundError(
            "micropython-lib's lora drivers not found at %s (../shared/vendor)" % VENDOR_LORA
        )
    packages = ("lora",) + tuple(p for p in mip_packages(board) if p != "lora")
    (dest / "lora").mkdir(parents=True, exist_ok=True)
    for package in packages:
        sources = sorted((VENDOR_LORA / package / "lora").glob("*.py"))
        if not sources:
            raise FileNotFoundError("no package %s in %s" % (package, VENDOR_LORA))
        for src in sources:
            out = dest / "lora" / (src.stem + ".mpy")
            if out.exists() and out.stat().st_mtime >= src.stat().st_mtime:
                continue
            proc = subprocess.run(
                [mpy_cross, "-s", "lora/" + src.name, "-o", str(out), str(src)],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                raise RuntimeError("mpy-cross failed on %s: %s" % (src, proc.stderr.strip()))
    return dest


__all__ = ["ChipError", "WiringError", "RadioHardware", "FleetRadios", "PCB", "build_mip"]

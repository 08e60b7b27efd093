# micropython-lib's real LoRa drivers (lora, lora-sync, lora-sx126x, lora-sx127x, unmodified,
# from ../shared/vendor) on the register/command-level chip models (boards/sim/sx1262.py,
# sx1276.py), reached through boards/hw.py's real RealBoard.radio() of the three LoRa boards:
# the drivers' time on air against firmware/airtime.py, the chips' strictness, a board module
# with a wrong pin or setting failing as it would on the bench, and a fleet run.
import socket
import sqlite3
import threading

import pytest
from test_lora import gateway, lora_node

from boards.sim import lora_hw
from boards.sim.lora_hw import RadioHardware, WiringError
from boards.sim.sx1262 import SX1262
from boards.sim.sx1276 import SX1276, ChipError
from host_tools import build
from host_tools.receive.receiver import Receiver, Verifier
from host_tools.receive.sinks import SqliteSink
from host_tools.sim import air
from host_tools.sim.fleet import LORA_DRIVER_HEAP, Fleet

BOARDS = ("heltec_v3", "lilygo_t3_v161", "pico_lora_sx1262")
DRIVER_HEAP = "400K"  # the scripts here load the drivers and test code; the node's: bench/


# --- a one-chip bench: the fleet simulator's protocol, for scripts on the unix port ------------


class _Port:
    """The chip's antenna on a bench: transmissions are recorded, nothing is heard."""

    def __init__(self):
        self.sent = []

    def transmit(self, chip, t_us, p, payload):
        toa = air.time_on_air_us(
            len(payload),
            p["sf"],
            p["bw"],
            p["coding_rate"],
            p["preamble_len"],
            p["implicit_header"],
            p["crc_en"],
        )
        self.sent.append((t_us, toa, dict(p), bytes(payload)))
        return t_us + toa

    def listen(self, chip, t_us, p):
        pass

    def stop(self, chip, t_us):
        pass

    def locked(self, chip, t_us):
        return None


class ChipBench(threading.Thread):
    """Answers one sim board's control requests (H, S, C, R, Q, X) on a virtual clock, with
    the board's radio chip. The first error of the chip or the wiring is kept in .error; the
    node then gets "!" and its driver stops on it."""

    def __init__(self, board):
        super().__init__(daemon=True)
        self.port = _Port()
        self.hw = RadioHardware(board, self.port, "bench")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(60)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.now_ms = 0
        self.error = None

    def run(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(4096)
            except OSError:
                return
            words = data.decode().split()
            try:
                reply = self._answer(words)
            except (ChipError, WiringError) as e:
                self.error = self.error or e
                reply = b"!"
            self.sock.sendto(reply, addr)

    def _answer(self, words):
        kind = words[0]
        if kind == "X":
            return self.hw.request(words[2:], self.now_ms * 1000 + int(words[1]))
        if kind != "H":
            end = self.now_ms + int(words[1])
            chip = self.hw.chip
            while True:  # the chip's own events (TX end, RX timeout) up to the end of the wait
                t = chip.next_event_us()
                if t is None or -(-t // 1000) > end:
                    break
                self.now_ms = max(self.now_ms, -(-t // 1000))
                chip.run_until(self.now_ms * 1000)
                if kind == "Q" and self.hw.edge():
                    end = self.now_ms  # "Q": woken by the DIO edge
            self.now_ms = end
        return b"W %d" % self.now_ms + self.hw.lines(self.now_ms * 1000)

    def close(self):
        self.sock.close()


@pytest.fixture(scope="session")
def mip_dirs(board_build):
    """Each board's micropython-lib packages, compiled as mip installs them."""
    out = {}
    for board in BOARDS:
        dest = board_build["dir"].parent / ("mip-" + board)
        lora_hw.build_mip(dest, board, build.tool("mpy-cross"))
        out[board] = dest
    return out


@pytest.fixture
def radio_script(run_mp, mip_dirs):
    """radio_script(board, body) -> (stdout, bench): body runs after `modem = board.radio()`
    on a sim board whose radio is that board's, the chip on a bench. A line `prelude` may come
    before (to change the board module first)."""

    def run(board, body, prelude=""):
        bench = ChipBench(board)
        bench.start()
        script = "\n".join(
            [
                "import sys",
                "sys.path.append(%r)" % str(mip_dirs[board]),
                prelude,
                "from boards.sim.board import Board",
                "b = Board({'node_id': 1, 'sim': {'clock': %r, 'radio': %r}})"
                % (bench.addr, board),
                "try:",
                "    modem = b.radio()",
                "except Exception as e:",
                "    print('radio failed:', type(e).__name__, e)",
                "    raise SystemExit(0)",
                body,
            ]
        )
        try:
            proc = run_mp(script, heap=DRIVER_HEAP, timeout=60, check=False)
        finally:
            bench.close()
        return proc.stdout + proc.stderr, bench  # a failure shows there: callers assert

    return run


# --- time on air ---------------------------------------------------------------------------


@pytest.mark.parametrize("board", ["heltec_v3", "lilygo_t3_v161"])
def test_driver_time_on_air_matches_firmware_airtime_sf7_to_sf12(radio_script, board):
    # The driver, configured per SF through the chip (which checks the low data rate
    # optimisation it sets), against the firmware's governor arithmetic; and one frame sent at
    # each SF: the chip's air time equals both.
    body = """
from firmware.airtime import time_on_air_us
cfg = dict(modem.cfg)
for sf in range(7, 13):
    modem.configure({'sf': sf})
    cfg['sf'] = sf
    for n in (1, 10, 16, 24, 51, 100, 255):
        print('toa', sf, n, modem.get_time_on_air_us(n), time_on_air_us(cfg, n))
    modem.send(bytes(range(24)))
print('done')
"""
    out, bench = radio_script(board, body)
    assert bench.error is None, bench.error
    assert "done" in out, out
    rows = [line.split()[1:] for line in out.splitlines() if line.startswith("toa ")]
    assert len(rows) == 6 * 7
    for sf, n, driver, firmware in rows:
        assert int(driver) == int(firmware), (sf, n)
    sent = bench.port.sent
    assert [p["sf"] for _, _, p, _ in sent] == [7, 8, 9, 10, 11, 12]
    for sf, (_, toa, p, payload) in zip(range(7, 13), sent, strict=True):
        want = [int(d) for s, n, d, _ in rows if int(s) == sf and int(n) == 24][0]
        assert toa == want and payload == bytes(range(24))
        assert p["freq_khz"] == 868100 and p["preamble_len"] == 8 and p["syncword"] == 0x12
        assert p["power_dbm"] == 14 and p["bw"] == 125 and p["crc_en"]


# --- the real boards' set-up on the chips ----------------------------------------------------

_SEND = """
print('sent at', modem.send(b'citynode'))
print('rx', modem.recv(timeout_ms=300))
print('done')
"""


@pytest.mark.parametrize("board", BOARDS)
def test_each_lora_board_brings_its_radio_up_and_sends(radio_script, board):
    out, bench = radio_script(board, _SEND)
    assert bench.error is None, bench.error
    assert "rx None" in out and "done" in out, out  # nothing on the air: the window times out
    ((t_us, toa, p, payload),) = bench.port.sent
    assert payload == b"citynode" and p["sf"] == 7 and p["power_dbm"] == 14


# Each mutation makes boards/<board>.py (through hw.py) give the driver what the board's circuit
# or chip does not take; the radio must then fail, with the reason named.
MUTATIONS = [
    ("heltec_v3", "LORA_BUSY = 14", "NSS went low while BUSY was high"),
    ("heltec_v3", "LORA_CS = 7", "RuntimeError Internal radio Status (7, 3) OpError 0xffff"),
    ("heltec_v3", "LORA_TCXO_MV = 0", "BUSY timeout"),
    ("heltec_v3", "LORA_TCXO_MV = 3300", "overdrive"),
    (
        "pico_lora_sx1262",
        "SPI_MISO = 13",
        "RuntimeError Internal radio Status (7, 3) OpError 0xffff",
    ),
    ("pico_lora_sx1262", "LORA_DIO1 = 21", "no DIO of the radio drives"),
    ("lilygo_t3_v161", "LORA_TX_ANT = None", "routes only PA_BOOST"),
    ("lilygo_t3_v161", "LORA_DIO0 = 25", "no DIO of the radio drives"),
    ("lilygo_t3_v161", "LORA_RESET = 14", None),  # the v1.3's reset pin: harmless here
]


@pytest.mark.parametrize("board, change, error", MUTATIONS)
def test_a_board_with_a_wrong_pin_or_setting_fails(radio_script, board, change, error):
    prelude = "from boards import %s as m\nm.Board.%s" % (board, change)
    out, bench = radio_script(board, _SEND, prelude)
    said = out + (str(bench.error) if bench.error else "")
    if error is None:
        assert bench.error is None and "done" in out, said
    else:
        assert error in said, said
        assert "done" not in out


def test_a_lora_cfg_the_chip_refuses_fails(radio_script):
    # coding_rate 4 (4/4) passes the SX1262 driver's own check (4..8) but not the chip's
    # SetModulationParams (CR 1..4 = 4/5..4/8): hw.lora_cfg must never give it.
    prelude = (
        "from boards import hw\n_cfg = hw.lora_cfg\n"
        "hw.lora_cfg = lambda raw: dict(_cfg(raw), coding_rate=4)"
    )
    out, bench = radio_script("heltec_v3", _SEND, prelude)
    assert "SetModulationParams: CR code 0" in str(bench.error), out


# --- the chips on their own (datasheet rules the drivers must keep) --------------------------


def _sx1276_reg(chip, reg, value, t=0):
    chip.nss(0, t)
    chip.transfer(bytes([reg | 0x80, value]), t)
    chip.nss(1, t)


def test_sx1276_registers_follow_the_datasheet():
    chip = SX1276(_Port())
    chip.nss(0, 0)
    assert chip.transfer(b"\x42\x00", 0)[1] == 0x12  # RegVersion, read with the wnr bit 0
    chip.nss(1, 0)
    with pytest.raises(ChipError, match="LongRangeMode changed in Standby"):
        _sx1276_reg(chip, 0x01, 0x81)  # LoRa + Standby from FSK Standby: not in Sleep
    _sx1276_reg(chip, 0x01, 0x80)  # Sleep + LoRa
    _sx1276_reg(chip, 0x01, 0x81)  # Standby
    with pytest.raises(ChipError, match="read-only"):
        _sx1276_reg(chip, 0x13, 5)  # RegRxNbBytes
    with pytest.raises(ChipError, match="not permitted"):
        _sx1276_reg(chip, 0x22, 0)  # RegPayloadLength 0
    with pytest.raises(ChipError, match="SpreadingFactor 13"):
        _sx1276_reg(chip, 0x1E, 0xD4)
    _sx1276_reg(chip, 0x01, 0x80)  # Sleep
    with pytest.raises(ChipError, match="FIFO write in Sleep"):
        _sx1276_reg(chip, 0x00, 0x55)
    with pytest.raises(ChipError, match="does not model"):
        _sx1276_reg(chip, 0x5A, 0)


def _sx1262_cmd(chip, data, t):
    chip.nss(0, t)
    out = chip.transfer(bytes(data), t)
    chip.nss(1, t)
    return out


def test_sx1262_commands_follow_the_datasheet():
    chip = SX1262(_Port())
    t = 10_000  # after the start-up BUSY
    assert _sx1262_cmd(chip, [0xC0, 0], t)[1] >> 4 == 2  # GetStatus: STDBY_RC
    with pytest.raises(ChipError, match="BUSY was high"):
        _sx1262_cmd(chip, [0xC0, 0], t + 1)  # before BUSY fell after the last command
    t += 1000
    with pytest.raises(ChipError, match="not an SX1262 command"):
        _sx1262_cmd(chip, [0x42], t)
    t += 1000
    with pytest.raises(ChipError, match="before SetPacketType"):
        _sx1262_cmd(chip, [0x8B, 7, 4, 1, 0], t)
    t += 1000
    _sx1262_cmd(chip, [0x8A, 1], t)  # LoRa
    t += 1000
    with pytest.raises(ChipError, match="power 23 dBm"):
        _sx1262_cmd(chip, [0x8E, 23, 2], t)
    t += 1000
    with pytest.raises(ChipError, match="takes 3 parameter bytes"):
        _sx1262_cmd(chip, [0x83, 0, 0], t)
    t += 1000
    with pytest.raises(ChipError, match="SetTx before SetRfFrequency"):
        _sx1262_cmd(chip, [0x83, 0, 0, 0], t)
    t += 1000
    _sx1262_cmd(chip, [0x86] + list((910268006).to_bytes(4, "big")), t)  # 868.1 MHz
    _sx1262_cmd(chip, [0x8B, 12, 4, 1, 0], t + 1000)  # SF12 125 kHz without LDRO
    _sx1262_cmd(chip, [0x8C, 0, 8, 0, 10, 1, 0], t + 2000)
    _sx1262_cmd(chip, [0x95, 2, 2, 0, 1], t + 3000)
    _sx1262_cmd(chip, [0x8E, 22, 2], t + 4000)
    with pytest.raises(ChipError, match="LowDataRateOptimize"):
        _sx1262_cmd(chip, [0x83, 0, 0, 0], t + 5000)


class _LockedPort(_Port):
    """An air on which a frame the receiver locked onto ends at frame_end_us."""

    def __init__(self, frame_end_us):
        super().__init__()
        self.frame_end_us = frame_end_us

    def locked(self, chip, t_us):
        return self.frame_end_us if t_us < self.frame_end_us else None


@pytest.mark.parametrize("model", ["sx1262", "sx1276"])
def test_a_frame_that_outlasts_the_receive_timeout_is_still_received(model):
    # DS (SX1261/2 13.1.5; SX1276 4.1.5): once the preamble is detected the timeout no longer
    # ends the reception. Before this rule was kept, a gateway's 4 s windows lost the SF12
    # frames that crossed their end (half the frames of a 5-node SF12 day).
    t, end = 10_000, 3_000_400
    port = _LockedPort(end)
    if model == "sx1262":
        chip = SX1262(port)
        cmds = [
            [0x8A, 1],
            [0x86] + list((910268006).to_bytes(4, "big")),
            [0x8B, 12, 4, 1, 1],
            [0x8C, 0, 8, 0, 0xFF, 1, 0],
            [0x08, 0x02, 0x03, 0x02, 0x03, 0, 0, 0, 0],  # RxDone, Timeout on DIO1
            [0x82] + list((64_000).to_bytes(3, "big")),  # SetRx, 1 s timeout
        ]
        for i, cmd in enumerate(cmds):
            _sx1262_cmd(chip, cmd, t + 1000 * i)
    else:
        chip = SX1276(port)
        _sx1276_reg(chip, 0x01, 0x80)  # Sleep + LoRa
        _sx1276_reg(chip, 0x01, 0x81)  # Standby
        _sx1276_reg(chip, 0x1E, 0xC4)  # SF12, CRC on
        _sx1276_reg(chip, 0x26, 0x08)  # LowDataRateOptimize
        _sx1276_reg(chip, 0x1F, 30)  # 30 symbols: about 1 s
        _sx1276_reg(chip, 0x01, 0x86, t)  # RxSingle
    chip.run_until(2_000_000)  # the timeout has passed, inside the frame
    assert chip.dio()[-1 if model == "sx1262" else 0] == 0  # no RxDone, and
    # the fleet resolves the air per ms: in the ms the frame ends, the chip's events run first
    chip.run_until(-(-end // 1000) * 1000)
    assert chip.next_event_us() > end  # no timeout yet
    assert chip.deliver(b"frame", -90, 8.0, True, {}, -(-end // 1000) * 1000)
    assert chip.dio()[0] == 1  # RxDone on DIO1 (SX1262) / DIO0 (SX1276)


# --- a fleet with real-driver nodes and gateways ---------------------------------------------


def _fleet(tmp_path, specs, heap):
    sink = SqliteSink(tmp_path / "r.db")
    fleet = Fleet(tmp_path / "fleet", specs, None, heap=heap, build_dir=tmp_path / "b")
    keys = {s.node_id: s.key for s in specs if s.role == "node"}
    fleet.receiver = Receiver(Verifier(keys), sink, clock=fleet.clock)
    try:
        results = {r["node_id"]: r for r in fleet.run(timeout_s=120)}
    finally:
        sink.close()
    con = sqlite3.connect(tmp_path / "r.db")
    rows = con.execute("SELECT DISTINCT node_id, ts FROM readings").fetchall()
    con.close()
    return results, rows, fleet


def _real_specs(board, n):
    node = lora_node(1, (400, 0), n=n, offset=7, sim={"radio": board})
    gw = gateway(1000, (0, 0))
    gw.extra_config["sim"] = {"radio": board}
    return [node, gw]


def test_real_driver_node_frames_reach_the_host_through_a_real_driver_gateway(tmp_path):
    results, rows, fleet = _fleet(tmp_path, _real_specs("heltec_v3", 20), LORA_DRIVER_HEAP)
    assert results[1]["exit_code"] == 0 and results[1000]["exit_code"] == 0
    assert results[1000]["stats"]["forwarded"] >= 3
    assert len(rows) >= 10 and {n for n, _ in rows} == {1}
    # what went on the air is what the driver said it would cost (firmware/airtime.py agrees)
    assert abs(results[1]["stats"]["airtime_ms"] - fleet.airtime_us[1] / 1000) < 1
    assert fleet.radios.chips[1].requests > 0 and fleet.radios.chips[1000].requests > 0


def test_real_driver_node_and_gateway_exchange_frames_and_acks(tmp_path):
    results, rows, fleet = _fleet(tmp_path, _real_specs("heltec_v3", 20), LORA_DRIVER_HEAP)
    assert results[1000]["stats"]["acks_late"] == 0
    assert results[1000]["stats"]["acks_sent"] >= 2
    assert results[1]["stats"]["frames_acked"] >= 2 and results[1]["stats"]["pending"] == 0
    assert len(rows) == 20


def test_unknown_sim_radio_board_is_named(tmp_path):
    with pytest.raises(WiringError, match="no such LoRa board"):
        RadioHardware("esp32_devkitc", _Port(), "node 1's radio")


def test_pcb_table_agrees_with_the_board_modules_it_stands_beside():
    # The circuit is written down on its own (so that a wrong board module fails), but both
    # come from the same sources: today they must agree, pin for pin.
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for board, pcb in lora_hw.PCB.items():
        tree = ast.parse((root / "boards" / (board + ".py")).read_text())
        attrs = {
            t.id: ast.literal_eval(node.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        assert (attrs["SPI_SCK"], attrs["SPI_MOSI"], attrs["SPI_MISO"]) == pcb["spi"]
        assert attrs["LORA_CS"] == pcb["nss"] and attrs["LORA_RESET"] == pcb["nreset"]
        assert attrs.get("LORA_BUSY", None) == pcb["busy"]
        dio = (
            (attrs["LORA_DIO0"], attrs["LORA_DIO1"])
            if pcb["chip"] == "sx1276"
            else (attrs["LORA_DIO1"],)
        )
        assert dio == pcb["dio"]
        assert attrs.get("LORA_TCXO_MV", 0) == pcb.get("tcxo_mv", 0)
        assert attrs["RADIO"] == pcb["chip"]


def test_demo_offers_the_boards_the_simulator_has_chips_for():
    from host_tools.commands import demo as demo_cmd

    assert tuple(demo_cmd.LORA_BOARDS) == tuple(lora_hw.board_names())


def test_demo_board_needs_the_lora_link():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "host_tools.cli", "demo", "--board", "heltec_v3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "citynode: --board heltec_v3: a board's LoRa radio needs --link lora"
    ), proc.stderr

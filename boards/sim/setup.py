# The simulated board's set-up, run once: boards/sim/board.py's Board() at boot, and radio() when
# a LoRa node or gateway builds its link. Each entry unloads this module first, as
# firmware.unload() does for firmware/ (the running call keeps its code until it returns), so
# that a running node's heap does not carry code it never runs again (firmware/README.md
# "Loading and unloading modules: the heap"). Its names are few on purpose: its qstrs stay.

import socket
import sys
import time

from micropython import const

_CONTROL_TIMEOUT_S = const(120)  # no word from the simulator for this long: it is gone, stop


def build(board, raw):
    """Board(raw): the clock, the I2C bus and what the config adds (deep sleep, faults, a PM
    sensor)."""
    unload()
    sim = raw.get("sim") or {}
    board._lora = raw.get("lora") or {}
    # "sim": {"radio": "heltec_v3"}: that board's real radio set-up and micropython-lib's
    # driver on a register-level chip (boards/sim/spi.py); else the API-level modem (radio.py)
    board._radio_board = sim.get("radio")
    board.radio_bus = None  # boards/sim/spi.py's Bridge, once the real driver is built
    board._wdt_ms = 0
    board._fed_ms = 0
    board._addr_cache = {}
    board._udp = None  # the socket udp_socket() made: in lockstep the simulator feeds it
    board._virtual_ms = 0
    board._control = None
    board.deep = raw.get("idle") == "deep"  # boards/hw.py's deep sleep: boards/sim/deep.py
    if board.deep:
        from boards.sim.deep import attach

        attach(board, raw)
    board.ended = False  # woken from deep sleep after the simulated world ended
    # Fault injection for tests (boards/sim/faults.py): loaded only when configured.
    board._faults = None
    if sim.get("faults"):
        from boards.sim.faults import Faults

        board._faults = Faults(sim["faults"])
    clock = sim.get("clock")
    if clock:
        # Lockstep with the host simulator: time moves only when it says so.
        host, _, port = clock.rpartition(":")
        board._control_addr = socket.getaddrinfo(host, int(port))[0][-1]
        board._control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        board._control.settimeout(_CONTROL_TIMEOUT_S)
        board._rx = b""
        board._ask(b"H %d" % raw.get("node_id", 0))
        board.ended = board._rx[0] == 69  # "E <ms>"
        from boards.sim.board import _BridgedI2C

        board._i2c = _BridgedI2C(board)
    else:
        board._t0 = time.ticks_ms()
        from boards.sim.bme280 import SimBME280, SimI2C

        devices = {}
        if sim.get("bme280", True):
            devices[sim.get("bme280_address", board.BME280_ADDRESS)] = SimBME280(
                chip_id=sim.get("chip_id", 0x60)
            )
        board._i2c = SimI2C(devices)
    if raw.get("sensors"):  # a PM sensor: uart(), idle_ms(ms, early_ms): sim/uart_bridge.py
        from boards.sim.uart_bridge import fit

        fit(board, raw)


def radio(board):
    """board.radio(): a LoRa modem with micropython-lib's API on the simulated air."""
    unload()
    if board._control is None:
        raise ValueError("config: the sim board's radio needs the fleet simulator (sim.clock)")
    if board._radio_board:
        from boards.sim.spi import real_radio

        return real_radio(board, board._radio_board, board._lora)
    from boards.sim.radio import modem

    return modem(board, board._lora)


def unload():
    # From sys.modules and from the package: its code goes at the next collection.
    sys.modules.pop(__name__, None)
    sys.modules["boards.sim"].__dict__.pop("setup", None)

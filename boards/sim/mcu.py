# The MCU of a real board (heltec_v3, lilygo_t3_v161, pico_lora_sx1262, ...) on `citynode sim-board
# --board NAME`: the `machine` the board's MicroPython port has and the unix port lacks, so that
# boards/hw.py's RealBoard and micropython-lib's radio drivers run unmodified. Importing this
# module installs it as sys.modules["machine"]; boards/sim/boot.py does so only when the sim-board
# simulates a real board (host_tools/sim/simboard.py gives it the option "mcu"): a plain sim
# node's heap never carries it.
#
# What it gives, in real time:
#   reset_cause()  latched as the hardware does, from how the sim-board started the process
#                  (RESET_ENV): a power-on PWRON_RESET; a reset what the resetter wrote in
#                  sim_reset_cause (boards/sim/board.py's file): the watchdog WDT_RESET, a
#                  deep-sleep wake DEEPSLEEP_RESET, machine.reset() SOFT_RESET (5; also when the
#                  machine.reset() was boot.py's, before this module was flashed; on an RP2040
#                  WDT_RESET, 3: MicroPython's rp2 machine.reset() is a watchdog reboot); a soft
#                  reboot (Ctrl-D) keeps the cause latched before it (sim_reset_latch)
#   WDT            fed by feed(); found expired at the next call of feed(), lightsleep(),
#                  idle() or a radio pin or SPI operation (no Python code is checked in between):
#                  "(sim: watchdog expired, resetting)", as the sim board's, then a reset that
#                  runs no finally: blocks (the host ends the process, as the chip's reset would)
#   I2C            a register-level BME280 (boards/sim/bme280.py, 0x76: SDO to GND) on the pins
#                  the board's circuit wires it to (_BME280_PINS); other pins reach nothing
#                  (OSError 19, as machine.I2C when nobody acknowledges)
#   Pin, SPI, idle boards/sim/spi.py's, bridged to the board's radio chip (boards/sim/lora_hw.py
#                  RadioHardware: its circuit and sx1262.py / sx1276.py) running here in real
#                  time; there is no air: a transmission takes its time on air and goes nowhere,
#                  a receive window times out
#   lightsleep     a real-time sleep; deepsleep: a real-time sleep, then a reset whose cause is
#                  DEEPSLEEP_RESET; RTC().memory(): kept (sim_rtc_memory) through every reset but
#                  power-on
# time: the unix port's (sleeps, time_ns: the RTC's ms in boards/hw.py), with ticks_ms() and
# ticks_us() counted from this reset as on a board (the port's count from the host's boot).

import os
import sys
import time

from micropython import const

_RESET_FILE = "sim_reset_cause"  # boards/sim/board.py _RESET_FILE: the latched reset cause
_LATCH_FILE = "sim_reset_latch"  # the cause of the last hardware reset, for soft reboots
_RTC_FILE = "sim_rtc_memory"  # RTC slow memory (boards/sim/deep.py's file)
_RESET_EXIT = const(3)  # boards/sim/boot.py _RESET_EXIT: the host restarts the board
_IDLE_US = const(1000)  # machine.idle() returns at the next system tick (1 ms) or a DIO edge
RESET_ENV = "CITYNODE_SIM_RESET"  # host_tools/sim/simboard.py: "power", "reset" or "soft"
# The BME280 breakout's bus on each board, (SDA, SCL) GPIOs, from boards/README.md's sources,
# written down apart from boards/<name>.py as lora_hw.PCB is: a board module naming other pins
# finds no sensor, as on the bench.
_BME280_PINS = {
    "esp32_devkitc": (21, 22),
    "heltec_v3": (41, 42),
    "lilygo_t3_v161": (21, 22),
    "pico_w": (4, 5),
    "pico_lora_sx1262": (4, 5),
}
_RP2040 = ("pico_w", "pico_lora_sx1262")


def _board_name():
    name = os.getenv("CITYNODE_SIM_BOARD")  # host_tools/sim/simboard.py SIM_BOARD_ENV
    if name is None or name == "sim":
        try:
            import json

            with open("/config.json") as f:
                name = json.load(f).get("board")
        except (OSError, ValueError, AttributeError):
            name = None
    return name


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


class _Nowhere:
    """The chip's antenna with no air behind it: a frame takes its time on air; nothing is
    heard."""

    def transmit(self, chip, t_us, p, payload):
        from firmware.airtime import time_on_air_us

        return t_us + time_on_air_us(p, len(payload))

    def listen(self, chip, t_us, p):
        pass

    def stop(self, chip, t_us):
        pass

    def locked(self, chip, t_us):
        return None


class Machine:
    """`machine` of a real board's port: its constants and functions here, the rest the unix
    port's (the real module)."""

    PWRON_RESET = 1
    HARD_RESET = 2
    WDT_RESET = 3
    DEEPSLEEP_RESET = 4
    SOFT_RESET = 5

    def __init__(self, real, board):
        self._real = real
        self._board = board
        self._wdt_ms = 0
        self._fed = 0
        self._bus = None
        self._last = time.ticks_us()
        self._us = 0
        kind = os.getenv(RESET_ENV)
        soft = 3 if board in _RP2040 else 5
        if kind == "soft":
            cause = _read(_LATCH_FILE) or b"1"
        else:
            cause = _read(_RESET_FILE) or b"%d" % soft if kind == "reset" else b"1"
            for path in (_RESET_FILE, _RTC_FILE) if kind != "reset" else (_RESET_FILE,):
                try:  # the cause is taken; RTC memory is lost with the power
                    os.remove(path)
                except OSError:
                    pass
            _write(_LATCH_FILE, cause)
        try:
            self._cause = int(cause)
        except ValueError:
            self._cause = 1

    def __getattr__(self, name):
        if name == "Pin" or name == "SPI":  # the radio's wiring, built on first use
            from boards.sim import spi

            m = spi._machine(self._bridge(), self._real)
            self.Pin = m.Pin
            self.SPI = m.SPI
            return getattr(m, name)
        return getattr(self._real, name)

    def _bridge(self):
        if self._bus is None:
            from boards.sim.spi import Bridge

            mcu = self

            class _Local(Bridge):
                """spi.py's Bridge with the chip here, in real time: each pin level and SPI
                transfer reaches the chip when the driver makes it (ops.append), not queued
                for the fleet simulator's next request."""

                hw = None
                rx = None

                def now_us(self):
                    return mcu.now_us()

                def append(self, op):  # self.ops is self
                    self.rx = self._apply([op.decode()])

                def _apply(self, tokens):
                    mcu.check()
                    if self.hw is None:
                        from boards.sim.lora_hw import RadioHardware

                        self.hw = RadioHardware(mcu._board, _Nowhere(), "the radio")
                    t = self.now_us()
                    self.hw.chip.run_until(t)  # the chip's own events (end of TX, RX timeout)
                    rx = self.hw.request(tokens, t)
                    self.lines(rx, len(rx))  # a rising DIO runs its handler
                    return rx

                def _send(self):  # Bridge.transfer: its read was applied as it was appended
                    return self.rx

                def read(self, gpio):
                    self._apply([])
                    return Bridge.read(self, gpio)

                def idle(self):
                    us = _IDLE_US
                    if self.hw is not None:
                        t = self.hw.chip.next_event_us()
                        if t is not None:
                            us = min(max(0, t - self.now_us()), us)
                    time.sleep_us(us)
                    self._apply([])

            self._bus = bus = _Local(None)
            bus.ops = bus
        return self._bus

    def now_us(self):
        """Microseconds since this machine started, as an int that does not wrap."""
        now = time.ticks_us()
        self._us += time.ticks_diff(now, self._last)
        self._last = now
        return self._us

    # --- resets, watchdog, sleep ---------------------------------------------------------

    def _reset(self, cause):
        _write(_RESET_FILE, b"%d" % cause)
        # A reset runs no more Python (no finally: blocks, which a SystemExit would run): the
        # host ends the process at boards/sim/boot.py's _EXIT marker and restarts the board.
        sys.stdout.write("\x00sim-exit %d\x00" % _RESET_EXIT)
        time.sleep_ms(2000)
        raise SystemExit(_RESET_EXIT)  # no sim-board host: boot.py restarts nothing

    def reset_cause(self):
        return self._cause

    def reset(self):
        self._reset(3 if self._board in _RP2040 else 5)

    def WDT(self, id=0, timeout=5000):
        self._wdt_ms = timeout
        self._fed = time.ticks_ms()
        return _WDT(self)

    def check(self):
        if self._wdt_ms and time.ticks_diff(time.ticks_ms(), self._fed) > self._wdt_ms:
            print("(sim: watchdog expired, resetting)")
            self._reset(3)

    def lightsleep(self, ms=0):
        self.check()
        time.sleep_ms(ms)
        self.check()

    def deepsleep(self, ms=0):
        self.check()
        time.sleep_ms(ms)
        self._reset(4)

    def idle(self):
        if self._bus is not None:
            self._bus.idle()
        else:
            time.sleep_us(_IDLE_US)
        self.check()

    # --- buses ------------------------------------------------------------------------------

    def I2C(self, id=0, *, scl=None, sda=None, freq=400000):
        from boards.sim.bme280 import SimBME280, SimI2C

        pins = (getattr(sda, "id", sda), getattr(scl, "id", scl))
        wired = _BME280_PINS.get(self._board) == pins
        return SimI2C({0x76: SimBME280()} if wired else {})

    def RTC(self):
        return _RTC()


class _Time:
    def __init__(self, real):
        self._real = real
        self._t0 = (real.ticks_ms(), real.ticks_us())

    def __getattr__(self, name):
        return getattr(self._real, name)

    def ticks_ms(self):
        r = self._real
        return r.ticks_add(0, r.ticks_diff(r.ticks_ms(), self._t0[0]))

    def ticks_us(self):
        r = self._real
        return r.ticks_add(0, r.ticks_diff(r.ticks_us(), self._t0[1]))


class _WDT:
    def __init__(self, mcu):
        self._mcu = mcu

    def feed(self):
        self._mcu.check()
        self._mcu._fed = time.ticks_ms()


class _RTC:
    def memory(self, data=None):
        if data is None:
            return _read(_RTC_FILE) or b""
        _write(_RTC_FILE, bytes(data))


_name = _board_name()
if _name is not None and _name != "sim":
    sys.modules["time"] = time = _Time(time)  # first: Machine counts on it
    sys.modules["machine"] = Machine(sys.modules["machine"], _name)

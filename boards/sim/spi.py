# The MCU side of a simulated LoRa board: machine.Pin, machine.SPI and machine.idle(), and the
# time functions the radio driver waits with, for micropython-lib's unmodified lora drivers on
# the unix port (whose machine has no SPI or Pin). Pin levels and SPI bytes go to the fleet
# simulator's chip model (boards/sim/lora_hw.py) in lockstep; what the chip drives (BUSY, DIO)
# comes back with every reply, and a rising DIO edge runs the driver's interrupt handler.
#
# real_radio() runs boards/hw.py's RealBoard.radio() of a real board (heltec_v3 ...) with these,
# as boards/sim/boot.py gives `machine` a reset(): the same pins and lora_cfg a board uses.
# Requests: "X <us> <ops>" (us past the board's ms clock; ops "o<gpio>=<v>" drive a pin,
# "b<id>,<sck>,<mosi>,<miso>,<baud>,<pol>,<pha>" an SPI bus set up, "q<gpio>" an interrupt
# handler attached, "w<hex>" a write, "r<hex>" a transfer whose MISO is wanted) and "Q <ms>"
# (wait up to ms, waking at a DIO edge). Output writes wait in a queue until the next request or
# input read, so a register write costs no round trip of its own.

import sys

try:
    from micropython import const
except ImportError:  # pragma: no cover

    def const(x):
        return x


_IDLE_CAP_MS = const(1000)  # boards/sim/lora_hw.py IDLE_CAP_MS: no system tick is modelled


class Bridge:
    """The board's radio wiring as the MCU sees it; one per node process."""

    def __init__(self, board):
        self.board = board
        self.ops = []  # queued operations (bytes), sent with the next request
        self.us = 0  # us past the board's ms clock (busy-waits shorter than a ms)
        self.levels = {}  # GPIO -> level the chip drives (DIO)
        self.busy = {}  # GPIO -> the node's us at which BUSY falls (-1: stays high)
        self.handlers = {}  # GPIO -> (handler, Pin)
        self.modem = None
        self.ended = False
        self.requests = 0

    def now_us(self):
        return self.board._virtual_ms * 1000 + self.us

    def flush(self):
        if self.ops:
            self._send()

    def transfer(self, data):
        self.ops.append(b"r" + bytes(data).hex().encode())
        rx = self._send()
        # "D <hex> ..."
        out = bytearray(len(data))
        for i in range(len(data)):
            out[i] = (_nibble(rx[2 + 2 * i]) << 4) | _nibble(rx[3 + 2 * i])
        return out

    def _send(self):
        ops = self.ops
        self.ops = []
        self.requests += 1
        self.board._ask(b"X %d " % self.us + b" ".join(ops))
        return self.board._rx

    def lines(self, rx, n):
        """Take the levels the chip drives from a reply ("... L14=1 B13=20"); a rising DIO runs
        its handler, as the MCU's interrupt would."""
        if rx[0] == 33:  # "!": the simulator refused what the pins or SPI did (its log says)
            raise OSError("sim: the radio operation was refused by the simulator")
        if rx[0] == 87 or rx[0] == 69:  # "W", "E": time moved to a new ms
            self.us = 0
            if rx[0] == 69:
                self.ended = True
                if self.modem is not None:
                    self.modem.ended = True  # firmware/gateway.py stops at its next window
        i = 0
        rising = None
        while True:
            i = _find(rx, n, i)
            if i < 0:
                break
            kind = rx[i]
            j = i + 1
            gpio = 0
            while rx[j] != 61:  # "="
                gpio = gpio * 10 + rx[j] - 48
                j += 1
            j += 1
            neg = rx[j] == 45  # "-"
            if neg:
                j += 1
            v = 0
            while j < n and rx[j] != 32:
                v = v * 10 + rx[j] - 48
                j += 1
            if neg:
                v = -v
            if kind == 76:  # "L"
                if v and not self.levels.get(gpio, 0) and gpio in self.handlers:
                    rising = (rising or []) + [gpio]
                self.levels[gpio] = v
            else:  # "B"
                self.busy[gpio] = -1 if v < 0 else self.now_us() + v
            i = j
        if rising:
            for gpio in rising:
                handler, pin = self.handlers[gpio]
                handler(pin)

    def read(self, gpio):
        if self.ops:
            self.flush()  # the pin is sampled after everything the MCU did before
        until = self.busy.get(gpio)
        if until is not None:
            return 1 if until < 0 or self.now_us() < until else 0
        return self.levels.get(gpio, 0)

    def wait_us(self, us):
        self.us += us
        if self.us >= 1000:
            self.wait_ms(0)

    def wait_ms(self, ms):
        """Sleep ms (plus the us carried): interrupts run at their edges meanwhile."""
        end = self.board._virtual_ms + ms + (self.us + 999) // 1000
        while True:
            left = end - self.board._virtual_ms
            self.board._ask(b"Q %d" % (left if left > 0 else 0))
            if self.board._virtual_ms >= end or self.ended:
                return

    def idle(self):
        """machine.idle(): until the next interrupt the sim models (a DIO edge), at most
        _IDLE_CAP_MS."""
        self.board._ask(b"Q %d" % _IDLE_CAP_MS)


def _find(rx, n, i):
    # the next " L" or " B" token from i
    while i < n - 1:
        if rx[i] == 32 and (rx[i + 1] == 76 or rx[i + 1] == 66):
            return i + 1
        i += 1
    return -1


def _nibble(c):
    return c - 48 if c < 58 else c - 87


def _machine(bridge, real):
    class Pin:
        IN = 0
        OUT = 1
        OPEN_DRAIN = 2
        PULL_UP = 1
        PULL_DOWN = 2
        IRQ_RISING = 1
        IRQ_FALLING = 2

        def __init__(self, id, mode=-1, pull=-1, *, value=None):
            self.id = id
            self._mode = -1
            self.init(mode, pull, value=value)

        def init(self, mode=-1, pull=-1, *, value=None):
            if mode != -1:
                self._mode = mode
            if value is not None:
                self.value(value)

        def value(self, v=None):
            if v is None:
                return bridge.read(self.id)
            bridge.ops.append(b"o%d=%d" % (self.id, 1 if v else 0))

        def __call__(self, v=None):
            return self.value(v)

        def on(self):
            self.value(1)

        def off(self):
            self.value(0)

        def irq(self, handler=None, trigger=3, hard=False):
            if trigger != Pin.IRQ_RISING:
                raise ValueError("sim: only IRQ_RISING is modelled")
            bridge.handlers[self.id] = (handler, self)
            bridge.ops.append(b"q%d" % self.id)

    class SPI:
        MSB = 0

        def __init__(
            self,
            id,
            baudrate=1000000,
            *,
            polarity=0,
            phase=0,
            bits=8,
            firstbit=0,
            sck=None,
            mosi=None,
            miso=None,
        ):
            if sck is None or mosi is None or miso is None:
                raise ValueError("sim: SPI needs sck, mosi and miso pins")
            bridge.ops.append(
                b"b%d,%d,%d,%d,%d,%d,%d"
                % (id, sck.id, mosi.id, miso.id, baudrate, polarity, phase)
            )

        def write(self, buf):
            bridge.ops.append(b"w" + bytes(buf).hex().encode())

        def write_readinto(self, wbuf, rbuf):
            got = bridge.transfer(wbuf)
            for i in range(len(rbuf)):
                rbuf[i] = got[i]

        def readinto(self, buf, write=0):
            got = bridge.transfer(bytes([write]) * len(buf))
            for i in range(len(buf)):
                buf[i] = got[i]

        def read(self, n, write=0):
            return bytes(bridge.transfer(bytes([write]) * n))

    class Machine:
        """The unix port's machine plus Pin, SPI and an idle() in simulated time."""

        def __getattr__(self, name):
            return getattr(real, name)

        def idle(self):
            bridge.idle()

    m = Machine()
    m.Pin = Pin
    m.SPI = SPI
    return m


def _time(bridge, real):
    class Time:
        """The time functions the driver uses, on the board's simulated clock."""

        def __getattr__(self, name):
            return getattr(real, name)

        def ticks_ms(self):
            return bridge.board._virtual_ms + bridge.us // 1000

        def ticks_us(self):
            return bridge.now_us()

        def ticks_diff(self, a, b):
            return a - b  # the simulated clocks never wrap

        def ticks_add(self, a, b):
            return a + b

        def sleep_ms(self, ms):
            bridge.wait_ms(ms)

        def sleep_us(self, us):
            bridge.wait_us(us)

        def sleep(self, s):
            bridge.wait_ms(int(s * 1000))

    return Time()


def real_radio(board, name, lora):
    """boards/<name>.py's Board(...).radio() (boards/hw.py RealBoard.radio), its machine and
    the driver's time being this simulated board's; returns the micropython-lib modem."""
    import time as real_time

    import machine as real_machine

    bridge = Bridge(board)
    board.radio_bus = bridge
    sim_machine = _machine(bridge, real_machine)
    saved = sys.modules.get("machine"), sys.modules.get("time")
    sys.modules["machine"] = sim_machine
    try:
        module = __import__("boards." + name, None, None, ("Board",))
        from boards import hw

        hw.machine = sim_machine  # in case boards.hw was imported before
        real = module.Board({"lora": lora} if lora else {})
        sys.modules["time"] = _time(bridge, real_time)
        modem = real.radio()
    finally:
        sys.modules["machine"] = saved[0] if saved[0] is not None else real_machine
        sys.modules["time"] = saved[1] if saved[1] is not None else real_time
    modem.ended = False
    bridge.modem = modem
    bridge.flush()
    return modem

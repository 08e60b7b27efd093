# A simulated UART line for the sim board's serial sensors (SDS011, PMS5003): bytes the node
# writes reach the simulated part, the part's bytes arrive at the line's baud rate into a bounded
# receive FIFO, as machine.UART's. In lockstep this runs in the fleet simulator, and the node's
# UART is boards/sim/uart_bridge.py ("UW"/"UR" requests): its heap holds only the last reply.
# Runs on MicroPython (sim-board in real time) and CPython (the fleet simulator, tests).

_RXBUF = 256  # machine.UART's default receive buffer on the ESP32 port; overflow drops bytes


class UartDevice:
    """A part on a UART: subclasses parse what the node writes (command(data)) and say what to
    send back (self.send(data)). clock() is ms (the sim board's or the fleet's virtual time).

    fault: None; "missing" (nothing on the line: writes vanish, nothing comes back); "stuck"
    (the part hangs: it ignores every command and sends nothing); "garbage" (noise on the line:
    random bytes before every transmission, and one frame in four with a byte changed).
    fault_at: the fault starts at this ms of clock() (None: from the start)."""

    BAUD = 9600
    LATENCY_MS = 2  # from the end of a command to the first byte of the reply

    def __init__(self, clock, fault=None, seed=1, fault_at=None):
        self.clock = clock
        self.fault = fault
        self.fault_at = fault_at
        self._queue = []  # [(ms at which the byte is on the line, byte)]
        self._rx = bytearray()  # what the node wrote, not yet a whole command
        self._seed = seed or 1
        self._sent = 0
        self.commands = 0  # commands understood

    def _rand(self, n):
        # xorshift32: the same noise on MicroPython and CPython for a seed
        x = self._seed
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self._seed = x
        return x % n

    def failing(self):
        """The fault in effect now, or None."""
        if self.fault is None or (self.fault_at is not None and self.clock() < self.fault_at):
            return None
        return self.fault

    def silent(self):
        f = self.failing()
        return f == "missing" or f == "stuck"

    def written(self, data):
        """Bytes from the node."""
        if self.silent():
            return
        self._rx.extend(data)
        self.parse(self._rx)

    def parse(self, rx):  # pragma: no cover - subclasses
        self._rx = bytearray()

    def send(self, data, at=None):
        """Queue bytes for the node, starting LATENCY_MS from now (or at ms `at`)."""
        if self.silent():
            return
        data = bytearray(data)
        if self.failing() == "garbage":
            self._sent += 1
            if self._sent % 4 == 0:
                i = self._rand(len(data))
                data[i] ^= 1 + self._rand(255)
            noise = bytearray(self._rand(6))
            for i in range(len(noise)):
                noise[i] = self._rand(256)
            data = noise + data
        t = (self.clock() if at is None else at) + self.LATENCY_MS
        byte_ms = 10000 / self.BAUD  # 10 bits a byte (8N1)
        for i in range(len(data)):
            self._queue.append((t + (i + 1) * byte_ms, data[i]))

    def arrived(self, now):
        """Bytes on the line by ms now (removed from the queue), for the node's FIFO."""
        self.tick(now)
        q = self._queue
        n = 0
        while n < len(q) and q[n][0] <= now:
            n += 1
        out = bytes([b for _, b in q[:n]])
        del q[:n]
        return out

    def tick(self, now):
        """Time passes (a part that reports on its own queues its reports here)."""


class FanSensor(UartDevice):
    """A particulate sensor on a UART (SDS011, PMS5003): a fan and laser that run while it is
    awake, what it senses (pm25, pm10 in ug/m3: set_pm), a report every second in active mode
    (report(): its frame), and commands of COMMAND_LEN bytes behind the two bytes HEAD, which
    received(frame) checks and answers. awake_ms and running_ms(): how long the fan has run
    (the power model's duty); wakes, sleeps: counters for tests."""

    SPINUP_MS = 30000  # fan and laser need this long after waking for a sound reading
    HEAD = (0, 0)
    COMMAND_LEN = 0

    def __init__(self, clock, fault=None, seed=1, awake=True, mode="active", fault_at=None):
        super().__init__(clock, fault, seed, fault_at)
        self.mode = mode
        self.awake = awake
        self.pm25 = 8.0
        self.pm10 = 14.0
        t = clock()
        self.woke_at = t - self.SPINUP_MS if awake else None  # on for long enough at the start
        self._awake_since = t
        self._next_report = t + 1000
        self.awake_ms = 0
        self.wakes = 0
        self.sleeps = 0

    def set_pm(self, pm25, pm10):
        self.pm25 = pm25
        self.pm10 = pm10

    def spun_up(self, now):
        return self.woke_at is None or now - self.woke_at >= self.SPINUP_MS

    def wake(self, now):
        if not self.awake:
            self.awake = True
            self.woke_at = now
            self._awake_since = now
            self._next_report = now + 1000
            self.wakes += 1

    def sleep(self, now):
        if self.awake:
            self.awake = False
            self.awake_ms += now - self._awake_since
            self.sleeps += 1

    def parse(self, rx):
        a, b = self.HEAD
        n = self.COMMAND_LEN
        while True:
            i = find(rx, a, b)
            if i < 0:
                self._rx = keep_tail(rx, a)
                return
            if len(rx) - i < n:
                self._rx = rx[i:]
                return
            frame = rx[i : i + n]
            rx = rx[i + n :]
            self._rx = rx
            self.received(frame)

    def received(self, frame):  # pragma: no cover - subclasses
        pass

    def report(self):  # pragma: no cover - subclasses
        return b""

    def tick(self, now):
        if self.awake and self.mode == "active" and not self.silent():
            if now - self._next_report > 30000:  # beyond the FIFO anyway
                self._next_report = now - 30000
            while self._next_report <= now:
                self.send(self.report(), at=self._next_report)
                self._next_report += 1000
        elif self.awake:
            self._next_report = now + 1000

    def running_ms(self, now):
        """ms the fan and laser have run in all."""
        return self.awake_ms + (now - self._awake_since if self.awake else 0)


def find(buf, a, b, start=0):
    """Index of the byte pair (a, b) in buf, or -1 (MicroPython's bytearray has no find)."""
    for i in range(start, len(buf) - 1):
        if buf[i] == a and buf[i + 1] == b:
            return i
    return -1


def keep_tail(buf, a):
    """What to keep of unparsed bytes without a header: a last byte that may start one."""
    return bytearray(buf[-1:]) if len(buf) and buf[-1] == a else bytearray()


class SimUART:
    """machine.UART's methods the drivers use (write, readinto, read, any) over a UartDevice;
    device None is an empty connector. Received bytes beyond the FIFO's size are dropped and
    counted (overruns), as on hardware."""

    def __init__(self, device, clock, rxbuf=_RXBUF):
        self.device = device
        self.clock = clock
        self._fifo = bytearray()
        self._rxbuf = rxbuf
        self.overruns = 0

    def _fill(self):
        if self.device is None:
            return
        data = self.device.arrived(self.clock())
        room = self._rxbuf - len(self._fifo)
        if len(data) > room:
            self.overruns += len(data) - room
            data = data[:room]
        self._fifo.extend(data)

    def write(self, buf):
        if self.device is not None:
            self.device.written(bytes(buf))
        return len(buf)

    def any(self):
        self._fill()
        return len(self._fifo)

    def readinto(self, buf, nbytes=None):
        self._fill()
        n = min(len(buf) if nbytes is None else nbytes, len(self._fifo))
        if not n:
            return None  # machine.UART with timeout=0: nothing waiting
        for i in range(n):
            buf[i] = self._fifo[i]
        self._fifo = self._fifo[n:]
        return n

    def read(self, nbytes=None):
        self._fill()
        if not self._fifo:
            return None
        n = len(self._fifo) if nbytes is None else min(nbytes, len(self._fifo))
        out = bytes(self._fifo[:n])
        self._fifo = self._fifo[n:]
        return out

    def take(self, nbytes=64):
        """What the bridge hands the node: up to nbytes received (b"" if none)."""
        return self.read(nbytes) or b""


def parts(raw, clock):
    """The simulated particulate sensor a node's config lists ("sensors"), as the fleet or
    the sim board fits it: ({uart id: device}, {i2c address: device}). Config "sim": {"pm":
    {"fault": "missing" | "stuck" | "garbage", "fault_at_s": s, "seed": n}} breaks it."""
    uarts, i2c = {}, {}
    pm = (raw.get("sim") or {}).get("pm") or {}
    fault_at = pm.get("fault_at_s")
    kw = {
        "fault": pm.get("fault"),
        "seed": pm.get("seed", 1),
        "fault_at": None if fault_at is None else fault_at * 1000,
    }
    for spec in raw.get("sensors") or ():
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind == "sds011":
            from boards.sim.sds011 import SimSDS011

            uarts[spec.get("uart")] = SimSDS011(clock, **kw)
        elif kind == "pms5003":
            from boards.sim.pms5003 import SimPMS5003

            uarts[spec.get("uart")] = SimPMS5003(clock, **kw)
        elif kind == "sps30":
            from boards.sim.sps30 import ADDRESS, SimSPS30

            i2c[ADDRESS] = SimSPS30(clock, **kw)
    return uarts, i2c

# The simulated board: real UDP sockets, a clock that is either real time or a virtual one
# stepped by the host's fleet simulator, and an I2C bus with a register-level BME280 on it: in
# lockstep the bus is bridged byte for byte to the simulator (which holds the chip's registers,
# so the node's heap carries only what a real board carries), in real time it is local.

import select
import socket
import time

from micropython import const

# Private const()s cost the node's heap nothing (firmware/README.md "Loading and unloading
# modules: the heap"); boards/sim/deep.py and mcu.py name the same file and values.
_RESET_FILE = const("sim_reset_cause")  # what the hardware would latch for machine.reset_cause()
_PWRON_RESET = const(1)  # machine.reset_cause() values, as on the ESP32 port
_WDT_RESET = const(3)
_DEEPSLEEP_RESET = const(4)
_SOFT_RESET = const(5)
_RESET_EXIT = const(3)  # process exit status meaning "reset me" to the simulator


class Board:
    """Board API used by the firmware (README "Boards"): NAME, BME280_ADDRESS, i2c(), ticks_ms(),
    sleep_ms(ms), idle_ms(ms) -> bool, network_up(), udp_socket(), uplink_address(),
    wait_readable(sock, ms) -> bool (a UDP socket of udp_socket() or a TCP connection)."""

    NAME = "sim"
    BME280_ADDRESS = 0x76

    def __init__(self, raw):
        # Set-up code runs once: it lives in boards/sim/setup.py, which unloads itself.
        from boards.sim import setup

        setup.build(self, raw)

    # --- clock ---------------------------------------------------------------------------

    def ticks_ms(self):
        if self._control is None:
            return time.ticks_diff(time.ticks_ms(), self._t0)
        return self._virtual_ms

    def _ask(self, request):
        """Send a request to the simulator; its reply is left in self._rx (n bytes returned):
        W <ms since boot> (time now) or E (the simulated world has ended) for time requests,
        P <ms> <rssi> <snr x4> <hex> for a frame the radio heard, D <hex> / A / N for bus
        transactions. Parsed in place: no strings to split."""
        bus = self.radio_bus
        if bus is not None and request[0] != 88:  # pins set before a wait take effect first
            bus.flush()
        self._control.sendto(request, self._control_addr)
        try:
            # recv, not readinto: a stream read on a datagram socket waits to fill the buffer.
            # A heard LoRa frame ("RX" asked) is up to 255 bytes in hex; other replies are short.
            size = 600 if request[:2] == b"RX" else 1100 if request[0] == 88 else 96
            rx = self._rx = self._control.recv(size)
        except OSError:
            # The simulator is gone: the node's crash handler resets it. Not an OSError, which
            # drivers and links take for a bus or network error and carry on after.
            raise RuntimeError("sim: no reply from the simulator to %r" % request)
        n = len(rx)
        # "W <ms>", "P <ms> ..." (a radio frame heard), "E <ms>" (a wake after the world ended)
        if rx[0] == 87 or rx[0] == 80 or (rx[0] == 69 and n > 2):
            ms = 0
            i = 2
            while i < n and rx[i] != 32:
                ms = ms * 10 + rx[i] - 48
                i += 1
            self._virtual_ms = ms
            if request[0] == 67:  # "C": lightsleep keeps the watchdog fed (boards/hw.py)
                self._fed_ms = ms
            self._check_wdt()
        if bus is not None:
            bus.lines(rx, n)  # what the radio chip drives (BUSY, DIO): an edge runs its IRQ
        return n

    def _wait(self, request):
        self._ask(request)
        return self._rx[0] != 69  # "E"

    # --- the RTC --------------------------------------------------------------------------

    # Reset causes through which the RTC counts on: every one but power-on, as an ESP32's
    # (boards/hw.py). A power cut (boards/sim/faults.py) restarts it.
    RTC_KEEPS = (_WDT_RESET, _DEEPSLEEP_RESET, _SOFT_RESET)

    def rtc_ms(self):
        """ms on the board's RTC: in lockstep the simulator's, which counts from the node's
        last power-on ("RTC" asked, "T <ms>" answered); in real time the host's clock."""
        if self._control is None:
            return time.time_ns() // 1000000
        self._ask(b"RTC")
        return int(self._rx[2:])

    # --- reset and watchdog ----------------------------------------------------------------

    def reset_cause(self):
        try:
            with open(_RESET_FILE) as f:
                cause = int(f.read())
            import os

            os.remove(_RESET_FILE)
            return cause
        except (OSError, ValueError):
            return _PWRON_RESET

    def reset(self, cause=_SOFT_RESET):
        with open(_RESET_FILE, "w") as f:
            f.write("%d" % cause)
        raise SystemExit(_RESET_EXIT)

    def wdt(self, timeout_ms):
        """machine.WDT stand-in: resets the board when not fed for timeout_ms of awake time."""
        self._wdt_ms = timeout_ms
        self._fed_ms = self.ticks_ms()
        return self

    def feed(self):
        self._fed_ms = self.ticks_ms()

    def _check_wdt(self):
        if self._wdt_ms and self.ticks_ms() - self._fed_ms > self._wdt_ms:
            print("(sim: watchdog expired, resetting)")
            self.reset(_WDT_RESET)

    def sleep_ms(self, ms):
        """A short wait inside a task (a sensor's conversion time): time passes, nothing else."""
        if self._control is None:
            time.sleep_ms(ms)
            return
        self._wait(b"S %d" % ms)
        if self._faults is not None:
            self._faults.check(self)

    def idle_ms(self, ms):
        """Sleep until the next sample (lightsleep on a real board). Returns False when the
        simulated world has ended (never on hardware). In lockstep the simulator decides the
        wake-up: a replayed trace wakes the node at the trace's next row."""
        if self._control is None:
            time.sleep_ms(ms)
            return True
        return self._wait(b"C %d" % ms)

    # --- buses, radio and network --------------------------------------------------------

    def radio(self):
        """A LoRa modem with micropython-lib's API on the simulated air (config "lora":
        {"freq_khz", "sf", "output_power"}); only in lockstep with the fleet simulator. Built
        once, at boot: by boards/sim/setup.py."""
        from boards.sim import setup

        return setup.radio(self)

    def i2c(self):
        return self._i2c

    def network_up(self):
        return True  # the host's loopback stands in for Wi-Fi

    def udp_socket(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(socket.getaddrinfo("0.0.0.0", 0)[0][-1])
        s.setblocking(False)
        self._udp = s
        return s

    def uplink_address(self, host_port):
        addr = self._addr_cache.get(host_port)
        if addr is None:
            addr = socket.getaddrinfo(host_port[0], host_port[1])[0][-1]
            self._addr_cache[host_port] = addr
        return addr

    def wait_readable(self, sock, timeout_ms):
        start = None
        if self._control is not None:
            if sock is self._udp or not isinstance(sock, socket.socket):
                # Let the simulator deliver what the host sent (on the UDP socket, or the
                # console of a USB gateway), then look without blocking.
                self._wait(b"R %d" % timeout_ms)
                timeout_ms = 0
            else:
                # A connection to a server outside the simulation (an MQTT broker): it answers
                # in real time, so wait in real time, then move the simulated clock on as much.
                start = time.ticks_ms()
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        ready = bool(poller.poll(timeout_ms))
        if start is not None:
            self.sleep_ms(time.ticks_diff(time.ticks_ms(), start))
        return ready


class _BridgedI2C:
    """machine.I2C's memory transactions, carried to the simulator's BME280 registers."""

    def __init__(self, board):
        self._board = board

    def _transfer(self, request):
        n = self._board._ask(request)
        if self._board._rx[0] == 78:  # "N"
            raise OSError(19)  # ENODEV: nobody acknowledged the address, as machine.I2C says
        return n

    def readfrom_mem_into(self, addr, reg, buf):
        self._transfer(b"IR %d %d %d" % (addr, reg, len(buf)))
        rx = self._board._rx
        for i in range(len(buf)):  # "D " then two hex digits a byte
            buf[i] = (_nibble(rx[2 + 2 * i]) << 4) | _nibble(rx[3 + 2 * i])

    def readfrom_mem(self, addr, reg, n):
        buf = bytearray(n)
        self.readfrom_mem_into(addr, reg, buf)
        return bytes(buf)

    def writeto_mem(self, addr, reg, buf):
        self._transfer(b"IW %d %d %s" % (addr, reg, bytes(buf).hex()))


def _nibble(c):
    return c - 48 if c < 58 else c - 87  # "0".."9", "a".."f"

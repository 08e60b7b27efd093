# The simulated board: a BME280 register model on a simulated I2C bus, real UDP sockets, and a
# clock that is either real time or a virtual one stepped by the host's fleet simulator.

import socket
import time

try:
    import select
except ImportError:  # pragma: no cover
    import uselect as select

from boards.sim_bme280 import SimBME280, SimI2C

_CONTROL_TIMEOUT_S = 120  # no word from the simulator for this long: it is gone, stop


class SimulationEnded(Exception):
    pass


class Board:
    """Board API used by the firmware (README "Boards"): NAME, BME280_ADDRESS, i2c(), ticks_ms(),
    sleep_ms(ms), idle_ms(ms) -> bool, network_up(), udp_socket(), uplink_address(),
    wait_readable(sock, ms) -> bool."""

    NAME = "sim"
    BME280_ADDRESS = 0x76

    def __init__(self, raw):
        sim = raw.get("sim") or {}
        self.bme280 = None
        devices = {}
        if sim.get("bme280", True):
            self.bme280 = SimBME280(chip_id=sim.get("chip_id", 0x60))
            devices[sim.get("bme280_address", self.BME280_ADDRESS)] = self.bme280
        self._i2c = SimI2C(devices)
        self._addr_cache = {}
        self._virtual_ms = 0
        self._control = None
        clock = sim.get("clock")
        if clock:
            # Lockstep with the host simulator: time moves only when it says so.
            host, _, port = clock.rpartition(":")
            self._control_addr = socket.getaddrinfo(host, int(port))[0][-1]
            self._control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._control.settimeout(_CONTROL_TIMEOUT_S)
            self._ask("H %d" % raw.get("node_id", 0))
        else:
            self._t0 = time.ticks_ms()

    # --- clock ---------------------------------------------------------------------------

    def ticks_ms(self):
        if self._control is None:
            return time.ticks_diff(time.ticks_ms(), self._t0)
        return self._virtual_ms

    def _ask(self, request):
        """Send a request to the simulator, apply its reply: W <ms since boot> [adc_t adc_p adc_h]
        (time now, and what the sensor senses) or E (the simulated world has ended)."""
        self._control.sendto(request.encode(), self._control_addr)
        try:
            reply = self._control.recv(128).decode().split()
        except OSError:
            raise SimulationEnded("sim: no reply from the simulator to %r" % request)
        if reply[0] == "E":
            return False
        self._virtual_ms = int(reply[1])
        if len(reply) == 5 and self.bme280 is not None:
            self.bme280.set_raw(int(reply[2]), int(reply[3]), int(reply[4]))
        return True

    def sleep_ms(self, ms):
        """A short wait inside a task (a sensor's conversion time): time passes, nothing else."""
        if self._control is None:
            time.sleep_ms(ms)
        else:
            self._ask("S %d" % ms)

    def idle_ms(self, ms):
        """Sleep until the next sample (lightsleep on a real board). Returns False when the
        simulated world has ended (never on hardware). In lockstep the simulator decides the
        wake-up: a replayed trace wakes the node at the trace's next row."""
        if self._control is None:
            time.sleep_ms(ms)
            return True
        return self._ask("C %d" % ms)

    # --- buses and network ---------------------------------------------------------------

    def i2c(self):
        return self._i2c

    def network_up(self):
        return True  # the host's loopback stands in for Wi-Fi

    def udp_socket(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(socket.getaddrinfo("0.0.0.0", 0)[0][-1])
        s.setblocking(False)
        return s

    def uplink_address(self, host_port):
        addr = self._addr_cache.get(host_port)
        if addr is None:
            addr = socket.getaddrinfo(host_port[0], host_port[1])[0][-1]
            self._addr_cache[host_port] = addr
        return addr

    def wait_readable(self, sock, timeout_ms):
        if self._control is not None:
            # Let the simulator deliver what the host sent, then look without blocking.
            self._ask("R %d" % timeout_ms)
            timeout_ms = 0
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(timeout_ms))

# What the sim board adds for a particulate sensor (config "sensors"), loaded only by such nodes
# so that a BME280-only node's heap does not carry it: board.uart(id), idle_ms(ms, early_ms) and,
# for an SPS30 (no registers), whole I2C transactions (boards/sim/bus_i2c.py). In lockstep the
# UART's bytes go to the fleet simulator, which holds the part on the line (boards/sim/uart.py):
# the node's heap holds only the simulator's last reply; in real time the part is local.

from boards.sim.board import _nibble


def fit(board, raw):
    idle_ms = board.idle_ms

    def idle_early(ms, early_ms=0):
        # "C <ms> <early>": the simulator wakes the node early_ms before its next sample, for
        # the PM sensor to spin up (firmware/sensors.py); in real time early_ms changes nothing
        if early_ms and board._control is not None:
            return board._wait(b"C %d %d" % (ms, early_ms))
        return idle_ms(ms)

    board.idle_ms = idle_early
    if board._control is not None:
        for spec in raw["sensors"]:
            if spec.get("type") == "sps30":  # whole I2C transactions: only an SPS30 needs them
                from boards.sim.bus_i2c import BusI2C

                board._i2c = BusI2C(board)
        board.uart = lambda id: BridgedUART(board, id)
        return
    from boards.sim.uart import SimUART, parts

    uarts, i2c = parts(raw, board.ticks_ms)
    board._i2c.devices.update(i2c)
    board.uart = lambda id: SimUART(uarts.get(id), board.ticks_ms)


class BridgedUART:
    # The node's side in lockstep: writes go to the simulator ("UW <id> <hex>"), reads come
    # from its reply to "UR <id>" ("D <hex>": what the part has sent by now, up to 64 bytes),
    # kept until read and asked again when used up: no buffer of its own.

    def __init__(self, board, id):
        self._board = board
        self._id = id
        self._read = b"UR %d" % id  # (made once: a request a poll would be garbage)
        self._rx = b""
        self._pos = 0  # of the next byte's hex digits in _rx

    def write(self, buf):
        self._board._ask(b"UW %d %s" % (self._id, buf.hex()))
        return len(buf)

    def readinto(self, buf, n=None):  # machine.UART's readinto(buf[, nbytes])
        rx = self._rx
        i = self._pos
        if i >= len(rx):
            self._board._ask(self._read)
            rx = self._rx = self._board._rx
            i = 2
        n = min(len(buf) if n is None else n, (len(rx) - i) // 2)
        for k in range(n):
            buf[k] = (_nibble(rx[i]) << 4) | _nibble(rx[i + 1])
            i += 2
        self._pos = i
        return n if n > 0 else None

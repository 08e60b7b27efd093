# What the sim board adds for a particulate sensor (config "sensors"), loaded only by such nodes
# so that a BME280-only node's heap does not carry it: board.uart(id), idle_ms(ms, early_ms) and
# whole I2C transactions (an SPS30 has no registers). In lockstep the UART's bytes go to the fleet
# simulator, which holds the part on the line (boards/sim/uart.py): the node's heap holds only a
# 64-byte FIFO; in real time the part is local.

from boards.sim.board import _BridgedI2C, _nibble


def fit(board, raw):
    if board._control is not None:
        board._i2c = BusI2C(board)
        board.uart = lambda uart_id: BridgedUART(board, uart_id)
        idle_ms = board.idle_ms

        def idle_early(ms, early_ms=0):
            # "C <ms> <early>": the simulator wakes the node early_ms before its next sample,
            # for the PM sensor to spin up (firmware/sensors.py)
            if early_ms:
                return board._wait(b"C %d %d" % (ms, early_ms))
            return idle_ms(ms)

        board.idle_ms = idle_early
        return
    from boards.sim.uart import SimUART, parts

    uarts, i2c = parts(raw, board.ticks_ms)
    board._i2c.devices.update(i2c)
    board.uart = lambda uart_id: SimUART(uarts.get(uart_id), board.ticks_ms)
    idle_ms = board.idle_ms
    board.idle_ms = lambda ms, early_ms=0: idle_ms(ms)  # real time: early_ms changes nothing


class BusI2C(_BridgedI2C):
    # machine.I2C's whole write and read transactions too ("IT <addr> <hex>", "IF <addr> <n>")

    def writeto(self, addr, buf):
        self._transfer(b"IT %d %s" % (addr, bytes(buf).hex()))
        return len(buf)

    def readfrom_into(self, addr, buf):
        self._transfer(b"IF %d %d" % (addr, len(buf)))
        rx = self._board._rx
        for i in range(len(buf)):
            buf[i] = (_nibble(rx[2 + 2 * i]) << 4) | _nibble(rx[3 + 2 * i])


class BridgedUART:
    # The node's side in lockstep: writes go to the simulator ("UW <id> <hex>"), reads come
    # from a 64-byte FIFO refilled from it ("UR <id>" -> "D <hex>") when empty.

    def __init__(self, board, uart_id):
        self._board = board
        self._id = uart_id
        self._read = b"UR %d" % uart_id  # (made once: a request a poll would be garbage)
        self._fifo = bytearray(64)
        self._n = 0
        self._i = 0

    def write(self, buf):
        self._board._ask(b"UW %d %s" % (self._id, bytes(buf).hex()))
        return len(buf)

    def readinto(self, buf, nbytes=None):
        if self._i >= self._n:  # empty: what the part has sent by now
            n = self._board._ask(self._read)
            rx = self._board._rx
            n = (n - 2) // 2 if n > 2 else 0
            for i in range(n):  # "D " then two hex digits a byte
                self._fifo[i] = (_nibble(rx[2 + 2 * i]) << 4) | _nibble(rx[3 + 2 * i])
            self._n = n
            self._i = 0
        n = min(len(buf) if nbytes is None else nbytes, self._n - self._i)
        if n <= 0:
            return None
        for k in range(n):
            buf[k] = self._fifo[self._i + k]
        self._i += n
        return n

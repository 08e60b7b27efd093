# The simulated board's I2C bus with machine.I2C's whole write and read transactions too, for a
# part without registers (an SPS30: firmware/sps30.py); loaded by boards/sim/uart_bridge.py only
# for a node that has one, so that other nodes' heaps do not carry it.

from boards.sim.board import _BridgedI2C, _nibble


class BusI2C(_BridgedI2C):
    # machine.I2C's whole write and read transactions too ("IT <addr> <hex>", "IF <addr> <n>")

    def writeto(self, addr, buf):
        self._transfer(b"IT %d %s" % (addr, buf.hex()))
        return len(buf)

    def readfrom_into(self, addr, buf):
        self._transfer(b"IF %d %d" % (addr, len(buf)))
        rx = self._board._rx
        for i in range(len(buf)):  # "D " then two hex digits a byte
            buf[i] = (_nibble(rx[2 + 2 * i]) << 4) | _nibble(rx[3 + 2 * i])

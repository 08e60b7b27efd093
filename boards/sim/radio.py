# The simulated board's API-level LoRa modem: micropython-lib's modem API (lora-sync: configure,
# send, recv, get_time_on_air_us) answered by the fleet simulator's shared air
# (host_tools/sim/air.py: time on air, collisions, range, RSSI and SNR) in one request each.
# No driver code runs behind it; it stays because big fleet runs are several times faster with it
# than with a board's real driver on a chip model (boards/sim/spi.py, "sim": {"radio": ...}; the
# figures: bench/RESULTS.md "LoRa fleet"). Which runs use which: boards/README.md.

from firmware.airtime import time_on_air_us


class RxPacket(bytearray):
    """A received frame, as micropython-lib's lora.RxPacket: the bytes plus ticks_ms, snr
    (dB), rssi (dBm), valid_crc."""

    def __init__(self, payload, ticks_ms, snr, rssi, valid_crc=True):
        super().__init__(payload)
        self.ticks_ms = ticks_ms
        self.snr = snr
        self.rssi = rssi
        self.valid_crc = valid_crc


def modem(board, lora):
    """The sim board's radio: micropython-lib's defaults, then the config's "lora" values."""
    cfg = {"freq_khz": 868100, "sf": 7, "bw": "125", "coding_rate": 5, "preamble_len": 8}
    cfg.update(lora)
    return SimModem(board, cfg)


class SimModem:
    def __init__(self, board, lora_cfg):
        self._board = board
        self.ended = False
        self.cfg = {}
        self.configure(lora_cfg)

    def configure(self, lora_cfg):
        self.cfg.update(lora_cfg)

    def get_time_on_air_us(self, payload_len):
        return time_on_air_us(self.cfg, payload_len)

    def send(self, packet, tx_at_ms=None):
        """Transmit; returns when the frame has left the antenna (ticks_ms then)."""
        b = self._board
        if tx_at_ms is not None and tx_at_ms > b.ticks_ms():
            b.sleep_ms(tx_at_ms - b.ticks_ms())
        c = self.cfg
        b._ask(
            b"TX %d %d %d %s"
            % (c["freq_khz"], c["sf"], c.get("output_power", 14), bytes(packet).hex())
        )
        return b.ticks_ms()

    def recv(self, timeout_ms=None, rx_length=0xFF, rx_packet=None):
        """The next frame heard on the configured channel within timeout_ms, else None."""
        b = self._board
        c = self.cfg
        n = b._ask(b"RX %d %d %d" % (c["freq_khz"], c["sf"], timeout_ms or 3600000))
        rx = b._rx
        if rx[0] == 69:  # "E": the simulated world has ended
            self.ended = True
            return None
        if rx[0] != 80:  # not "P": the window closed empty
            return None
        # P <ms> <rssi> <snr x4> <hex>
        words = bytes(rx[:n]).split()
        payload = bytes.fromhex(words[4].decode())
        return RxPacket(payload, b.ticks_ms(), int(words[3]) / 4, int(words[2]))

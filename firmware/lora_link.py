# The LoRa uplink: frames over raw LoRa (micropython-lib's modem API, from the board) to a
# gateway node of ours (firmware/gateway.py), under the EU868 airtime governor (airtime.py).

import random


class LoraLink:
    """Frames over raw LoRa (micropython-lib's modem API, from the board) to a gateway node.

    Every transmission asks the airtime governor first (EU868 duty cycle per sub-band, and an
    optional daily budget): a frame it defers is not sent; the readings stay in the journal.
    Acks come back on ack_freq_khz (869.525 MHz by default: the 10 % sub-band, FIELD.md)."""

    NAME = "lora"

    def __init__(self, board, lora, log, governor):
        self.board = board
        self.modem = board.radio()
        self.log = log
        self.governor = governor
        self.freq = self.modem.cfg["freq_khz"]
        self.ack_freq = lora.get("ack_freq_khz", 869525)
        self.rssi = 0
        self.snr = 0
        self.deferred = 0
        self.wait_ms = 0  # after a deferral: until the governor lets the next frame go
        # A backlog (after an outage, a deferral) goes out in frames of up to this many
        # readings: about 100 bytes, still well inside raw LoRa's 255 (bench/airtime.py).
        self.max_batch = lora.get("max_batch", 30)

    def up(self):
        return True

    def prepare(self):
        # Jitter before each frame: nodes that boot or retry together would otherwise collide
        # every time. The node takes its readings' ages after this, so they stay exact.
        self.board.sleep_ms(random.getrandbits(10) * 2)  # 0..2 s

    def send(self, data):
        airtime = self.modem.get_time_on_air_us(len(data))
        wait = self.governor.can_send(self.freq, airtime)
        self.wait_ms = wait
        if wait:
            self.deferred += 1
            self.log.warning(
                "link",
                "airtime limit, frame deferred",
                reason=self.governor.reason,
                wait_ms=wait,
                airtime_us=airtime,
            )
            return False
        self.governor.record(self.freq, airtime)
        self.modem.send(data)
        return True

    def receive(self, timeout_ms):
        # The driver blocks for the whole window without feeding the watchdog (8.4 s at most,
        # boards/hw.py; an ack window is 6 s): fed here, a frame's window and a status frame's
        # one in the same cycle no longer add up past it.
        self.board.feed()
        self.modem.configure({"freq_khz": self.ack_freq})
        try:
            pkt = self.modem.recv(timeout_ms=timeout_ms)
        except KeyboardInterrupt:
            # Ctrl-C (mpremote) mid-receive: the driver refuses a configure while it receives
            # ("Receiving"), which would replace the interrupt with a crash; the board stops.
            raise
        except Exception:
            self.modem.configure({"freq_khz": self.freq})
            raise
        self.modem.configure({"freq_khz": self.freq})
        if pkt is None or not pkt.valid_crc:
            return None
        self.rssi = pkt.rssi
        self.snr = pkt.snr
        return bytes(pkt)

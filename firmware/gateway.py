# The gateway role: the same firmware on a board with a LoRa radio, forwarding every frame it
# hears to the host (protocols/gwlink.py over UDP) and transmitting the host's acks to the node
# in its receive window. It holds no node keys: frames pass through untouched (GATEWAY.md).

import sys

from firmware import FW_VERSION
from firmware.airtime import Governor
from protocols import gwlink

_LISTEN_MS = 4000  # one receive window, shorter than any watchdog timeout (RP2040: 8.4 s)
_DOWNLINK_WAIT_MS = 1000  # how long to wait for the host's answer to an uplink
_TX_MARGIN_MS = 20  # stop listening this long before an ack is due


def _tx_at(m):
    return m.tx_at_ms


class Gateway:
    ROLE = "gateway"  # the log's subsystem for what app.py reports

    def __init__(self, cfg, board, log):
        self.board = board
        self.log = log
        self.gw_id = cfg.node_id
        self.modem = board.radio()
        self.listen_freq = self.modem.cfg["freq_khz"]
        self.sf = self.modem.cfg["sf"]
        self.host = cfg.uplink
        if cfg.uplink == "serial":
            # gwlink messages share the USB console with the log: the framing skips the lines
            self.sock = None
            self._out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else sys.stdout
            self._in = sys.stdin.buffer if hasattr(sys.stdin, "buffer") else sys.stdin
        else:
            self.sock = board.udp_socket()
        self.deframer = gwlink.Deframer()
        self.governor = Governor(board.ticks_ms)
        self.seq = 0
        self.stats = {"heard": 0, "bad_crc": 0, "forwarded": 0, "acks_sent": 0, "acks_late": 0}
        self.stats["acks_deferred"] = 0

    def run(self, wdt=None):
        self.log.info("gateway", "started", gw=self.gw_id, fw=FW_VERSION, board=self.board.NAME)
        self.queue = []  # downlinks waiting for their node's receive window, soonest first
        while True:
            if wdt is not None:
                wdt.feed()
            # Listen until the next ack is due, not through it: the radio hears other nodes
            # during the 2 s a node waits for its ack (GATEWAY.md "Timing").
            timeout = _LISTEN_MS
            if self.queue:
                due = self.queue[0].tx_at_ms - _TX_MARGIN_MS  # a receive ends a little late
                timeout = max(0, min(timeout, due - self.board.ticks_ms()))
            pkt = self.modem.recv(timeout_ms=timeout) if timeout else None
            if getattr(self.modem, "ended", False):
                break  # only a simulated world ends
            if pkt is not None:
                self.forward(pkt)
            while self.queue and self.queue[0].tx_at_ms <= self.board.ticks_ms() + _TX_MARGIN_MS:
                self.transmit(self.queue.pop(0))
        self.log.info("gateway", "stopped", **self.stats)

    def forward(self, pkt):
        end_ms = self.board.ticks_ms()  # the end of reception: the node's RX delay counts from it
        self.stats["heard"] += 1
        if not pkt.valid_crc:
            self.stats["bad_crc"] += 1
            return
        airtime = self.modem.get_time_on_air_us(len(pkt))
        self.seq = (self.seq + 1) & 0xFFFF
        msg = gwlink.Uplink(
            self.gw_id,
            self.seq,
            end_ms,
            airtime,
            self.listen_freq,
            int(pkt.rssi),
            max(-128, min(127, int(pkt.snr * 4))),
            self.sf,
            gwlink.FLAG_CRC_OK,
            bytes(pkt),
        )
        try:
            if self.sock is None:
                self._out.write(gwlink.encode(msg))
                if hasattr(self._out, "flush"):
                    self._out.flush()
            else:
                self.sock.sendto(gwlink.encode(msg), self.board.uplink_address(self.host))
        except OSError as e:
            self.log.warning("gateway", "host unreachable", errno=e.args[0] if e.args else 0)
            return
        self.stats["forwarded"] += 1
        stream = self._in if self.sock is None else self.sock
        if self.board.wait_readable(stream, _DOWNLINK_WAIT_MS):
            try:
                if self.sock is None:
                    data = bytearray()  # one byte at a time: the line never blocks us
                    while True:
                        data.extend(self._in.read(1))  # type: ignore[arg-type]  # .buffer: bytes
                        if not self.board.wait_readable(self._in, 0):
                            break
                else:
                    data = self.sock.recv(gwlink.MAX_ENCODED + 2)
            except OSError:
                return
            for m in self.deframer.feed(data):
                if isinstance(m, gwlink.Downlink):
                    self.queue.append(m)
                    self.queue.sort(key=_tx_at)

    def transmit(self, m):
        now = self.board.ticks_ms()
        if m.tx_at_ms < now:
            self.stats["acks_late"] += 1
            self.log.warning(
                "gateway",
                "ack too late for the node's window",
                msg=m.msg_id,
                late_ms=now - m.tx_at_ms,
            )
            return
        self.modem.configure({"freq_khz": m.freq_khz, "sf": m.sf})
        airtime = self.modem.get_time_on_air_us(len(m.payload))
        if self.governor.can_send(m.freq_khz, airtime):
            self.stats["acks_deferred"] += 1
            self.log.warning("gateway", "duty cycle: ack not sent", reason=self.governor.reason)
        else:
            self.governor.record(m.freq_khz, airtime)
            self.modem.send(m.payload, tx_at_ms=m.tx_at_ms)
            self.stats["acks_sent"] += 1
        self.modem.configure({"freq_khz": self.listen_freq, "sf": self.sf})

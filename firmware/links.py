# Uplinks a node sends frames over: each has up(), prepare(), send(frame) and
# receive(timeout_ms) for the downlink (acks), rssi and max_batch. Wi-Fi/UDP here; raw LoRa to a
# gateway node of ours in lora_link.py (a module of its own: a Wi-Fi node does not load it).


try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


# Longest downlink a node reads. The host acks one frame at a time (one range: at most 22
# bytes); 64 bytes take an ack of up to four ranges (SPEC.md "ACK frame"). A smaller read
# than MAX_FRAME because recv() allocates its whole buffer, and late in a long run the heap
# may have no 256-byte hole left (a MemoryError and a reset, in a 68 KB heap).
_ACK_MAX = const(64)


class UdpLink:
    """Frames as UDP datagrams to the host (Wi-Fi on real boards, loopback in simulation)."""

    NAME = "udp"
    max_batch = 0  # a backlog goes out in frames of the configured batch
    wait_ms = 0  # after a send() refused: how long until one may go (LoRa's airtime governor)

    def __init__(self, board, uplink, log):
        self.board = board
        self.uplink = uplink  # (host, port)
        self.log = log
        self.sock = None
        self.rssi = 0  # not known over UDP

    def up(self):
        return self.board.network_up()

    def prepare(self):
        pass

    def send(self, data):
        if self.sock is None:
            self.sock = self.board.udp_socket()
        try:
            self.sock.sendto(data, self.board.uplink_address(self.uplink))
            return True
        except OSError as e:
            self.log.warning("link", "send failed", errno=e.args[0] if e.args else 0)
            return False

    def receive(self, timeout_ms):
        """One downlink datagram, or None when nothing came within timeout_ms."""
        if self.sock is None or not self.board.wait_readable(self.sock, timeout_ms):
            return None
        try:
            return self.sock.recv(_ACK_MAX)
        except OSError as e:
            # ECONNREFUSED: the host answered "nothing listens on that port" to our datagram
            # (a wrong uplink port, or the receiver not running): say so, not just "no ack"
            if e.args and e.args[0] == 111:
                self.log.warning("link", "nothing listens at the uplink", errno=111)
            return None

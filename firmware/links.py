# Uplinks a node sends frames over: each has up(), send(frame) and receive(timeout_ms) for the
# downlink (acks). Wi-Fi/UDP here; LoRa (through a gateway node) is added beside it.


class UdpLink:
    """Frames as UDP datagrams to the host (Wi-Fi on real boards, loopback in simulation)."""

    NAME = "udp"

    def __init__(self, board, uplink, log):
        self.board = board
        self.uplink = uplink  # (host, port)
        self.log = log
        self.sock = None
        self.rssi = 0  # not known over UDP

    def up(self):
        return self.board.network_up()

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
            return self.sock.recv(256)
        except OSError:
            return None

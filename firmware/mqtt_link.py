# The MQTT uplink: frames published to a broker on citynode/up/<node_id>, the host's acks read
# from citynode/down/<node_id>, over micropython-lib's umqtt.simple (MQTT 3.1.1; frozen into
# ESP32 firmware, `mip install umqtt.simple` elsewhere). Its own module: UDP nodes do not load it.
# Log lines: "link mqtt connect failed errno=111"; errno=-1 is umqtt.simple's end of stream (the
# broker closed the connection); exc=MQTTException error=5 a CONNACK return code (MQTT 3.1.1
# section 3.2.2.3: 2 client id rejected, 4 bad user name or password, 5 not authorised).

from micropython import const

# Every socket operation waits at most this long (s); a connect's two waits (TCP, then CONNACK)
# fit between two watchdog feeds on every board (RP2040: 8.4 s).
_IO_TIMEOUT_S = const(3)
_DRAIN_MAX = const(8)  # messages read and dropped before a frame goes out


class MqttLink:
    """Frames as MQTT messages through a broker, to the host that subscribes citynode/up/+.

    QoS 0 both ways, clean session. The host's ack (echoing the frame's tag, SPEC.md "ACK
    frame") is the end-to-end confirmation, and the node keeps every reading in its journal
    until one comes. A QoS 1 PUBACK would say only that the broker has the frame, not that a
    sink made it durable: a round trip and code for nothing the node can act on (and
    umqtt.simple waits for it with no bound of its own). Acks are idempotent and useful only
    within the ack window: one the broker kept across a reconnect would be refused anyway.

    The connection is opened at the first send, and again at the send after anything went
    wrong with it: an error, the broker closing it (seen when the messages waiting are read
    before each frame), or an ack that did not come (it may be half-open: Wi-Fi slept, the
    address changed, a NAT forgot it). Failures are logged, never raised.

    Every socket operation has a timeout, but one: umqtt.simple's wait_msg() reads the rest of
    a message after its first byte with the socket blocking. A broker that stalls inside an
    ack (a few bytes, one TCP segment) is left to the watchdog."""

    NAME = "mqtt"
    max_batch = 0  # a backlog goes out in frames of the configured batch
    wait_ms = 0  # (links.py UdpLink)

    def __init__(self, board, uplink, node_id, gap_s, log):
        self.board = board
        self.log = log
        self.rssi = 0  # not known to the link
        self._up = b"citynode/up/%d" % node_id
        self._down = b"citynode/down/%d" % node_id
        # The broker drops a client silent for 1.5 keepalives, and umqtt.simple sends no pings:
        # twice the gap between frames (interval x batch) keeps a session over a missed frame;
        # after a longer silence the next send finds it closed and reopens it. One client id
        # per node: after a reset the broker hands the node's session over at once.
        # (client id, host, port, keepalive s: 16 bits, MQTT 3.1.1 section 3.1.2.10)
        self._conf = (
            b"citynode-%d" % node_id,
            uplink[0],
            uplink[1],
            min(65535, max(60, 2 * gap_s)),
        )
        self._client = None  # made at the first send (_client_or_none)
        self._sock = None  # the connection's socket, for the board's waits; None = closed
        self._stale = False  # an ack did not come: reconnect before the next frame
        self._ack = None

    def up(self):
        return self.board.network_up()

    def prepare(self):
        pass

    def _message(self, topic, msg):
        self._ack = msg  # citynode/down/<node_id>: the one topic subscribed

    def _client_or_none(self):
        """umqtt.simple is loaded at the first send, not at boot: by then the boot-time modules
        have left the heap, and its code fills the holes they left (a 64-bit unix-port node
        then runs a day in 72K, not 74K: bench/node_cycle.py)."""
        if self._client is None:
            try:
                from umqtt.simple import MQTTClient
            except ImportError:
                self.log.error("link", "mqtt needs umqtt.simple (mip install umqtt.simple)")
                return None
            client_id, host, port, keepalive = self._conf
            self._client = MQTTClient(client_id, host, port, keepalive=keepalive)
            self._client.set_callback(self._message)
        return self._client

    def send(self, data):
        c = self._client_or_none()
        if c is None:
            return False
        if self._stale:
            self._close()
        try:
            if self._sock is not None:
                # A late ack of an earlier frame is read and dropped, and a connection that
                # ended while the node slept fails here, before a frame is lost in it: the
                # broker's keepalive ran out, it restarted, or (a board in light sleep turns
                # Wi-Fi off) the network dropped it. Routine: an OSError is information.
                for _ in range(_DRAIN_MAX):
                    if c.check_msg() is None:
                        break
        except Exception as e:
            info = self.log.info if isinstance(e, OSError) else None
            self._failed("mqtt connection ended while idle", e, info)
        if self._sock is None:
            try:
                self.board.feed()
                c.connect(True, _IO_TIMEOUT_S)  # clean session: acks kept while away are stale
                self._sock = c.sock
                self.board.feed()
                c.subscribe(self._down, 0)
            except Exception as e:
                self._failed("mqtt connect failed", e)
                return False
            self.log.info("link", "mqtt connected", broker="%s:%d" % (c.server, c.port))
        self._ack = None
        try:
            self._sock.settimeout(_IO_TIMEOUT_S)  # check_msg() left it blocking: no bound
            c.publish(self._up, data)
            return True
        except Exception as e:
            self._failed("mqtt send failed", e)
            return False

    def receive(self, timeout_ms):
        """The next message on citynode/down/<node_id>, or None when none came within
        timeout_ms (the connection is then suspect and reopened before the next frame)."""
        end = self.board.ticks_ms() + timeout_ms
        try:
            while self._ack is None:
                left = end - self.board.ticks_ms()
                if self._sock is None:
                    return None
                if left <= 0 or not self.board.wait_readable(self._sock, left):
                    self._stale = True
                    return None
                self._sock.settimeout(_IO_TIMEOUT_S)
                self._client.wait_msg()  # one MQTT packet; an ack goes to _message
        except Exception as e:  # OSError, umqtt's asserts, a MemoryError on an oversized message
            self._failed("mqtt connection lost", e)
            return None
        ack = self._ack
        self._ack = None
        return ack

    def _failed(self, what, e, log=None):
        """Log why (a warning unless told), in the node's format, and close: the next send
        opens a new connection."""
        log = log or self.log.warning
        if isinstance(e, OSError):
            log("link", what, errno=e.args[0] if e.args else 0)
        else:  # MQTTException (a CONNACK code), an assert in umqtt.simple, a MemoryError
            log("link", what, exc=type(e).__name__, error=str(e))
        self._close()

    def _close(self):
        c = self._client
        if c.sock is not None:  # the connection, or the socket of a connect that failed
            try:
                c.sock.close()
            except OSError:
                pass
        c.sock = None
        self._sock = None
        self._stale = False
        self._ack = None

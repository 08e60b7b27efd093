# Tests for host_tools/receive/mqtt.py against a real broker: Debian's mosquitto, started here on a
# free port of 127.0.0.1 (tools/system-deps.sh installs it; without it these tests skip, except in
# CI as root, where they must run). The sink (readings; Home Assistant discovery, availability with
# a last will, retained newest states; broker stopped and restarted) and the source (frames in from
# a gateway's topic, acks back).

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import paho.mqtt.client as paho
import pytest

from firmware import FW_VERSION
from host_tools.backoff import Backoff
from host_tools.receive import mqtt
from host_tools.receive.forward import Forwarder
from host_tools.receive.mqtt import MqttSink, MqttSource, MqttUrl, ha_discovery
from host_tools.receive.receiver import Intake, Receiver, Verifier, serve
from host_tools.receive.sinks import DeliveryError, SinkError, reading_id, reading_json
from host_tools.receive.spool import Spool
from protocols import frame, uplink

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY7 = bytes(range(16))
ROWS = [
    (17, 40312, 1_700_000_000.25, "temperature_c", 21.5),
    (17, 40312, 1_700_000_000.25, "humidity_pct", 45.0),
    (17, 40312, 1_700_000_000.25, "pressure_hpa", 1013.25),
    (17, 40312, 1_700_000_000.25, "channel_99", 7.0),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_path():
    path = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
    )
    if path is None:
        reason = "mosquitto not installed (tools/system-deps.sh installs it when run as root)"
        if os.environ.get("CI") and os.geteuid() == 0:
            pytest.fail(reason + ": in CI as root it must be there")
        pytest.skip(reason)
    return path


class Mosquitto:
    """A real mosquitto on 127.0.0.1:port with persistence in a temp dir, so a graceful stop
    (SIGTERM) keeps the subscribers' sessions and their queued messages across a restart."""

    def __init__(self, tmp_path, port=None):
        self.binary = mosquitto_path()
        self.port = port or free_port()
        self.dir = tmp_path / ("mosquitto-%d" % self.port)
        self.dir.mkdir(exist_ok=True)
        self.conf = self.dir / "mosquitto.conf"
        lines = [
            "listener %d 127.0.0.1" % self.port,
            "allow_anonymous true",
            "persistence true",
            "persistence_location %s/" % self.dir,
            "log_dest file %s/mosquitto.log" % self.dir,
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to user mosquitto, who cannot write here
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = None

    @property
    def url(self):
        return "mqtt://127.0.0.1:%d" % self.port

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        "mosquitto exited %d: %s" % (self.proc.returncode, self.proc.stderr.read())
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError("mosquitto did not listen on %d" % self.port) from None
                time.sleep(0.05)

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


class Subscriber:
    """A persistent-session subscriber (QoS 1) that records every message it gets."""

    def __init__(self, broker, topics, client_id="citynode-test-sub"):
        self.messages = []
        self.connected = threading.Event()
        self._lock = threading.Lock()
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False
        )
        client.reconnect_delay_set(0.1, 0.5)

        def on_connect(client, userdata, flags, reason_code, properties):
            client.subscribe([(t, 1) for t in topics])
            self.connected.set()

        def on_disconnect(client, userdata, flags, reason_code, properties):
            self.connected.clear()

        def on_message(client, userdata, message):
            with self._lock:
                self.messages.append((message.topic, bytes(message.payload), message.retain))

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        self.client = client
        assert self.connected.wait(10)
        time.sleep(0.2)  # the SUBACK

    def snapshot(self):
        with self._lock:
            return list(self.messages)

    def readings(self, prefix="citynode/"):
        return [json.loads(p) for t, p, _ in self.snapshot() if t.startswith(prefix)]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.02)


_readers = iter(range(10**6))


def retained(broker, topics, expect=()):
    """{topic: payload} of the messages the broker holds retained on `topics`, as a client
    connecting now gets them (after those of `expect` are in)."""
    sub = Subscriber(broker, topics, client_id="retained-reader-%d" % next(_readers))
    try:
        wait_until(lambda: set(expect) <= {t for t, _, r in sub.snapshot() if r}, what=expect)
        time.sleep(0.2)
        return {t: p for t, p, r in sub.snapshot() if r}
    finally:
        sub.close()


def kind(topic):
    """ "reading" (citynode/...), "state" or "status" (citynode-ha/...) of a topic."""
    root, _, rest = topic.partition("/")
    if root == "citynode":
        return "reading"
    assert root == "citynode-ha", topic
    return "status" if rest == "status" else "state"


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


# --- URLs and discovery payloads (no broker needed) ---------------------------------------


def test_mqtt_urls():
    u = MqttUrl("mqtt://user:p%40ss@broker.example:1884/citynode/up/#", "--mqtt-in")
    assert (u.host, u.port, u.tls, u.username, u.password, u.topic) == (
        "broker.example",
        1884,
        False,
        "user",
        "p@ss",
        "citynode/up/#",
    )
    assert MqttUrl("mqtts://b", "--mqtt-out").port == 8883
    for text, message in [
        ("http://b/x", "--mqtt-out: expected mqtt://HOST[:PORT][/TOPIC], got 'http://b/x'"),
        ("mqtt:///x", "--mqtt-out: no broker host in 'mqtt:///x'"),
        ("mqtt://b:xx", "--mqtt-out: bad port in 'mqtt://b:xx'"),
    ]:
        with pytest.raises(SinkError) as info:
            MqttUrl(text, "--mqtt-out")
        assert str(info.value) == message
    with pytest.raises(SinkError, match="no topic"):
        MqttSource("mqtt://b")
    with pytest.raises(SinkError, match="must be a plain topic"):
        MqttSink("mqtt://b/citynode/#")


def test_ha_discovery_config():
    topic, config = ha_discovery(17, "temperature_c")
    assert topic == "homeassistant/sensor/citynode_17_temperature_c/config"
    assert config["unique_id"] == "citynode_17_temperature_c"
    assert config["default_entity_id"] == "sensor.citynode_17_temperature_c"
    assert "object_id" not in config  # deprecated by Home Assistant 2025.10
    assert config["state_topic"] == "citynode-ha/17/temperature_c"
    assert config["device_class"] == "temperature"
    assert config["unit_of_measurement"] == "°C"
    assert config["value_template"] == "{{ value_json.value }}"
    assert config["device"]["identifiers"] == ["citynode_17"]
    assert "sw_version" not in config["device"]  # the node's: in STATUS frames, not the sink's
    assert config["origin"] == {"name": "citynode", "sw_version": FW_VERSION}
    assert config["availability"] == [
        {
            "topic": "citynode-ha/status",
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]
    assert config["expire_after"] == 1800  # 3 frames of 10 readings a minute
    assert ha_discovery(3, "pressure_hpa")[1]["device_class"] == "atmospheric_pressure"
    assert ha_discovery(3, "humidity_pct")[1]["unit_of_measurement"] == "%"
    _, raw = ha_discovery(3, "channel_99", prefix="city", ha_prefix="ha")
    assert "device_class" not in raw and "unit_of_measurement" not in raw
    assert raw["state_topic"] == "city-ha/3/channel_99"
    assert raw["availability"][0]["topic"] == "city-ha/status"
    assert ha_discovery(3, "humidity_pct", expire_after=600)[1]["expire_after"] == 600
    assert "expire_after" not in ha_discovery(3, "humidity_pct", expire_after=None)[1]
    with pytest.raises(ValueError, match="expire_after"):
        MqttSink("mqtt://b", ha_prefix="homeassistant", expire_after=1.5)


# --- the sink against mosquitto ------------------------------------------------------------


def test_sink_publishes_readings_and_discovery(broker):
    sub = Subscriber(broker, ["citynode/#", "citynode-ha/#", "homeassistant/#"])
    sink = MqttSink(broker.url, ha_prefix="homeassistant", timeout=5)
    try:
        sink.deliver(ROWS)
        sink.deliver(ROWS[:1])  # announced once per connection
        # 5 readings, 4 configs, 5 states (the second batch's, as new as the first's), online
        wait_until(lambda: len(sub.snapshot()) == 15, what="15 messages")
    finally:
        sink.close()
        sub.close()
    messages = sub.snapshot()
    readings = [(t, json.loads(p), r) for t, p, r in messages if t.startswith("citynode/")]
    assert [(t, p) for t, p, _ in readings] == [
        ("citynode/17/%s" % row[3], reading_json(row)) for row in ROWS + ROWS[:1]
    ]
    # each reading with its id: node/reading index/quantity
    assert [p["id"] for _, p, _ in readings] == [
        "17/40312/temperature_c",
        "17/40312/humidity_pct",
        "17/40312/pressure_hpa",
        "17/40312/channel_99",
        "17/40312/temperature_c",
    ]
    configs = {t: json.loads(p) for t, p, _ in messages if t.startswith("homeassistant/")}
    assert set(configs) == {"homeassistant/sensor/citynode_17_%s/config" % row[3] for row in ROWS}
    for topic, config in configs.items():
        node, quantity = 17, topic.split("/")[2][len("citynode_17_") :]
        assert config == ha_discovery(node, quantity)[1]
    # retained, found by a client that comes later (Home Assistant after its restart): the
    # configs, each sensor's state and the receiver's status; the readings are not
    states = {"citynode-ha/17/%s" % row[3]: reading_json(row) for row in ROWS}
    late = retained(
        broker, ["citynode/#", "citynode-ha/#", "homeassistant/#"], set(configs) | set(states)
    )
    assert set(late) == set(configs) | set(states) | {"citynode-ha/status"}
    assert {t: json.loads(late[t]) for t in states} == states
    assert late["citynode-ha/status"] == b"offline"  # closed


def test_sink_expire_after_option(broker):
    sink = MqttSink(broker.url, ha_prefix="ha", timeout=5, expire_after=900)
    never = MqttSink(broker.url, ha_prefix="ha2", timeout=5, expire_after=None)
    try:
        sink.deliver(ROWS[:1])
        never.deliver(ROWS[:1])
    finally:
        sink.close()
        never.close()
    configs = {t: json.loads(p) for t, p in retained(broker, ["ha/#", "ha2/#"]).items()}
    assert configs["ha/sensor/citynode_17_temperature_c/config"]["expire_after"] == 900
    assert "expire_after" not in configs["ha2/sensor/citynode_17_temperature_c/config"]


def temperature(index, ts, value=20.0):
    return (17, index, ts, "temperature_c", value)


def test_sink_retains_only_the_newest_state(broker):
    """Each sensor's state topic holds its newest reading: one state per sensor per batch (the
    batch's newest), never replaced by an older reading, by this receiver or by a restarted
    one; the readings themselves all go out, not retained."""
    sub = Subscriber(broker, ["citynode/#", "citynode-ha/#"])
    topic = "citynode-ha/17/temperature_c"

    def state():
        return json.loads(retained(broker, [topic], [topic])[topic])

    def states_published():
        return [json.loads(p)["ts"] for t, p, _ in sub.snapshot() if t == topic]

    sink = MqttSink(broker.url, ha_prefix="homeassistant", timeout=5)
    try:
        humidity = (17, 3, 300.0, "humidity_pct", 40.0)
        sink.deliver(
            [temperature(1, 100.0), temperature(2, 200.0), temperature(3, 300.0), humidity]
        )
        assert state() == reading_json(temperature(3, 300.0))
        assert states_published() == [300.0]  # only the batch's newest
        sink.deliver([temperature(0, 50.0)])  # the node's backlog, sent later
        assert state()["ts"] == 300.0
        sink.deliver([temperature(5, 250.0), temperature(7, 400.0), temperature(6, 350.0)])
        assert state() == reading_json(temperature(7, 400.0))  # the newest, not the last
    finally:
        sink.close()
    restarted = MqttSink(broker.url, ha_prefix="homeassistant", timeout=5)
    try:
        restarted.deliver([temperature(4, 150.0)])  # reads what is retained before it compares
        assert state()["ts"] == 400.0
        restarted.deliver([temperature(8, 500.0)])
        assert state() == reading_json(temperature(8, 500.0))
        wait_until(lambda: states_published()[-1:] == [500.0], what="the state of ts 500")
    finally:
        restarted.close()
        time.sleep(0.2)
        sub.close()
    assert states_published() == [300.0, 400.0, 500.0]
    readings = [json.loads(p) for t, p, r in sub.snapshot() if kind(t) == "reading"]
    assert [r["reading_index"] for r in readings if r["quantity"] == "temperature_c"] == [
        1,
        2,
        3,
        0,
        5,
        7,
        6,
        4,
        8,
    ]
    assert retained(broker, ["citynode/#"]) == {}  # the readings are not retained


def test_sink_without_discovery_publishes_readings_only(broker):
    sub = Subscriber(broker, ["#"])
    sink = MqttSink(broker.url, timeout=5)
    try:
        sink.deliver(ROWS)
        wait_until(lambda: len(sub.snapshot()) == 4, what="4 readings")
        time.sleep(0.2)
    finally:
        sink.close()
        sub.close()
    assert [kind(t) for t, _, _ in sub.snapshot()] == ["reading"] * 4
    assert retained(broker, ["#"]) == {}


# --- availability: the receiver's status and its last will --------------------------------

RECEIVER = """
import sys, time
from host_tools.receive.mqtt import MqttSink
sink = MqttSink(sys.argv[1], ha_prefix="homeassistant", timeout=5)
sink.deliver([(17, 1, 1_700_000_000.0, "temperature_c", 21.5)])
print("delivered", flush=True)
time.sleep(60)
"""


def statuses(sub):
    return [(p.decode(), r) for t, p, r in sub.snapshot() if t == "citynode-ha/status"]


def test_receiver_killed_goes_offline_by_its_last_will(broker):
    sub = Subscriber(broker, ["citynode-ha/status"])
    receiver = subprocess.Popen(
        [sys.executable, "-c", RECEIVER, broker.url], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert receiver.stdout.readline() == "delivered\n"
        wait_until(lambda: statuses(sub) == [("online", False)], what="online")
        assert retained(broker, ["citynode-ha/status"]) == {"citynode-ha/status": b"online"}
        receiver.kill()  # no DISCONNECT: the broker sees the socket closed
        receiver.wait(10)
        wait_until(lambda: statuses(sub)[-1:] == [("offline", False)], what="the last will")
    finally:
        receiver.kill()
        receiver.stdout.close()
        sub.close()
    assert retained(broker, ["citynode-ha/status"]) == {"citynode-ha/status": b"offline"}


def test_sink_status_online_then_offline_on_close(broker):
    sub = Subscriber(broker, ["citynode-ha/status"])
    sink = MqttSink(broker.url, ha_prefix="homeassistant", timeout=5)
    try:
        sink.deliver(ROWS[:1])
        assert retained(broker, ["citynode-ha/status"]) == {"citynode-ha/status": b"online"}
        sink.close()
        wait_until(lambda: statuses(sub)[-1:] == [("offline", False)], what="offline")
    finally:
        sink.close()
        sub.close()
    assert statuses(sub) == [("online", False), ("offline", False)]


def test_sink_that_gives_up_on_a_hung_broker_leaves_its_will(broker):
    """A delivery that fails drops the connection without a DISCONNECT, so the broker, once it
    notices, says "offline"; the next delivery connects again and says "online"."""
    sub = Subscriber(broker, ["citynode-ha/status"])
    sink = MqttSink(broker.url, ha_prefix="homeassistant", timeout=1)
    try:
        sink.deliver(ROWS)
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(DeliveryError):
                sink.deliver(ROWS)
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: statuses(sub)[-1:] == [("offline", False)], what="the last will")
        sink.deliver(ROWS)
        wait_until(lambda: statuses(sub)[-1:] == [("online", False)], what="online again")
    finally:
        sink.close()
        sub.close()


def test_live_receiver_says_online_again_after_another_ones_will(broker, monkeypatch):
    """Receivers sharing a prefix share the status topic: when one dies, a live one says
    "online" again with a batch (at least ONLINE_EVERY_S apart; 0 here)."""
    monkeypatch.setattr(mqtt, "ONLINE_EVERY_S", 0)
    sub = Subscriber(broker, ["citynode-ha/status"])
    a = MqttSink(broker.url, ha_prefix="homeassistant", timeout=5, client_id="receiver-a")
    b = MqttSink(broker.url, ha_prefix="homeassistant", timeout=5, client_id="receiver-b")
    try:
        a.deliver(ROWS[:1])
        b.deliver(ROWS[1:2])
        a._client.socket().shutdown(socket.SHUT_RDWR)  # receiver a dies
        wait_until(lambda: statuses(sub)[-1:] == [("offline", False)], what="a's last will")
        b.deliver(ROWS[2:3])
        wait_until(lambda: statuses(sub)[-1:] == [("online", False)], what="b: online")
    finally:
        a.close()
        b.close()
        sub.close()


def test_sink_prefix_from_url(broker):
    sub = Subscriber(broker, ["koper/#"])
    sink = MqttSink(broker.url + "/koper/air", timeout=5)
    try:
        sink.deliver(ROWS[:1])
        wait_until(lambda: sub.snapshot(), what="a message")
    finally:
        sink.close()
        sub.close()
    assert sub.snapshot()[0][0] == "koper/air/17/temperature_c"
    assert sink.name == "mqtt 127.0.0.1:%d/koper/air" % broker.port


def test_sink_broker_down_is_connect_error():
    port = free_port()
    sink = MqttSink("mqtt://127.0.0.1:%d" % port, timeout=2)
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    assert info.value.reason == "connect"
    assert str(info.value) == "mqtt 127.0.0.1:%d: connection refused" % port


def test_sink_broker_killed_mid_batch_fails_then_recovers(broker):
    sink = MqttSink(broker.url, timeout=3)
    sink.deliver(ROWS)
    broker.stop(signal.SIGKILL)
    rows = [(5, i, float(i), "temperature_c", 1.0) for i in range(500)]
    with pytest.raises(DeliveryError) as info:
        sink.deliver(rows)
    assert info.value.reason in ("connect", "connection", "timeout")
    broker.start()
    sink.deliver(rows)
    sink.close()


def test_sink_broker_that_hangs_times_out_and_nothing_counts_as_delivered(broker):
    """A frozen broker (SIGSTOP) takes the TCP bytes but sends no PUBACK: deliver() must fail
    by its timeout rather than take the readings for delivered."""
    sink = MqttSink(broker.url, timeout=1)
    sink.deliver(ROWS)  # connected
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises(DeliveryError) as info:
            sink.deliver(ROWS)
        assert 0.9 < time.monotonic() - t0 < 5
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    assert info.value.reason == "timeout"
    assert str(info.value) == (
        "mqtt 127.0.0.1:%d: 4 of 4 messages not acknowledged within 1.0 s" % broker.port
    )
    sink.deliver(ROWS)  # a fresh connection once it is back
    sink.close()


def test_forwarder_through_a_broker_restart_delivers_every_reading(broker, tmp_path):
    sub = Subscriber(broker, ["citynode/#"])
    spool = Spool(tmp_path / "spool.db")
    sink = MqttSink(broker.url, timeout=2)
    f = Forwarder(spool, sink, batch=100, backoff=Backoff(base=0.05, cap=0.5), poll_s=0.05)
    f.start()
    expected = set()

    def spool_some(n, t0):
        rows = [(9, t0 + i, 1_700_000_000.0 + t0 + i, "temperature_c", float(i)) for i in range(n)]
        spool.write(rows)
        expected.update(reading_id(*r[:4]) for r in rows)

    def got():
        return {r["id"] for r in sub.readings()}

    try:
        spool_some(300, 0)
        wait_until(lambda: got() == expected, what="first readings")
        broker.stop()  # graceful: the subscriber's session and queue are kept on disk
        spool_some(300, 1000)
        wait_until(lambda: f.counters["failed_connect"] + f.counters["failed_connection"] >= 1)
        assert spool.backlog(sink.name) > 0
        broker.start()
        wait_until(lambda: got() == expected, timeout=30, what="every reading after restart")
    finally:
        assert f.stop(5)
        sink.close()
        sub.close()
        spool.close()
    assert got() == expected


def test_readings_spooled_twice_are_published_once(broker, tmp_path):
    """The same readings reach the spool again (a frame re-sent after a lost ack, heard by a
    second gateway), before and after the first copy was published and pruned: each is
    published once, with its id."""
    sub = Subscriber(broker, ["citynode/#"])
    spool = Spool(tmp_path / "spool.db")
    sink = MqttSink(broker.url, timeout=5)
    f = Forwarder(spool, sink, batch=50, poll_s=0.05)
    first = [(9, i, 1_700_000_000.0 + i, "temperature_c", float(i)) for i in range(100)]
    more = [(9, i, 1_700_000_500.0 + i, "temperature_c", -1.0) for i in range(90, 120)]
    f.start()
    try:
        assert spool.write(first) == 100
        assert spool.write(first[:50]) == 0  # a copy before it was published
        wait_until(lambda: len(sub.readings()) == 100, what="the first readings")
        wait_until(lambda: spool.backlog(sink.name) == 0)
        assert spool.write(first) == 0  # published and pruned: still a copy
        assert spool.write(more) == 20  # 90..99 are copies (their first timestamp stands)
        wait_until(lambda: len(sub.readings()) == 120, what="the new readings")
        time.sleep(0.3)
    finally:
        assert f.stop(5)
        sink.close()
        sub.close()
        spool.close()
    got = sub.readings()
    assert [r["id"] for r in got] == ["9/%d/temperature_c" % i for i in range(120)]
    assert [r["value"] for r in got[90:100]] == [float(i) for i in range(90, 100)]


# --- the source ---------------------------------------------------------------------------


def test_source_frames_in_acks_out(broker, tmp_path):
    from host_tools.receive.sinks import SqliteSink

    sink = SqliteSink(tmp_path / "r.db")
    receiver = Receiver(Verifier({7: KEY7}), sink)
    source = MqttSource(broker.url + "/gw/#")  # "#" also matches the acks
    intake = Intake()
    stop = threading.Event()
    loop = threading.Thread(target=serve, args=(intake, receiver, stop, 0.05), daemon=True)
    loop.start()
    source.start(intake)
    gateway = Subscriber(broker, ["gw/#"], client_id="gateway-1")
    try:
        assert source.connected.wait(10)
        time.sleep(0.2)
        signer = frame.Signer(KEY7)
        good = frame.encode_data(signer, 7, 11, (1, 2, 3), [(2150, 4500, 101325)], [0])
        gateway.client.publish("gw/a/up", good, qos=1)
        gateway.client.publish("gw/b/up", good, qos=1)  # heard by two gateways
        gateway.client.publish("gw/a/up", b"\x11junk", qos=1)
        wait_until(lambda: receiver.counters["frames_heard_again"] == 1, what="the copy")
        wait_until(lambda: sum(1 for t, _, _ in gateway.snapshot() if t.endswith("/ack")) == 1)
        time.sleep(0.2)
    finally:
        stop.set()
        loop.join(5)
        source.stop()
        gateway.close()
        sink.close()
    # the very frame heard by the second gateway is not acked again (two acks would collide
    # on the air); a node's re-sent frame is re-encoded, a copy with bytes of its own
    acks = [(t, p) for t, p, _ in gateway.snapshot() if t.endswith("/ack")]
    assert len(acks) == 1
    assert acks[0][0] in ("gw/a/up/ack", "gw/b/up/ack")
    assert uplink.decode_ack(acks[0][1], frame.Signer(KEY7)).acked == [(11, 11)]
    assert receiver.counters["frames_accepted"] == 1
    assert receiver.counters["acks_sent"] == 1
    assert source.counters["mqtt_messages"] == 3  # its own ack was not taken for a frame
    assert sum(v for k, v in receiver.counters.items() if k.startswith("rejected_")) == 1
    with sqlite3.connect(tmp_path / "r.db") as db:  # stored once
        assert (
            db.execute("SELECT node_id, reading_index FROM readings").fetchall() == [(7, 11)] * 3
        )

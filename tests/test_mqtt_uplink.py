# MQTT uplink (host_tools/receive/mqtt.py MqttUplinkSource, `citynode receive --mqtt-up`) against a
# real mosquitto on loopback (tests/test_sinks_mqtt.py starts it; without it these tests skip):
# nodes publish v2 frames on citynode/up/<id> and take acks on citynode/down/<id>; three real
# receivers share one subscription and one SQLite file, and one of them is SIGKILLed mid-run.

import contextlib
import logging
import queue
import random
import re
import select
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from conftest import ReceiveProcess
from test_sinks_mqtt import Mosquitto, Subscriber, wait_until

from host_tools.keys import save_keys
from host_tools.receive.mqtt import DOWN_TOPIC, UP_TOPIC, MqttUplinkSource, up_node_id
from host_tools.receive.receiver import MAX_DATAGRAM, Intake
from host_tools.receive.sinks import SinkError
from protocols import frame, uplink

REPO = Path(__file__).resolve().parent.parent
NODES = {n: bytes((n * 29 + 7 * i) % 256 for i in range(16)) for n in range(1, 9)}
BME = frame.BME280_CHANNELS
QUANTITIES = ("temperature_c", "humidity_pct", "pressure_hpa")  # all three have scale 100
ACK_TIMEOUT_S = 2.0  # the firmware's ack_timeout_ms
CONNECTED = r"mqtt-up \S+ \S+: connected, subscribed"


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys.json"
    save_keys(path, NODES)  # mode 0600, as the receiver requires
    return path


def mqtt_client(client_id, protocol=paho.MQTTv5):
    return paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)


class Publisher:
    """A plain MQTT v5 client that publishes (QoS 1) and waits for the broker's PUBACK."""

    def __init__(self, broker, client_id="citynode-test-pub"):
        self.client = mqtt_client(client_id)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def publish(self, topic, payload):
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(5)
        assert info.is_published(), "the broker did not take %s" % topic

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


# --- a v2 node on Wi-Fi publishing over MQTT ----------------------------------------------


def age_s(t_send, sampled):
    """A reading's age in whole seconds at t_send, rounded as firmware/node.py does."""
    return (int((t_send - sampled) * 1000) + 500) // 1000


class Node:
    """A v2 node with an MQTT connection of its own: it publishes its frames on
    citynode/up/<id> and reads acks on citynode/down/<id>. As the firmware, it keeps a frame's
    readings until an ack that echoes the tag of the copy just sent covers them, and after
    ACK_TIMEOUT_S without one it publishes them again, re-encoded with their new ages.
    qos=0: MQTT 3.1.1 and QoS 0 both ways, as firmware/mqtt_link.py (umqtt.simple) does;
    qos=1: MQTT v5 and QoS 1, as a node with a fuller client may."""

    def __init__(self, broker, node_id, qos):
        self.node_id = node_id
        self.qos = qos
        self.signer = frame.Signer(NODES[node_id])
        self.rng = random.Random(node_id)
        self.next_index = 0
        self.sampled = {}  # index -> (sample time, raw values)
        self.frames = []  # per frame delivered: (time of its first copy, copies sent, indices)
        self.acks = queue.Queue()
        subscribed = threading.Event()
        protocol = paho.MQTTv311 if qos == 0 else paho.MQTTv5
        client = mqtt_client("citynode-node-%d" % node_id, protocol)

        def on_connect(client, userdata, flags, reason_code, properties):
            client.subscribe(DOWN_TOPIC + str(node_id), qos=qos)

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            subscribed.set()

        def on_message(client, userdata, message):
            self.acks.put(bytes(message.payload))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        self.client = client
        assert subscribed.wait(10), "node %d: not subscribed to its acks" % node_id

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()

    def sample(self, when):
        index = self.next_index
        self.next_index += 1
        raw = (
            1500 + self.rng.randrange(1500),
            3000 + self.rng.randrange(5000),
            98000 + self.rng.randrange(6000),
        )
        self.sampled[index] = (when, raw)
        return index

    def encode(self, indices, t_send):
        ages = [age_s(t_send, self.sampled[i][0]) for i in indices]
        raws = [self.sampled[i][1] for i in indices]
        return frame.encode_data(self.signer, self.node_id, indices[0], BME, raws, ages, version=2)

    def publish(self, payload):
        info = self.client.publish(UP_TOPIC + str(self.node_id), payload, qos=self.qos)
        info.wait_for_publish(5)  # QoS 1: the broker's PUBACK; QoS 0: written to the socket
        assert info.is_published(), "node %d: the frame did not go out" % self.node_id

    def acks_for(self, payload, indices, timeout, want=1):
        """Up to `want` acks that echo payload's tag and cover indices, read within timeout s
        (acks of earlier copies are skipped, as the firmware does)."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                raw = self.acks.get(timeout=left)
            except queue.Empty:
                break
            ack = uplink.decode_ack(raw, self.signer)  # a bad ack fails the test
            if ack.echo == payload[-frame.TAG_LEN :] and any(
                a <= indices[0] and indices[-1] <= b for a, b in ack.acked
            ):
                got.append(ack)
        return got

    def deliver(self, indices, tries=6):
        """Publish until acked: (payload of the copy acked, its ack)."""
        first = None
        for copy in range(1, tries + 1):
            t_send = time.time()
            payload = self.encode(indices, t_send)
            first = first or t_send
            self.publish(payload)
            acks = self.acks_for(payload, indices, ACK_TIMEOUT_S)
            if acks:
                self.frames.append((first, copy, indices))
                return payload, acks[0]
        raise AssertionError("node %d: readings %s never acked" % (self.node_id, indices))

    def run(self, frames, per_frame, pause, errors):
        """Deliver `frames` frames of `per_frame` readings sampled over the last minute, `pause`
        seconds apart."""
        try:
            for _ in range(frames):
                now = time.time()
                indices = [self.sample(now - 60 + 10 * k) for k in range(per_frame)]
                self.deliver(indices)
                time.sleep(pause)
        except Exception as e:  # reported by the test's thread
            errors.append("node %d: %r" % (self.node_id, e))


def run_nodes(nodes, frames, per_frame, pause):
    errors = []
    threads = [
        threading.Thread(target=n.run, args=(frames, per_frame, pause, errors), daemon=True)
        for n in nodes
    ]
    for t in threads:
        t.start()
    return threads, errors


def join(threads, timeout=120):
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "nodes still delivering after %d s" % timeout


# --- receivers and their database ---------------------------------------------------------


def parse_counters(text):
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}


def live_counters(rx):
    rx.proc.send_signal(signal.SIGUSR1)
    return parse_counters(rx.wait_for(r" INFO counters: (.*)$").group(1))


def stop(rx):
    """SIGTERM; the final counters, after checking a clean exit."""
    assert rx.stop() == 0, rx.drain()
    return parse_counters(rx.wait_for(r"^citynode: final counters: (.*)$").group(1))


def stored(db):
    """{(node_id, reading_index): {quantity: (ts, value)}}, after checking that no reading is
    stored twice."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT node_id, reading_index, ts, quantity, value FROM readings"
        ).fetchall()
    identities = [(n, i, q) for n, i, _, q, _ in rows]
    assert len(identities) == len(set(identities)), "a reading stored twice"
    out = {}
    for n, i, ts, q, v in rows:
        out.setdefault((n, i), {})[q] = (ts, v)
    return out


def check_stored(db, nodes, tol=1.0):
    """Every reading the nodes sampled is stored once, with its values and a timestamp within
    tol s of when it was sampled (ages are whole seconds), and nothing else is."""
    got = stored(db)
    expected = {(n.node_id, i): s for n in nodes for i, s in n.sampled.items()}
    assert sorted(set(got) - set(expected))[:10] == [], "readings stored that were not sent"
    assert sorted(set(expected) - set(got))[:10] == [], "readings missing"
    wrong = []
    for key, (when, raw) in sorted(expected.items()):
        values = got[key]
        if set(values) != set(QUANTITIES):
            wrong.append((key, sorted(values)))
            continue
        for name, r in zip(QUANTITIES, raw, strict=True):
            ts, v = values[name]
            if abs(v - r / 100) > 1e-9 or not abs(ts - when) < tol:
                wrong.append((key, name, ts, v, "expected", when, r / 100))
    assert wrong[:10] == [], "%d readings wrong" % len(wrong)
    return len(got)


def start_receivers(broker, keys, db, tmp_path, count):
    """`count` receivers on one broker group and one database, each subscribed."""
    rxs = [
        ReceiveProcess(
            "--keys",
            keys,
            "--mqtt-up",
            broker.url,
            "--db",
            db,
            "--replay-state",
            tmp_path / ("rx%d.replay" % k),
        )
        for k in range(count)
    ]
    try:
        for rx in rxs:
            rx.wait_for(CONNECTED)
    except BaseException:
        for rx in rxs:
            rx.stop(signal.SIGKILL)
        raise
    return rxs


# --- three receivers, one killed -----------------------------------------------------------


def test_three_receivers_share_the_uplink_and_take_over_from_one_killed(tmp_path, broker, keys):
    begin = time.monotonic()
    db = tmp_path / "readings.db"
    rxs = start_receivers(broker, keys, db, tmp_path, 3)
    nodes = []
    try:
        nodes = [Node(broker, n, qos=n % 2) for n in NODES]  # half of them as the firmware

        # 1. all three up: every frame acked, the messages spread over the three
        threads, errors = run_nodes(nodes, frames=15, per_frame=4, pause=0.0)
        join(threads)
        assert errors == []
        phase1 = sum(len(n.frames) for n in nodes)
        shares = [live_counters(rx).get("mqtt_up_messages", 0) for rx in rxs]
        assert sum(shares) == sum(c for n in nodes for _, c, _ in n.frames)
        assert min(shares) >= sum(shares) / 5, "load not spread: %s" % shares

        # 2. one receiver SIGKILLed while the nodes publish
        threads, errors = run_nodes(nodes, frames=40, per_frame=4, pause=0.1)
        wait_until(
            lambda: sum(len(n.frames) for n in nodes) >= phase1 + 80,
            timeout=60,
            what="frames delivered before the kill",
        )
        # Another writer holds the database meanwhile, so that each receiver dies or lives
        # with frames read and PUBACKed but not stored: every node's frame in flight (each
        # keeps one) waits in a receiver, the killed one holding its turn of them (about 8/3).
        with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as lock:
            lock.execute("BEGIN EXCLUSIVE")
            time.sleep(0.5)
            killed_at = time.time()
            assert rxs[0].stop(signal.SIGKILL) == -signal.SIGKILL
            lock.execute("COMMIT")
        join(threads)
        assert errors == []
        frames = [f for n in nodes for f in n.frames]
        after = [(t, copies) for t, copies, _ in frames if t > killed_at + 1.0]
        assert len(after) >= 40, "the kill came too late to show anything"
        # The killed receiver's session ended with its connection: the broker gave its turn to
        # the others at once, so every frame published after the kill was acked first time.
        assert [c for _, c in after if c > 1] == []
        # What the killed one held was lost with it, PUBACKed or not: those nodes, unacked,
        # published the readings again after ACK_TIMEOUT_S, and a survivor acked them. No
        # frame needed a second copy before the kill or after it.
        resent = sorted(round(t - killed_at, 2) for t, c, _ in frames if c > 1)
        assert resent != [], "the killed receiver held no frame"
        assert all(-1.0 < dt <= 0.0 for dt in resent), resent

        # 3. copies, through the two left: the very same bytes published twice (a node's own
        # QoS 1 re-send after it reconnected), and readings sent again after a lost ack
        before = [live_counters(rx) for rx in rxs[1:]]
        stored_before = len(stored(db))
        node = nodes[0]  # node 1, QoS 1
        indices = [node.sample(time.time() - 5)]
        payload = node.encode(indices, time.time())
        node.publish(payload)
        node.publish(payload)
        twice = node.acks_for(payload, indices, ACK_TIMEOUT_S, want=2)
        assert len(twice) >= 1, "neither copy acked"
        _, _, lost_ack = nodes[1].frames[-1]  # node 2, QoS 0
        _, ack = nodes[1].deliver(lost_ack)  # re-encoded, new ages: acked again
        assert ack.acked
        copies = nodes[1].frames[-1][1]
        stored_after = len(stored(db))

        finals = [stop(rx) for rx in rxs[1:]]
    finally:
        for rx in rxs:
            rx.stop(signal.SIGKILL)
        for n in nodes:
            n.close()
    logs = [rx.drain() for rx in rxs]
    for log in logs[1:]:
        assert "Traceback" not in log
        assert "connection lost" not in log and "cannot connect" not in log
    readings = check_stored(db, nodes)
    total = {}
    for c in finals:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    rejected = {k: v for k, v in total.items() if k.startswith("rejected_")}
    assert rejected == {}
    assert total.get("ack_send_error", 0) == 0
    for k in ("oversize", "intake_full", "mqtt_up_bad_topic", "mqtt_up_id_mismatch"):
        assert total.get(k, 0) == 0, k
    # section 3: each message handled by one receiver (accepted, a copy, or the same bytes
    # heard again), and only the one new reading stored
    handled = ("frames_accepted", "frames_copies", "frames_heard_again")
    changes = [
        f.get(k, 0) - b.get(k, 0) for f, b in zip(finals, before, strict=True) for k in handled
    ]
    assert sum(changes) == 2 + copies
    assert stored_after == stored_before + 1
    assert all(c.get("mqtt_up_messages", 0) > 0 for c in finals)
    print(
        "\nmqtt uplink: %d readings in %d frames from %d nodes; shares before the kill %s; "
        "%d frames lost with the killed receiver and published again; survivors: copies %d "
        "(values already stored %d), heard again %d, %d acks for the same bytes twice; %.1f s"
        % (
            readings,
            len(frames),
            len(nodes),
            shares,
            len(resent),
            total.get("frames_copies", 0),
            total.get("values_already_stored", 0),
            total.get("frames_heard_again", 0),
            len(twice),
            time.monotonic() - begin,
        )
    )


# --- the source on its own, in this process -----------------------------------------------


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def matching(self, pattern):
        return [line for line in self.lines if re.search(pattern, line)]


def source_log():
    log = logging.getLogger("test.mqtt_uplink.%d" % time.monotonic_ns())
    log.propagate = False
    records = Records()
    log.addHandler(records)
    log.setLevel(logging.INFO)
    return log, records


def test_each_message_checked_before_the_intake(broker):
    log, records = source_log()
    source = MqttUplinkSource(broker.url + "/unit", log=log)
    intake = Intake()
    acks = Subscriber(broker, [DOWN_TOPIC + "#"], client_id="citynode-test-acks")
    pub = Publisher(broker)
    source.start(intake)
    try:
        assert source.connected.wait(10)
        signer = frame.Signer(NODES[7])
        good = frame.encode_data(signer, 7, 40, BME, [(2150, 4500, 101325)], [3], version=2)
        other = frame.encode_data(frame.Signer(NODES[8]), 8, 0, BME, [(1, 2, 3)], [0], version=2)
        sent_from = time.time()
        messages = [
            (UP_TOPIC + "7", good),  # in
            (UP_TOPIC + "7", bytes(MAX_DATAGRAM + 1)),  # oversize
            (UP_TOPIC + "7", bytes(MAX_DATAGRAM)),  # not a frame, not oversize: in
            (UP_TOPIC + "7", b"\x21junk"),  # no frame at all: in, for the verifier
            (UP_TOPIC + "7", other),  # node 8's frame on node 7's topic
            (UP_TOPIC + "007", good),  # not as node 7 writes its id
            (UP_TOPIC + "4294967296", good),  # not a u32
            (UP_TOPIC + "x", good),
            (UP_TOPIC + "", good),  # "+" matches an empty level too
        ]
        for topic, payload in messages:
            pub.publish(topic, payload)
        wait_until(lambda: source.counters["mqtt_up_messages"] == len(messages))
        sent_until = time.time()
        batch = intake.get_batch(1.0, 100)
    finally:
        pub.close()
    assert sorted(d for d, _, _ in batch) == sorted([good, bytes(MAX_DATAGRAM), b"\x21junk"])
    assert all(sent_from <= t <= sent_until for _, _, t in batch)  # read time, not handling
    assert dict(source.counters) == {
        "mqtt_up_messages": 9,
        "oversize": 1,
        "mqtt_up_id_mismatch": 1,
        "mqtt_up_bad_topic": 4,
    }
    reply = next(r for d, r, _ in batch if d == good)
    reply(b"the ack")
    wait_until(lambda: acks.snapshot(), what="the ack")
    time.sleep(0.2)
    assert [(t, p) for t, p, _ in acks.snapshot()] == [(DOWN_TOPIC + "7", b"the ack")]
    # the drops are logged, folded: one line per kind, not per message
    assert len(records.matching(r"dropped: not citynode/up/<node id>")) == 1
    assert records.matching(r"frame of node 8 on citynode/up/7 dropped") != []
    source.stop()
    acks.close()
    with pytest.raises(OSError, match="not connected, ack to citynode/down/7 not sent"):
        reply(b"late")
    source.stop()  # twice is fine


def test_up_node_id():
    assert up_node_id("citynode/up/0") == 0
    assert up_node_id("citynode/up/17") == 17
    assert up_node_id("citynode/up/4294967295") == 4294967295
    for topic in [
        "citynode/up/4294967296",
        "citynode/up/017",
        "citynode/up/-1",
        "citynode/up/+1",
        "citynode/up/ 1",
        "citynode/up/1 ",
        "citynode/up/١",  # an Arabic-Indic digit: isdigit() says yes
        "citynode/up/",
        "citynode/up/1/2",
        "citynode/down/1",
        "citynode/up/" + "9" * 5000,
    ]:
        assert up_node_id(topic) is None, topic


def test_broker_down_then_back_logs_each_change_once_and_backs_off(tmp_path):
    broker = Mosquitto(tmp_path)
    log, records = source_log()
    source = MqttUplinkSource(broker.url, log=log, backoff=(0.05, 0.4))
    intake = Intake()
    source.start(intake)
    try:
        wait_until(lambda: source.counters["mqtt_up_connect_failed"] >= 4, what="attempts")
        time.sleep(0.5)
        broker.start()
        assert source.connected.wait(10)
        broker.stop()  # SIGTERM: the broker closes the connection
        wait_until(lambda: source.counters["mqtt_up_connect_failed"] >= 8, what="attempts")
        failed = source.counters["mqtt_up_connect_failed"]
        broker.start()
        assert source.connected.wait(10)
        with contextlib.closing(Publisher(broker)) as pub:
            frame1 = frame.encode_data(frame.Signer(NODES[1]), 1, 0, BME, [(1, 2, 3)], [0])
            pub.publish(UP_TOPIC + "1", frame1)
            wait_until(lambda: intake.qsize() == 1, what="the frame after the restart")
    finally:
        source.stop()
        broker.stop()
    # doubling pauses between 0.025 and 0.4 s: a few attempts a second, not a busy loop
    assert 8 <= failed < 60, failed
    assert source.counters["mqtt_up_disconnected"] == 1
    lines = records.lines
    assert len(records.matching(r"cannot connect to the broker: Connection refused")) == 1
    assert len(records.matching(r"connection lost: closed without a DISCONNECT")) == 1
    assert len(records.matching(r": connected after [\d.]+ s, subscribed")) == 1
    assert len(records.matching(r": connected again after [\d.]+ s, subscribed")) == 1
    assert len(lines) == 4, lines


# --- URLs ----------------------------------------------------------------------------------


def test_urls_and_groups():
    source = MqttUplinkSource("mqtt://broker.example")
    assert (source.url.address, source.group) == ("broker.example:1883", "citynode")
    assert source.topic_filter == "$share/citynode/citynode/up/+"
    source = MqttUplinkSource("mqtts://u:p@broker.example:8884/east")
    assert (source.url.tls, source.url.port, source.group) == (True, 8884, "east")
    assert source.topic_filter == "$share/east/citynode/up/+"
    assert MqttUplinkSource("mqtt://b/", group="west").group == "west"
    for url, message in [
        ("http://b/g", "--mqtt-up: expected mqtt://HOST[:PORT][/GROUP], got 'http://b/g'"),
        ("b:1883", "--mqtt-up: expected mqtt://HOST[:PORT][/GROUP], got 'b:1883'"),
        ("mqtt:///g", "--mqtt-up: no broker host in 'mqtt:///g'"),
        ("mqtt://b:99999", "--mqtt-up: bad port in 'mqtt://b:99999'"),
        (
            "mqtt://b/a/b",
            "--mqtt-up: group 'a/b' in 'mqtt://b/a/b': a share name is one or more characters "
            "without '/', '+' or '#' (mqtt://HOST[:PORT][/GROUP])",
        ),
        (
            "mqtt://b/g+",
            "--mqtt-up: group 'g+' in 'mqtt://b/g+': a share name is one or more characters "
            "without '/', '+' or '#' (mqtt://HOST[:PORT][/GROUP])",
        ),
    ]:
        with pytest.raises(SinkError) as info:
            MqttUplinkSource(url)
        assert str(info.value) == message


@pytest.mark.parametrize(
    "urls, line",
    [
        (["ftp://b"], "citynode: --mqtt-up: expected mqtt://HOST[:PORT][/GROUP], got 'ftp://b'"),
        (
            ["mqtt://b:1883/a#"],
            "citynode: --mqtt-up: group 'a#' in 'mqtt://b:1883/a#': a share name is one or more "
            "characters without '/', '+' or '#' (mqtt://HOST[:PORT][/GROUP])",
        ),
        (
            ["mqtt://b/g", "mqtt://b:1883/g"],
            "citynode: --mqtt-up mqtt://b:1883/g: broker b:1883 and group g are given twice",
        ),
    ],
)
def test_cli_bad_urls_one_line_exit_2(tmp_path, keys, urls, line):
    args = [sys.executable, "-m", "host_tools.cli", "receive", "--keys", str(keys)]
    args += ["--db", str(tmp_path / "r.db")]
    for url in urls:
        args += ["--mqtt-up", url]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert (result.returncode, result.stderr) == (2, line + "\n")


# --- why sessions end with their connection ------------------------------------------------

MEMBER = """
import sys, paho.mqtt.client as paho
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes
port, expiry = int(sys.argv[1]), int(sys.argv[2])
c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="member-a", protocol=paho.MQTTv5)
c.on_connect = lambda c, u, f, rc, p: c.subscribe("$share/g/citynode/up/+", qos=1)
c.on_subscribe = lambda c, u, mid, rcs, p: print("subscribed", flush=True)
props = Properties(PacketTypes.CONNECT)
props.SessionExpiryInterval = expiry
c.connect("127.0.0.1", port, clean_start=expiry == 0, properties=props)
c.loop_forever()
"""


@pytest.mark.parametrize("expiry, expected", [(0, 10), (300, 5)])
def test_mosquitto_gives_a_dead_members_turn_to_its_session_while_it_lasts(
    broker, expiry, expected
):
    """The broker behaviour behind MqttUplinkSource's clean sessions: two members of a group,
    one killed; with a session outliving it, the broker still hands it every other message."""
    member = subprocess.Popen(
        [sys.executable, "-c", MEMBER, str(broker.port), str(expiry)],
        stdout=subprocess.PIPE,
        text=True,
    )
    got = []
    other = mqtt_client("member-b")
    subscribed = threading.Event()
    other.on_connect = lambda c, u, f, rc, p: c.subscribe("$share/g/citynode/up/+", qos=1)
    other.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    other.on_message = lambda c, u, m: got.append(bytes(m.payload))
    other.connect("127.0.0.1", broker.port)
    other.loop_start()
    pub = Publisher(broker)
    try:
        assert select.select([member.stdout], [], [], 10)[0], "member a did not subscribe"
        assert member.stdout.readline() == "subscribed\n"
        assert subscribed.wait(10)
        member.kill()
        member.wait(10)
        time.sleep(0.3)  # the broker has seen the connection close
        for k in range(10):
            pub.publish(UP_TOPIC + "1", b"%d" % k)
        wait_until(lambda: len(got) >= expected, what="%d messages" % expected)
        time.sleep(0.5)  # and no more
    finally:
        pub.close()
        other.disconnect()
        other.loop_stop()
        member.kill()
        member.wait(10)
    assert len(got) == expected, got

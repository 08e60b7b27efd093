# The node over MQTT end to end: the real firmware on the MicroPython unix port (fleet simulator,
# a board's heap) publishing to a real mosquitto on loopback, with micropython-lib's umqtt.simple
# in its /lib as `mip install` leaves it, and a small host peer that verifies and acks each frame.
import errno
import json
import re
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from test_node import boot_alone
from test_sinks_mqtt import Mosquitto, free_port

from host_tools import build, flash
from host_tools.sim import weather
from host_tools.sim.fleet import NODE_HEAP, Fleet, NodeSpec
from protocols import frame, uplink

KEY = bytes(range(16))
START = 1782864000
# The vendored, unmodified micropython-lib package (never copied into the repository).
UMQTT = (
    build.ROOT.parent / "shared/vendor/micropython-lib/micropython/umqtt.simple/umqtt/simple.py"
)
# The smallest heap in which the MQTT node runs a simulated day on this 64-bit port
# (bench/node_cycle.py); the UDP node's is NODE_MIN_HEAP. Tests run with 2 KB of margin.
MQTT_NODE_MIN_HEAP = "64K"
ACK_TIMEOUT_MS = 1000  # real time: the broker and the peer answer in a few ms on loopback


def generated(n, seed=0):
    return weather.generate(START, 60, n, seed=seed)


def with_umqtt(build_dir):
    """Put umqtt/simple.mpy into the node's /lib (the build the fleet links as "lib"),
    compiled from the vendored source as micropython-lib's index serves it to mip."""
    if not UMQTT.exists():
        pytest.skip("%s not found: the vendored micropython-lib lives in ../shared" % UMQTT)
    out = Path(build_dir) / "umqtt" / "simple.mpy"
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [build.tool("mpy-cross"), "-s", "umqtt/simple.py", "-o", str(out), str(UMQTT)],
        check=True,
    )
    return build_dir


class AckPeer:
    """The host's half in miniature: subscribed to citynode/up/+ (MQTT v5, as the host's
    receiver will be), it verifies each frame with protocols.uplink and publishes its ack, with
    the frame's reading-index range and echoed tag, to citynode/down/<node_id>.

    ignore: frames to leave unacknowledged first (a host that is down); on_data(peer, frame)
    runs for each verified DATA frame before its ack."""

    def __init__(self, port, clock, ignore=0, on_data=None):
        self.clock = clock
        self.ignore = ignore
        self.on_data = on_data
        self.readings = {}  # (node id, reading index) -> (ts, values)
        self.copies = 0  # readings that came again (a lost ack, a retry)
        self.free_heap = []  # the free_heap field of every STATUS frame
        self.errors = []
        self.unacked = 0
        self.lock = threading.Lock()
        self.connected = threading.Event()
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id="citynode-test-host",
            protocol=paho.MQTTv5,
        )
        client.reconnect_delay_set(0.05, 0.2)
        client.on_connect = self._connect
        client.on_disconnect = lambda *a: self.connected.clear()
        client.on_message = self._message
        client.connect("127.0.0.1", port)
        client.loop_start()
        self.client = client
        assert self.connected.wait(10), "the test host could not reach the broker"

    def _connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe("citynode/up/+", qos=0)
        self.connected.set()

    def _message(self, client, userdata, message):
        try:
            self._handle(message.topic, bytes(message.payload))
        except Exception as e:  # surfaced by the test, not lost on paho's thread
            self.errors.append("%s: %r" % (message.topic, e))

    def _handle(self, topic, data):
        node_id = int(topic.rsplit("/", 1)[1])
        version, _, in_frame = uplink.peek(data)
        assert version == 2 and in_frame == node_id, (version, in_frame, topic)
        received = uplink.decode(data, frame.Signer(KEY))  # verifies the tag
        now = self.clock()
        with self.lock:
            if isinstance(received, uplink.Status):
                self.free_heap.append(received.fields[3])
                ranges = []
            else:
                n = len(received.readings)
                for i in range(n):
                    key = (node_id, received.index + i)
                    self.copies += key in self.readings
                    self.readings[key] = (now - received.ages[i], received.readings[i])
                ranges = [(received.index, received.index + n - 1)]
                if self.on_data is not None:
                    self.on_data(self, received)
            if self.ignore > 0:
                self.ignore -= 1
                self.unacked += 1
                return
        ack = uplink.encode_ack(
            frame.Signer(KEY), node_id, int(now), ranges, echo=data[-frame.TAG_LEN :]
        )
        client = self.client
        client.publish("citynode/down/%d" % node_id, ack, qos=0)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path):
    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


def run(tmp_path, broker_port, specs, heap=NODE_HEAP, umqtt=True, host=True, **peer):
    """The fleet with MQTT nodes (and the host peer); returns (results, peer)."""
    build_dir = tmp_path / "build"
    if umqtt:
        with_umqtt(build_dir)
    for s in specs:
        s.extra_config.setdefault("uplink", "mqtt://127.0.0.1:%d" % broker_port)
        s.extra_config.setdefault("ack_timeout_ms", ACK_TIMEOUT_MS)
    fleet = Fleet(tmp_path / "fleet", specs, receiver=None, heap=heap, build_dir=build_dir)
    host = AckPeer(broker_port, fleet.clock, **peer) if host else None
    try:
        results = fleet.run(timeout_s=180)
    finally:
        if host is not None:
            host.close()
    if host is not None:
        assert host.errors == []
    return results, host


def console(result):
    return Path(result["log"]).read_text()


def assert_all_readings(host, node_id, rows):
    """Every row arrived (once or more: a copy has the same reading index), at its time, with
    the sensor's values. (Reading indices are unique, not contiguous across restarts.)"""
    got = sorted(v for (n, _), v in host.readings.items() if n == node_id)
    assert len(got) == len(rows)
    for (ts, (c, h, p)), (t, temp, hum, pres) in zip(got, rows, strict=True):
        assert abs(ts - t) <= 1, (ts, t)  # ages in whole seconds, against the host's clock
        assert abs(c / 100 - temp) <= 0.005 and abs(h / 100 - hum) <= 0.0100001
        assert abs(p / 100 - pres) <= 0.005


def test_readings_arrive_over_mqtt_and_are_acked(tmp_path, broker):
    rows = generated(60)
    results, host = run(tmp_path, broker.port, [NodeSpec(21, KEY, rows, 60, 10)])
    r = results[0]
    log = console(r)
    assert r["exit_code"] == 0 and r["resets"] == 0
    assert r["stats"]["pending"] == 0 and r["stats"]["dropped"] == 0  # the journal emptied
    assert r["stats"]["frames_sent"] == r["stats"]["frames_acked"] == 6 + 1  # data + status
    assert_all_readings(host, 21, rows)
    assert host.copies == 0 and host.unacked == 0
    assert "link=mqtt" in log
    # one connection for the whole run, and not one warning or error
    assert log.count("link mqtt connected") == 1
    assert "I 0.011 link mqtt connected broker=127.0.0.1:%d\n" % broker.port in log
    assert [ln for ln in log.splitlines() if ln[:2] in ("W ", "E ")] == []


def test_broker_stopped_and_restarted_nothing_lost(tmp_path, broker):
    rows = generated(240)
    node_log = tmp_path / "fleet" / "node-22" / "console.log"
    down = threading.Event()

    def stop_after_three_frames(peer, data):
        if data.index >= 20 and not down.is_set():
            down.set()

    def operator():
        # The broker goes down (gracefully: it closes the node's connection) after the third
        # frame, and comes back once the node has found it gone.
        if not down.wait(60):
            return
        broker.stop()
        deadline = time.monotonic() + 60
        while "mqtt connect failed" not in node_log.read_text():
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        broker.start()

    t = threading.Thread(target=operator, daemon=True)
    t.start()
    results, host = run(
        tmp_path,
        broker.port,
        [NodeSpec(22, KEY, rows, 60, 10)],
        on_data=stop_after_three_frames,
    )
    t.join(10)
    r = results[0]
    log = console(r)
    assert down.is_set()
    assert r["exit_code"] == 0 and r["resets"] == 0  # never crashed
    # found at the next send (the node slept through the stop), or while it waited for an ack
    assert re.search(r"link mqtt connection (ended while idle|lost) errno=", log)
    assert "link mqtt connect failed errno=%d\n" % errno.ECONNREFUSED in log  # while down
    assert log.count("link mqtt connected") >= 2  # and back
    assert r["stats"]["pending"] == 0 and r["stats"]["dropped"] == 0
    assert_all_readings(host, 22, rows)  # nothing lost


def test_unacked_frames_stay_in_the_journal_and_the_node_reconnects(tmp_path, broker):
    # A host that does not answer the first two frames (down, or a lost ack): the node keeps
    # the readings, backs off, and opens a new connection before the next try (the old one
    # may be half-open).
    rows = generated(40)
    results, host = run(tmp_path, broker.port, [NodeSpec(23, KEY, rows, 60, 10)], ignore=2)
    r = results[0]
    log = console(r)
    assert host.unacked == 2
    assert log.count("link no ack, will retry") == 2
    assert log.count("link mqtt connected") == 3
    assert (
        r["stats"]["pending"] == 0 and r["stats"]["frames_acked"] == r["stats"]["frames_sent"] - 2
    )
    assert_all_readings(host, 23, rows)


def test_an_oversized_downlink_costs_the_connection_not_the_node(tmp_path, broker):
    # umqtt.simple allocates a message's whole payload: 200 KB on citynode/down/<id> (from
    # anyone the broker lets publish there) is a MemoryError in the node's heap. The node drops
    # that connection, keeps its readings and goes on over a new one.
    rows = generated(40)

    flooded = []

    def flood_once(peer, data):
        if not flooded:
            flooded.append(data.index)
            peer.client.publish("citynode/down/27", bytes(200000), qos=0)  # before the ack

    results, host = run(
        tmp_path, broker.port, [NodeSpec(27, KEY, rows, 60, 10)], on_data=flood_once
    )
    r = results[0]
    log = console(r)
    assert r["exit_code"] == 0 and r["resets"] == 0
    assert 'link mqtt connection lost error="memory allocation failed' in log
    assert "exc=MemoryError" in log
    assert log.count("link mqtt connected") == 2
    assert log.count("link no ack, will retry") == 1  # the ack came after the flood
    assert r["stats"]["pending"] == 0
    assert_all_readings(host, 27, rows)


def test_node_without_umqtt_says_so_and_keeps_its_readings(tmp_path):
    rows = generated(12)
    results, _ = run(
        tmp_path, free_port(), [NodeSpec(24, KEY, rows, 60, 10)], umqtt=False, host=False
    )
    r = results[0]
    log = console(r)
    assert r["exit_code"] == 0 and r["resets"] == 0
    assert "E 0.011 link mqtt needs umqtt.simple (mip install umqtt.simple)" in log
    assert r["stats"]["pending"] == 12 and r["stats"]["frames_sent"] == 0


def test_deep_sleeping_node_connects_at_each_wake(tmp_path, broker):
    rows = generated(30)
    spec = NodeSpec(25, KEY, rows, 60, 10, {"idle": "deep"})
    results, host = run(tmp_path, broker.port, [spec])
    r = results[0]
    assert r["resets"] == 0 and r["wakes"] == 30
    assert r["stats"]["pending"] == 0
    assert_all_readings(host, 25, rows)


def _heap_kb(heap, more=0):
    return "%dK" % (int(heap.rstrip("K")) + more)


def test_a_simulated_day_in_the_mqtt_node_heap_without_growth(tmp_path, broker):
    rows = generated(1440)
    spec = NodeSpec(26, KEY, rows, 60, 10, {"status_every_s": 7200})
    heap = _heap_kb(MQTT_NODE_MIN_HEAP, 2)
    results, host = run(tmp_path, broker.port, [spec], heap=heap)
    r = results[0]
    assert r["resets"] == 0 and r["stats"]["pending"] == 0
    assert len(host.free_heap) == 12  # at boot, then every 120 cycles
    steady = host.free_heap[1:]
    assert max(steady) - min(steady) <= 512, host.free_heap  # no growth beyond GC noise
    assert_all_readings(host, 26, rows)


# --- config.json: the mqtt:// uplink, one precise line per mistake -----------------------------

GOOD = {"node_id": 1, "key": "00" * 16, "board": "sim"}
CONFIG_CASES = [
    ({"uplink": "mqtt://broker.lan:1884"}, "ok mqtt ('broker.lan', 1884)"),
    ({"uplink": "mqtt://broker.lan"}, "ok mqtt ('broker.lan', 1883)"),
    ({"uplink": "mqtt://10.0.0.2:1883", "link": "mqtt"}, "ok mqtt ('10.0.0.2', 1883)"),
    ({"uplink": "10.0.0.2:1700"}, "ok udp ('10.0.0.2', 1700)"),
    ({"uplink": "mqtt://:1883"}, "config: uplink 'mqtt://:1883' has no host"),
    ({"uplink": "mqtt://b:0"}, "config: uplink 'mqtt://b:0': port must be 1..65535"),
    ({"uplink": "mqtt://b:x"}, "config: uplink 'mqtt://b:x': port must be 1..65535"),
    (
        {"uplink": "mqtts://b:8883"},
        "config: uplink 'mqtts://b:8883': TLS (mqtts://) is not supported on a node",
    ),
    (
        {"uplink": "mqtt://u:pw@b:1883"},
        "config: uplink 'mqtt://u:pw@b:1883': no user name or password on a node",
    ),
    (
        {"uplink": "mqtt://b:1883/citynode/up/1"},
        "config: uplink 'mqtt://b:1883/citynode/up/1': no topic "
        "(a node publishes to citynode/up/<node_id>)",
    ),
    (
        {"uplink": "http://b:80"},
        "config: uplink must be 'host:port' or 'mqtt://host:port', got 'http://b:80'",
    ),
    (
        {"uplink": "b:1883", "link": "mqtt"},
        "config: link 'mqtt' needs uplink 'mqtt://host:port', got 'b:1883'",
    ),
    (
        {"uplink": "mqtt://b:1883", "link": "udp"},
        "config: uplink 'mqtt://b:1883' is an MQTT broker but link is 'udp' (leave link out)",
    ),
    (
        {"uplink": "mqtt://b:1883", "role": "gateway", "key": None},
        "config: MQTT is for nodes: a gateway's uplink must be 'host:port' or 'serial', "
        "got 'mqtt://b:1883'",
    ),
]


def test_mqtt_uplink_config_errors_are_precise(run_mp):
    cases = [
        {k: v for k, v in dict(GOOD, **extra).items() if v is not None}
        for extra, _ in CONFIG_CASES
    ]
    script = (
        "import json\nfrom firmware import config\n"
        "for raw in json.loads(%r):\n"
        "    try:\n"
        "        c = config.parse(raw)\n"
        "        print('ok', c.link, c.uplink)\n"
        "    except config.ConfigError as e:\n"
        "        print(e)\n"
    ) % json.dumps(cases)
    out = run_mp(script).splitlines()
    assert out == [expected for _, expected in CONFIG_CASES]


def test_a_bad_mqtt_uplink_is_one_log_line_and_the_node_waits(tmp_path, board_build):
    line = boot_alone(tmp_path, board_build, json.dumps(dict(GOOD, uplink="mqtts://b:8883")))
    # "E <uptime> ...": the uptime is a ms or two on a loaded machine
    assert re.fullmatch(
        r"E \d+\.\d{3} config config: uplink 'mqtts://b:8883': TLS \(mqtts://\) is not "
        r"supported on a node retry_s=10",
        line,
    ), line


# --- provisioning: umqtt.simple installed with mip where the firmware does not freeze it -------


@pytest.mark.parametrize(
    "board, uplink, installs",
    [
        ("pico_w", "mqtt://broker.lan:1883", True),
        ("pico_w", "10.0.0.2:1700", False),
        ("esp32_devkitc", "mqtt://broker.lan:1883", False),  # frozen into ESP32 firmware
    ],
)
def test_flash_installs_umqtt_for_an_mqtt_uplink(tmp_path, board, uplink, installs):
    flasher = flash.Flasher(flash.board_def(board), tmp_path / "keys.json", uplink, 60, 10)
    assert ("umqtt.simple" in flasher.packages) == installs
    again = flash.Flasher(
        flash.board_def(board),
        tmp_path / "keys.json",
        uplink,
        60,
        10,
        extra_packages=["umqtt.simple"],
    )
    assert again.packages.count("umqtt.simple") == 1

# Scale-out end to end: three `citynode receive` on one mosquitto shared subscription and one
# PostgreSQL take a simulated day of 200 v2 nodes publishing over MQTT; one killed, one restarted.
#
# The day is compressed: a node's reading k is sampled (its true time a day in the past plus
# 600 k s) when the run's clock reaches cycle k, so ages in the frames are hours and the
# receivers' timestamps are checked against the true sample times. The nodes behave as
# firmware/node.py send_pending(): frames of 10, stop-and-wait, the firmware's back-off in
# cycles, readings sent again re-encoded with their ages of that moment. Each ack a node takes
# is checked against PostgreSQL on the spot, before the node forgets its readings. A bigger
# run (400 nodes, 3 days) is marked slow; the last test pins down what a SIGTERM does to the
# acks of the last batch.

import collections
import math
import random
import signal
import threading
import time
from typing import NamedTuple

import paho.mqtt.client as paho
import psycopg
import pytest
from conftest import ReceiveProcess
from test_identity_e2e import age_s, citynode, covers
from test_mqtt_uplink import CONNECTED, live_counters, stop
from test_sinks_mqtt import Mosquitto

from host_tools.keys import save_keys
from host_tools.receive.mqtt import DOWN_TOPIC, UP_TOPIC
from protocols import frame, uplink

pytest_plugins = ["pg_server"]

BME = frame.BME280_CHANNELS
QUANTITIES = ("temperature_c", "humidity_pct", "pressure_hpa")  # all three have scale 100
INTERVAL_S = 600  # a reading every 10 minutes: 144 a day
BATCH = 10  # readings a frame (firmware config `batch`)
ACK_TIMEOUT_S = 2.0  # firmware config `ack_timeout_ms`
NODES_PER_CONNECTION = 10
GROUP = "city"
TOLERANCE_S = 1.0  # SPEC.md "Timing": whole-second ages, a one-second budget


class Scale(NamedTuple):
    nodes: int
    days: int
    day_s: float  # real seconds a simulated day takes
    kill_at: float  # fraction of the run's sampling at which receiver A is SIGKILLed
    restart_at: float  # ... and receiver B is stopped (SIGTERM) and started again


CI = Scale(nodes=200, days=1, day_s=20.0, kill_at=0.35, restart_at=0.6)
SOAK = Scale(nodes=400, days=3, day_s=20.0, kill_at=0.3, restart_at=0.55)


# --- the nodes ----------------------------------------------------------------------------


class Sent(NamedTuple):
    first_sent: float  # time.time() of its first copy
    copies: int
    first: int
    last: int
    acked_at: float  # time.time() when the node took the ack


class DayNode:
    """A v2 node on the compressed clock. Its cycle k starts at (k + offset) * cycle_s into the
    run (offsets, 0 to BATCH cycles, spread the fleet's frames evenly over the time a node takes
    to fill one, as nodes that are not in step); at each it samples reading k and, unless
    backing off, sends its oldest BATCH readings (the rest once the last reading is sampled:
    the flush), one frame at a time, keeping them until an ack that echoes the tag of the copy
    just sent and covers them arrives within ACK_TIMEOUT_S. After a miss it waits the firmware's
    back-off (0, 0..1, 2..3 ... cycles) and sends the same readings again with their new ages.
    Acks are appended to `acks` by the MQTT thread, with the time they arrived."""

    def __init__(self, node_id, key, day0, offset, readings):
        self.node_id = node_id
        self.signer = frame.Signer(key)
        self.day0 = day0
        self.offset = offset
        self.readings = readings
        self.rng = random.Random(node_id)
        self.sampled = {}  # index -> (true sample time, raw values)
        self.journal = collections.deque()  # indices not acked yet, oldest first
        self.next_index = 0
        self.acks = collections.deque()  # (time.monotonic() of arrival, ack bytes)
        self.in_flight = None  # (payload, first, last, deadline) of the copy just sent
        self.head = None  # (time of the first copy, copies) of the journal's head frame
        self.misses = 0
        self.retry_cycle = 0
        self.sent = []  # Sent, per frame acked
        self.stale_acks = 0  # acks of an earlier copy, or arriving after the timeout
        self._missed = False  # the copy in flight went unacked: step() sets the back-off

    def sample_until(self, cycle):
        while self.next_index <= min(cycle, self.readings - 1):
            k = self.next_index
            day = 2 * math.pi * (k + self.offset) * INTERVAL_S / 86400
            raw = (
                1500 + int(600 * math.sin(day)) + self.rng.randrange(-20, 21),
                6000 + int(1500 * math.cos(day)) + self.rng.randrange(-50, 51),
                101325 + self.rng.randrange(-300, 301),
            )
            self.sampled[k] = (self.day0 + INTERVAL_S * (k + self.offset), raw)
            self.journal.append(k)
            self.next_index += 1

    def take_ack(self, now_mono):
        """(first, last) of the frame in flight if its ack came in time, else None."""
        taken = None
        while self.acks:
            arrived, raw = self.acks.popleft()
            ack = uplink.decode_ack(raw, self.signer)  # a bad ack fails the run
            if ack.node_id != self.node_id:
                raise AssertionError("node %d: an ack of node %d" % (self.node_id, ack.node_id))
            f = self.in_flight
            if (
                f is not None
                and taken is None
                and arrived <= f[3]
                and ack.echo == f[0][-frame.TAG_LEN :]
                and covers(ack.acked, f[1], f[2])
            ):
                taken = (f[1], f[2])
            else:
                self.stale_acks += 1
        if taken is None and self.in_flight is not None and now_mono > self.in_flight[3]:
            self.in_flight = None  # a miss: handled by step() at this cycle
            self.misses = min(self.misses + 1, 6)
            self._missed = True
        return taken

    def forget(self, first, last):
        for i in range(first, last + 1):
            assert self.journal.popleft() == i, "node %d: acked out of order" % self.node_id
        self.sent.append(Sent(self.head[0], self.head[1], first, last, time.time()))
        self.in_flight = self.head = None
        self.misses = 0

    def step(self, cycle, now_mono, publish):
        """Sample what the clock has reached, and send the next frame if one is due."""
        self.sample_until(cycle)
        if self._missed:
            self._missed = False
            # firmware/node.py _transmit(): wait 2^(misses-1) - 1 cycles, less one half the time
            backoff = (1 << (self.misses - 1)) - 1 - (cycle & 1 if self.misses > 1 else 0)
            self.retry_cycle = cycle + 1 + backoff
        if self.in_flight is not None or cycle < self.retry_cycle or not self.journal:
            return
        flush = self.next_index == self.readings
        if len(self.journal) < BATCH and not flush:
            return
        indices = [self.journal[i] for i in range(min(BATCH, len(self.journal)))]
        t_send = time.time()
        ages = [age_s(t_send, self.sampled[i][0]) for i in indices]
        raws = [self.sampled[i][1] for i in indices]
        payload = frame.encode_data(self.signer, self.node_id, indices[0], BME, raws, ages)
        self.head = (t_send, 1) if self.head is None else (self.head[0], self.head[1] + 1)
        self.in_flight = (payload, indices[0], indices[-1], now_mono + ACK_TIMEOUT_S)
        publish(self.node_id, payload)

    @property
    def done(self):
        return self.next_index == self.readings and not self.journal


class Fleet:
    """The nodes' side of the broker: one MQTT connection per NODES_PER_CONNECTION nodes (to
    the receivers a node is its topic, not its connection), each subscribed to its nodes'
    citynode/down/<id>. Even connections are MQTT 3.1.1 with QoS 0 both ways, as
    firmware/mqtt_link.py (umqtt.simple); odd ones MQTT v5 with QoS 1."""

    def __init__(self, port, nodes):
        self.nodes = nodes
        self.clients = {}  # node_id -> (client, qos)
        self.publish_errors = 0
        ids = sorted(nodes)
        events = []
        for c, start in enumerate(range(0, len(ids), NODES_PER_CONNECTION)):
            group = ids[start : start + NODES_PER_CONNECTION]
            qos = c % 2
            client = paho.Client(
                paho.CallbackAPIVersion.VERSION2,
                client_id="citynode-fleet-%d" % c,
                protocol=paho.MQTTv311 if qos == 0 else paho.MQTTv5,
            )
            client.max_inflight_messages_set(1000)
            subscribed = threading.Event()
            topics = [(DOWN_TOPIC + str(n), qos) for n in group]
            client.on_connect = lambda cl, u, f, rc, p, topics=topics: cl.subscribe(topics)
            client.on_subscribe = lambda cl, u, mid, rcs, p, ev=subscribed: ev.set()
            client.on_message = self._on_message
            client.connect("127.0.0.1", port)
            client.loop_start()
            events.append(subscribed)
            for n in group:
                self.clients[n] = (client, qos)
        for ev in events:
            assert ev.wait(10), "a fleet connection did not subscribe"

    def _on_message(self, client, userdata, message):
        node_id = int(message.topic[len(DOWN_TOPIC) :])
        self.nodes[node_id].acks.append((time.monotonic(), bytes(message.payload)))

    def publish(self, node_id, payload):
        client, qos = self.clients[node_id]
        if client.publish(UP_TOPIC + str(node_id), payload, qos=qos).rc != paho.MQTT_ERR_SUCCESS:
            self.publish_errors += 1  # the node times out and sends it again

    def close(self):
        for client in {c for c, _ in self.clients.values()}:
            client.disconnect()
            client.loop_stop()


# Per ack taken: how many of its values PostgreSQL holds (3 per reading when all are there).
CHECK = (
    "SELECT a.n, a.f, a.l, (SELECT count(*) FROM readings r WHERE r.node_id = a.n "
    "AND r.reading_index BETWEEN a.f AND a.l) "
    "FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS a(n, f, l)"
)


class Day(threading.Thread):
    """Runs every node on one thread, in passes a few ms apart: first the acks that came
    (each one taken is checked against PostgreSQL at once, in one query per pass, before its
    node forgets the readings), then sampling and sending."""

    def __init__(self, nodes, fleet, url, cycle_s, limit_s):
        super().__init__(daemon=True)
        self.nodes = list(nodes.values())
        self.fleet = fleet
        self.url = url
        self.cycle_s = cycle_s
        self.limit_s = limit_s
        self.t0 = None
        self.cycles = max(n.readings + n.offset for n in self.nodes)
        self.acks_checked = 0
        self.check_s = 0.0
        self.not_stored = []  # (node, first, last, values found) of acks PostgreSQL lacked
        self.errors = []
        self.ended = None  # time.time() when every node was done

    def progress(self):
        """Fraction of the readings' cycles the clock has passed."""
        if self.t0 is None:
            return 0.0
        return (time.monotonic() - self.t0) / (self.cycle_s * self.cycles)

    def run(self):
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                self._run(conn)
        except BaseException as e:  # reported by the test's thread
            self.errors.append(repr(e))

    def _run(self, conn):
        self.t0 = time.monotonic()
        while True:
            now = time.monotonic()
            if now - self.t0 > self.limit_s:
                left = sum(len(n.journal) for n in self.nodes)
                raise AssertionError("%d readings not acked after %.0f s" % (left, self.limit_s))
            taken = []
            for node in self.nodes:
                got = node.take_ack(now)
                if got is not None:
                    taken.append((node, got))
            if taken:
                began = time.perf_counter()
                args = [[n.node_id for n, _ in taken], [f for _, (f, _) in taken]]
                args.append([last for _, (_, last) in taken])
                for n, f, last, count in conn.execute(CHECK, args).fetchall():
                    if count != len(QUANTITIES) * (last - f + 1):
                        self.not_stored.append((n, f, last, count))
                self.check_s += time.perf_counter() - began
                self.acks_checked += len(taken)
                for node, (f, last) in taken:
                    node.forget(f, last)
            elapsed = time.monotonic() - self.t0
            for node in self.nodes:
                cycle = math.floor(elapsed / self.cycle_s - node.offset)
                node.step(cycle, now, self.fleet.publish)
            if all(node.done for node in self.nodes):
                self.ended = time.time()
                return
            time.sleep(0.005)


# --- receivers ----------------------------------------------------------------------------


class Member:
    """One `citynode receive` process of the group, with when it was up."""

    def __init__(self, name, url, broker):
        self.name = name
        self.proc = ReceiveProcess("--keys", url, "--db", url, "--mqtt-up", broker)
        self.up = self.down = None
        self.counters = {}
        self.how = "stopped at the end"

    def wait_up(self):
        self.proc.wait_for(CONNECTED)
        self.up = time.time()


def wait_for(what, predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.02)


def lock_then_kill(url, member, hold_s=0.5):
    """SIGKILL a receiver while PostgreSQL keeps every receiver from committing: each then
    holds frames read but not stored, and the killed one's are lost with it (its transaction
    never commits), so that their nodes must send them again."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        with conn.transaction():
            conn.execute("LOCK TABLE readings IN EXCLUSIVE MODE")  # reads go on, writes wait
            time.sleep(hold_s)
            member.proc.stop(signal.SIGKILL)
            member.down = time.time()


def expected_shares(members, acked_at):
    """Each member's fair share of the frames: in every stretch of the run, the frames acked in
    it divided evenly between the members up in it."""
    edges = sorted({t for m in members for t in (m.up, m.down) if t is not None})
    edges = [float("-inf"), *edges, float("inf")]
    share = {m.name: 0.0 for m in members}
    for lo, hi in zip(edges, edges[1:], strict=False):
        n = sum(1 for t in acked_at if lo <= t < hi)
        live = [m for m in members if m.up <= lo and (m.down is None or m.down >= hi)]
        for m in live:
            share[m.name] += n / len(live)
    return share


# --- the test -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scale",
    [
        pytest.param(CI, id="200-nodes-1-day"),
        pytest.param(SOAK, id="400-nodes-3-days", marks=pytest.mark.slow),
    ],
)
def test_three_receivers_on_one_shared_subscription_and_postgres_store_a_day_once(
    tmp_path, pg_url, scale
):
    begin = time.monotonic()
    rng = random.Random(5)
    keys = {n: rng.randbytes(16) for n in range(1, scale.nodes + 1)}
    key_file = tmp_path / "keys.json"
    save_keys(key_file, keys)
    citynode("keys", "--keys", key_file, "push", pg_url)
    readings = 144 * scale.days
    # the last reading of the node with the largest offset is 10 min old
    day0 = time.time() - scale.days * 86400 - (BATCH + 1) * INTERVAL_S
    nodes = {
        n: DayNode(n, key, day0, BATCH * (n - 1) / scale.nodes, readings)
        for n, key in keys.items()
    }
    broker = Mosquitto(tmp_path).start()
    url = "%s/%s" % (broker.url, GROUP)
    members = []
    fleet = None
    try:
        members = [Member(name, pg_url, url) for name in ("A", "B", "C")]
        for m in members:
            m.wait_up()
        fleet = Fleet(broker.port, nodes)
        cycle_s = scale.day_s / 144
        day = Day(nodes, fleet, pg_url, cycle_s, limit_s=scale.day_s * scale.days + 60)
        day.start()
        a, b, c = members

        # mid-run: A killed while frames wait in every receiver
        wait_for("the kill", lambda: day.progress() >= scale.kill_at or not day.is_alive(), 120)
        a.counters = live_counters(a.proc)  # its last counters (it accepts none after: locked)
        lock_then_kill(pg_url, a)
        a.how = "SIGKILLed at %.0f%%" % (100 * day.progress())

        # later: B stopped (SIGTERM) and started again
        wait_for(
            "the restart", lambda: day.progress() >= scale.restart_at or not day.is_alive(), 120
        )
        b.counters = stop(b.proc)
        b.down = time.time()
        b.how = "SIGTERM at %.0f%%" % (100 * day.progress())
        b2 = Member("B'", pg_url, url)
        members.append(b2)
        b2.wait_up()
        b2.how = "started again after %.1f s" % (b2.up - b.down)

        day.join(scale.day_s * scale.days + 90)
        assert not day.is_alive(), "the nodes are still running"
        assert day.errors == []
        for m in (c, b2):
            m.counters = stop(m.proc)
            m.down = time.time()
    finally:
        for m in members:
            m.proc.stop(signal.SIGKILL)
        if fleet is not None:
            fleet.close()
        broker.stop()
    run_s = time.monotonic() - begin

    # 1. no ack without its readings in PostgreSQL, checked as each was taken
    sent = [s for node in nodes.values() for s in node.sent]
    assert day.acks_checked == len(sent)
    assert day.not_stored == [], "acked but not in PostgreSQL: %s" % day.not_stored[:10]

    # 2. every reading sampled stored exactly once, with its values and its time
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute(
            "SELECT node_id, reading_index, quantity, extract(epoch FROM ts)::float8, value "
            "FROM readings"
        ).fetchall()
    identities = [(n, i, q) for n, i, q, _, _ in rows]
    assert len(identities) == len(set(identities)), "a reading stored twice"
    expected = {
        (node.node_id, i, q): (when, r / 100)
        for node in nodes.values()
        for i, (when, raw) in node.sampled.items()
        for q, r in zip(QUANTITIES, raw, strict=True)
    }
    assert len(expected) == scale.nodes * readings * len(QUANTITIES)
    assert sorted(set(expected) - set(identities))[:10] == [], "readings missing"
    assert sorted(set(identities) - set(expected))[:10] == [], "readings not sent"
    wrong = [
        (n, i, q, ts, v, expected[(n, i, q)])
        for n, i, q, ts, v in rows
        if abs(v - expected[(n, i, q)][1]) > 1e-9
        or not abs(ts - expected[(n, i, q)][0]) < TOLERANCE_S
    ]
    assert wrong[:10] == [], "%d values wrong" % len(wrong)
    worst_ts = max(abs(ts - expected[(n, i, q)][0]) for n, i, q, ts, _ in rows)

    # 3. the load spread over the receivers
    logs = {m.name: m.proc.drain() for m in members}
    for name, log in logs.items():
        assert "Traceback" not in log, name
    fair = expected_shares(members, [s.acked_at for s in sent])
    total = collections.Counter()
    for m in members:
        total.update(m.counters)
    rejected = {k: v for k, v in total.items() if k.startswith("rejected_")}
    assert rejected == {}
    for k in ("ack_send_error", "sink_error", "intake_full", "oversize", "internal_error"):
        assert total.get(k, 0) == 0, k
    resent = [s for s in sent if s.copies > 1]
    # a frame lost with a receiver was first sent shortly before it went (lock_then_kill holds
    # A's for hold_s), and sent again after ACK_TIMEOUT_S
    near_kill = [s for s in resent if a.down - 1.5 < s.first_sent <= a.down]
    near_stop = [s for s in resent if b.down - 1.5 < s.first_sent <= b.down]
    lines = [
        "",
        "scale-out: %d nodes x %d readings = %d readings (%d values) in %d frames; %d sent "
        "again (%d copies: %d lost with A, %d with B's stop, %d else), %d stale acks, %d "
        "publish errors"
        % (
            scale.nodes,
            readings,
            scale.nodes * readings,
            len(expected),
            len(sent),
            len(resent),
            sum(s.copies - 1 for s in resent),
            len(near_kill),
            len(near_stop),
            len(resent) - len(near_kill) - len(near_stop),
            sum(n.stale_acks for n in nodes.values()),
            fleet.publish_errors,
        ),
        "  %-3s %-30s %16s %8s %13s %10s"
        % ("rx", "", "frames_accepted", "copies", "mqtt_up_msgs", "fair share"),
    ]
    for m in members:
        got = m.counters.get("frames_accepted", 0)
        lines.append(
            "  %-3s %-30s %16s %8d %13d %10.0f"
            % (
                m.name,
                m.how,
                (">= %d" if m.name == "A" else "%d") % got,
                m.counters.get("frames_copies", 0),
                m.counters.get("mqtt_up_messages", 0),
                fair[m.name],
            )
        )
    lines.append(
        "  every ack checked in PostgreSQL as taken: %d acks, %.2f s of queries; worst "
        "timestamp error %.3f s; run %.1f s (the day %.1f s)"
        % (day.acks_checked, day.check_s, worst_ts, run_s, scale.day_s * scale.days)
    )
    print("\n".join(lines))
    for m in members:
        got = m.counters.get("frames_accepted", 0)
        assert got >= fair[m.name] / 2, "%s took %d frames, fair share %.0f" % (
            m.name,
            got,
            fair[m.name],
        )
    # A was killed holding frames it had read: their nodes sent them again
    assert near_kill != [], "receiver A held no frame when it was killed"


# --- a graceful stop and the acks of what was stored -------------------------------------

STOP_ROUNDS = 3
STOP_FRAMES = 60


class Spy:
    """Every ack the broker delivers on citynode/down/+ (MQTT v5, QoS 1): what nodes get."""

    def __init__(self, port):
        self.acks = collections.deque()
        subscribed = threading.Event()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id="citynode-spy", protocol=paho.MQTTv5
        )
        self.client.on_connect = lambda cl, u, f, rc, p: cl.subscribe(DOWN_TOPIC + "+", qos=1)
        self.client.on_subscribe = lambda cl, u, mid, rcs, p: subscribed.set()
        self.client.on_message = lambda cl, u, m: self.acks.append(
            (int(m.topic[len(DOWN_TOPIC) :]), bytes(m.payload))
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "the spy did not subscribe"

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def lock_readings(url, held, release):
    """A thread's work: LOCK readings (waiting its turn), set `held`, keep it until `release`."""
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        with conn.transaction():
            conn.execute("LOCK TABLE readings IN EXCLUSIVE MODE")
            held.set()
            release.wait(30)


def test_a_receiver_stopped_with_sigterm_acks_every_frame_it_stored(tmp_path, pg_url):
    """SIGTERM while a batch of STOP_FRAMES frames waits on the database: once it commits, the
    receiver acks them and exits; every frame stored must have its ack delivered. Made
    certain by a plug: a first frame blocked by one lock, the batch queued behind it blocked
    by a second lock taken between the two writes."""
    rng = random.Random(7)
    keys = {n: rng.randbytes(16) for n in range(1, STOP_FRAMES + 2)}
    key_file = tmp_path / "keys.json"
    save_keys(key_file, keys)
    signers = {n: frame.Signer(k) for n, k in keys.items()}
    broker = Mosquitto(tmp_path).start()
    spy = publisher = None
    rounds = []
    try:
        spy = Spy(broker.port)
        publisher = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id="citynode-nodes", protocol=paho.MQTTv311
        )
        publisher.connect("127.0.0.1", broker.port)
        publisher.loop_start()

        def publish(node_id, first):
            readings = [(2000 + k, 5000, 101000) for k in range(BATCH)]
            ages = [INTERVAL_S * (BATCH - 1 - k) for k in range(BATCH)]
            payload = frame.encode_data(signers[node_id], node_id, first, BME, readings, ages)
            publisher.publish(UP_TOPIC + str(node_id), payload, qos=0)

        for r in range(STOP_ROUNDS):
            spy.acks.clear()
            rx = ReceiveProcess(
                "--keys", key_file, "--db", pg_url, "--mqtt-up", "%s/%s" % (broker.url, GROUP)
            )
            held1, release1, held2, release2 = (threading.Event() for _ in range(4))
            lockers = [
                threading.Thread(target=lock_readings, args=(pg_url, held1, release1)),
                threading.Thread(target=lock_readings, args=(pg_url, held2, release2)),
            ]
            try:
                rx.wait_for(CONNECTED)
                lockers[0].start()
                assert held1.wait(10)
                publish(STOP_FRAMES + 1, BATCH * r)  # the plug: its write waits on lock 1
                time.sleep(0.3)
                for n in range(1, STOP_FRAMES + 1):  # queued in the receiver meanwhile
                    publish(n, BATCH * r)
                time.sleep(0.3)
                lockers[1].start()  # lock 2 queues behind the plug's write
                time.sleep(0.2)
                release1.set()  # the plug commits, lock 2 is taken, the batch's write waits
                assert held2.wait(10)
                time.sleep(0.3)
                rx.proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)
                release2.set()  # the batch commits, is acked, and the receiver exits
                counters = stop(rx)
            finally:
                release1.set()
                release2.set()
                for t in lockers:
                    if t.is_alive() or t.ident is not None:
                        t.join(30)
                rx.stop(signal.SIGKILL)
            time.sleep(0.5)  # the broker delivers what it has
            acked = set()
            for node_id, raw in list(spy.acks):
                ack = uplink.decode_ack(raw, signers[node_id])
                acked.update((node_id, first) for first, _ in ack.acked)
            with psycopg.connect(pg_url) as conn:
                stored = set(
                    conn.execute(
                        "SELECT DISTINCT node_id, reading_index FROM readings "
                        "WHERE reading_index = %s",
                        (BATCH * r,),
                    ).fetchall()
                )
            rounds.append((len(stored), len(stored & acked), counters.get("acks_sent", 0)))
    finally:
        if publisher is not None:
            publisher.disconnect()
            publisher.loop_stop()
        if spy is not None:
            spy.close()
        broker.stop()
    print("\nSIGTERM rounds (frames stored, their acks delivered, acks_sent): %s" % rounds)
    assert all(s >= STOP_FRAMES for s, _, _ in rounds), "the batch was not stored: %s" % rounds
    assert [(s, a) for s, a, _ in rounds if a != s] == [], "stored, never acked: %s" % rounds

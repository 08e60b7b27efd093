# End to end: `citynode receive` as a subprocess with a UDP source and SQLite, webhook and MQTT
# sinks (a real HTTP server and a real mosquitto), real frames over UDP, the remote sinks killed
# and restarted mid-run, the receiver itself killed and restarted, and a spool that fills up.
# Checks: every reading arrives exactly once at each sink (by its id), and an ack only ever
# comes for a frame whose readings are already in SQLite.

import json
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ReceiveProcess as Receiver
from test_sinks_http import WebhookServer
from test_sinks_mqtt import Mosquitto, Subscriber

from host_tools.keys import save_keys
from host_tools.receive.sinks import reading_id
from protocols import frame, uplink

REPO = Path(__file__).resolve().parent.parent
NODES = {n: bytes((n * 7 + i) % 256 for i in range(16)) for n in range(1, 6)}
BME = (1, 2, 3)
PER_FRAME = 10  # readings per frame, 3 quantities each


class Fleet:
    """Nodes sending real frames of 10 readings over UDP, each resent (same bytes) until acked.
    Right after each ack it checks that the frame's readings are already in SQLite."""

    def __init__(self, port, db, rng):
        self.addr = ("127.0.0.1", port)
        self.db = db
        self.rng = rng
        self.seq = dict.fromkeys(NODES, 0)
        self.acked = {n: 0 for n in NODES}  # frames acked per node
        self.sent_values = {n: [] for n in NODES}  # (quantity, value) of acked frames
        self.unacked_tries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))

    def close(self):
        self.sock.close()

    def send_frame(self, node, tries=50, timeout=1.0):
        self.seq[node] += 1
        seq = self.seq[node]
        base = self.rng.randrange(1500, 2500)
        readings = [(base + i, 4000 + self.rng.randrange(100), 101000 + i) for i in range(10)]
        # a node's frames ten minutes apart, as nodes send them (the SQLite sink takes equal
        # readings of one node within 1.5 s for the same reading sent again)
        older = 600 * (5000 - seq)
        ages = [older + 60 * (PER_FRAME - 1 - i) for i in range(PER_FRAME)]
        first = (seq - 1) * PER_FRAME  # format v2: the reading index of the first reading
        datagram = frame.encode_data(frame.Signer(NODES[node]), node, first, BME, readings, ages)
        for _ in range(tries):
            self.sock.settimeout(timeout)
            self.sock.sendto(datagram, self.addr)
            try:
                while True:
                    reply, _ = self.sock.recvfrom(512)
                    ack = uplink.decode_ack(reply, frame.Signer(NODES[node]))
                    if ack.echo == datagram[-4:] and ack.acked == [(first, first + 9)]:
                        break
            except TimeoutError:
                self.unacked_tries += 1
                continue
            self.acked[node] += 1
            with sqlite3.connect(self.db) as conn:
                (count,) = conn.execute(
                    "SELECT count(*) FROM readings WHERE node_id = ?", (node,)
                ).fetchone()
            assert count == 3 * PER_FRAME * self.acked[node], "acked before durable"
            for raw in readings:
                self.sent_values[node] += [
                    ("temperature_c", raw[0] / 100),
                    ("humidity_pct", raw[1] / 100),
                    ("pressure_hpa", raw[2] / 100),
                ]
            return True
        return False

    def send_round(self):
        for node in NODES:
            assert self.send_frame(node), "node %d: no ack after retries" % node


def sqlite_rows(db):
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT node_id, reading_index, ts, quantity, value FROM readings"
        ).fetchall()


def wait_until(predicate, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.05)


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys.json"
    save_keys(path, NODES)
    return path


def test_sinks_killed_and_restarted_every_reading_exactly_once(tmp_path, keys):
    broker = Mosquitto(tmp_path).start()
    sub = Subscriber(broker, ["citynode/#", "homeassistant/#"])
    webhook = WebhookServer(tmp_path)  # not started: unreachable when the receiver starts
    db, spool, status = tmp_path / "rx.db", tmp_path / "spool.db", tmp_path / "status.json"
    rx = Receiver(
        "--keys",
        keys,
        "--udp",
        "127.0.0.1:0",
        "--db",
        db,
        "--webhook",
        webhook.url,
        "--mqtt-out",
        broker.url,
        "--ha-discovery",
        "--spool",
        spool,
        "--status-file",
        status,
        "--sink-timeout",
        "1",
        "--retry-max",
        "0.5",
    )
    fleet = None
    try:
        port = int(rx.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)").group(1))
        fleet = Fleet(port, db, random.Random(5))
        fleet.send_round()  # webhook down from the start
        rx.wait_for(
            r"webhook .*: delivery failed reason=connect attempt=\d+: .*connection "
            r"refused; \d+ readings waiting in the spool"
        )
        webhook.start()
        fleet.send_round()
        webhook.set_mode("500")
        fleet.send_round()
        rx.wait_for(r"delivery failed reason=http_500 .*HTTP 500 Internal Server Error: boom")
        webhook.set_mode("hang")
        fleet.send_round()
        rx.wait_for(r"delivery failed reason=timeout .*no answer within 1\.0 s")
        webhook.kill()  # mid-run
        webhook.set_mode("ok")
        broker.stop()  # mid-run too (graceful, so the test subscriber's queue survives)
        fleet.send_round()
        rx.wait_for(r"mqtt 127\.0\.0\.1:\d+/citynode: delivery failed reason=\w+")
        fleet.send_round()
        webhook.start()
        broker.start()
        fleet.send_round()
        rx.proc.send_signal(signal.SIGUSR1)
        rx.wait_for(r"counters: .*frames_accepted=35 ")

        expected = {reading_id(*r[:4]) for r in sqlite_rows(db)}
        assert len(expected) == 35 * 3 * PER_FRAME

        def webhook_ids():
            return {r["id"] for r in webhook.readings()}

        def mqtt_ids():
            return {r["id"] for r in sub.readings()}

        wait_until(lambda: webhook_ids() == expected, what="every reading at the webhook")
        wait_until(lambda: mqtt_ids() == expected, what="every reading on MQTT")
        wait_until(
            lambda: json.loads(status.read_text())["sinks"][webhook_name(webhook)]["backlog"] == 0,
            what="status file: webhook backlog 0",
        )
        check = subprocess.run(
            [
                sys.executable,
                "-m",
                "host_tools.cli",
                "receive",
                "--status",
                "--status-file",
                status,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=30,
        )
        assert check.returncode == 0, check.stderr
        doc = json.loads(check.stdout)
        assert doc["counters"]["frames_accepted"] == 35
        assert doc["counters"]["readings_accepted"] == 350
        assert set(doc["sinks"]) == {
            webhook_name(webhook),
            "mqtt 127.0.0.1:%d/citynode" % broker.port,
        }
        assert rx.stop() == 0
        final = rx.wait_for(r"^citynode: final counters: (.*)$").group(1)
        assert "frames_accepted=35 " in final
    finally:
        if fleet is not None:
            fleet.close()
        rx.stop(signal.SIGKILL)
        webhook.kill()
        sub.close()
        broker.stop()
    log = rx.drain()
    assert "Traceback" not in log

    # every reading exactly once in SQLite, with the values the nodes sent
    rows = sqlite_rows(db)
    assert len(rows) == len({reading_id(*r[:4]) for r in rows})
    for node in NODES:
        got = sorted((q, round(v, 2)) for n, _, _, q, v in rows if n == node)
        assert got == sorted(fleet.sent_values[node])
    # the same readings, once by id, at the webhook and on MQTT, with the same values
    by_id = {reading_id(*r[:4]): r[4] for r in rows}
    for reading in webhook.readings() + sub.readings():
        assert by_id[reading["id"]] == reading["value"]
    # Home Assistant discovery: one config per node and quantity
    configs = {t for t, _, _ in sub.snapshot() if t.startswith("homeassistant/")}
    assert configs == {
        "homeassistant/sensor/citynode_%d_%s/config" % (n, q)
        for n in NODES
        for q in ("temperature_c", "humidity_pct", "pressure_hpa")
    }


def webhook_name(webhook):
    return "webhook " + webhook.url


def test_receiver_killed_with_a_backlog_delivers_it_after_restart(tmp_path, keys):
    webhook = WebhookServer(tmp_path)
    db, spool = tmp_path / "rx.db", tmp_path / "spool.db"
    args = [
        "--keys",
        keys,
        "--udp",
        "127.0.0.1:0",
        "--db",
        db,
        "--webhook",
        webhook.url,
        "--spool",
        spool,
        "--sink-timeout",
        "1",
        "--retry-max",
        "0.3",
    ]
    rx = Receiver(*args)
    fleet = None
    try:
        port = int(rx.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)").group(1))
        fleet = Fleet(port, db, random.Random(7))
        for _ in range(3):
            fleet.send_round()
        rx.wait_for(r"delivery failed reason=connect")
        assert rx.stop(signal.SIGKILL) == -9  # no clean shutdown
        webhook.start()
        rx = Receiver(*args)
        rx.wait_for(r"listening on udp")
        expected = {reading_id(*r[:4]) for r in sqlite_rows(db)}
        assert len(expected) == 15 * 3 * PER_FRAME
        wait_until(
            lambda: {r["id"] for r in webhook.readings()} == expected,
            what="the backlog at the webhook",
        )
        assert rx.stop() == 0
    finally:
        if fleet is not None:
            fleet.close()
        rx.stop(signal.SIGKILL)
        webhook.kill()
    assert "Traceback" not in rx.drain()


def test_spool_full_means_no_ack_then_recovers(tmp_path, keys):
    """A spool at its size limit (the same SQLITE_FULL path as a full disk): frames are not
    acked, a precise log line says why; once the webhook takes the backlog, room is made and
    the resent frames are acked. Nothing is lost or doubled."""
    webhook = WebhookServer(tmp_path)
    db, spool = tmp_path / "rx.db", tmp_path / "spool.db"
    rx = Receiver(
        "--keys",
        keys,
        "--udp",
        "127.0.0.1:0",
        "--db",
        db,
        "--webhook",
        webhook.url,
        "--spool",
        spool,
        "--spool-max-mb",
        "0.05",
        "--sink-timeout",
        "1",
        "--retry-max",
        "0.3",
    )
    fleet = None
    try:
        port = int(rx.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)").group(1))
        fleet = Fleet(port, db, random.Random(9))
        full = False
        for _ in range(200):
            node = 1 + fleet.seq[1] % 5
            if not fleet.send_frame(node, tries=1, timeout=0.5):
                full = True
                break
        assert full, "the spool never filled"
        rx.wait_for(
            r"sink failed node=\d+ index=\d+: SpoolFull: spool .*spool\.db: disk full or at its "
            r"limit of 50000 bytes \(database or disk is full\): 30 readings not spooled; "
            r"not acked"
        )
        webhook.start()
        assert fleet.send_frame(node, tries=60, timeout=0.5)  # the same frame, resent
        for _ in range(3):
            fleet.send_round()
        expected = {reading_id(*r[:4]) for r in sqlite_rows(db)}
        assert len(expected) == 3 * PER_FRAME * sum(fleet.acked.values())
        wait_until(
            lambda: {r["id"] for r in webhook.readings()} == expected,
            what="every reading at the webhook",
        )
        rx.proc.send_signal(signal.SIGUSR1)
        rx.wait_for(r"counters: .*spool_full=\d+")
        assert rx.stop() == 0
    finally:
        if fleet is not None:
            fleet.close()
        rx.stop(signal.SIGKILL)
        webhook.kill()
    assert "Traceback" not in rx.drain()
    rows = sqlite_rows(db)
    assert len(rows) == len({reading_id(*r[:4]) for r in rows})  # nothing doubled


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--webhook", "ftp://x"],
            "citynode: --webhook: expected an http:// or https:// URL, got 'ftp://x'",
        ),
        (
            ["--mqtt-out", "tcp://x"],
            "citynode: --mqtt-out: expected mqtt://HOST[:PORT][/TOPIC], got 'tcp://x'",
        ),
        (["--ha-discovery"], "citynode: --ha-discovery needs --mqtt-out"),
        (
            ["--mqtt-in", "mqtt://127.0.0.1"],
            "citynode: --mqtt-in: no topic in 'mqtt://127.0.0.1' (mqtt://HOST[:PORT]/TOPIC)",
        ),
        (
            ["--webhook", "http://127.0.0.1:9/x", "--spool", "/nonexistent/dir/spool.db"],
            "citynode: spool /nonexistent/dir/spool.db: cannot open: unable to open database file",
        ),
        (
            ["--spool", "x.db"],
            "citynode: --spool is for remote sinks (--webhook, --mqtt-out, --influx URL)",
        ),
        (
            ["--replay-state", "/nonexistent/dir/replay.db"],
            "citynode: --replay-state /nonexistent/dir/replay.db: unable to open database file",
        ),
        (["--status"], "citynode: --status needs --status-file PATH (the running receiver's)"),
        (
            ["--status", "--status-file", "/nonexistent/status.json"],
            "citynode: status file "
            "/nonexistent/status.json: No such file or directory (is a receiver running with "
            "--status-file /nonexistent/status.json?)",
        ),
    ],
)
def test_bad_options_one_precise_line_exit_2(keys, tmp_path, extra, message):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "host_tools.cli",
            "receive",
            "--keys",
            str(keys),
            "--udp",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "rx.db"),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [message]


def test_udp_and_mqtt_sources_at_once(tmp_path, keys):
    """A frame heard by a UDP gateway and an MQTT gateway is stored once and acked once; the
    MQTT broker is down when the receiver starts and comes up later."""
    broker = Mosquitto(tmp_path)  # not started yet
    db = tmp_path / "rx.db"
    rx = Receiver(
        "--keys",
        keys,
        "--udp",
        "127.0.0.1:0",
        "--mqtt-in",
        broker.url + "/gw/#",
        "--db",
        db,
    )
    gateway = None
    try:
        port = int(rx.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)").group(1))
        rx.wait_for(r"listening on mqtt-in 127\.0\.0\.1:\d+/gw/#")
        rx.wait_for(r"mqtt-in 127\.0\.0\.1:\d+/gw/#: cannot connect to the broker; retrying")
        broker.start()
        rx.wait_for(r"mqtt-in .*: connected, subscribed", timeout=40)
        gateway = Subscriber(broker, ["gw/#"], client_id="gateway-2")
        signer = frame.Signer(NODES[3])
        one = frame.encode_data(signer, 3, 1, BME, [(2150, 4500, 101325)], [600], version=1)
        gateway.client.publish("gw/lora-1/up", one, qos=1)
        wait_until(lambda: any(t == "gw/lora-1/up/ack" for t, _, _ in gateway.snapshot()))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(1.0)
            udp.sendto(one, ("127.0.0.1", port))  # the same frame through the other source
            with pytest.raises(TimeoutError):
                udp.recvfrom(512)
            # sampled ten minutes after the first (equal values of one node within 1.5 s are the
            # same reading sent again, to the SQLite sink)
            two = frame.encode_data(signer, 3, 2, BME, [(2160, 4500, 101325)], [0], version=1)
            udp.sendto(two, ("127.0.0.1", port))
            assert uplink.decode_ack(udp.recvfrom(512)[0], signer).acked == [(2, 2)]
        (topic, ack, _) = [m for m in gateway.snapshot() if m[0].endswith("/ack")][0]
        assert uplink.decode_ack(ack, signer).acked == [(1, 1)]
        assert rx.stop() == 0
        final = rx.wait_for(r"^citynode: final counters: (.*)$").group(1)
    finally:
        rx.stop(signal.SIGKILL)
        if gateway is not None:
            gateway.close()
        broker.stop()
    assert "frames_accepted=2 " in final and "frames_heard_again=1 " in final
    assert "mqtt_messages=1 " in final and "udp_datagrams=2" in final
    assert len(sqlite_rows(db)) == 6
    assert "Traceback" not in rx.drain()


def test_bench_receiver_speed_quick():
    """bench/receiver_speed.py runs and checks itself (rows stored == readings sent); the
    figures are not asserted here: CI machines vary."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "receiver_speed.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["core", "core", "core", "udp", "mem"]
    assert re.search(r"mem +5000 nodes .*: \d+ bytes/node held", lines[4])


def test_influx_file_and_jsonl_beside_sqlite(tmp_path, keys):
    db, lp, jl = tmp_path / "rx.db", tmp_path / "out.lp", tmp_path / "out.jsonl"
    rx = Receiver(
        "--keys", keys, "--udp", "127.0.0.1:0", "--db", db, "--influx", lp, "--jsonl", jl
    )
    fleet = None
    try:
        port = int(rx.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)").group(1))
        fleet = Fleet(port, db, random.Random(11))
        fleet.send_round()
        assert rx.stop() == 0
    finally:
        if fleet is not None:
            fleet.close()
        rx.stop(signal.SIGKILL)
    rows = sqlite_rows(db)
    lines = lp.read_text().splitlines()
    assert len(lines) == 5 * PER_FRAME  # one point per node and time, three fields each
    points = {"citynode,node_id=%d %d" % (r[0], round(r[2] * 1000) * 1_000_000) for r in rows}
    assert {re.sub(r" \S+ ", " ", line) for line in lines} == points
    assert all(
        re.fullmatch(
            r"citynode,node_id=\d+ humidity_pct=[\d.]+,pressure_hpa=[\d.]+,"
            r"reading_index=\d+i,temperature_c=[\d.]+ \d{19}",
            line,
        )
        for line in lines
    )
    assert len(jl.read_text().splitlines()) == len(rows) == 5 * PER_FRAME * 3


# --- the receive loop in process: batches (group commit) ----------------------------------


class FailingSink:
    def __init__(self):
        self.fail = True
        self.rows = []

    def write(self, rows):
        if self.fail:
            raise OSError(28, "No space left on device")
        self.rows.extend(rows)
        return len(rows)

    def close(self):
        pass


def one_frame(node, seq, raw=2150):
    """A frame of one reading sampled seq minutes ago (distinct frames, distinct times: one
    node's readings at the same millisecond are one reading to the backend)."""
    signer = frame.Signer(NODES[node])
    return frame.encode_data(signer, node, seq, BME, [(raw, 4500, 101325)], [60 * seq], version=1)


def test_batch_dedupes_copies_and_commits_once():
    from host_tools.receive.receiver import Receiver as Core
    from host_tools.receive.receiver import Verifier

    class CountingSink(FailingSink):
        writes = 0

        def write(self, rows):
            self.writes += 1
            return super().write(rows)

    sink = CountingSink()
    sink.fail = False
    core = Core(Verifier(NODES), sink, clock=lambda: 1_700_000_000.0)
    batch = [one_frame(1, 5), one_frame(1, 5), one_frame(2, 1), b"junk", one_frame(1, 3)]
    acks = core.handle([(d, None) for d in batch])
    assert [a is not None for a in acks] == [True, False, True, False, True]
    assert sink.writes == 1 and len(sink.rows) == 9
    assert core.counters["frames_heard_again"] == 1  # the same bytes twice: two gateways
    # seq 4 arrives late, out of order: accepted once; 3 and 5 again are duplicates
    acks = core.handle([(one_frame(1, 4), None), (one_frame(1, 3), None), (one_frame(1, 4), None)])
    assert [a is not None for a in acks] == [True, False, False]
    assert core.counters["frames_accepted"] == 4


def test_batch_sink_failure_acks_nothing_and_keeps_receive_times():
    from host_tools.receive.receiver import Receiver as Core
    from host_tools.receive.receiver import Verifier

    sink = FailingSink()
    now = [1_700_000_000.0]
    core = Core(Verifier(NODES), sink, clock=lambda: now[0])
    core.log.disabled = True
    status = frame.encode_status(frame.Signer(NODES[1]), 1, 9, {1: 3})
    try:
        acks = core.handle([(one_frame(1, 1), None), (one_frame(2, 1), None), (status, None)])
    finally:
        core.log.disabled = False
    assert [a is not None for a in acks] == [False, False, True]  # health needs no sink
    assert core.counters["sink_error"] == 2
    sink.fail = False
    now[0] += 30  # the nodes resend 30 s later: the readings keep their first receive time
    acks = core.handle([(one_frame(1, 1), None), (one_frame(2, 1), None)])
    assert all(acks)
    assert {r[2] for r in sink.rows} == {1_700_000_000.0 - 60}  # seq 1 was sampled 60 s before


def test_serve_and_udp_source_on_real_sockets(tmp_path):
    import threading as th

    from host_tools.receive.receiver import Intake, UdpSource, Verifier, serve
    from host_tools.receive.receiver import Receiver as Core
    from host_tools.receive.sinks import SqliteSink

    sink = SqliteSink(tmp_path / "rx.db")
    core = Core(Verifier(NODES), sink)
    sockets = []
    for _ in range(2):  # two sources at once
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    sources = [UdpSource(s, poll_s=0.05) for s in sockets]
    intake, stop = Intake(), th.Event()
    for source in sources:
        source.start(intake)
    loop = th.Thread(target=serve, args=(intake, core, stop, 0.05), daemon=True)
    loop.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            # A burst through both sources, then the acks. 60 frames: the two sources may be
            # drained in any order, and every interleaving must stay inside the 64-frame
            # replay window (more would be rejected as replays, rightly).
            for seq in range(1, 61):
                client.sendto(one_frame(4, seq, 2000 + seq), sockets[seq % 2].getsockname())
            acked = set()
            while len(acked) < 60:
                ack = uplink.decode_ack(client.recvfrom(512)[0], frame.Signer(NODES[4]))
                acked.add(ack.acked[0][0])
    finally:
        stop.set()
        loop.join(5)
        for source in sources:
            source.stop()
        sink.close()
    assert acked == set(range(1, 61))
    assert core.counters["frames_accepted"] == 60 and core.counters["acks_sent"] == 60
    assert sum(s.counters["udp_datagrams"] for s in sources) == 60
    assert len(sqlite_rows(tmp_path / "rx.db")) == 180


def test_a_restarted_receiver_still_refuses_a_replayed_frame(tmp_path, keys):
    # An attacker (or a confused gateway) sends a captured frame again after the receiver
    # restarted: with the replay state kept beside the key file it is a duplicate, not new
    # readings at a wrong time; with --replay-state none the restarted receiver would take it.
    datagram = frame.encode_data(
        frame.Signer(NODES[1]), 1, 7, BME, [(2100, 4000, 101000)], [0], version=1
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(3)
    db = tmp_path / "rx.db"

    def run_once(extra):
        rx = Receiver("--keys", keys, "--udp", "127.0.0.1:0", "--db", db, *extra)
        try:
            port = int(rx.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)").group(1))
            sock.sendto(datagram, ("127.0.0.1", port))
            try:
                sock.recvfrom(512)
                acked = True
            except TimeoutError:
                acked = False
            assert rx.stop() == 0
        finally:
            rx.stop(signal.SIGKILL)
        return acked, rx.drain()

    try:
        assert run_once([])[0] is True
        acked, log = run_once([])
        assert acked is False
        assert "frame rejected reason=duplicate node=1" in log and "seq 7 already received" in log
        assert (tmp_path / "keys.json.replay").exists()
        assert run_once(["--replay-state", "none"])[0] is True  # memory only: taken again
    finally:
        sock.close()

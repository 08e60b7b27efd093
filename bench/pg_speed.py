"""Readings/s into PostgreSQL through `citynode receive` with 1, 2 and 3 receivers, beside a
plain COPY of the same rows into the same table (the ceiling), on this machine, in one run.

    python bench/pg_speed.py [--frames N] [--transport udp|mqtt|both] [--repeat N] [--quick]

Its own PostgreSQL 15 (tests/pg_server.py's PgServer, with fsync and full_page_writes turned
back on: a receiver acks only what is committed, so each commit waits for the WAL on disk, as
on a real server) and its own mosquitto (tests/test_sinks_mqtt.py). The same frames each run,
of 10 BME280 readings (v2) from FLEET nodes; every run starts on a fresh database.

1. copy: the rows the receivers would store, as COPY text made beforehand, COPYed into
   `readings` (host_tools/receive/pg.py's schema: its UNIQUE identity index included) in one
   transaction: the database's own ceiling for these rows.
2. sink: PostgresSink.write() in this process, in batches of 256 frames (the receive loop's
   largest): COPY into a temporary table, INSERT ... ON CONFLICT DO NOTHING, commit.
3. receive: 1, 2 and 3 `citynode receive --db postgresql://...` processes, keys pushed to the
   database (`citynode keys push`), frames from a sender process with at most WINDOW in
   flight; a frame unacked after 2 s is sent again re-encoded (as a node does). Over UDP
   (each node to one receiver, as a load balancer hashing on the source would) and over MQTT
   (`--mqtt-up`: QoS 0 up as firmware/mqtt_link.py, one shared subscription, acks on
   citynode/down/<id>). Readings/s from the first send to the last ack; every run checks that
   the database holds every reading once, and that no receiver rejected or failed anything.

Every line is the best of --repeat runs. The cores are shared by everything here (sender,
broker, receivers, PostgreSQL) and by whatever else runs on the machine, so each line says where
the CPU time went during it: per part, `others` the machine's busy time that was not ours, out
of the run's wall time x cores.
"""

import argparse
import datetime
import io
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "tests"):  # run as a script from anywhere
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import pg_server  # noqa: E402
import psycopg  # noqa: E402
import pytest  # noqa: E402  (pg_server and test_sinks_mqtt skip through it)
from conftest import ReceiveProcess  # noqa: E402
from test_sinks_mqtt import Mosquitto  # noqa: E402

from host_tools.keys import save_keys  # noqa: E402
from host_tools.receive.mqtt import DOWN_TOPIC, UP_TOPIC  # noqa: E402
from host_tools.receive.pg import PostgresSink, open_schema  # noqa: E402
from host_tools.receive.receiver import frame_rows  # noqa: E402
from protocols.frame import BME280_CHANNELS, Signer, encode_data  # noqa: E402
from protocols.uplink import decode_ack, decode_data, peek  # noqa: E402

READINGS_PER_FRAME = 10
FLEET = 1000  # nodes sending
WINDOW = 512  # frames in flight from the sender
RESEND_S = 2.0  # firmware's ack_timeout_ms
SINK_BATCH = 256  # frames per PostgresSink.write in the in-process run
GROUP = "bench"
TICK = os.sysconf("SC_CLK_TCK")

# Durable, as a real server: the test server's fsync=off would let commits skip the disk.
pg_server.SETTINGS.update(fsync="on", full_page_writes="on")


# --- frames -------------------------------------------------------------------------------


def fleet_keys(seed):
    rng = random.Random(seed)
    return {node: rng.randbytes(16) for node in range(1, FLEET + 1)}


def frame_content(i, seed):
    """Frame i: (node, first reading index, readings, ages); node 1 + i % FLEET, its frames
    10 readings apart in its count, each reading 60 s after the one before."""
    rng = random.Random(seed * 1_000_003 + i)
    node = 1 + i % FLEET
    k = i // FLEET
    readings = [
        (
            2150 + rng.randrange(-50, 50),
            4500 + rng.randrange(-30, 30),
            101325 + rng.randrange(-20, 20),
        )
        for _ in range(READINGS_PER_FRAME)
    ]
    ages = [3600 + 60 * (READINGS_PER_FRAME - 1 - r) for r in range(READINGS_PER_FRAME)]
    return node, k * READINGS_PER_FRAME, readings, ages


def encode(signers, i, seed, older=0):
    """Frame i encoded; `older` seconds more on every age (a copy sent again later)."""
    node, first, readings, ages = frame_content(i, seed)
    ages = [a + older for a in ages]
    return encode_data(signers[node], node, first, BME280_CHANNELS, readings, ages, version=2)


def frame_id(node, first):
    return (first // READINGS_PER_FRAME) * FLEET + node - 1


# --- the sender (a process of its own) ------------------------------------------------------


class UdpLink:
    """Frames to receivers' UDP ports, each node always to the same one (as a load balancer
    hashing on the source address); acks read on the same socket."""

    def __init__(self, ports):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.settimeout(0.2)
        self.addrs = [("127.0.0.1", p) for p in ports]

    def send(self, node, payload):
        self.sock.sendto(payload, self.addrs[node % len(self.addrs)])

    def ack(self):
        try:
            return self.sock.recvfrom(512)[0]
        except TimeoutError:
            return None

    def close(self):
        self.sock.close()


class MqttLink:
    """Frames published on citynode/up/<node> (QoS 0, MQTT 3.1.1, as firmware/mqtt_link.py);
    acks from citynode/down/+ (QoS 0). One connection for the whole fleet."""

    def __init__(self, port):
        import paho.mqtt.client as paho

        self.acks = queue.Queue()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id="citynode-bench-sender-%d" % os.getpid(),
            protocol=paho.MQTTv311,
        )
        subscribed = queue.Queue()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(DOWN_TOPIC + "+", qos=0)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.put(True)
        self.client.on_message = lambda c, u, m: self.acks.put(bytes(m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        subscribed.get(timeout=10)

    def send(self, node, payload):
        self.client.publish(UP_TOPIC + str(node), payload, qos=0)

    def ack(self):
        try:
            return self.acks.get(timeout=0.2)
        except queue.Empty:
            return None

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def sender_main(transport, target, n_frames, seed, limit_s):
    """Make the frames and connect, print "ready", and at "go" on stdin send frames
    0..n_frames-1, WINDOW in flight, each until acked; then print "elapsed_s resent"."""
    signers = {node: Signer(key) for node, key in fleet_keys(seed).items()}
    frames = [encode(signers, i, seed) for i in range(n_frames)]  # before the clock starts
    if transport == "udp":
        link = UdpLink([int(p) for p in target.split(",")])
    else:
        link = MqttLink(int(target))
    print("ready", flush=True)
    if sys.stdin.readline() != "go\n":
        sys.exit("sender: no go")
    pending = {}  # frame id -> (time sent, tag of the copy sent, copies)
    resent = 0
    next_i = 0
    done = 0
    t0 = time.perf_counter()
    try:
        while done < n_frames:
            if time.perf_counter() - t0 > limit_s:
                sys.exit(
                    "sender: %d of %d frames unacked after %.0f s"
                    % (n_frames - done, n_frames, limit_s)
                )
            while next_i < n_frames and len(pending) < WINDOW:
                node = 1 + next_i % FLEET
                link.send(node, frames[next_i])
                pending[next_i] = (time.monotonic(), frames[next_i][-4:], 1)
                next_i += 1
            reply = link.ack()
            if reply is None or len(pending) < WINDOW // 4:
                now = time.monotonic()
                for i, (sent, _, copies) in list(pending.items()):
                    if now - sent > RESEND_S:
                        copy = encode(signers, i, seed, older=int(RESEND_S) * copies)
                        link.send(1 + i % FLEET, copy)
                        pending[i] = (now, copy[-4:], copies + 1)
                        resent += 1
            if reply is None:
                continue
            node = peek(reply)[2]
            ack = decode_ack(reply, signers[node])
            i = frame_id(node, ack.acked[0][0])
            entry = pending.get(i)
            if entry is not None and entry[1] == ack.echo:
                del pending[i]
                done += 1
    finally:
        link.close()
    print("%.6f %d" % (time.perf_counter() - t0, resent), flush=True)


# --- measuring ------------------------------------------------------------------------------


def cpu_s(pids):
    """CPU seconds (user + system) used so far by these processes; gone ones count 0."""
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / TICK


def machine_busy_s():
    """CPU seconds the whole machine has been busy (all cores; /proc/stat, idle and iowait
    left out)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICK


def pg_pids(server):
    """The postmaster and its children (backends, WAL writer, checkpointer ...)."""
    with open(os.path.join(server.data, "postmaster.pid")) as f:
        master = int(f.readline())
    pids = [master]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == master:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def make_rows(n_frames, seed, rx_time):
    """The rows the receivers store for these frames, received at rx_time."""
    signers = {node: Signer(key) for node, key in fleet_keys(seed).items()}
    rows = []
    for i in range(n_frames):
        payload = encode(signers, i, seed)
        rows.extend(frame_rows(decode_data(payload, signers[peek(payload)[2]]), rx_time))
    return rows


def copy_text(rows):
    """COPY text of readings (node_id, reading_index, ts, quantity, value)."""
    out = io.StringIO()
    for node, index, ts, quantity, value in rows:
        when = datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat()
        out.write("%d\t%d\t%s\t%s\t%r\n" % (node, index, when, quantity, value))
    return out.getvalue().encode()


def count_rows(url):
    with psycopg.connect(url, connect_timeout=10) as conn:
        total, identities = conn.execute(
            "SELECT count(*), count(DISTINCT (node_id, reading_index, quantity)) FROM readings"
        ).fetchone()
    return total, identities


def check_rows(url, expected, what):
    total, identities = count_rows(url)
    if total != expected or identities != expected:
        sys.exit(
            "%s: %d rows (%d identities) stored, expected %d" % (what, total, identities, expected)
        )


def bench_copy(server, rows):
    url = server.url(server.create_database())
    data = copy_text(rows)
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        open_schema(conn)
        cpu0 = cpu_s(pg_pids(server))
        busy0 = machine_busy_s()
        p0 = time.process_time()
        t0 = time.perf_counter()
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(
                "COPY readings (node_id, reading_index, ts, quantity, value) FROM STDIN"
            ) as copy:
                copy.write(data)
        elapsed = time.perf_counter() - t0
        cpu = {"pg": cpu_s(pg_pids(server)) - cpu0, "bench": time.process_time() - p0}
        cpu["all"] = machine_busy_s() - busy0
    check_rows(url, len(rows), "copy")
    return elapsed, cpu


def bench_sink(server, rows):
    url = server.url(server.create_database())
    sink = PostgresSink(url)
    step = SINK_BATCH * READINGS_PER_FRAME * 3
    cpu0 = cpu_s(pg_pids(server))
    busy0 = machine_busy_s()
    p0 = time.process_time()
    t0 = time.perf_counter()
    for k in range(0, len(rows), step):
        sink.write(rows[k : k + step])
    elapsed = time.perf_counter() - t0
    cpu = {"pg": cpu_s(pg_pids(server)) - cpu0, "bench": time.process_time() - p0}
    cpu["all"] = machine_busy_s() - busy0
    sink.close()
    check_rows(url, len(rows), "sink")
    return elapsed, cpu


class Run:
    """Receivers started for one measurement, stopped (SIGTERM, final counters read) after."""

    def __init__(self, count, transport, db_args, broker):
        self.transport = transport
        self.broker = broker
        self.procs = []
        self.ports = []
        try:
            for _ in range(count):
                if transport == "udp":
                    rx = ReceiveProcess(*db_args, "--udp", "127.0.0.1:0")
                    self.procs.append(rx)
                    self.ports.append(
                        int(rx.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)", 60).group(1))
                    )
                else:
                    rx = ReceiveProcess(*db_args, "--mqtt-up", "%s/%s" % (broker.url, GROUP))
                    self.procs.append(rx)
                    rx.wait_for(r"mqtt-up \S+ \S+: connected, subscribed", 60)
        except BaseException:
            self.kill()
            raise

    @property
    def target(self):
        return ",".join(map(str, self.ports)) if self.transport == "udp" else str(self.broker.port)

    def stop(self):
        """Each receiver's frames_accepted, after a clean exit."""
        accepted = []
        for rx in self.procs:
            if rx.stop() != 0:
                sys.exit("a receiver exited non-zero:\n%s" % rx.drain()[-3000:])
            line = rx.wait_for(r"^citynode: final counters: (.*)$", 30).group(1)
            counters = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
            bad = {
                k: v
                for k, v in counters.items()
                if k.startswith(("rejected_", "sink_error", "internal_error"))
            }
            if bad:
                sys.exit("a receiver counted %s:\n%s" % (bad, rx.drain()[-3000:]))
            accepted.append(counters.get("frames_accepted", 0))
        return accepted

    def kill(self):
        for rx in self.procs:
            rx.stop(signal.SIGKILL)


def push_keys(workdir, url):
    pushed = subprocess.run(
        [sys.executable, "-m", "host_tools.cli", "keys", "--keys", str(workdir / "keys.json")]
        + ["push", url],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    if pushed.returncode != 0:
        sys.exit("keys push: %s" % pushed.stderr)


def bench_receive(server, broker, workdir, count, transport, n_frames, seed):
    """(elapsed s, resent, cpu dict, frames accepted per receiver)."""
    url = server.url(server.create_database())
    push_keys(workdir, url)
    run = Run(count, transport, ["--keys", url, "--db", url], broker)
    sender = None
    try:
        sender = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--sender",
                transport,
                run.target,
                str(n_frames),
                str(seed),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        if sender.stdout.readline() != "ready\n":  # its frames made, connected
            sys.exit("sender did not start")
        pids = {
            "rx": [rx.proc.pid for rx in run.procs],
            "pg": pg_pids(server),
            "broker": [broker.proc.pid] if transport == "mqtt" else [],
            "sender": [sender.pid],
        }
        cpu0 = {k: cpu_s(v) for k, v in pids.items()}
        busy0 = machine_busy_s()
        sender.stdin.write("go\n")
        sender.stdin.flush()
        result = sender.stdout.readline().split()
        cpu = {k: cpu_s(v) - cpu0[k] for k, v in pids.items()}
        cpu["all"] = machine_busy_s() - busy0
        if sender.wait(60) != 0 or len(result) != 2:
            sys.exit("sender failed (exit %s)" % sender.returncode)
        elapsed, resent = result
        accepted = run.stop()
    finally:
        if sender is not None and sender.poll() is None:
            sender.kill()
            sender.wait()
        run.kill()
    check_rows(url, n_frames * READINGS_PER_FRAME * 3, "receive x%d" % count)
    return float(elapsed), int(resent), cpu, accepted


# --- report -------------------------------------------------------------------------------


def cpu_text(cpu, elapsed):
    """CPU seconds per part; `others`: the machine's busy time not ours (other work)."""
    parts = ["%s %.1f" % (k, v) for k, v in cpu.items() if k != "all" and v]
    others = cpu["all"] - sum(v for k, v in cpu.items() if k != "all" and v)
    return "%s, others %.1f (of %.1f)" % (
        ", ".join(parts),
        max(0.0, others),
        elapsed * os.cpu_count(),
    )


def best(repeat, measure):
    """The fastest of `repeat` runs of measure() -> (elapsed, ...): other work on the machine
    only ever slows a run down."""
    return min((measure() for _ in range(repeat)), key=lambda r: r[0])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=20_000, help="frames per run (10 readings each)")
    p.add_argument(
        "--transport",
        choices=("udp", "mqtt", "both"),
        default="both",
        help="how frames reach the receivers (default both: every count over each)",
    )
    p.add_argument("--repeat", type=int, default=2, help="runs of each line, the best shown")
    p.add_argument("--quick", action="store_true", help="small runs, once each (a smoke test)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sender", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sender:
        transport, target, n, seed = args.sender
        return sender_main(transport, target, int(n), int(seed), limit_s=300)
    if args.quick:
        args.frames, args.repeat = 2000, 1
    transports = ("udp", "mqtt") if args.transport == "both" else (args.transport,)
    n = args.frames
    readings = n * READINGS_PER_FRAME
    try:
        server = pg_server.PgServer()
    except (pytest.skip.Exception, pytest.fail.Exception) as e:
        sys.exit("pg_speed: %s" % e)
    results = {}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="citynode-pg-bench-") as tmp:
        workdir = Path(tmp)
        save_keys(workdir / "keys.json", fleet_keys(args.seed))
        broker = None
        try:
            server.start()
            broker = Mosquitto(workdir).start()
            rows = make_rows(n, args.seed, time.time())
            print(
                "pg_speed: %d frames of %d readings (%d rows) from %d nodes, best of %d; %d "
                "cores, load %.2f at start; PostgreSQL %s, fsync on"
                % (
                    n,
                    READINGS_PER_FRAME,
                    len(rows),
                    FLEET,
                    args.repeat,
                    os.cpu_count(),
                    os.getloadavg()[0],
                    server_version(server),
                ),
                flush=True,
            )
            print("%-44s %10s %7s  %s" % ("", "readings/s", "of COPY", "cpu s in the run"))
            elapsed, cpu = best(args.repeat, lambda: bench_copy(server, rows))
            ceiling = readings / elapsed
            line("copy     COPY, one transaction: the ceiling", ceiling, ceiling, cpu, elapsed)
            elapsed, cpu = best(args.repeat, lambda: bench_sink(server, rows))
            line(
                "sink     PostgresSink.write, %d frames each" % SINK_BATCH,
                readings / elapsed,
                ceiling,
                cpu,
                elapsed,
            )
            for transport in transports:
                for count in (1, 2, 3):
                    elapsed, resent, cpu, accepted = best(
                        args.repeat,
                        lambda t=transport, c=count: bench_receive(
                            server, broker, workdir, c, t, n, args.seed
                        ),
                    )
                    results[transport, count] = (readings / elapsed, cpu)
                    split = "/".join("%.0f" % (100 * a / max(1, sum(accepted))) for a in accepted)
                    line(
                        "receive  %d x citynode receive, %-4s" % (count, transport),
                        readings / elapsed,
                        ceiling,
                        cpu,
                        elapsed,
                        "; split %s%%%s" % (split, "; %d resent" % resent if resent else ""),
                    )
        finally:
            if broker is not None:
                broker.stop()
            server.cleanup()
    if len(transports) == 2:
        # Receiver CPU per reading, over each transport: what MQTT adds (paho's thread, the
        # broker's) is taken from the same two cores PostgreSQL needs.
        rx_us = {
            t: 1e6 * sum(results[t, c][1]["rx"] for c in (1, 2, 3)) / (3 * readings)
            for t in transports
        }
        top = {t: max(results[t, c][0] for c in (1, 2, 3)) for t in transports}
        ratio = top["mqtt"] / top["udp"]
        print(
            "transport: best %.0f readings/s over mqtt, %.0f over udp (mqtt/udp %.2f); receiver "
            "cpu %.1f us a reading over mqtt, %.1f over udp: %s"
            % (
                top["mqtt"],
                top["udp"],
                ratio,
                rx_us["mqtt"],
                rx_us["udp"],
                "mqtt limits the runs here, the udp lines are the database's figures"
                if ratio < 0.9
                else "mqtt does not limit the runs here",
            )
        )
    print("pg_speed: %.0f s" % (time.monotonic() - began))


def line(label, rate, ceiling, cpu, elapsed, note=""):
    print(
        "%-44s %10.0f %6.0f%%  %s%s"
        % (label, rate, 100 * rate / ceiling, cpu_text(cpu, elapsed), note),
        flush=True,
    )


def server_version(server):
    with server.admin() as conn:
        return conn.execute("SHOW server_version").fetchone()[0].split()[0]


if __name__ == "__main__":
    main()

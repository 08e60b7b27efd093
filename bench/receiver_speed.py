"""Receiver throughput with verification and the SQLite sink, and memory held per known node.

    python bench/receiver_speed.py [--frames N] [--nodes N] [--quick]

1. core: frames of 10 readings -> Receiver.handle (tag, structure, replay window, timestamps)
   -> SqliteSink on a real file (WAL, synchronous=FULL: one fsync per batch) -> acks, in the
   batches the receive loop takes from its intake; pinned to one core.
2. udp: the same end to end through the real loop: a sender process (the other core) sends the
   frames over loopback UDP, at most WINDOW unacknowledged; UdpSource -> Intake -> serve() ->
   Receiver -> SQLite -> acks back. Readings/s from the first send to the last ack.
3. memory: tracemalloc over loading 100 000 node keys from a key file and every node sending a
   frame (its replay window, the LRU of signers), divided by the node count.

Targets (issue 5): >= 20 000 readings/s end to end into SQLite on one core; <= 1 KB of receiver
memory per node for 100 000 nodes. Prints PASS/FAIL for each; exits non-zero only if a check of
correctness fails (rows stored != readings sent), not on a missed target.
"""

import argparse
import os
import random
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from host_tools.keys import load_keys, save_keys  # noqa: E402
from host_tools.receive.receiver import (  # noqa: E402
    Intake,
    Receiver,
    ReplayStore,
    UdpSource,
    Verifier,
    serve,
)
from host_tools.receive.sinks import SqliteSink, TeeSink  # noqa: E402
from host_tools.receive.spool import Spool  # noqa: E402
from protocols.frame import BME280_CHANNELS, Signer, encode_data  # noqa: E402
from protocols.uplink import decode_ack, peek  # noqa: E402

READINGS_PER_FRAME = 10
TARGET_READINGS_S = 20_000
TARGET_BYTES_PER_NODE = 1024
FLEET = 1000  # nodes sending in the throughput runs
BATCH = 256  # the receive loop's largest batch (receiver.serve max_batch)
WINDOW = 512  # frames in flight from the UDP sender


def pin(cpu):
    """Run this process on one core (Linux); returns a note for the report."""
    try:
        os.sched_setaffinity(0, {cpu})
        return "pinned to cpu %d" % cpu
    except (AttributeError, OSError) as e:
        return "not pinned (%s)" % e


def make_frames(n_frames, seed=1, version=2):
    """n_frames DATA frames of 10 BME280 readings from FLEET nodes, seqs (v1) or reading
    indices (v2: 10 a frame) rising per node."""
    rng = random.Random(seed)
    keys = {node: rng.randbytes(16) for node in range(1, FLEET + 1)}
    signers = {node: Signer(key) for node, key in keys.items()}
    frames = []
    last_seq = n_frames // FLEET + 1
    for i in range(n_frames):
        node = 1 + i % FLEET
        seq = 1 + i // FLEET
        # A node's frames ten minutes apart, as a node sends them: sent here in a burst, their
        # readings still get distinct times (the receiver takes near-equal readings of one
        # node within 1.5 s for the same reading sent again).
        older = 600 * (last_seq - seq)
        t = 2150 + rng.randrange(-50, 50)
        readings = [
            (t + k, 4500 + rng.randrange(-30, 30), 101325 + rng.randrange(-20, 20))
            for k in range(READINGS_PER_FRAME)
        ]
        ages = [older + 60 * (READINGS_PER_FRAME - 1 - k) for k in range(READINGS_PER_FRAME)]
        first = seq if version == 1 else (seq - 1) * READINGS_PER_FRAME
        frames.append(
            encode_data(
                signers[node], node, first, BME280_CHANNELS, readings, ages, version=version
            )
        )
    return keys, frames


def stored_rows(db):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT count(*) FROM readings").fetchone()[0]


def bench_core(keys, frames, workdir, spooled=False, tag=""):
    """Readings/s through Receiver.handle into SQLite (and, with spooled, also into the spool
    of the remote sinks: a second fsync per batch, as `--db` with `--webhook` does)."""
    db = Path(workdir) / ("core%s%s.db" % ("-spooled" if spooled else "", tag))
    sink = SqliteSink(db)
    if spooled:
        spool = Spool(Path(workdir) / "spool.db")
        spool.register("bench")
        sink = TeeSink([spool, sink])
    clock = iter(range(1_700_000_000, 1_800_000_000))  # distinct second per frame: distinct ts
    receiver = Receiver(Verifier(keys), sink, clock=lambda: float(next(clock)))
    t0 = time.perf_counter()
    acks = 0
    for i in range(0, len(frames), BATCH):
        batch = [(f, None) for f in frames[i : i + BATCH]]
        acks += sum(a is not None for a in receiver.handle(batch))
    elapsed = time.perf_counter() - t0
    sink.close()
    rows = stored_rows(db)
    expected = len(frames) * READINGS_PER_FRAME * 3
    if acks != len(frames) or rows != expected:
        sys.exit(
            "core: %d acks, %d rows stored; expected %d and %d"
            % (acks, rows, len(frames), expected)
        )
    return len(frames) * READINGS_PER_FRAME / elapsed


def sender_main(port, frames_path, node_keys_path):
    """The UDP sender (a separate process): send every frame, WINDOW in flight, resend what is
    not acked within 1 s; print the elapsed seconds from first send to last ack."""
    pin(1)
    data = Path(frames_path).read_bytes()
    frames, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from(">H", data, pos)
        frames.append(data[pos + 2 : pos + 2 + n])
        pos += 2 + n
    keys = load_keys(node_keys_path)
    signers = {node: Signer(key) for node, key in keys.items()}
    ids = [peek(f)[2] for f in frames]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    addr = ("127.0.0.1", port)
    pending = {}  # (node, seq) -> (index, sent at)
    next_i = 0
    done = 0
    t0 = time.perf_counter()
    sock.settimeout(1.0)
    while done < len(frames):
        while next_i < len(frames) and len(pending) < WINDOW:
            sock.sendto(frames[next_i], addr)
            pending[next_i] = time.monotonic()
            next_i += 1
        try:
            reply, _ = sock.recvfrom(512)
        except TimeoutError:
            now = time.monotonic()
            for i, sent in list(pending.items()):
                if now - sent > 1.0:
                    sock.sendto(frames[i], addr)
                    pending[i] = now
            continue
        node = peek(reply)[2]
        ack = decode_ack(reply, signers[node])
        first = ack.acked[0][0]
        seq = first if ack.echo is None else first // READINGS_PER_FRAME + 1
        i = (seq - 1) * FLEET + (node - 1)
        if pending.pop(i, None) is not None:
            done += 1
        assert ids[i] == node
    print("%.6f" % (time.perf_counter() - t0), flush=True)


def bench_udp(keys, frames, workdir):
    pin_note = pin(0)
    frames_path = Path(workdir) / "frames.bin"
    frames_path.write_bytes(b"".join(struct.pack(">H", len(f)) + f for f in frames))
    keys_path = Path(workdir) / "keys.json"
    save_keys(keys_path, keys)
    db = Path(workdir) / "udp.db"
    sink = SqliteSink(db)
    # as `citynode receive` runs: the replay windows kept in a file beside the key file
    store = ReplayStore(Path(workdir) / "keys.json.replay")
    receiver = Receiver(Verifier(keys, store=store), sink)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    source = UdpSource(sock, poll_s=0.2)
    intake = Intake()
    stop = threading.Event()
    source.start(intake)
    loop = threading.Thread(target=serve, args=(intake, receiver, stop, 0.2), daemon=True)
    loop.start()
    try:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--sender",
                str(sock.getsockname()[1]),
                str(frames_path),
                str(keys_path),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout
    finally:
        stop.set()
        loop.join(5)
        source.stop()
        sink.close()
        store.close()
    elapsed = float(out.strip())
    rows = stored_rows(db)
    if rows != len(frames) * READINGS_PER_FRAME * 3:
        sys.exit("udp: %d rows stored, expected %d" % (rows, len(frames) * 30))
    drops = source.counters["intake_full"]
    return len(frames) * READINGS_PER_FRAME / elapsed, pin_note, drops


def bench_memory(n_nodes, workdir):
    rng = random.Random(2)
    keys = {node: rng.randbytes(16) for node in range(1, n_nodes + 1)}
    keys_path = Path(workdir) / ("keys-%d.json" % n_nodes)
    save_keys(keys_path, keys)
    # the frames each node sends, made before tracing starts
    frames = []
    for node, key in keys.items():
        signer = Signer(key)
        frames.append(  # v1: a replay window per node (v2 readings need none)
            encode_data(signer, node, 5, BME280_CHANNELS, [(2150, 4500, 101325)], [0], version=1)
        )
    del keys
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    verifier = Verifier(load_keys(keys_path))
    for f in frames:
        verifier.accept(verifier.check(f))
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(verifier._windows) == n_nodes
    return (current - base) / n_nodes, (peak - base) / n_nodes


def verdict(ok):
    return "PASS" if ok else "FAIL"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=20_000, help="frames per throughput run")
    p.add_argument("--nodes", type=int, default=100_000, help="nodes in the memory run")
    p.add_argument("--quick", action="store_true", help="small runs (a smoke test)")
    p.add_argument("--sender", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.sender:
        return sender_main(int(args.sender[0]), args.sender[1], args.sender[2])
    if args.quick:
        args.frames, args.nodes = 2000, 5000
    keys, frames = make_frames(args.frames)
    with tempfile.TemporaryDirectory(prefix="citynode-bench-") as workdir:
        note = pin(0)
        _, frames_v1 = make_frames(args.frames, version=1)
        core_v1 = bench_core(keys, frames_v1, workdir, tag="-v1")
        print(
            "core  v1 frames (no identity: the 1.5 s resent rule in SQL): %8.0f readings/s"
            % core_v1
        )
        core = bench_core(keys, frames, workdir)
        print(
            "core  verify + SQLite (WAL, synchronous=FULL), batches of %d: %8.0f readings/s  "
            "(v2 frames: identity key; %d frames of %d readings, %s)"
            % (BATCH, core, len(frames), READINGS_PER_FRAME, note)
        )
        spooled = bench_core(keys, frames, workdir, spooled=True)
        print(
            "core  the same + the spool of remote sinks (2 fsyncs a batch): %8.0f readings/s"
            % spooled
        )
        udp, note, drops = bench_udp(keys, frames, workdir)
        print(
            "udp   end to end over loopback, acks back:             %8.0f readings/s  "
            "(receiver %s, sender on cpu 1; %d intake drops)   %s (target >= %d)"
            % (udp, note, drops, verdict(udp >= TARGET_READINGS_S), TARGET_READINGS_S)
        )
        per_node, peak = bench_memory(args.nodes, workdir)
        print(
            "mem   %d nodes (keys from a key file, replay windows, signer LRU): %.0f bytes/node "
            "held (peak %.0f)   %s (target <= %d)"
            % (
                args.nodes,
                per_node,
                peak,
                verdict(per_node <= TARGET_BYTES_PER_NODE),
                TARGET_BYTES_PER_NODE,
            )
        )


if __name__ == "__main__":
    main()

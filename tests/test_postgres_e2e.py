# Several `citynode receive` processes on one PostgreSQL (ARCHITECTURE.md "Beyond one machine"):
# keys pushed there with `citynode keys push`, readings and replay windows there, frames of
# the same nodes reaching every receiver (a node heard by two gateways, a load balancer), one
# receiver killed with SIGKILL mid-run. Every reading acked is in PostgreSQL exactly once.

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
from test_identity_e2e import NODES, Node, start, stop

from host_tools.keys import save_keys

pytest_plugins = ["pg_server"]

ROOT = Path(__file__).resolve().parent.parent


def citynode(*args):
    return subprocess.run(
        [sys.executable, "-m", "host_tools.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def pg_rows(url):
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT node_id, reading_index, quantity, extract(epoch FROM ts) FROM readings"
        ).fetchall()


def test_keys_pushed_to_postgres_and_two_receivers_one_killed_each_reading_once(tmp_path, pg_url):
    keys = tmp_path / "keys.json"
    save_keys(keys, NODES)
    pushed = citynode("keys", "--keys", keys, "push", pg_url)
    assert pushed.returncode == 0, pushed.stderr
    assert "%d node(s) pushed" % len(NODES) in pushed.stderr
    common = ["--keys", pg_url, "--db", pg_url, "--udp", "127.0.0.1:0"]
    rng = random.Random(9)
    nodes = [Node(n) for n in (1, 2, 3)]
    acked = {}  # (node, index) -> the send time of the copy acked, less the reading's age
    now = time.time()
    rx_a = rx_b = None
    try:
        rx_a, addr_a = start(*common)
        rx_b, addr_b = start(*common)
        addrs = [addr_a, addr_b]

        def run(node, frames, killed):
            for f in range(frames):
                indices = [node.sample(now - 20000 + 60 * (10 * f + k)) for k in range(10)]
                live = [addr_b] if killed.is_set() else addrs
                # a node heard by both receivers at once: the two write the same rows
                datagram = node.encode(indices, time.time())
                for addr in live:
                    node.sock.sendto(datagram, addr)
                for _ in range(5):
                    if node.ack_for(datagram, indices, 2.0) is not None:
                        break
                    datagram, _ = node.send(addr_b, indices)  # re-sent, re-encoded
                else:
                    raise AssertionError("node %d: %s never acked" % (node.node_id, indices))
                for i in indices:
                    acked[(node.node_id, i)] = True
                node.forget(indices)
                time.sleep(0.05)  # frames keep coming while the receiver is killed

        killed = threading.Event()
        threads = [threading.Thread(target=run, args=(n, 30, killed)) for n in nodes]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.4, 0.9))
        assert len(acked) < 3 * 30 * 10, "the kill must come mid-run"
        rx_a.proc.send_signal(signal.SIGKILL)  # mid-run, at a random moment
        rx_a.proc.wait(10)
        killed.set()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        counters_b = stop(rx_b)
    finally:
        for rx in (rx_a, rx_b):
            if rx is not None:
                rx.stop(signal.SIGKILL)
        for n in nodes:
            n.close()
    assert "Traceback" not in rx_b.drain()
    assert counters_b["frames_accepted"] > 0
    rows = pg_rows(pg_url)
    identities = [(n, i, q) for n, i, q, _ in rows]
    assert len(identities) == len(set(identities)), "a reading stored twice"
    assert {(n, i) for n, i, _, _ in rows} == set(acked) and len(acked) == 3 * 30 * 10
    for node in nodes:
        for i, (sampled, _) in node.sampled.items():
            stamps = {ts for n, j, _, ts in rows if n == node.node_id and j == i}
            assert len(stamps) == 1
            assert abs(float(stamps.pop()) - sampled) <= 1.0


def test_receive_with_an_unreachable_postgres_is_one_line(tmp_path):
    keys = tmp_path / "keys.json"
    save_keys(keys, NODES)
    result = citynode(
        "receive", "--keys", keys, "--db", "postgresql://citynode:s3cret@127.0.0.1:1/none"
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("citynode: ")
    assert "s3cret" not in result.stderr


def test_keys_pushed_keep_every_key_still_in_its_grace(tmp_path, pg_url):
    from host_tools.keys import load_accepted_keys
    from host_tools.receive.pg import PgKeyStore

    keys = tmp_path / "keys.json"
    for args in (("add", 7), ("rotate", 7), ("rotate", 7), ("push", pg_url)):
        result = citynode("keys", "--keys", keys, *args)
        assert result.returncode == 0, result.stderr
    store = PgKeyStore(pg_url)
    try:
        from_pg = store.load_accepted()
    finally:
        store.close()
    from_file = load_accepted_keys(keys)
    assert len(from_file[7]) == 3 and from_pg == from_file

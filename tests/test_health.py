# Per-node health for `citynode receive --status`: what the receiver keeps of each node (last
# heard, its STATUS fields) and which nodes it names as needing a look.

import json
import subprocess
import sys
import time
from pathlib import Path

from host_tools.receive.health import Health, problems_of_snapshot
from host_tools.receive.receiver import Receiver, Verifier
from protocols import frame

ROOT = Path(__file__).resolve().parent.parent
KEY = bytes(range(16))
BME = (1, 2, 3)


class Sink:
    def write(self, rows):
        return len(rows)


def data(node_id, index, ages=(1200, 600, 0)):
    readings = [(2150 + i, 4500, 101325) for i in range(len(ages))]
    return frame.encode_data(frame.Signer(KEY), node_id, index, BME, readings, list(ages))


def status(node_id, seq, **fields):
    ids = {"boot_count": 1, "readings_dropped": 5, "sensor_faults": 8, "free_heap": 3}
    ids.update(bme280_faults=10, sds011_faults=11, pms5003_faults=12, sps30_faults=13)
    return frame.encode_status(
        frame.Signer(KEY), node_id, seq, {ids[k]: v for k, v in fields.items()}
    )


def test_the_receiver_keeps_each_nodes_health_and_names_the_ones_with_problems():
    now = [1_800_000_000.0]
    r = Receiver(Verifier({1: KEY, 2: KEY, 3: KEY}), Sink(), clock=lambda: now[0])
    for node in (1, 2, 3):
        r.datagram(status(node, 0, boot_count=4, readings_dropped=0, sensor_faults=0))
        r.datagram(data(node, 0))  # three readings 10 min apart: a frame every 30 min
    r.datagram(status(2, 1, boot_count=6, readings_dropped=12, sensor_faults=0))
    now[0] += 3000
    r.datagram(data(1, 3))
    r.datagram(data(2, 3))
    r.datagram(status(3, 1, boot_count=4, readings_dropped=0, sensor_faults=0))
    now[0] += 2 * 3600  # node 3 sent no DATA since; nodes 1 and 2 stop too
    r.datagram(data(1, 6))
    problems = r.health.problems(now[0])
    assert (1, "reset 0 times") not in problems
    by_node = {}
    for node, what in problems:
        by_node.setdefault(node, []).append(what)
    assert sorted(by_node) == [2, 3]
    assert "12 readings dropped on the node" in by_node[2]
    assert "reset 2 times since the receiver started" in by_node[2]
    assert any(
        w.startswith("not heard for 7200 s (it sends about every 1800 s)") for w in by_node[2]
    )
    snap = r.health.snapshot(now[0])
    assert snap["1"]["frames"] == 3 and snap["1"]["readings"] == 9
    assert snap["2"]["resets"] == 2 and snap["2"]["readings_dropped"] == 12
    assert list(snap)[:2] == ["2", "3"]  # the nodes with problems first
    # the same verdicts from the status file's copy
    doc = {"time": now[0], "node_health": snap}
    assert problems_of_snapshot(doc, now[0]) == problems


def test_receive_status_prints_a_line_for_each_node_with_a_problem(tmp_path):
    h = Health()
    t = time.time()
    h.nodes.clear()
    h.data(
        type("F", (), {"node_id": 31, "readings": [0] * 10, "ages": list(range(540, -1, -60))})(),
        t - 4000,
    )
    h.data(
        type("F", (), {"node_id": 32, "readings": [0] * 10, "ages": list(range(540, -1, -60))})(),
        t - 10,
    )
    path = tmp_path / "status.json"
    doc = {"time": t, "pid": 1, "status_every_s": 5, "node_health": h.snapshot(t)}
    path.write_text(json.dumps(doc))
    result = subprocess.run(
        [sys.executable, "-m", "host_tools.cli", "receive", "--status", "--status-file", path],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "citynode: node 31: not heard for 4000 s (it sends about every 600 s)"
    ]
    assert json.loads(result.stdout)["node_health"]["32"]["frames"] == 1


def test_a_pm_node_names_which_sensor_faults():
    """A node with config "sensors" reports faults per sensor type (STATUS fields 10-13):
    --status names them, from the receiver and from the status file alike."""
    now = 1_800_000_000.0
    r = Receiver(Verifier({4: KEY, 5: KEY}), Sink(), clock=lambda: now)
    r.datagram(status(4, 0, boot_count=1, sensor_faults=7, bme280_faults=0, sds011_faults=7))
    r.datagram(status(5, 0, boot_count=1, sensor_faults=2))  # a BME280-only node: no 10-13
    problems = r.health.problems(now)
    assert (4, "7 sensor faults since boot (sds011 7)") in problems
    assert (5, "2 sensor faults since boot") in problems
    doc = {"time": now, "node_health": r.health.snapshot(now)}
    assert problems_of_snapshot(doc, now) == problems
    r.datagram(status(4, 1, boot_count=2, sensor_faults=0, sds011_faults=0))  # fixed, rebooted
    assert not [w for n, w in r.health.problems(now) if n == 4 and "fault" in w]

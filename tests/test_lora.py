# LoRa end to end: node firmware with the LoRa link and the gateway firmware, each a real
# MicroPython process on the simulated board, sharing the simulated air (host_tools/sim/air.py:
# time on air, collisions, range); the gateway forwards over gwlink to the receiver.
import sqlite3

from host_tools.receive.receiver import Receiver, Verifier
from host_tools.receive.sinks import SqliteSink
from host_tools.sim import weather
from host_tools.sim.fleet import LORA_NODE_HEAP, Fleet, NodeSpec

START = 1782864000
KEY = bytes(range(16))


def lora_node(node_id, position, n=60, offset=0, sf=7, **extra):
    rows = [(r[0] + offset,) + tuple(r[1:]) for r in weather.generate(START, 60, n, node_id)]
    cfg = {"link": "lora", "lora": {"sf": sf}, **extra}
    return NodeSpec(node_id, KEY, rows, 60, 10, cfg, position)


def gateway(gw_id, position, sf=7):
    return NodeSpec(gw_id, b"", [], 60, 1, {"role": "gateway", "lora": {"sf": sf}}, position)


def run(tmp_path, specs):
    sink = SqliteSink(tmp_path / "r.db")
    fleet = Fleet(tmp_path / "fleet", specs, None, heap=LORA_NODE_HEAP, build_dir=tmp_path / "b")
    keys = {s.node_id: s.key for s in specs if s.role == "node"}
    fleet.receiver = receiver = Receiver(Verifier(keys), sink, clock=fleet.clock)
    try:
        results = {r["node_id"]: r for r in fleet.run(timeout_s=120)}
    finally:
        sink.close()
    con = sqlite3.connect(tmp_path / "r.db")
    rows = con.execute("SELECT node_id, ts, quantity, value FROM readings").fetchall()
    con.close()
    return results, rows, receiver, fleet


def stored_times(rows, node_id):
    return sorted({ts for n, ts, _, _ in rows if n == node_id})


def test_nodes_reach_the_host_through_a_gateway(tmp_path):
    specs = [
        lora_node(1, (400, 0), offset=7),
        lora_node(2, (0, 900), offset=31),
        lora_node(3, (-700, -300), offset=47),
        gateway(1000, (0, 0)),
    ]
    results, rows, receiver, fleet = run(tmp_path, specs)
    for spec in specs[:3]:
        times = stored_times(rows, spec.node_id)
        assert len(times) == 60, spec.node_id  # every reading, once
        for (t, *_), ts in zip(spec.rows, times, strict=True):
            assert abs(ts - t) < 1.0  # ages in whole seconds, the frame's airtime subtracted
        stats = results[spec.node_id]["stats"]
        assert stats["pending"] == 0 and stats["airtime_ms"] > 0
    gw = results[1000]["stats"]
    assert gw["forwarded"] >= 3 * 6 and gw["acks_sent"] >= 3 * 6
    assert fleet.air.stats["frames"] > 0
    log = open(results[1]["log"]).read()
    assert "link=lora" in log and "clock synced to host" in log


def test_out_of_range_node_keeps_its_readings(tmp_path):
    specs = [lora_node(4, (50_000, 0), n=30), gateway(1000, (0, 0))]
    results, rows, _, fleet = run(tmp_path, specs)
    assert rows == []
    stats = results[4]["stats"]
    assert stats["sampled"] == 30 and stats["pending"] == 30  # all still in the journal
    assert fleet.air.stats["below_sensitivity"] > 0
    assert "no ack, will retry" in open(results[4]["log"]).read()


def test_daily_airtime_budget_defers_frames_and_loses_nothing(tmp_path):
    # 0.2 s of airtime a day: the boot status frame and a data frame or two, then deferrals.
    specs = [lora_node(5, (300, 0), n=40, airtime_budget_ms=200), gateway(1000, (0, 0))]
    results, rows, _, _ = run(tmp_path, specs)
    stats = results[5]["stats"]
    log = open(results[5]["log"]).read()
    assert stats["deferred"] > 0
    # the governor says how long to wait: the node builds no frame before then (it once tried
    # every cycle, a STATUS frame taking a seq each time)
    assert stats["deferred"] <= 3, stats
    assert "link airtime limit, frame deferred" in log and "reason=daily" in log
    assert stats["airtime_ms"] <= 200
    assert len(stored_times(rows, 5)) + stats["pending"] >= 40  # sent or still kept


def test_two_gateways_hear_one_node_the_host_keeps_one_copy(tmp_path):
    specs = [lora_node(6, (0, 0), n=30), gateway(1000, (200, 0)), gateway(1001, (-200, 0))]
    results, rows, receiver, _ = run(tmp_path, specs)
    assert len(stored_times(rows, 6)) == 30
    assert results[1000]["stats"]["forwarded"] > 0 and results[1001]["stats"]["forwarded"] > 0
    assert receiver.counters["frames_heard_again"] > 0  # the second gateway's copies, quiet


def test_gateway_on_usb_serial_shares_its_console_with_the_log(tmp_path):
    # The gateway's gwlink messages go out on its console between its log lines: the host's
    # framing skips the text and finds every message.
    gw = gateway(1000, (0, 0))
    gw.extra_config["uplink"] = "serial"
    specs = [lora_node(7, (300, 0), n=30, offset=5), gw]
    results, rows, _, _ = run(tmp_path, specs)
    assert len(stored_times(rows, 7)) == 30
    assert results[1000]["stats"]["forwarded"] >= 3
    console = open(results[1000]["log"], errors="replace").read()
    assert "gateway started" in console and "gateway stopped" in console

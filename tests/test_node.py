# The node firmware end to end: real MicroPython processes (NODE_HEAP) on the simulated board,
# frames over loopback UDP to the real receiver and a SQLite file, driven by the fleet simulator.
import json
import os
import re
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import shared_trace

from host_tools.receive.receiver import Receiver, Verifier
from host_tools.receive.sinks import SqliteSink
from host_tools.sim import weather
from host_tools.sim.fleet import NODE_HEAP, NODE_MIN_HEAP, Fleet, FleetError, NodeSpec
from protocols import frame, uplink

KEY = bytes(range(16))
START = 1782864000


def run_fleet(tmp_path, specs, wrap=None, heap=NODE_HEAP):
    sink = SqliteSink(tmp_path / "readings.db")
    fleet = Fleet(
        tmp_path / "fleet", specs, receiver=None, heap=heap, build_dir=tmp_path / "build"
    )
    receiver = Receiver(Verifier({s.node_id: s.key for s in specs}), sink, clock=fleet.clock)
    fleet.receiver = wrap(receiver) if wrap else receiver
    try:
        results = fleet.run(timeout_s=120)
    finally:
        sink.close()
    con = sqlite3.connect(tmp_path / "readings.db")
    rows = con.execute("SELECT node_id, ts, quantity, value FROM readings ORDER BY ts").fetchall()
    con.close()
    return results, rows, receiver


def console(result):
    return open(result["log"]).read()


def generated(n, interval=60, seed=0):
    return weather.generate(START, interval, n, seed=seed)


def test_demo_command_three_nodes_one_day(tmp_path):
    db = tmp_path / "demo.db"
    proc = subprocess.run(
        [sys.executable, "-m", "host_tools.cli", "demo", "--nodes", "3", "--hours", "24"]
        + ["--json", "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["readings_sampled"] == 3 * 24 * 60
    assert s["readings_stored"] == s["readings_sampled"]
    assert s["readings_lost"] == 0 and s["frames_rejected"] == 0
    assert s["frames_sent"] == s["frames_accepted"] == 3 * 24 * 6
    # 0.01 %RH: the BME280's humidity step (1/1024 %RH before rounding), see test_bme280.py
    assert s["max_abs_diff"]["temperature_c"] <= 0.005
    assert s["max_abs_diff"]["humidity_pct"] <= 0.0100001
    assert s["max_abs_diff"]["pressure_hpa"] <= 0.005
    assert s["max_ts_error_s"] <= 0.5
    assert s["bytes_per_reading"] == pytest.approx(s["uplink_bytes"] / s["readings_stored"], 0.01)
    assert s["node_exit_codes"] == [0, 0, 0]
    con = sqlite3.connect(db)
    assert con.execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 3 * 3 * 24 * 60


def test_demo_idle_deep_is_for_wifi_nodes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "host_tools.cli", "demo", "--link", "lora", "--idle", "deep"]
        + ["--db", str(tmp_path / "d.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "citynode: --idle deep is for Wi-Fi nodes (a LoRa node's airtime account would not "
        "survive it)\n"
    )


def test_trace_replay_stores_each_row_at_its_time(tmp_path):
    rows = weather.read_trace(shared_trace("bme280_indoor_1min.csv"))[:300]
    results, stored, _ = run_fleet(tmp_path, [NodeSpec(7, KEY, rows, 60, 10)])
    by_ts = {}
    for node_id, ts, q, v in stored:
        assert node_id == 7
        by_ts.setdefault(ts, {})[q] = v
    times = sorted(by_ts)
    assert len(times) == len(rows)
    for (t, temp, hum, pres), ts in zip(rows, times, strict=True):
        assert abs(ts - t) < 0.5  # the trace's irregular 60/61 s steps survive
        got = by_ts[ts]
        assert got["temperature_c"] == pytest.approx(temp, abs=0.005)
        assert got["humidity_pct"] == pytest.approx(hum, abs=0.0100001)
        assert got["pressure_hpa"] == pytest.approx(pres, abs=0.005)
    assert results[0]["stats"]["sampled"] == len(rows)


def test_node_log_lines_are_greppable(tmp_path):
    results, _, _ = run_fleet(tmp_path, [NodeSpec(3, KEY, generated(25), 60, 10)])
    lines = console(results[0]).splitlines()
    assert lines[0] == "I 0.000 sensor bme280 ready address=0x76"
    assert lines[1].startswith("I 0.000 journal opened ")
    assert lines[2].startswith("I 0.000 node started ")
    assert "node=3" in lines[2] and "fw=" in lines[2] and "boot=1" in lines[2]
    assert re.search(r" uplink=127\.0\.0\.1:\d+$", lines[2])  # where its frames go
    assert any(ln.startswith("I 0.011 link sent status ") for ln in lines[3:5])  # after a sample
    sent = [ln for ln in lines if " link sent frame " in ln]
    assert len(sent) == 3  # 10 + 10 + the 5 flushed when the simulated world ends
    level, uptime, subsystem = sent[0].split()[:3]
    assert (level, subsystem) == ("I", "link") and float(uptime) == pytest.approx(540, abs=1)
    # format v2: the frame carries its readings' indices (the status frame took seq 0)
    assert "first=0 " in sent[0] and "readings=10" in sent[0]
    assert "first=10 " in sent[1]


class ForgeFirstAcks:
    """A receiver whose first n acks are signed with the wrong key (an attacker, or a host
    with a stale registry): the node must reject them and keep its readings."""

    def __init__(self, receiver, n):
        self.receiver, self.n = receiver, n

    def datagram(self, data):
        ack = self.receiver.datagram(data)
        if ack is not None and self.n > 0:
            self.n -= 1
            a = uplink.decode_ack(ack, self.receiver.verifier.signer(uplink.peek(ack)[2]))
            return uplink.encode_ack(frame.Signer(bytes(16)), a.node_id, a.host_time, a.acked)
        return ack

    def __getattr__(self, name):
        return getattr(self.receiver, name)


def test_forged_acks_are_rejected_and_readings_resent(tmp_path):
    results, stored, receiver = run_fleet(
        tmp_path, [NodeSpec(5, KEY, generated(40), 60, 10)], wrap=lambda r: ForgeFirstAcks(r, 2)
    )
    log = console(results[0])
    assert log.count("link ack rejected") == 2
    assert "reason=tag" in log
    assert log.count("no ack, will retry") == 2
    stats = results[0]["stats"]
    assert stats["acks_rejected"] == 2 and stats["frames_sent"] == stats["frames_acked"] + 2
    # Nothing lost and nothing doubled: the resent readings land on the same rows.
    assert len({(n, ts) for n, ts, _, _ in stored}) == 40
    # The refused acks were those of the boot status frame, sent again the next cycle and
    # refused again: no reading was in them, and every data frame was acked the first time.
    assert log.count("link sent status") == 3
    assert receiver.counters["readings_accepted"] == 40


class DropFirst:
    """A host that is down for the first n frames: no ack at all."""

    def __init__(self, receiver, n):
        self.receiver, self.n = receiver, n

    def datagram(self, data):
        if self.n > 0:
            self.n -= 1
            return None
        return self.receiver.datagram(data)

    def __getattr__(self, name):
        return getattr(self.receiver, name)


def test_host_down_readings_kept_until_acked(tmp_path):
    results, stored, _ = run_fleet(
        tmp_path, [NodeSpec(6, KEY, generated(60), 60, 10)], wrap=lambda r: DropFirst(r, 5)
    )
    assert console(results[0]).count("no ack, will retry") == 5
    assert len({ts for _, ts, _, _ in stored}) == 60
    assert results[0]["stats"]["dropped"] == 0


def test_missing_sensor_is_logged_and_node_keeps_running(tmp_path):
    spec = NodeSpec(8, KEY, generated(5), 60, 10, extra_config={"sim": {"bme280": False}})
    results, stored, _ = run_fleet(tmp_path, [spec])
    log = console(results[0])
    assert log.count("E ") >= 5
    assert "sensor bme280: no device at 0x76 (OSError 19)" in log
    assert results[0]["exit_code"] == 0 and stored == []
    assert results[0]["stats"]["sensor_faults"] == 5


def test_bmp280_instead_of_bme280_is_named(tmp_path):
    spec = NodeSpec(9, KEY, generated(3), 60, 10, extra_config={"sim": {"chip_id": 0x58}})
    results, stored, _ = run_fleet(tmp_path, [spec])
    assert "chip id 0x58 at 0x76, expected 0x60 (0x58 is a BMP280" in console(results[0])
    assert results[0]["exit_code"] == 0 and stored == []


def boot_alone(tmp_path, board_build, config_text):
    """Boot the firmware with a given config.json and no simulator; return its first lines."""
    home = tmp_path / "node"
    home.mkdir()
    if config_text is not None:
        (home / "config.json").write_text(config_text)
    env = dict(os.environ, MICROPYPATH=".frozen:%s" % board_build["dir"])
    proc = subprocess.Popen(
        [
            board_build["micropython"],
            "-X",
            "heapsize=" + NODE_HEAP,
            "-c",
            "from firmware import app; app.run()",
        ],
        cwd=home,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        time.sleep(0.3)
        assert proc.poll() is None, "the node halted: " + line + proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    return line.strip()


GOOD = {"node_id": 1, "key": "00" * 16, "board": "sim", "uplink": "127.0.0.1:1700"}


@pytest.mark.parametrize(
    "config_text, message",
    [
        (None, "config: cannot read config.json (not provisioned?)"),
        ("{not json", "config: config.json is not valid JSON"),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "node_id"}),
            "missing required field 'node_id'",
        ),
        (
            json.dumps(dict(GOOD, key="00" * 15)),
            "key must be 32 hex characters (16 bytes), got 30",
        ),
        (json.dumps(dict(GOOD, key="zz" * 16)), "config: key is not hexadecimal"),
        (json.dumps(dict(GOOD, node_id="7")), "config: node_id must be an integer, got '7'"),
        (json.dumps(dict(GOOD, interval_s=0)), "config: interval_s must be 1..86400, got 0"),
        (json.dumps(dict(GOOD, uplink="nowhere")), "config: uplink must be 'host:port'"),
        (json.dumps(dict(GOOD, board="esp99")), "config: unknown board 'esp99'"),
        ("[1, 2]", "config: top level must be a JSON object"),
    ],
)
def test_bad_config_is_reported_and_node_waits(tmp_path, board_build, config_text, message):
    line = boot_alone(tmp_path, board_build, config_text)
    assert line.startswith("E 0.")
    assert " config " in line and message in line and "retry_s=10" in line


def stored_times(stored):
    return sorted({ts for _, ts, _, _ in stored})


def assert_rows_stored(rows, stored, except_near=()):
    """Every row sensed is stored once, at its time (+-0.5 s), but for rows re-sensed after a
    reset (their time moves)."""
    times = stored_times(stored)
    assert len(times) == len(rows)
    for (t, *_), ts in zip(rows, times, strict=True):
        if t not in except_near:
            assert abs(ts - t) < 0.5, (t, ts)


def test_watchdog_resets_a_hung_node_and_nothing_is_lost(tmp_path):
    rows = generated(30)
    faults = {"sim": {"faults": {"hang_at_s": 300}}}
    results, stored, _ = run_fleet(tmp_path, [NodeSpec(11, KEY, rows, 60, 10, faults)])
    log = console(results[0])
    assert results[0]["resets"] == 1
    assert "(sim: injected fault: the driver hangs)" in log
    assert "(sim: watchdog expired, resetting)" in log
    assert "boot=2" in log and "reset_cause=3" in log  # WDT_RESET, as machine.reset_cause()
    # The reading being taken when the driver hung is taken again after the reset, later.
    assert_rows_stored(rows, stored, except_near={rows[5][0]})


def test_crash_is_logged_kept_across_the_reset_and_recovered(tmp_path):
    rows = generated(30)
    faults = {"sim": {"faults": {"crash_at_s": 420}}}
    results, stored, _ = run_fleet(tmp_path, [NodeSpec(12, KEY, rows, 60, 10, faults)])
    log = console(results[0])
    assert results[0]["resets"] == 1
    assert 'node crashed error="sim: injected fault in a driver" exc=RuntimeError' in log
    assert "node log saved before the previous reset follows" in log
    assert "> reset_cause=crash" in log
    assert "reset_cause=5" in log
    # Readings journaled before the crash (not yet a full batch) are sent after the reboot,
    # placed in time through the clock offset the first boot learned from an ack.
    assert_rows_stored(rows, stored, except_near={rows[7][0]})


class RewriteAck:
    """Re-signs the n-th ack after changing it with edit(ack) -> (host_time, acked)."""

    def __init__(self, receiver, n, edit):
        self.receiver, self.n, self.edit, self.count = receiver, n, edit, 0

    def datagram(self, data):
        ack = self.receiver.datagram(data)
        if ack is None:
            return None
        self.count += 1
        if self.count != self.n:
            return ack
        signer = self.receiver.verifier.signer(uplink.peek(ack)[2])
        a = uplink.decode_ack(ack, signer)
        edited = self.edit(a)
        host_time, acked = edited[:2]
        echo = edited[2] if len(edited) > 2 else a.echo
        return uplink.encode_ack(signer, a.node_id, host_time, acked, echo=echo)

    def __getattr__(self, name):
        return getattr(self.receiver, name)


def test_host_clock_jumping_back_does_not_move_timestamps(tmp_path):
    rows = generated(30)
    results, stored, _ = run_fleet(
        tmp_path,
        [NodeSpec(13, KEY, rows, 60, 10)],
        wrap=lambda r: RewriteAck(r, 3, lambda a: (a.host_time - 3600, a.acked)),
    )
    log = console(results[0])
    # one hour back (the offset also absorbs the ms the node was awake)
    assert re.search(r"clock synced to host step_ms=-36000\d\d ", log)
    # Ages come from the node's own ticks; the host stamps with its own clock: a wrong time
    # in one ack does not move any reading.
    assert_rows_stored(rows, stored)


def test_ack_for_readings_never_sent_is_refused(tmp_path):
    rows = generated(30)
    results, stored, _ = run_fleet(
        tmp_path,
        [NodeSpec(14, KEY, rows, 60, 10)],
        wrap=lambda r: RewriteAck(r, 2, lambda a: (a.host_time, [(1000, 1000)])),
    )
    log = console(results[0])
    assert "link ack for another frame first=0" in log
    assert results[0]["stats"]["acks_rejected"] == 1
    assert_rows_stored(rows, stored)


def test_ack_of_another_frame_is_refused_and_sets_no_clock(tmp_path):
    """An ack whose echoed tag is not the frame just sent (an old ack replayed, or one for an
    earlier copy of the same readings) is refused: its host time may be stale."""
    rows = generated(30)
    results, stored, _ = run_fleet(
        tmp_path,
        [NodeSpec(16, KEY, rows, 60, 10)],
        wrap=lambda r: RewriteAck(r, 2, lambda a: (a.host_time - 3600, a.acked, bytes(4))),
    )
    log = console(results[0])
    assert "link ack for another frame first=0" in log
    assert "step_ms=-36" not in log
    assert results[0]["stats"]["acks_rejected"] == 1
    assert_rows_stored(rows, stored)


def test_a_boot_that_never_learned_the_time_is_placed_over_the_rtc_after_a_reset(tmp_path):
    """The host is down until after a crash (or a watchdog reset, or a technician's `mpremote
    ... + reset` after the node stopped at the REPL): the first boot never learns the time, but
    the RTC counted on through the reset, so the next boot places its readings exactly."""
    rows = generated(30)
    faults = {"sim": {"faults": {"crash_at_s": 420}}}
    results, stored, _ = run_fleet(
        tmp_path, [NodeSpec(15, KEY, rows, 60, 10, faults)], wrap=lambda r: DropFirst(r, 7)
    )
    log = console(results[0])
    assert results[0]["resets"] == 1
    assert "without time dropped" not in log
    assert results[0]["stats"]["unplaceable"] == 0
    assert_rows_stored(rows, stored, except_near={rows[7][0]})


def test_readings_from_a_boot_that_never_learned_the_time_are_dropped_after_a_power_cut(
    tmp_path,
):
    """The same, but the power was cut: the RTC restarted, nothing links the two boots."""
    rows = generated(30)
    faults = {"sim": {"faults": {"power_cut_at_s": 420}}}
    results, stored, _ = run_fleet(
        tmp_path, [NodeSpec(15, KEY, rows, 60, 10, faults)], wrap=lambda r: DropFirst(r, 7)
    )
    log = console(results[0])
    assert results[0]["power_cuts"] == 1
    assert "clock readings from a boot without time dropped count=7" in log
    assert results[0]["stats"]["unplaceable"] == 7
    assert len(stored_times(stored)) == len(rows) - 7


def test_readings_dropped_over_several_batches_are_one_log_line(tmp_path):
    # 30 readings of a boot that never learned the time, three frames' worth: one line, not
    # one a batch (a long outage's backlog made 91 identical lines).
    rows = generated(60)
    faults = {"sim": {"faults": {"power_cut_at_s": 1800}}}
    results, stored, _ = run_fleet(
        tmp_path, [NodeSpec(17, KEY, rows, 60, 10, faults)], wrap=lambda r: DropFirst(r, 7)
    )
    log = console(results[0])
    lines = [ln for ln in log.splitlines() if "readings from a boot without time dropped" in ln]
    assert len(lines) == 1 and lines[0].endswith(" count=30"), lines
    assert results[0]["stats"]["unplaceable"] == 30


class StatusHeap:
    """Records the free_heap field of every status frame."""

    def __init__(self, receiver):
        self.receiver, self.free, self.fields = receiver, [], []

    def datagram(self, data):
        if data[0] & 0x0F == frame.TYPE_STATUS:
            signer = self.receiver.verifier.signer(uplink.peek(data)[2])
            fields = uplink.decode_status(data, signer).fields
            self.free.append(fields[3])
            self.fields.append(fields)
        return self.receiver.datagram(data)

    def __getattr__(self, name):
        return getattr(self.receiver, name)


def _with_margin(heap, kb=2):
    return "%dK" % (int(heap.rstrip("K")) + kb)


def test_ten_thousand_cycles_in_the_smallest_node_heap_without_growth(tmp_path):
    rows = generated(10000)
    spec = NodeSpec(16, KEY, rows, 60, 10, {"status_every_s": 60000})
    probe = {}

    def wrap(r):
        probe["p"] = StatusHeap(r)
        return probe["p"]

    # bench/node_cycle.py shows NODE_MIN_HEAP itself; here 2 KB of margin, so that a
    # machine whose heap lays out a little differently does not fail the suite.
    results, stored, _ = run_fleet(tmp_path, [spec], wrap=wrap, heap=_with_margin(NODE_MIN_HEAP))
    free = probe["p"].free
    assert results[0]["resets"] == 0 and results[0]["stats"]["sampled"] == 10000
    assert len(free) == 10  # at boot, then every 1 000 cycles
    steady = free[1:]
    assert max(steady) - min(steady) <= 512, free  # no growth beyond GC noise
    assert len(stored_times(stored)) == 10000


def test_deep_sleep_wakes_each_cycle_as_the_same_boot_and_loses_nothing(tmp_path):
    # config "idle": "deep": after every cycle the board deep sleeps (the process exits) and
    # app.py runs again at the next sample. A wake is not a boot: the boot count stays, the
    # clock counts on, the sequence numbers and counters come back from RTC memory.
    rows = generated(180)
    spec = NodeSpec(18, KEY, rows, 60, 10, {"idle": "deep", "status_every_s": 3600})
    probe = {}

    def wrap(r):
        probe["p"] = StatusHeap(r)
        return probe["p"]

    results, stored, _ = run_fleet(tmp_path, [spec], wrap=wrap)
    r = results[0]
    log = console(r)
    assert r["resets"] == 0 and r["wakes"] == 180  # 179 samples after the first, then the end
    assert r["stats"]["sampled"] == 180 and r["stats"]["pending"] == 0
    assert r["stats"]["frames_acked"] == r["stats"]["frames_sent"] == 18 + 3  # data + status
    assert_rows_stored(rows, stored)  # each at its time: the clock went on through the sleeps
    assert log.count("node started") == 1 and "idle=deep" in log
    assert [f[1] for f in probe["p"].fields] == [1, 1, 1]  # boot count: one boot, 180 wakes
    home = tmp_path / "fleet" / "node-18"
    assert (home / "boot.dat").read_text() == "1\n"
    assert (home / "seq.dat").read_text() == "64\n"  # reserved once, at the boot


def test_a_crash_in_deep_sleep_mode_is_a_new_boot_and_loses_nothing(tmp_path):
    # After a crash the board resets (not a deep-sleep wake): RTC memory is not trusted, the
    # boot count goes up and the sequence counter comes from flash, past every seq used.
    rows = generated(30)
    faults = {"idle": "deep", "sim": {"faults": {"crash_at_s": 420}}}
    results, stored, receiver = run_fleet(tmp_path, [NodeSpec(19, KEY, rows, 60, 10, faults)])
    r = results[0]
    log = console(r)
    assert r["resets"] == 1 and r["wakes"] == 30  # 29 rows after the first, then the end
    assert 'node crashed error="sim: injected fault in a driver"' in log
    assert log.count("node started") == 2 and "boot=2" in log
    rejected = {k: v for k, v in receiver.counters.items() if k.startswith("rejected_") and v}
    assert rejected == {}  # no seq was used twice (a duplicate or a replay)
    assert receiver.counters["frames_accepted"] == 3 and receiver.counters["status_accepted"] == 2
    assert_rows_stored(rows, stored, except_near={rows[7][0]})


def test_a_heap_too_small_to_build_the_node_resets_it_with_a_log_line(tmp_path):
    # Out of heap while the node is built: not a halt at the REPL, not "flash state unusable":
    # a log line, the log saved, a reset (the simulator gives up after 20).
    with pytest.raises(FleetError, match="reset 21 times"):
        run_fleet(tmp_path, [NodeSpec(20, KEY, generated(5), 60, 10)], heap="44K")
    log = (tmp_path / "fleet" / "node-20" / "console.log").read_text()
    cannot = [ln for ln in log.splitlines() if ln.startswith("E 0.000 node cannot start ")]
    assert len(cannot) == 21 and all("memory allocation failed" in ln for ln in cannot)
    assert "exc=MemoryError" in log and "flash state unusable" not in log
    assert "node log saved before the previous reset follows" in log


def test_status_frames_at_boot_then_by_time_and_within_the_hour_of_a_new_fault(tmp_path):
    """A healthy node sends one STATUS frame at boot and then one every status_every_s (two
    days by default): nothing more in three hours. A node whose sensor fails tells it within
    the hour, and again each hour while new faults come, not only two days later."""
    healthy = NodeSpec(21, KEY, generated(180), 60, 10)
    broken = NodeSpec(22, KEY, generated(180), 60, 10, extra_config={"sim": {"bme280": False}})
    probe = {}

    def wrap(r):
        probe["p"] = StatusHeap(r)
        return probe["p"]

    results, _, _ = run_fleet(tmp_path, [healthy, broken], wrap=wrap)
    sent = {r["node_id"]: r["stats"]["status_sent"] for r in results}
    assert sent[21] == 1
    assert 3 <= sent[22] <= 4, sent  # at boot, then at the next full hours of its clock
    faults = sorted(f[8] for f in probe["p"].fields if f[8])
    assert faults == sorted(set(faults)) and faults[-1] >= 120, faults  # told as they grew

"""What one node cycle costs on the MicroPython unix port: heap allocated, CPU time, heap free.

Runs the node's own code (BME280 driver on the register-level simulator, the journal in a
host folder (its flash wear is bench/flash_wear.py's), the frame encoder) for many cycles
inside one MicroPython process with
the node's heap, and prints, per stage: bytes allocated (gc.mem_alloc with the GC paused) and
microseconds of CPU. Then the heap the whole node needs: it boots the real firmware in the
fleet simulator at decreasing heap sizes; and the same for a node whose uplink is MQTT
(firmware/mqtt_link.py over micropython-lib's umqtt.simple, vendored in ../shared, publishing to
a real mosquitto on loopback, a small host peer acking each frame).

    .venv/bin/python bench/node_cycle.py
    .venv/bin/python bench/node_cycle.py --lora [heltec_v3|lilygo_t3_v161|pico_lora_sx1262]
    .venv/bin/python bench/node_cycle.py --sensors bme280,sds011

(`--lora`: only the LoRa node's heap over a simulated day, with the API-level modem, or with a
board's real radio set-up and micropython-lib's driver on the chip model. `--sensors`: only the
heap of a node with these sensors (config "sensors", firmware/sensors.py) over a simulated day.)

x86-64 figures: a 240 MHz ESP32 or 133 MHz RP2040 runs the same bytecode many times slower,
and a 32-bit port's objects are smaller (pointers are 4 bytes, not 8).
"""

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from host_tools import build  # noqa: E402
from host_tools.receive.receiver import Receiver, Verifier  # noqa: E402
from host_tools.receive.sinks import SqliteSink  # noqa: E402
from host_tools.sim import weather  # noqa: E402
from host_tools.sim.fleet import NODE_HEAP, NODE_MIN_HEAP, Fleet, NodeSpec  # noqa: E402
from protocols import frame, uplink  # noqa: E402

CYCLES = 2000
SCRIPT = r"""
import gc, json, time
from boards.sim.bme280 import SimBME280, SimI2C
from firmware.bme280 import BME280
from firmware.journal import Journal
from protocols import frame

sensor = BME280(SimI2C({0x76: SimBME280()}), 0x76, sleep_ms=lambda ms: None)
journal = Journal("journal")
signer = frame.Signer(bytes(16))
buf = bytearray(frame.MAX_FRAME)
stages = {"read": [0, 0], "append": [0, 0], "send": [0, 0]}
low = gc.mem_free()
seq = 0

def measure(name, fn):
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    t = time.ticks_us()
    out = fn()
    dt = time.ticks_diff(time.ticks_us(), t)
    stages[name][0] += gc.mem_alloc() - a
    stages[name][1] += dt
    gc.enable()
    return out

def send():
    global seq
    rows = journal.peek(10)
    ages = [(9 - i) * 60 for i in range(len(rows))]
    data = frame.encode_data(signer, 17, seq, frame.BME280_CHANNELS, [r[2] for r in rows],
                             ages, buf)
    journal.ack(len(rows))
    seq += 1
    return data

for k in range(CYCLES):
    values = measure("read", sensor.read)
    measure("append", lambda: journal.append(1, k * 60000, values))
    if k % 10 == 9:
        measure("send", send)
    if k % 100 == 0:
        gc.collect()
        low = min(low, gc.mem_free())
print(json.dumps({"stages": stages, "low_free": low}))
"""


def per_cycle(cycles):
    build_dir = Path(tempfile.mkdtemp(prefix="citynode-bench-"))
    build.build(build_dir)  # the journal's folder is made here too
    proc = subprocess.run(
        [
            build.tool("micropython"),
            "-X",
            "heapsize=" + NODE_HEAP,
            "-c",
            SCRIPT.replace("CYCLES", str(cycles)),
        ],
        cwd=build_dir,
        env={"MICROPYPATH": ".frozen:%s" % build_dir},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        sys.exit("node_cycle: MicroPython failed:\n" + proc.stdout[-2000:] + proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def smallest_heap():
    """The smallest heap (KB) in which the real node boots and runs a simulated day."""
    results = {}
    for kb in (54, 56, 58, 60, 62, 64, 66, 80):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "host_tools.cli",
                    "demo",
                    "--nodes",
                    "1",
                    "--hours",
                    "24",
                    "--json",
                    "--db",
                    str(Path(tmp) / "d.db"),
                    "--heap",
                    "%dK" % kb,
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=300,
            )
        summary = json.loads(proc.stdout) if proc.returncode == 0 else {}
        ok = summary.get("readings_stored") == 24 * 60 and summary.get("node_resets") == 0
        results[kb] = ok
    return results


def _probed_run(specs, key, heap, timeout_s):
    """Run the fleet of specs (the first is the measured node, node id 16) into SQLite:
    (its resets, or the FleetError of a node that kept resetting; readings stored; the
    free_heap field of each of its status frames)."""
    free = []
    with tempfile.TemporaryDirectory() as tmp:
        sink = SqliteSink(Path(tmp) / "r.db")
        fleet = Fleet(Path(tmp) / "fleet", specs, receiver=None, heap=heap)
        receiver = Receiver(Verifier({16: key}), sink, clock=fleet.clock)

        class Probe:  # the free_heap field of every status frame, then the receiver's work
            def datagram(self, data, **kw):
                if data[0] & 0x0F == frame.TYPE_STATUS:
                    free.append(uplink.decode_status(data, frame.Signer(key)).fields[3])
                return receiver.datagram(data, **kw)

            def __getattr__(self, name):
                return getattr(receiver, name)

        fleet.receiver = Probe()
        try:
            resets = fleet.run(timeout_s=timeout_s)[0]["resets"]
        except Exception as e:  # a node that keeps resetting: FleetError
            resets = str(e)
        finally:
            sink.close()
        con = sqlite3.connect(Path(tmp) / "r.db")
        stored = con.execute("SELECT COUNT(DISTINCT ts) FROM readings").fetchone()[0]
        con.close()
    return resets, stored, free


def ten_thousand_cycles(heap, cycles=10000):
    """The real node (firmware/app.py) on the simulated board for `cycles` one-minute cycles
    in `heap`: (resets, readings stored, free heap in its status frames every 1 000 cycles)."""
    rows = weather.generate(1782864000, 60, cycles, seed=0)
    key = bytes(range(16))
    spec = NodeSpec(16, key, rows, 60, 10, {"status_every_s": 60000})
    return _probed_run([spec], key, heap, timeout_s=600)


UMQTT = ROOT.parent / "shared/vendor/micropython-lib/micropython/umqtt.simple/umqtt/simple.py"


def _mosquitto(tmp):
    """A real mosquitto on a free loopback port: (process, port), or None if not installed."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(binary, os.X_OK):
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = Path(tmp) / "mosquitto.conf"
    conf.write_text("listener %d 127.0.0.1\nallow_anonymous true\n" % port)
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def mqtt_day(heap, cycles=1440):
    """The real node with uplink mqtt://, a simulated day in `heap`: (resets, readings acked,
    free heap in its status frames at boot and every 120 cycles); None without a broker."""
    import paho.mqtt.client as paho

    rows = weather.generate(1782864000, 60, cycles, seed=0)
    key = bytes(range(16))
    free, acked = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        broker = _mosquitto(tmp)
        if broker is None or not UMQTT.exists():
            return None
        build_dir = Path(tmp) / "build"  # the node's /lib: ours, and umqtt as mip installs it
        (build_dir / "umqtt").mkdir(parents=True)
        subprocess.run(
            [build.tool("mpy-cross"), "-s", "umqtt/simple.py", "-o"]
            + [str(build_dir / "umqtt" / "simple.mpy"), str(UMQTT)],
            check=True,
        )
        config = {"uplink": "mqtt://127.0.0.1:%d" % broker[1], "status_every_s": 7200}
        spec = NodeSpec(16, key, rows, 60, 10, config)
        fleet = Fleet(Path(tmp) / "fleet", [spec], receiver=None, heap=heap, build_dir=build_dir)
        signer = frame.Signer(key)
        ready = threading.Event()

        def on_message(client, userdata, message):  # the host: verify, ack on the down topic
            data = bytes(message.payload)
            got = uplink.decode(data, signer)
            if isinstance(got, uplink.Status):
                free.append(got.fields[3])
                ranges = []
            else:
                last = got.index + len(got.readings) - 1
                acked.update(range(got.index, last + 1))
                ranges = [(got.index, last)]
            ack = uplink.encode_ack(signer, 16, int(fleet.clock()), ranges, echo=data[-4:])
            client.publish("citynode/down/16", ack)

        host = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        host.on_connect = lambda c, *a: (c.subscribe("citynode/up/+"), ready.set())
        host.on_message = on_message
        host.connect("127.0.0.1", broker[1])
        host.loop_start()
        try:
            ready.wait(10)
            resets = fleet.run(timeout_s=600)[0]["resets"]
        except Exception as e:  # a node that keeps resetting: FleetError
            resets = str(e)
        finally:
            host.loop_stop()
            broker[0].terminate()
            broker[0].wait()
    return resets, len(acked), free


def lora_day(heap, radio, hours=24):
    """A LoRa node (link "lora", SF7, frames of 10) for `hours` of one-minute cycles in `heap`,
    its radio either the API-level modem (radio None) or a board's real set-up with
    micropython-lib's driver on the chip model ("sim": {"radio": radio}); one gateway node
    with the API-level modem acks it (the node's heap is what is measured). Returns (resets,
    readings stored, free heap in its status frames every 120 cycles)."""
    cycles = int(hours * 60)
    rows = weather.generate(1782864000, 60, cycles, seed=0)
    key = bytes(range(16))
    extra = {"link": "lora", "lora": {"sf": 7}, "status_every_s": 7200}
    if radio:
        extra["sim"] = {"radio": radio}
    node = NodeSpec(16, key, rows, 60, 10, extra, (300.0, 0.0))
    gw = NodeSpec(1000, b"", [], 60, 1, {"role": "gateway", "lora": {"sf": 7}}, (0.0, 0.0))
    return _probed_run([node, gw], key, heap, timeout_s=900)


def main_lora(radio):
    """`--lora [BOARD]`: the LoRa node's heap, API-level modem or a board's real driver."""
    what = "%s's radio set-up, micropython-lib's driver" % radio if radio else "API-level modem"
    print("## LoRa node heap (%s): a simulated day, SF7, frames of 10\n" % what)
    sizes = (96, 104, 112, 128, 136, 144, 152, 160) if radio else (60, 64, 68, 72, 80, 88, 96)
    for kb in sizes:
        resets, stored, free = lora_day("%dK" % kb, radio)
        print(
            "- %dK: resets %s, readings stored %d of 1440, free heap in the status frames (boot,"
            " then every 120 cycles) %s" % (kb, resets, stored, free)
        )


def pm_day(heap, sensors, hours=24):
    """`citynode demo --sensors ...` for one node in `heap`: (readings stored, PM readings
    stored, resets, exit codes, free heap after the final collection)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "host_tools.cli", "demo", "--nodes", "1", "--hours"]
            + [str(hours), "--sensors", sensors, "--json", "--heap", heap]
            + ["--db", str(Path(tmp) / "d.db"), "--workdir", str(Path(tmp) / "w")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        log = (Path(tmp) / "w" / "node-1" / "console.log").read_text(errors="replace")
    free = [int(w.split("=")[1]) for w in log.split() if w.startswith("free_heap=")]
    s = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}
    return (
        s.get("readings_stored"),
        s.get("pm_readings_stored"),
        s.get("node_resets"),
        s.get("node_exit_codes"),
        free[-1] if free else None,
    )


def main_pm(sensors):
    """`--sensors LIST`: the heap a node with these sensors needs for a simulated day."""
    print("## Node heap with %s: a simulated day (demo --sensors %s)\n" % (sensors, sensors))
    for kb in (60, 62, 64, 66, 68, 72, 80):
        stored, pm_stored, resets, codes, free = pm_day("%dK" % kb, sensors)
        if stored is None:
            print("- %dK: no: the node resets in a loop (MemoryError), the demo gives up" % kb)
            continue
        print(
            "- %dK: readings stored %s of 1440 (with PM %s), resets %s, exit codes %s, free heap "
            "at the end %s" % (kb, stored, pm_stored, resets, codes, free)
        )


def main():
    if "--sensors" in sys.argv:
        main_pm(sys.argv[sys.argv.index("--sensors") + 1])
        return
    if "--lora" in sys.argv:
        rest = sys.argv[sys.argv.index("--lora") + 1 :]
        main_lora(rest[0] if rest else None)
        return
    r = per_cycle(CYCLES)
    sends = CYCLES // 10
    print("## Node cycle (bench/node_cycle.py), %d cycles, heap %s\n" % (CYCLES, NODE_HEAP))
    print("| stage | bytes allocated each | us CPU each (x86-64) |")
    print("|---|---:|---:|")
    for name, n in (("read", CYCLES), ("append", CYCLES), ("send", sends)):
        alloc, us = r["stages"][name]
        print("| %s | %.0f | %.0f |" % (name, alloc / n, us / n))
    total_alloc = sum(v[0] for v in r["stages"].values()) / CYCLES
    total_us = sum(v[1] for v in r["stages"].values()) / CYCLES
    print("| per cycle (send every 10th) | %.0f | %.0f |" % (total_alloc, total_us))
    print("\nlowest free heap during the run: %d bytes" % r["low_free"])
    print("\n## Node heap: does the real node run a simulated day in this heap?\n")
    for kb, ok in smallest_heap().items():
        print("- %dK: %s" % (kb, "yes" if ok else "no"))
    print(
        "\n## Node heap: 10 000 cycles without heap growth (NODE_MIN_HEAP %s; issue 3's "
        "target is 64K)\n" % NODE_MIN_HEAP
    )
    for heap in (NODE_MIN_HEAP, "64K"):
        resets, stored, free = ten_thousand_cycles(heap)
        steady = free[1:]
        grow = (max(steady) - min(steady)) if steady else None
        print(
            "- %s: resets %s, readings stored %d of 10000, free heap in the status frames (boot,"
            " then every 1 000 cycles) %s, spread after boot %s bytes"
            % (heap, resets, stored, free, grow)
        )
    print("\n## MQTT node heap: a simulated day over a real mosquitto (firmware/mqtt_link.py)\n")
    for kb in (60, 62, 64, 66, 68, 72, 80):
        run = mqtt_day("%dK" % kb)
        if run is None:
            print("- skipped: no mosquitto, or no vendored umqtt.simple at %s" % UMQTT)
            break
        resets, acked, free = run
        print(
            "- %dK: resets %s, readings acked %d of 1440, free heap in the status frames (boot,"
            " then every 120 cycles) %s" % (kb, resets, acked, free)
        )


if __name__ == "__main__":
    main()

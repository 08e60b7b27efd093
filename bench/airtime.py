"""LoRa airtime per reading, readings a day within the EU868 limits, and delivery under load.

1. Airtime per reading at SF7 and SF12 of our DATA frames on both real traces (batches of 1 to 50
   readings, every frame decoded back and checked), beside CayenneLPP over LoRaWAN, all with one
   formula (firmware/airtime.py, the node's own) and one radio setting: 125 kHz, CR 4/5, 8-symbol
   preamble, explicit header, CRC on.
2. Readings a day a node can send within a 1 % duty cycle, and within 30 s of airtime a day:
   measured by driving the firmware's airtime governor with a sender that always has the trace's
   next frame ready, for 24 simulated hours on one 1 % sub-band.
3. Delivery ratio under collision load: host_tools/sim/air.py's medium, one gateway listening on
   three channels and every SF, 10 to 500 nodes in a 3.5 km disk (SF by distance), each sending a
   frame every 60-600 s through its own governor.

Run as `python bench/airtime.py` (`--quick` for a smoke run, `--json` for machine output).
"""

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from frame_size import (  # noqa: E402
    KEY,
    LORAWAN_OVERHEAD,
    SETTINGS,
    TRACES,
    CodecMismatch,
    batches,
    encode_batch,
    smallest_batch,
)
from peers import CAYENNE_LPP_SIZE, time_on_air_s  # noqa: E402

from firmware.airtime import Governor, time_on_air_us  # noqa: E402
from host_tools.sim import air  # noqa: E402
from host_tools.sim.weather import read_trace  # noqa: E402
from protocols.frame import Signer  # noqa: E402
from protocols.uplink import decode_data  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
BATCHES = (1, 5, 10, 20, 30, 50)
SFS = (7, 12)
CHANNEL = 868100  # 868.0-868.6 MHz, 1 %
DAILY_BUDGET_MS = 30_000  # public networks' fair use
TARGET_SF12_MS = 150.0
LPP_LORAWAN_BYTES = CAYENNE_LPP_SIZE + LORAWAN_OVERHEAD  # 24 B (FIELD.md)
DAY_MS = 86_400_000
NODE_COUNTS = (10, 50, 100, 200, 500)
LOAD_CHANNELS = (868100, 868300, 868500)
LOAD_RADIUS_M = 3500.0
LOAD_MARGIN_DB = 3.0  # SF chosen so the median signal is this far above the sensitivity
LOAD_HOURS = 2.0


def lora_cfg(sf):
    return {
        "sf": sf,
        "bw": "125",
        "coding_rate": 5,
        "preamble_len": 8,
        "implicit_header": False,
        "crc_en": True,
    }


def airtime_ms(size, sf):
    return time_on_air_us(lora_cfg(sf), size) / 1000


# --- 1. airtime per reading ---------------------------------------------------------------


def frame_sizes(rows, size):
    """Sizes of the trace's frames of `size` readings ("typical" node id and seq), each one
    decoded back and compared with what was encoded (CodecMismatch if not)."""
    signer = Signer(KEY)
    node_id, seq0 = SETTINGS["typical"]
    sizes = []
    for i, batch in enumerate(batches(rows, size)):
        frame, readings, ages = encode_batch(signer, node_id, seq0 + i, batch)
        got = decode_data(frame, signer)
        if [tuple(r) for r in got.readings] != readings or list(got.ages) != ages:
            raise CodecMismatch("frame %d of %d readings does not decode back" % (i, size))
        sizes.append(len(frame))
    return sizes


def per_reading(sizes, size):
    out = {"size": size, "frames": len(sizes), "mean_bytes": sum(sizes) / len(sizes)}
    out["max_bytes"] = max(sizes)
    for sf in SFS:
        total = sum(airtime_ms(n, sf) for n in sizes)
        out["sf%d_ms" % sf] = total / (len(sizes) * size)
        # the same with bench/peers.py's float formula: the two must agree
        check = sum(time_on_air_s(n, sf) for n in sizes) * 1000 / (len(sizes) * size)
        if abs(check - out["sf%d_ms" % sf]) > 1e-6:
            raise AssertionError("airtime formulas disagree: %r vs %r" % (check, out))
    return out


# --- 2. readings a day ----------------------------------------------------------------------


def readings_per_day(sizes, size, sf, budget_ms=None):
    """Readings sent in 24 h by a node that always has its next frame (sizes, cycled) ready,
    governed by firmware/airtime.py on one 1 % sub-band (and a daily budget if given)."""
    t = [0]
    g = Governor(lambda: t[0], daily_budget_ms=budget_ms)
    sent = 0
    i = 0
    while True:
        us = time_on_air_us(lora_cfg(sf), sizes[i % len(sizes)])
        w = g.can_send(CHANNEL, us)
        if w < 0:
            return 0  # a frame longer than the limits allow
        t[0] += w
        if t[0] + us / 1000 > DAY_MS:
            return sent * size
        g.record(CHANNEL, us)
        sent += 1
        t[0] += (us + 999) // 1000  # the radio is busy while it sends
        i += 1


# --- 3. delivery under load -----------------------------------------------------------------


def choose_sf(medium, node, gateway):
    """The smallest SF whose sensitivity the node's median signal beats by LOAD_MARGIN_DB."""
    loss = medium.path_loss.loss_db(medium.distance_m(node, gateway))
    for sf in range(7, 13):
        if 14 - loss >= air.sensitivity_dbm(sf, 125) + LOAD_MARGIN_DB:
            return sf
    return 12


def delivery_under_load(n_nodes, payload_len, hours=LOAD_HOURS, seed=1):
    rng = random.Random(seed)
    m = air.Medium(seed=seed)
    m.add_radio("gw", 0.0, 0.0)
    for f in LOAD_CHANNELS:
        for sf in range(7, 13):
            m.listen("gw", f, sf)
    nodes = []
    for i in range(n_nodes):
        r = LOAD_RADIUS_M * math.sqrt(rng.random())  # uniform over the disk
        a = rng.uniform(0, 2 * math.pi)
        m.add_radio(i, r * math.cos(a), r * math.sin(a))
        period_ms = rng.uniform(60_000, 600_000)
        clock = [0]
        nodes.append(
            {
                "id": i,
                "sf": choose_sf(m, i, "gw"),
                "period": period_ms,
                "next": rng.uniform(0, period_ms),  # when its next frame is ready, ms
                "clock": clock,
                "gov": Governor(lambda c=clock: c[0]),
                "deferred": 0,
            }
        )
    end_ms = hours * 3_600_000
    sent = delivered = 0
    offered = {sf: 0.0 for sf in range(7, 13)}  # airtime offered per SF, for ALOHA's estimate
    events = sorted((n["next"], n["id"]) for n in nodes)
    import heapq

    heapq.heapify(events)
    payload = bytes(payload_len)
    last_resolve = 0
    while events:
        t_ms, i = heapq.heappop(events)
        if t_ms > end_ms:
            break
        node = nodes[i]
        node["clock"][0] = int(t_ms)
        freq = rng.choice(LOAD_CHANNELS)
        us = air.time_on_air_us(payload_len, node["sf"])
        w = node["gov"].can_send(freq, us)
        if w > 0:  # the node's governor defers the frame: it goes when allowed
            node["deferred"] += 1
            heapq.heappush(events, (t_ms + w, i))
            continue
        if t_ms - last_resolve > 60_000:
            for got in m.deliveries(int(t_ms * 1000)).values():
                delivered += len(got)
            last_resolve = t_ms
        m.transmit(i, int(t_ms * 1000), freq, node["sf"], 125, payload, 14)
        node["gov"].record(freq, us)
        sent += 1
        offered[node["sf"]] += us / 1000
        nxt = t_ms + node["period"] * rng.uniform(0.9, 1.1)
        heapq.heappush(events, (max(nxt, t_ms + us / 1000 + 1), i))
    for got in m.deliveries(int(end_ms * 1000 + 60_000_000)).values():
        delivered += len(got)
    # pure ALOHA without capture, per channel and SF: P(success) = exp(-2G)
    aloha = 0.0
    for sf, ms in offered.items():
        g_load = ms / (end_ms * len(LOAD_CHANNELS))
        share = sum(1 for n in nodes if n["sf"] == sf)
        aloha += share * math.exp(-2 * g_load)
    sf_mix = {sf: sum(1 for n in nodes if n["sf"] == sf) for sf in range(7, 13)}
    return {
        "nodes": n_nodes,
        "frames": sent,
        "delivered": delivered,
        "ratio": delivered / sent if sent else float("nan"),
        "aloha": aloha / n_nodes,
        "collisions": m.stats["collision"],
        "below_sensitivity": m.stats["below_sensitivity"],
        "deferred": sum(n["deferred"] for n in nodes),
        "sf_mix": sf_mix,
    }


# --- report ---------------------------------------------------------------------------------


def run(quick=False):
    out = {"traces": {}, "lpp": {}}
    for sf in SFS:
        out["lpp"]["sf%d_ms" % sf] = airtime_ms(LPP_LORAWAN_BYTES, sf)
        out["lpp"]["day_duty_sf%d" % sf] = readings_per_day([LPP_LORAWAN_BYTES], 1, sf)
        out["lpp"]["day_budget_sf%d" % sf] = readings_per_day(
            [LPP_LORAWAN_BYTES], 1, sf, DAILY_BUDGET_MS
        )
    for label, filename in TRACES:
        path = SHARED_DATA / filename
        if not path.exists():
            out["traces"][label] = {"missing": str(path)}
            continue
        rows = read_trace(path)
        if quick:
            rows = rows[:600]
        results = []
        for size in BATCHES:
            sizes = frame_sizes(rows, size)
            r = per_reading(sizes, size)
            for sf in SFS:
                r["day_duty_sf%d" % sf] = readings_per_day(sizes, size, sf)
                r["day_budget_sf%d" % sf] = readings_per_day(sizes, size, sf, DAILY_BUDGET_MS)
            results.append(r)
        gaps = sorted(b[0] - a[0] for a, b in zip(rows, rows[1:], strict=False))
        interval = gaps[len(gaps) // 2]  # the sampling interval (the traces have logging gaps)
        out["traces"][label] = {
            "file": filename,
            "readings": len(rows),
            "per_day_needed": 86400 / interval,
            "results": results,
            # every batch size, not only the listed ones (bench/frame_size.py's search)
            "smallest_batch_sf12": smallest_batch(rows, TARGET_SF12_MS, sf=12, start=1),
        }
    counts = NODE_COUNTS[:3] if quick else NODE_COUNTS
    hours = 0.25 if quick else LOAD_HOURS
    out["load"] = [delivery_under_load(n, 36, hours) for n in counts]
    out["load_payload"] = 36
    out["load_hours"] = hours
    return out


def target_batch(trace):
    """The smallest batch measured whose SF12 airtime per reading meets the target."""
    for r in trace["results"]:
        if r["sf12_ms"] <= TARGET_SF12_MS:
            return r
    return None


def report(out):
    lpp = out["lpp"]
    print("LoRa airtime per reading: 125 kHz, CR 4/5, 8-symbol preamble, explicit header, CRC on")
    print("(firmware/airtime.py; CayenneLPP over LoRaWAN = %d B a reading)\n" % LPP_LORAWAN_BYTES)
    for label, trace in out["traces"].items():
        if "missing" in trace:
            print("%s: trace %s not found, skipped\n" % (label, trace["missing"]))
            continue
        print(
            "%s (%s, %d readings, a node sampling as it did sends %.0f a day):\n"
            % (label, trace["file"], trace["readings"], trace["per_day_needed"])
        )
        print(
            "| readings/frame | frames | mean B | max B | SF7 ms/reading | SF12 ms/reading "
            "| readings/day 1 % SF7 | 1 % SF12 | 30 s/day SF7 | 30 s/day SF12 |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in trace["results"]:
            print(
                "| %d | %d | %.2f | %d | %.1f | %.1f | %d | %d | %d | %d |"
                % (
                    r["size"],
                    r["frames"],
                    r["mean_bytes"],
                    r["max_bytes"],
                    r["sf7_ms"],
                    r["sf12_ms"],
                    r["day_duty_sf7"],
                    r["day_duty_sf12"],
                    r["day_budget_sf7"],
                    r["day_budget_sf12"],
                )
            )
        print(
            "| CayenneLPP/LoRaWAN, 1 | | %d | %d | %.1f | %.1f | %d | %d | %d | %d |\n"
            % (
                LPP_LORAWAN_BYTES,
                LPP_LORAWAN_BYTES,
                lpp["sf7_ms"],
                lpp["sf12_ms"],
                lpp["day_duty_sf7"],
                lpp["day_duty_sf12"],
                lpp["day_budget_sf7"],
                lpp["day_budget_sf12"],
            )
        )
    print(
        "Delivery under load: %d nodes max in a %.1f km disk, one gateway on %d channels x SF7-12,"
        % (max(r["nodes"] for r in out["load"]), LOAD_RADIUS_M / 1000, len(LOAD_CHANNELS))
    )
    print(
        "%d-byte frames every 60-600 s per node (each through its own 1 %% governor), "
        "%.2g simulated hours, Hata urban path loss, 6 dB capture:\n"
        % (out["load_payload"], out["load_hours"])
    )
    print(
        "| nodes | SF7..SF12 nodes | frames | delivered | ratio | pure ALOHA | collisions | "
        "deferred |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in out["load"]:
        mix = "/".join(str(r["sf_mix"][sf]) for sf in range(7, 13))
        print(
            "| %d | %s | %d | %d | %.3f | %.3f | %d | %d |"
            % (
                r["nodes"],
                mix,
                r["frames"],
                r["delivered"],
                r["ratio"],
                r["aloha"],
                r["collisions"],
                r["deferred"],
            )
        )
    print()
    ok = True
    for label, trace in out["traces"].items():
        if "missing" in trace:
            continue
        hit = target_batch(trace)
        if hit is None:
            ok = False
            print(
                "FAIL %s: no batch up to %d reaches <= %.0f ms a reading at SF12"
                % (label, BATCHES[-1], TARGET_SF12_MS)
            )
        else:
            print(
                "PASS %s: <= %.0f ms a reading at SF12 from %d readings a frame (exactly: from "
                "%s); at %d, %.1f ms, %.1fx better than CayenneLPP over LoRaWAN's %.1f ms"
                % (
                    label,
                    TARGET_SF12_MS,
                    hit["size"],
                    trace["smallest_batch_sf12"],
                    hit["size"],
                    hit["sf12_ms"],
                    lpp["sf12_ms"] / hit["sf12_ms"],
                    lpp["sf12_ms"],
                )
            )
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a slice of each trace, fewer nodes")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = run(quick=args.quick)
    if args.json:
        print(json.dumps(out, indent=1, sort_keys=True))
    else:
        report(out)
        print("(%.1f s)" % (time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())

# firmware/airtime.py: time on air against FIELD.md's table, Semtech's calculator (as quoted in
# micropython-lib's lora tests) and bench/peers.py's float formula; the governor's limits checked
# by brute force over long randomised runs, on CPython and on the MicroPython unix port (64 KB
# heap, .mpy build), which must take exactly the same decisions; no allocation when it decides.

import bisect
import json
import math
import random
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import airtime
from firmware.airtime import (
    EU868,
    NEVER,
    Governor,
    best_batch,
    symbol_us,
    time_on_air_us,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from peers import time_on_air_s  # noqa: E402

LORAWAN = {"sf": 12, "bw": "125", "coding_rate": 5, "preamble_len": 8}  # + explicit, CRC on
HOUR = 3_600_000
DAY = 86_400_000


# --- time on air --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, sf7_ms, sf12_ms",
    # FIELD.md "LoRa time on air": BW 125 kHz, CR 4/5, 8-symbol preamble, explicit header, CRC
    [(10, 41.2, 991), (20, 56.6, 1319), (24, 61.7, 1483), (51, 102.7, 2466), (100, 174.3, 3940)],
)
def test_time_on_air_matches_field_table(payload, sf7_ms, sf12_ms):
    sf7 = time_on_air_us(dict(LORAWAN, sf=7), payload) / 1000
    sf12 = time_on_air_us(LORAWAN, payload) / 1000
    assert abs(sf7 - sf7_ms) <= 0.05
    assert abs(sf12 - sf12_ms) <= 0.5


# Semtech's "SX1261 LoRa Calculator" values that micropython-lib's tests/test_time_on_air.py
# quotes (the same formula as the SX1276's for SF7..12): (sf, bw, coding_rate, preamble,
# payload, explicit header, crc) -> time on air in ms.
CALCULATOR = [
    (12, "500", 5, 8, 1, True, True, 206.848),
    (12, "500", 5, 12, 64, True, True, 649.216),
    (12, "500", 5, 8, 1, True, False, 165.888),
    (12, "500", 5, 8, 192, True, True, 1476.608),
    (12, "500", 5, 12, 16, False, False, 280.576),
    (8, "125", 6, 8, 1, True, True, 53.760),
    (8, "125", 6, 8, 3, True, True, 66.048),
    (8, "125", 6, 8, 253, True, False, 827.904),
    (8, "125", 6, 12, 10, False, True, 86.528),
    (8, "125", 6, 12, 253, False, True, 823.808),
]


@pytest.mark.parametrize("sf, bw, cr, pre, pl, explicit, crc, ms", CALCULATOR)
def test_time_on_air_matches_semtech_calculator(sf, bw, cr, pre, pl, explicit, crc, ms):
    cfg = {
        "sf": sf,
        "bw": bw,
        "coding_rate": cr,
        "preamble_len": pre,
        "implicit_header": not explicit,
        "crc_en": crc,
    }
    assert time_on_air_us(cfg, pl) == round(ms * 1000)


@settings(max_examples=400, deadline=None)
@given(
    sf=st.integers(6, 12),
    bw=st.sampled_from([125, 250, 500]),
    cr=st.integers(5, 8),
    pre=st.integers(6, 64),
    ih=st.booleans(),
    crc=st.booleans(),
    pl=st.integers(0, 255),
)
def test_time_on_air_agrees_with_the_float_formula(sf, bw, cr, pre, ih, crc, pl):
    cfg = {
        "sf": sf,
        "bw": bw,
        "coding_rate": cr,
        "preamble_len": pre,
        "implicit_header": ih,
        "crc_en": crc,
    }
    expected = time_on_air_s(
        pl, sf, bw * 1000, cr - 4, pre, explicit_header=not ih, crc=crc
    )  # peers.py: DE on above 16 ms symbols; ours from 16 ms: no symbol is exactly 16 ms here
    assert abs(time_on_air_us(cfg, pl) - expected * 1e6) < 0.01


def test_time_on_air_defaults_are_the_micropython_lib_drivers():
    # SF7, 125 kHz, 4/5, a 12-symbol preamble, explicit header, CRC on
    assert time_on_air_us({}, 20) == time_on_air_us(
        {"sf": 7, "bw": "125", "coding_rate": 5, "preamble_len": 12}, 20
    )
    # FIELD.md: the 4 extra preamble symbols cost 131 ms a frame at SF12
    assert time_on_air_us({"sf": 12}, 20) - time_on_air_us(LORAWAN, 20) == 4 * 32768


def test_bandwidth_spellings_and_symbol_time():
    for bw in (125, "125", 125.0):
        assert symbol_us({"sf": 12, "bw": bw}) == 32768
    assert symbol_us({"sf": 7, "bw": "7.8"}) == 16384  # 128 / 7.8125 kHz
    assert symbol_us({"sf": 7, "bw": 62.5}) == 2048
    # low data rate optimisation follows the symbol time, not the SF alone
    assert time_on_air_us({"sf": 11, "bw": "250"}, 50) < time_on_air_us({"sf": 11}, 50) / 2 + 1


@pytest.mark.parametrize(
    "cfg, pl, message",
    [
        ({"sf": 5}, 10, "sf must be 6..12"),
        ({"sf": 13}, 10, "sf must be 6..12"),
        ({"bw": 100}, 10, "not a LoRa bandwidth"),
        ({"coding_rate": 1}, 10, "coding_rate must be 5..8"),
        ({"preamble_len": 2}, 10, "preamble_len must be 6..65535"),
        ({}, 256, "payload_len must be 0..255"),
        ({}, -1, "payload_len must be 0..255"),
    ],
)
def test_time_on_air_rejects_bad_settings(cfg, pl, message):
    with pytest.raises(ValueError, match=message):
        time_on_air_us(cfg, pl)


# --- governor: exact waits ----------------------------------------------------------------


class Clock:
    def __init__(self, t=0):
        self.t = t

    def __call__(self):
        return self.t


def test_off_time_is_t_air_over_duty_cycle_rounded_up_to_the_ms():
    clock = Clock(1000)
    g = Governor(clock)
    t_air = time_on_air_us(LORAWAN, 24)  # 1 482 752 us
    assert g.can_send(868100, t_air) == 0
    g.record(868100, t_air)
    closed = 148_276  # 1 482.752 ms * 100 = 148 275.2 ms, rounded up
    assert g.can_send(868300, t_air) == closed  # same sub-band
    assert g.reason == "off_time" and g.deferrals == 1 and g.deferred_ms == closed
    clock.t = 1000 + closed - 1
    assert g.can_send(868500, t_air) == 1
    clock.t = 1000 + closed
    assert g.can_send(868100, t_air) == 0
    assert g.deferred_off_time == 2 and g.frames == 1 and g.airtime_ms == 1483


def test_sub_bands_are_governed_separately_with_their_own_duty_cycle():
    clock = Clock()
    g = Governor(clock)
    t_air = 100_000  # 100 ms
    g.record(868100, t_air)  # 1 %
    assert g.can_send(867100, t_air) == 0  # 865-868 MHz, another 1 % band
    assert g.can_send(869525, t_air) == 0
    g.record(869525, t_air)  # 10 %: closed for 1 s
    assert g.can_send(869525, t_air) == 1000
    g.record(868800, t_air)  # 0.1 %: closed for 100 s
    assert g.can_send(868900, t_air) == 100_000
    assert g.can_send(868100, t_air) == 10_000


@pytest.mark.parametrize("freq", [862_000, 868_650, 869_300, 870_000])
def test_frequencies_outside_the_sub_bands_are_refused(freq):
    g = Governor(Clock())
    with pytest.raises(ValueError, match="%d kHz is in no sub-band" % freq):
        g.can_send(freq, 1000)


def test_the_hourly_rule_closes_the_gap_the_off_time_leaves():
    # 0.7 s frames every 70 s (the off-time) would put 52 frames, 36.4 s, in one hour.
    clock = Clock()
    g = Governor(clock)
    starts = []
    while clock.t < 2 * HOUR:
        w = g.can_send(868100, 700_000)
        assert w != NEVER
        clock.t += w
        assert g.can_send(868100, 700_000) == 0
        g.record(868100, 700_000)
        starts.append(clock.t)
    assert worst_window(starts, [700_000] * len(starts), HOUR) <= 36_000_000
    assert g.deferred_hourly > 0  # the off-time alone would have been too lax
    # and the price is small: at least 50 frames an hour (51.4 fit exactly)
    assert len([s for s in starts if HOUR <= s < 2 * HOUR]) >= 50


def test_a_daily_budget_of_30_s():
    clock = Clock()
    g = Governor(clock, daily_budget_ms=30_000)
    t_air = time_on_air_us(LORAWAN, 24)  # 1.48 s: 20 frames fit in 30 s
    sent = []
    while clock.t < 2 * DAY:
        w = g.can_send(868100, t_air)
        clock.t += w
        g.record(868100, t_air)
        sent.append(clock.t)
    assert worst_window(sent, [t_air] * len(sent), DAY) <= 30_000_000
    assert len([s for s in sent if s < DAY]) == 20
    assert g.deferred_daily > 0 and g.reason == "daily"
    # used_ms() is an upper bound of the airtime in the last 24 h: it counts whole 15-minute
    # buckets, and the off-time lets at most 7 of these frames into one
    recent = sum(t_air for s in sent if s + t_air / 1000 > clock.t - DAY) / 1000
    assert recent <= g.used_ms() <= recent + 7 * t_air / 1000


def test_a_frame_longer_than_any_limit_is_never_sent():
    g = Governor(Clock(), daily_budget_ms=1000)
    assert g.can_send(868100, 1_000_001) == NEVER
    assert g.reason == "too_long" and g.too_long == 1 and g.deferrals == 0
    g = Governor(Clock())
    # 0.1 % of an hour is 3.6 s: a 255-byte frame at SF12 (9.2 s) never fits there
    assert g.can_send(868800, time_on_air_us(LORAWAN, 255)) == NEVER
    assert g.can_send(868100, time_on_air_us(LORAWAN, 255)) == 0


def test_recording_without_asking_is_counted_and_still_governed():
    clock = Clock()
    g = Governor(clock)
    g.record(868100, 100_000)
    g.record(868100, 100_000)  # 0 ms later: over the limit
    assert g.over_limit == 1
    assert g.can_send(868100, 1000) == 20_000  # both frames' off-times, back to back


def test_a_bad_daily_budget_is_refused():
    with pytest.raises(ValueError, match="daily_budget_ms must be positive"):
        Governor(Clock(), daily_budget_ms=0)


# --- governor: randomised runs, checked by brute force ------------------------------------

# The traffic: frames of random airtime on random channels of four sub-bands, offered at random
# moments; the sender asks, waits exactly as long as told (sometimes longer), then sends. The
# same source runs on CPython and MicroPython.
SIM = """
def simulate(Governor, requests, budget, emit):
    t = [0]
    g = Governor(lambda: t[0], daily_budget_ms=budget)
    radio_free = 0  # one radio: a frame waits for the previous one to end
    for gap, freq, us, extra in requests:
        t[0] += gap
        if t[0] < radio_free:
            t[0] = radio_free
        asked = t[0]
        w = g.can_send(freq, us)
        if w < 0:
            emit([t[0], freq, us, -1, asked, g.reason])
            continue
        if w > 0:
            t[0] += w - 1
            if g.can_send(freq, us) != 1:  # exact: one ms earlier is still too early
                emit([t[0], freq, us, -2, asked, g.reason])
                continue
            t[0] += 1 + extra
            if g.can_send(freq, us) != 0:
                emit([t[0], freq, us, -3, asked, g.reason])
                continue
        g.record(freq, us)
        radio_free = t[0] + (us + 999) // 1000
        emit([t[0], freq, us, w, asked, g.reason if w else None])
    return [g.frames, g.deferrals, g.deferred_ms, g.too_long, g.over_limit,
            g.deferred_off_time, g.deferred_hourly, g.deferred_daily]
"""
_ns = {}
exec(SIM, _ns)


def simulate(governor, requests, budget):
    log = []
    counters = _ns["simulate"](governor, requests, budget, log.append)
    return log, counters


CHANNELS = [868100, 868300, 868500, 867100, 867500, 869525, 868800]


def requests_strategy(max_len):
    frame = st.tuples(
        st.one_of(
            st.just(0),
            st.integers(0, 5_000),
            st.integers(0, 600_000),
            st.integers(0, 6 * 3_600_000),
        ),  # gap before the frame is ready, ms
        st.sampled_from(CHANNELS),
        st.one_of(
            st.integers(1, 50_000), st.integers(30_000, 2_000_000), st.integers(1, 10_000_000)
        ),  # airtime, us: tiny beacons to 10 s
        st.one_of(st.just(0), st.integers(0, 60_000)),  # the sender waits longer than told
    )
    return st.lists(frame, min_size=1, max_size=max_len)


def band_of(freq):
    for i, (lo, hi, _div) in enumerate(EU868):
        if lo <= freq < hi:
            return i
    raise AssertionError(freq)


def worst_window(starts, airtimes_us, span_ms):
    """The most airtime (us) in any window of span_ms: the maximum is reached by a window
    ending where a transmission ends, so those are the ones checked. Transmissions in order and
    one at a time (one radio), which makes it O(n log n) with prefix sums."""
    ivs = [(s * 1000, s * 1000 + us) for s, us in zip(starts, airtimes_us, strict=True)]
    for (_, e0), (s1, _) in zip(ivs, ivs[1:], strict=False):
        assert s1 >= e0, "overlapping transmissions"
    ends = [e for _, e in ivs]
    prefix = [0]
    for s, e in ivs:
        prefix.append(prefix[-1] + e - s)
    worst = 0
    for k, (_, end) in enumerate(ivs):
        lo = end - span_ms * 1000
        j = bisect.bisect_right(ends, lo)  # the first transmission ending inside the window
        total = prefix[k + 1] - prefix[j] - max(0, lo - ivs[j][0])
        worst = max(worst, total)
    return worst


def check_limits(log, budget):
    sent = [r for r in log if r[3] >= 0]
    assert all(r[3] >= -1 for r in log), "a wait was not exact: %r" % [r for r in log if r[3] < -1]
    by_band = {}
    for start, freq, us, *_ in sent:
        by_band.setdefault(band_of(freq), []).append((start, us))
    for band, frames in by_band.items():
        div = EU868[band][2]
        starts = [s for s, _ in frames]
        ats = [us for _, us in frames]
        # rule 1: the off-time after each frame
        for (s0, us0), (s1, _) in zip(frames, frames[1:], strict=False):
            assert s1 * 1000 >= s0 * 1000 + us0 * div, (band, s0, us0, s1)
        # ETSI: at most duty cycle x 1 h in any hour
        assert worst_window(starts, ats, HOUR) <= HOUR * 1000 // div, band
        # and over any longer window W, at most duty cycle x W plus one frame
        for span in (2 * HOUR, 5 * HOUR + 123_457):
            assert worst_window(starts, ats, span) <= span * 1000 // div + max(ats), band
    if budget is not None and sent:
        assert worst_window([r[0] for r in sent], [r[2] for r in sent], DAY) <= budget * 1000
    # a frame is refused for good only if it is longer than a limit
    for _start, freq, us, w, *_ in log:
        if w == -1:
            div = EU868[band_of(freq)][2]
            assert us > HOUR * 1000 // div or (budget is not None and us > budget * 1000)


def exact_ok(history, starts, t, freq, us, budget):
    """The rules without buckets, on the history (start ms, freq, us), starts its start times:
    may a frame of us µs start at t ms? Only the last day and a bit can matter (an off-time
    is at most 10 s x 1000)."""
    recent = history[bisect.bisect_left(starts, t - DAY - 20_000) :]
    band = band_of(freq)
    div = EU868[band][2]
    same = [(s, a) for s, f, a in recent if band_of(f) == band]
    if same:
        s, a = same[-1]
        if t < s + (a // 1000) * div + ((a % 1000) * div + 999) // 1000:
            return False
    end = t * 1000 + us

    def inside(frames, span_ms):
        lo = end - span_ms * 1000
        return sum(max(0, min(s * 1000 + a, end) - max(s * 1000, lo)) for s, a in frames)

    if inside(same, HOUR) + us > HOUR * 1000 // div:
        return False
    if budget is not None and inside([(s, a) for s, _, a in recent], DAY) + us > budget * 1000:
        return False
    return True


# How much later than the exact rules the governor may let a frame go: a bucket (its windows
# count every bucket they touch) plus the longest frame (counted whole at a window's edge).
SLACK = {"off_time": 0, "hourly": 60_000 + 10_000, "daily": 900_000 + 10_000}


def check_waits(log, budget):
    """Every wait ends where the exact rules allow the frame, or at most SLACK later."""
    history = []
    starts = []
    for start, freq, us, w, asked, reason in log:
        if w > 0:
            t_gov = asked + w
            assert exact_ok(history, starts, t_gov, freq, us, budget)
            early = t_gov - 1 - SLACK[reason]
            if early >= asked:
                assert not exact_ok(history, starts, early, freq, us, budget), (reason, asked, w)
        if w >= 0:
            history.append((start, freq, us))
            starts.append(start)


@settings(max_examples=60, deadline=None)
@given(requests=requests_strategy(120), budget=st.sampled_from([None, 30_000, 200_000]))
def test_limits_hold_in_randomised_runs(requests, budget):
    log, counters = simulate(Governor, requests, budget)
    check_limits(log, budget)
    check_waits(log, budget)
    assert counters[0] == len([r for r in log if r[3] >= 0])
    assert counters[4] == 0  # every frame was asked for


def random_requests(rng, n):
    """n random frames, a third of them in bursts that saturate a sub-band for over an hour
    with equal frames (where the off-time alone would overshoot an hour's limit)."""
    out = []
    while len(out) < n:
        if rng.random() < 0.02:
            freq = rng.choice(CHANNELS)
            us = rng.randrange(300_000, 1_500_000)
            out.extend([0, freq, us, 0] for _ in range(60))
            continue
        gap = rng.choice([0, rng.randrange(5_000), rng.randrange(600_000), rng.randrange(HOUR)])
        us = rng.choice([rng.randrange(1, 50_000), rng.randrange(30_000, 2_000_000)])
        if rng.random() < 0.05:
            us = rng.randrange(1, 10_000_000)
        out.append([gap, rng.choice(CHANNELS), us, rng.choice([0, 0, 0, rng.randrange(60_000)])])
    return out[:n]


def test_limits_hold_in_a_month_of_random_traffic():
    rng = random.Random(4)
    for budget in (None, 30_000):
        log, _ = simulate(Governor, random_requests(rng, 20_000), budget)
        check_limits(log, budget)
        check_waits(log, budget)


# --- on MicroPython -----------------------------------------------------------------------

# one case: a line {"budget": ...}, then one request a line, then an empty line; out: one
# decision a line, then the counters
MP_SIM = (
    """
import json, sys
from firmware.airtime import Governor
"""
    + SIM
    + """
def requests():
    while True:
        line = sys.stdin.readline().strip()
        if not line:
            return
        yield json.loads(line)


def emit(entry):
    print(json.dumps(entry))


while True:
    line = sys.stdin.readline()
    if not line:
        break
    counters = simulate(Governor, requests(), json.loads(line)["budget"], emit)
    print(json.dumps({"counters": counters}))
"""
)


def test_micropython_takes_the_same_decisions(run_mp):
    rng = random.Random(7)
    cases = [
        {"requests": random_requests(rng, 400), "budget": budget}
        for budget in (None, 30_000, None, 200_000)
    ]
    stdin = ""
    for c in cases:
        stdin += json.dumps({"budget": c["budget"]}) + "\n"
        stdin += "".join(json.dumps(r) + "\n" for r in c["requests"]) + "\n"
    out = run_mp(MP_SIM, input=stdin, timeout=300)
    results = []
    log = []
    for line in out.splitlines():
        item = json.loads(line)
        if isinstance(item, dict):
            results.append((log, item["counters"]))
            log = []
        else:
            log.append(item)
    assert len(results) == len(cases)
    for case, (got_log, got_counters) in zip(cases, results, strict=True):
        log, counters = simulate(Governor, case["requests"], case["budget"])
        assert got_log == log
        assert got_counters == counters
        check_limits(got_log, case["budget"])
        check_waits(got_log, case["budget"])
        off_time, hourly, daily = counters[5:]
        assert off_time > 0 and hourly > 0  # the traffic did make every rule defer it
        assert daily > 0 or case["budget"] is None


def test_time_on_air_on_micropython(run_mp):
    cases = [(sf, bw, pl) for sf in (7, 9, 12) for bw in ("125", "250", "7.8") for pl in (0, 51)]
    script = (
        "from firmware.airtime import time_on_air_us\n"
        "for sf, bw, pl in %r:\n"
        "    print(time_on_air_us({'sf': sf, 'bw': bw, 'preamble_len': 8}, pl))\n" % (cases,)
    )
    got = [int(x) for x in run_mp(script).split()]
    assert got == [
        time_on_air_us({"sf": sf, "bw": bw, "preamble_len": 8}, pl) for sf, bw, pl in cases
    ]


def test_deciding_allocates_nothing_on_micropython(run_mp):
    # after each sub-band's first use, can_send() and record() run with the heap locked
    script = """
import micropython
from firmware.airtime import Governor, time_on_air_us
t = [0]
g = Governor(lambda: t[0], daily_budget_ms=30000)
cfg = {"sf": 12, "bw": "125", "preamble_len": 8}
g.record(868100, 1000)
t[0] = 200


def run(us):  # locals only: a new global would grow the module's dict
    micropython.heap_lock()
    try:
        for i in range(300):
            w = g.can_send(868100, us)
            t[0] += w
            g.record(868100, us)
            t[0] += 17
            us = time_on_air_us(cfg, 40 + i % 50)
    finally:
        micropython.heap_unlock()


run(time_on_air_us(cfg, 40))
print(g.frames, g.deferrals, g.deferred_daily, g.over_limit)
"""
    frames, deferrals, daily, over = (int(x) for x in run_mp(script).split())
    assert frames == 301 and deferrals > 0 and daily > 0 and over == 0


# --- best_batch -----------------------------------------------------------------------------


def fits(size, n, interval_s, cfg, div, budget_ms, margin):
    t = time_on_air_us(cfg, size) / 1e6
    period = n * interval_s
    keep = (100 - margin) / 100
    ok = t * div <= period * keep + 1e-12
    if budget_ms is not None:
        ok = ok and t * 86400 / period <= budget_ms / 1000 * keep + 1e-9
    return ok


@settings(max_examples=200, deadline=None)
@given(
    overhead=st.integers(8, 20),
    per=st.integers(1, 6),
    interval=st.sampled_from([10, 30, 60, 300, 600]),
    sf=st.integers(7, 12),
    div=st.sampled_from([10, 100, 1000]),
    budget=st.sampled_from([None, 30_000, 100_000]),
    margin=st.sampled_from([0, 20, 50]),
)
def test_best_batch_is_the_smallest_that_fits(overhead, per, interval, sf, div, budget, margin):
    cfg = dict(LORAWAN, sf=sf)

    def size(n):
        return overhead + per * n

    n = best_batch(size, interval, cfg, div, budget, margin)
    feasible = [
        k
        for k in range(1, 256)
        if size(k) <= 255 and fits(size(k), k, interval, cfg, div, budget, margin)
    ]
    assert n == (feasible[0] if feasible else None)


def test_best_batch_for_our_frames():
    # ~12 B of header and tag plus ~3 B a reading (bench/RESULTS.md), a reading a minute
    def size(n):
        return 12 + 3 * n

    assert best_batch(size, 60, dict(LORAWAN, sf=7)) == 1
    n12 = best_batch(size, 60, LORAWAN)
    assert n12 is not None and n12 > 1
    assert best_batch(size, 60, LORAWAN, daily_budget_ms=30_000) is None  # SF12: not in 30 s
    assert best_batch(size, 600, LORAWAN, daily_budget_ms=30_000) is not None

    def too_long(n):
        raise ValueError("frame would exceed 255 bytes")

    assert best_batch(too_long, 60, LORAWAN) is None
    with pytest.raises(ValueError, match="interval_s must be positive"):
        best_batch(size, 0, LORAWAN)


def test_the_module_has_no_cpython_only_imports():
    source = Path(airtime.__file__).read_text()
    imports = {
        line.split()[1] for line in source.splitlines() if line.startswith(("import ", "from "))
    }
    assert imports <= {"micropython", "array"}
    assert math.isfinite(time_on_air_us({}, 0))


# --- bench/airtime.py -----------------------------------------------------------------------


def test_bench_airtime_quick_run():
    from conftest import shared_trace

    shared_trace("bme280_indoor_1min.csv")
    shared_trace("jena_outdoor_10min.csv")
    import airtime as bench  # bench/airtime.py (bench/ is on sys.path above)

    out = bench.run(quick=True)
    lpp = out["lpp"]
    assert round(lpp["sf12_ms"], 1) == 1482.8 and round(lpp["sf7_ms"], 1) == 61.7
    # 24 B at SF12: one frame per 148.3 s of off-time, less what the hourly rule holds back
    assert 560 <= lpp["day_duty_sf12"] <= 583
    assert lpp["day_budget_sf12"] == 20  # 30 s / 1.48 s
    for trace in out["traces"].values():
        results = trace["results"]
        assert [r["size"] for r in results] == list(bench.BATCHES)
        assert results[0]["mean_bytes"] == 16  # one reading: 16 bytes (SPEC.md)
        for a, b in zip(results, results[1:], strict=False):
            assert b["sf12_ms"] < a["sf12_ms"] and b["day_duty_sf12"] > a["day_duty_sf12"]
        for r in results:
            assert r["day_budget_sf12"] <= r["day_duty_sf12"]
            # capacity agrees with the airtime: 1 % of a day, within the hourly rule's margin
            assert 0.9 < r["day_duty_sf12"] * r["sf12_ms"] / 864_000 <= 1.0
        assert bench.target_batch(trace) is not None
    for r in out["load"]:
        assert r["frames"] > 0 and 0.8 < r["ratio"] <= 1.0
    assert out["load"][0]["ratio"] >= out["load"][-1]["ratio"] - 0.02

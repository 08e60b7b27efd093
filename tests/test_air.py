# host_tools/sim/air.py, the simulated LoRa medium: link budget by Hata's formula written out here,
# collisions and capture (LoRaSim's rules), SF/channel orthogonality, range, half-duplex, receive
# windows, determinism; and a brute-force reference that random traffic must match exactly.

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import airtime as fw_airtime
from host_tools.sim import air
from host_tools.sim.air import Medium

NOISE_125 = -174 + 10 * math.log10(125_000) + 6  # -117.03 dBm


def hata_db(d_m, f=868.0, hb=30.0, hm=1.5):
    a = (1.1 * math.log10(f) - 0.7) * hm - (1.56 * math.log10(f) - 0.8)
    return (
        69.55
        + 26.16 * math.log10(f)
        - 13.82 * math.log10(hb)
        - a
        + (44.9 - 6.55 * math.log10(hb)) * math.log10(d_m / 1000)
    )


def medium(**kw):
    m = Medium(**kw)
    m.add_radio("gw", 0, 0)
    return m


# --- one link -----------------------------------------------------------------------------


def test_a_single_link_is_delivered_with_its_link_budget():
    m = medium()
    m.add_radio("n", 2400, 3200)  # 4 km
    m.listen("gw", 868100, 12)
    tx = m.transmit("n", 1_000_000, 868100, 12, 125, b"p" * 24, 14)
    t_air = fw_airtime.time_on_air_us({"sf": 12, "bw": "125", "preamble_len": 8}, 24)
    assert tx.t_end == 1_000_000 + t_air == 1_000_000 + 1_482_752
    assert m.deliveries(tx.t_end - 1) == {}  # not over yet
    got = m.deliveries(tx.t_end)
    (d,) = got["gw"]
    assert d.payload == b"p" * 24 and d.sender == "n" and d.t_end_us == tx.t_end
    assert d.rssi == pytest.approx(14 - hata_db(4000), abs=1e-9)  # -133.2 dBm: near the edge
    assert d.snr == pytest.approx(d.rssi - NOISE_125, abs=1e-9)
    assert m.stats == {"frames": 1, "frames_delivered": 1, "delivered": 1}
    assert m.deliveries(tx.t_end + 10**7) == {}  # reported once


def test_hata_urban_parameters():
    assert air.HATA_URBAN.pl0_db == pytest.approx(hata_db(1000))
    assert air.HATA_URBAN.exponent == pytest.approx(3.52, abs=0.005)
    assert air.HATA_URBAN.loss_db(10_000) == pytest.approx(hata_db(10_000))
    assert air.PETAJAJARVI_GROUND.loss_db(1000) == 128.95
    assert air.LORASIM.loss_db(40) == 127.41


def test_sensitivity_table_and_noise_floor():
    assert air.sensitivity_dbm(7, 125) == -123 and air.sensitivity_dbm(12, 125) == -136
    assert air.sensitivity_dbm(12, 500) == -130
    # no datasheet figure: noise floor + the SF's demodulation limit (AN1200.22)
    assert air.sensitivity_dbm(12, 62.5) == pytest.approx(-174 + 10 * math.log10(62_500) + 6 - 20)
    assert air.noise_floor_dbm(125) == pytest.approx(NOISE_125)


@pytest.mark.parametrize("sf", [7, 9, 12])
def test_range_edge(sf):
    sens = air.sensitivity_dbm(sf, 125)
    edge = air.HATA_URBAN.range_m(14 - sens)
    m = medium()
    m.add_radio("near", edge * 0.99, 0)
    m.add_radio("far", 0, edge * 1.01)
    m.listen("gw", 868100, sf)
    m.transmit("near", 0, 868100, sf, 125, b"a" * 10, 14)
    m.transmit("far", 10_000_000, 868100, sf, 125, b"b" * 10, 14)
    got = m.deliveries(10**8)
    assert [d.sender for d in got["gw"]] == ["near"]
    assert m.stats["below_sensitivity"] == 1


# --- collisions ---------------------------------------------------------------------------


def two_nodes(d1, d2, **kw):
    m = medium(**kw)
    m.add_radio("a", d1, 0)
    m.add_radio("b", -d2, 0)
    return m


def power_gap_db(d1, d2):
    return 10 * air.HATA_URBAN.exponent * math.log10(d2 / d1)


@pytest.mark.parametrize(
    "d2, heard",
    [
        (1000, []),  # equal power: both lost
        (1000 * 10 ** (5.9 / 35.2), []),  # 5.9 dB apart: both lost
        (1000 * 10 ** (6.1 / 35.2), ["a"]),  # 6.1 dB: the stronger is captured
        (3000, ["a"]),
    ],
)
def test_overlapping_frames_on_one_channel_and_sf(d2, heard):
    m = two_nodes(1000, d2)
    m.listen("gw", 868300, 9)
    m.transmit("a", 0, 868300, 9, 125, b"a" * 20, 14)
    m.transmit("b", 50_000, 868300, 9, 125, b"b" * 20, 14)  # starts inside a's payload
    got = m.deliveries(10**7)
    assert [d.sender for d in got.get("gw", [])] == heard
    assert m.stats["collision"] == 2 - len(heard)
    if heard:
        (d,) = got["gw"]
        # SNR counts the interference: signal over noise plus the weaker frame
        gap = power_gap_db(1000, d2)
        i_mw = 10 ** ((d.rssi - gap) / 10) + 10 ** (NOISE_125 / 10)
        assert d.snr == pytest.approx(d.rssi - 10 * math.log10(i_mw))


def test_capture_is_against_the_sum_of_interferers():
    m = medium()
    m.add_radio("strong", 1000, 0)
    m.add_radio("w1", -1500, 0)
    m.add_radio("w2", 0, 1500)
    gap = power_gap_db(1000, 1500)  # 6.2 dB: beats each alone, not the two together
    assert 6 < gap < 6 + 10 * math.log10(2)
    m.listen("gw", 868100, 7)
    m.transmit("strong", 0, 868100, 7, 125, b"s" * 30, 14)
    m.transmit("w1", 10_000, 868100, 7, 125, b"1" * 30, 14)
    m.transmit("w2", 20_000, 868100, 7, 125, b"2" * 30, 14)
    assert m.deliveries(10**7) == {}
    assert m.stats["collision"] == 3


@pytest.mark.parametrize(
    "freq_b, sf_b", [(868300, 9), (868100, 10), (868100, 7), (868500, 12)], ids=str
)
def test_other_channels_and_sfs_do_not_collide(freq_b, sf_b):
    m = two_nodes(1000, 1000)
    m.listen("gw", 868100, 9)
    m.listen("gw", freq_b, sf_b)
    m.transmit("a", 0, 868100, 9, 125, b"a" * 20, 14)
    m.transmit("b", 1000, freq_b, sf_b, 125, b"b" * 20, 14)
    got = m.deliveries(10**7)
    assert sorted(d.sender for d in got["gw"]) == ["a", "b"]


def test_overlapping_channel_spans_collide():
    m = two_nodes(1000, 1000)
    m.listen("gw", 868100, 7)
    m.listen("gw", 868200, 7)  # 100 kHz apart, 125 kHz wide: they overlap
    m.transmit("a", 0, 868100, 7, 125, b"a" * 20, 14)
    m.transmit("b", 1000, 868200, 7, 125, b"b" * 20, 14)
    assert m.deliveries(10**7) == {}


def test_an_interferer_over_only_the_early_preamble_is_harmless():
    # LoRaSim's timing rule: a receiver needs the last 5 of 8 preamble symbols
    t_sym = 2**9 * 8  # SF9, 125 kHz: 4096 us
    for end_in_preamble, heard in ((3 * t_sym, ["a"]), (3 * t_sym + 1, [])):
        m = two_nodes(1000, 1000)
        m.listen("gw", 868100, 9)
        b = m.transmit("b", 0, 868100, 9, 125, b"b" * 3, 14)
        start_a = b.t_end - end_in_preamble
        m.transmit("a", start_a, 868100, 9, 125, b"a" * 20, 14)
        got = m.deliveries(10**7)
        assert [d.sender for d in got.get("gw", [])] == heard, end_in_preamble


# --- receivers ----------------------------------------------------------------------------


def test_half_duplex():
    m = medium()
    m.add_radio("n", 500, 0)
    m.listen("gw", 868100, 7)
    m.listen("n", 869525, 7)
    up = m.transmit("n", 0, 868100, 7, 125, b"up" * 10, 14)
    m.transmit("gw", up.t_end - 1, 869525, 7, 125, b"ack", 14)  # gateway busy: misses the end
    m.transmit("n", up.t_end + 5000, 868100, 7, 125, b"x", 14)  # the node sends over its ack
    assert m.deliveries(10**7) == {}
    # the uplink and "x" at the gateway (sending its ack), the ack at the node (sending "x")
    assert m.stats["half_duplex"] == 3


def test_receive_windows():
    m = medium()
    m.add_radio("n", 500, 0)
    t_sym = 2**7 * 8  # 1024 us
    lock = 3 * t_sym  # the critical section starts 3 symbols into an 8-symbol preamble
    m.listen("n", 869525, 7, t_from_us=0, t_until_us=100_000)  # closes before the frame
    m.listen(
        "n", 869525, 7, t_from_us=1_000_000 + lock, t_until_us=1_000_000 + lock
    )  # just in time
    m.listen("n", 869525, 7, t_from_us=2_000_000 + lock + 1, t_until_us=3_000_000)  # too late
    for t in (500_000, 1_000_000, 2_000_000):
        m.transmit("gw", t, 869525, 7, 125, b"ack%d" % t, 14)
    got = m.deliveries(10**7)
    assert [d.payload for d in got["n"]] == [b"ack1000000"]


def test_stop_listening():
    m = medium()
    m.add_radio("n", 500, 0)
    m.listen("gw", 868100, 7)
    m.stop_listening("gw", 1_000_000)
    m.transmit("n", 0, 868100, 7, 125, b"in", 14)
    m.transmit("n", 1_000_000, 868100, 7, 125, b"out", 14)
    assert [d.payload for d in m.deliveries(10**7)["gw"]] == [b"in"]


def test_time_only_moves_forward_and_radios_send_one_frame_at_a_time():
    m = medium()
    m.add_radio("n", 500, 0)
    m.transmit("n", 0, 868100, 7, 125, b"x" * 50, 14)
    with pytest.raises(ValueError, match="already transmitting"):
        m.transmit("n", 1000, 868300, 7, 125, b"y", 14)
    m.deliveries(1_000_000)
    with pytest.raises(ValueError, match="already resolved up to 1000000 us"):
        m.transmit("n", 999_999, 868100, 7, 125, b"y", 14)
    with pytest.raises(ValueError, match="already resolved"):
        m.listen("gw", 868100, 7, t_from_us=5)
    with pytest.raises(ValueError, match="no radio 'x'"):
        m.transmit("x", 2_000_000, 868100, 7, 125, b"y", 14)
    with pytest.raises(ValueError, match="a LoRa frame holds 0..255"):
        m.transmit("n", 2_000_000, 868100, 7, 125, bytes(256), 14)
    with pytest.raises(ValueError, match="already on the air"):
        m.add_radio("n", 0, 0)


# --- randomness ---------------------------------------------------------------------------


def lossy_run(seed, loss_prob=0.3, shadowing=True):
    m = Medium(
        seed=seed, path_loss=air.PETAJAJARVI_GROUND, shadowing=shadowing, loss_prob=loss_prob
    )
    m.add_radio("gw", 0, 0)
    m.listen("gw", 868100, 10)
    rng = random.Random(99)
    for i in range(300):
        m.add_radio(i, rng.uniform(-3000, 3000), rng.uniform(-3000, 3000))
        m.transmit(i, i * 1_000_000, 868100, 10, 125, b"%d" % i, 14)
    got = m.deliveries(10**9)
    return [(d.tx_id, round(d.rssi, 6)) for d in got.get("gw", [])], m.stats


def test_deterministic_for_a_seed():
    a, stats_a = lossy_run(1)
    b, stats_b = lossy_run(1)
    c, _ = lossy_run(2)
    assert a == b and stats_a == stats_b
    assert a != c


def test_random_loss_rate():
    _, stats = lossy_run(5, loss_prob=0.3, shadowing=False)
    heard = stats["delivered"] + stats["random_loss"]
    assert heard > 200
    # binomial(heard, 0.3): 5 standard deviations
    assert abs(stats["random_loss"] - 0.3 * heard) < 5 * math.sqrt(heard * 0.21)


# --- random traffic against a brute-force reference ---------------------------------------


def reference(frames, gateways, positions):
    """Outcome per (frame index, gateway) by the rules written out plainly, O(n^2)."""
    out = {}
    model = air.HATA_URBAN
    for i, (sender, start, freq, sf, n) in enumerate(frames):
        end = start + air.time_on_air_us(n, sf)
        crit = start + 3 * (2**sf * 8)
        for g in gateways:
            if g == sender:
                continue
            busy = any(
                s2 == g and st < end and start < st + air.time_on_air_us(n2, sf2)
                for s2, st, _, sf2, n2 in frames
            )
            if busy:
                out[(i, g)] = "half_duplex"
                continue

            def power(src, g=g):
                d = math.dist(positions[src], positions[g])
                return 14 - model.loss_db(d)

            p = power(sender)
            if p < air.sensitivity_dbm(sf, 125):
                out[(i, g)] = "below_sensitivity"
                continue
            i_mw = sum(
                10 ** (power(s2) / 10)
                for j, (s2, st2, f2, sf2, n2) in enumerate(frames)
                if j != i
                and s2 != g
                and f2 == freq
                and sf2 == sf
                and st2 < end
                and st2 + air.time_on_air_us(n2, sf2) > crit
            )
            ok = i_mw == 0 or p - 10 * math.log10(i_mw) >= 6
            out[(i, g)] = "delivered" if ok else "collision"
    return out


traffic = st.lists(
    st.tuples(
        st.integers(0, 9),  # sender: nodes 0..7, gateways 8, 9
        st.integers(0, 3_000_000),  # start, us
        st.sampled_from([868100, 868300]),
        st.sampled_from([7, 8, 12]),
        st.integers(1, 60),  # payload bytes
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(
    frames=traffic,
    positions=st.lists(
        st.tuples(st.floats(-4000, 4000), st.floats(-4000, 4000)), min_size=10, max_size=10
    ),
    cuts=st.lists(st.integers(0, 12_000_000), max_size=5),
)
def test_random_traffic_matches_the_reference(frames, positions, cuts):
    m = Medium()
    for r, (x, y) in enumerate(positions):
        m.add_radio(r, x, y)
    gateways = (8, 9)
    for g in gateways:
        for freq in (868100, 868300):
            for sf in (7, 8, 12):
                m.listen(g, freq, sf)
    m.log = []
    accepted = []
    for sender, start, freq, sf, n in sorted(frames, key=lambda f: f[1]):
        try:
            m.transmit(sender, start, freq, sf, 125, bytes(n), 14)
        except ValueError as e:
            assert "already transmitting" in str(e)
            continue
        accepted.append((sender, start, freq, sf, n))
    # resolve in any number of steps: the answer must not depend on them
    got = {}
    for until in sorted(cuts) + [10**8]:
        for g, ds in m.deliveries(until).items():
            got.setdefault(g, []).extend(ds)
    expected = reference(accepted, gateways, positions)
    outcomes = {(tx_id, g): outcome for tx_id, g, outcome in m.log}
    assert outcomes == expected
    for g in gateways:
        assert sorted(d.tx_id for d in got.get(g, [])) == sorted(
            i for (i, gg), o in expected.items() if gg == g and o == "delivered"
        )


def test_a_long_run_prunes_its_memory_and_changes_nothing(monkeypatch):
    def run(prune):
        m = Medium(seed=3)
        if not prune:
            monkeypatch.setattr(m, "_prune", lambda: None)
        m.add_radio("gw", 0, 0)
        for f in (868100, 868300, 868500):
            for sf in range(7, 13):
                m.listen("gw", f, sf)
        rng = random.Random(11)
        for i in range(200):
            m.add_radio(i, rng.uniform(-2000, 2000), rng.uniform(-2000, 2000))
        t = 0
        got = []
        next_free = {}
        for step in range(6000):
            t += rng.randrange(0, 150_000)
            node = rng.randrange(200)
            start = max(t, next_free.get(node, 0))
            tx = m.transmit(
                node,
                start,
                rng.choice([868100, 868300, 868500]),
                rng.randrange(7, 13),
                125,
                bytes(30),
                14,
            )
            next_free[node] = tx.t_end
            if step % 7 == 0:
                got += [d.tx_id for d in m.deliveries(t).get("gw", [])]
        got += [d.tx_id for d in m.deliveries(t + 10**8).get("gw", [])]
        return got, m.stats, len(m._txs)

    pruned, stats_p, kept = run(True)
    full, stats_f, _ = run(False)
    assert pruned == full and stats_p == stats_f
    assert stats_p["collision"] > 0 and stats_p["delivered"] > 1000
    assert kept < 2000  # of 6000


@settings(max_examples=300)
@given(
    sf=st.integers(6, 12),
    bw=st.sampled_from([7.8, 62.5, 125, 250, 500]),
    cr=st.integers(5, 8),
    pre=st.integers(6, 20),
    ih=st.booleans(),
    crc=st.booleans(),
    n=st.integers(0, 255),
)
def test_time_on_air_is_the_firmwares(sf, bw, cr, pre, ih, crc, n):
    cfg = {"sf": sf, "bw": bw, "coding_rate": cr, "preamble_len": pre, "implicit_header": ih}
    cfg["crc_en"] = crc
    assert air.time_on_air_us(n, sf, bw, cr, pre, ih, crc) == fw_airtime.time_on_air_us(cfg, n)

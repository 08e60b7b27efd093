"""Tests for the synthetic Koper weather generator and the trace CSV reader/writer.

The real traces come from ../shared/data (not in the repository); their tests skip without it.
"""

import math
import statistics
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_tools.sim.weather import HEADER, generate, read_trace, write_trace

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
JAN_1_2025 = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp())
HEADER_LINE = HEADER + "\n"


@pytest.fixture(scope="module")
def year():
    """A year of 10-minute readings."""
    return generate(JAN_1_2025, 600, 365 * 144, seed=0)


def test_deterministic_per_seed():
    a = generate(JAN_1_2025, 60, 3000, seed=7)
    assert a == generate(JAN_1_2025, 60, 3000, seed=7)
    assert a != generate(JAN_1_2025, 60, 3000, seed=8)


def test_timestamps_and_rounding():
    rows = generate(JAN_1_2025 + 17, 30, 500, seed=1)
    assert [r[0] for r in rows] == [JAN_1_2025 + 17 + 30 * k for k in range(500)]
    for _, t, rh, p in rows:
        for value in (t, rh, p):
            assert value == round(value, 2)


def test_edge_arguments():
    assert generate(JAN_1_2025, 60, 0) == []
    assert len(generate(JAN_1_2025, 60, 1)) == 1
    with pytest.raises(ValueError, match="interval_s"):
        generate(JAN_1_2025, 0, 10)
    with pytest.raises(ValueError, match="count"):
        generate(JAN_1_2025, 60, -1)


def test_plausible_for_koper_across_a_year(year):
    temps = [r[1] for r in year]
    hums = [r[2] for r in year]
    pressures = [r[3] for r in year]
    assert -12.0 < min(temps) and max(temps) < 40.0
    assert 0.0 <= min(hums) and max(hums) <= 100.0
    assert 20.0 < statistics.mean(hums) < 90.0
    assert 970.0 < min(pressures) and max(pressures) < 1045.0
    assert 1008.0 < statistics.mean(pressures) < 1022.0
    assert 11.0 < statistics.mean(temps) < 18.0

    def month_mean(month):  # 30-day blocks from 1 January
        block = year[month * 30 * 144 : (month + 1) * 30 * 144]
        return statistics.mean(r[1] for r in block)

    assert month_mean(0) < 10.0  # January
    assert month_mean(6) > 19.0  # July
    assert month_mean(6) - month_mean(0) > 12.0


def test_diurnal_cycle(year):
    # Koper is UTC+1/+2; sunrise is 04..07 UTC, mid-afternoon 12..14 UTC.
    def hour(ts):
        return (ts % 86400) // 3600

    dawn = [r[1] for r in year if hour(r[0]) in (4, 5)]
    afternoon = [r[1] for r in year if hour(r[0]) in (12, 13)]
    assert statistics.mean(afternoon) - statistics.mean(dawn) > 3.0
    # humidity runs the other way
    dawn_rh = [r[2] for r in year if hour(r[0]) in (4, 5)]
    afternoon_rh = [r[2] for r in year if hour(r[0]) in (12, 13)]
    assert statistics.mean(dawn_rh) - statistics.mean(afternoon_rh) > 8.0


@pytest.mark.parametrize("seed", range(3))
def test_humidity_anticorrelated_with_temperature(seed):
    # within a day, with the dew point slow, RH falls as the air warms
    rows = generate(JAN_1_2025 + 120 * 86400, 600, 30 * 144, seed=seed)
    days = [rows[d * 144 : (d + 1) * 144] for d in range(30)]
    per_day = [statistics.correlation([r[1] for r in d], [r[2] for r in d]) for d in days]
    assert statistics.median(per_day) < -0.8


@pytest.mark.parametrize("seed", range(5))
def test_fronts_in_a_month(seed):
    rows = generate(JAN_1_2025, 600, 30 * 144, seed=seed)
    pressures = [r[3] for r in rows]
    assert max(pressures) - min(pressures) > 10.0
    # a front drops pressure by more than 5 hPa within a day somewhere in the month
    drops = [rows[i][3] - rows[i + 144][3] for i in range(len(rows) - 144)]
    assert max(drops) > 5.0


def test_noise_at_sensor_level():
    rows = generate(JAN_1_2025, 1, 600, seed=4)  # 10 minutes at 1 s: noise dominates
    for column, low, high in ((1, 0.005, 0.04), (2, 0.02, 0.15), (3, 0.005, 0.04)):
        steps = [rows[i + 1][column] - rows[i][column] for i in range(len(rows) - 1)]
        sd = statistics.pstdev(steps) / math.sqrt(2)
        assert low < sd < high, (column, sd)


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data (real traces) not present")
@pytest.mark.parametrize(
    ("name", "rows", "first"),
    [
        ("bme280_indoor_1min.csv", 13367, ("2025-12-29T18:53:28", 18.80, 43.15, 980.18)),
        ("jena_outdoor_10min.csv", 2017, ("2009-01-01T00:10:00", -8.02, 93.3, 996.52)),
    ],
)
def test_reads_real_traces(name, rows, first):
    trace = read_trace(DATA / name)
    assert len(trace) == rows
    stamp, t, rh, p = first
    ts = int(datetime.fromisoformat(stamp).replace(tzinfo=UTC).timestamp())
    assert trace[0] == (ts, t, rh, p)
    assert all(a[0] < b[0] for a, b in zip(trace, trace[1:], strict=False))


def test_round_trip(tmp_path):
    rows = generate(JAN_1_2025, 60, 2000, seed=5)
    path = tmp_path / "trace.csv"
    write_trace(path, rows)
    assert path.read_text().startswith(HEADER_LINE + "2025-01-01T00:00:00Z,")
    assert read_trace(path) == rows


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 10**6),
            st.integers(-4000, 8500),
            st.integers(0, 10000),
            st.integers(30000, 110000),
        ),
        max_size=30,
    )
)
def test_round_trip_property(tmp_path_factory, items):
    ts = 1_700_000_000
    rows = []
    for gap, t, rh, p in items:
        ts += gap
        rows.append((ts, t / 100, rh / 100, p / 100))
    path = tmp_path_factory.mktemp("rt") / "trace.csv"
    write_trace(path, rows)
    assert read_trace(path) == rows


GOOD = "2025-01-01T00:00:00Z,12.50,70.00,1015.00\n"
GOOD2 = "2025-01-01T00:01:00Z,12.51,70.10,1015.01\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "trace.csv line 1: empty file, expected header"),
        ("time,t,rh,p\n" + GOOD, "trace.csv line 1: expected header"),
        (
            HEADER_LINE + GOOD + "2025-01-01T00:01:00Z,12.5,70\n",
            "line 3: expected 4 fields, got 3",
        ),
        (HEADER_LINE + GOOD2.replace("70.10", "abc"), "trace.csv line 2: bad humidity_pct 'abc'"),
        (HEADER_LINE + GOOD2.replace("12.51", ""), "line 2: bad temperature_c ''"),
        (HEADER_LINE + GOOD2.replace("1015.01", "nan"), "line 2: bad pressure_hpa 'nan'"),
        (HEADER_LINE + GOOD2.replace("12.51", " 12.51"), "line 2: bad temperature_c ' 12.51'"),
        (HEADER_LINE + GOOD2.replace("Z", ""), "line 2: bad timestamp '2025-01-01T00:01:00'"),
        (
            HEADER_LINE + GOOD2.replace("01T", "32T"),
            "line 2: bad timestamp '2025-01-32T00:01:00Z'",
        ),
        (
            HEADER_LINE + GOOD2.replace("70.10", "100.5"),
            "line 2: humidity_pct 100.5 outside 0..100",
        ),
        (HEADER_LINE + GOOD2 + GOOD, "line 3: timestamp 2025-01-01T00:00:00Z not after"),
        (HEADER_LINE + GOOD + "\n" + GOOD2, "line 3: expected 4 fields, got 1"),
    ],
)
def test_rejects_malformed(tmp_path, text, message):
    path = tmp_path / "trace.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        read_trace(path)
    assert message in str(info.value)
    assert str(info.value).startswith("trace.csv line ")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789.,-:TZe nax\n", max_size=200))
def test_reader_fuzz_raises_only_value_error(tmp_path_factory, body):
    path = tmp_path_factory.mktemp("fuzz") / "trace.csv"
    path.write_text(HEADER_LINE + body)
    try:
        rows = read_trace(path)
    except ValueError as exc:
        assert str(exc).startswith("trace.csv line ")
    else:
        assert all(len(r) == 4 for r in rows)

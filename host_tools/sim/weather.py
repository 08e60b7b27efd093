"""Synthetic coastal weather for Koper, and the CSV trace format shared with the real traces.

Feeds simulations and benchmarks on the host with BME280-like readings (no hardware, no network).
"""

import bisect
import math
import random
import re
from datetime import UTC, datetime
from pathlib import Path

Row = tuple[int, float, float, float]  # (unix_ts, temperature_c, humidity_pct, pressure_hpa)

HEADER = "timestamp,temperature_c,humidity_pct,pressure_hpa"
_FIELDS = HEADER.split(",")

# Koper: 45.55 °N, 13.73 °E, at sea level on the Adriatic coast.
_LAT_RAD = math.radians(45.55)
_LON_DEG = 13.73

# Climate (Koper/Portorož normals, rounded): daily mean 5.5 °C in late January, 24 °C in late
# July; the sea damps the daily swing to about 6 °C (winter) .. 8 °C (summer) peak to peak.
_T_ANNUAL_MEAN = 14.75
_T_ANNUAL_AMPL = 9.25
_T_COLDEST_DOY = 25.0
_DIURNAL_HALF_WINTER = 3.0
_DIURNAL_HALF_SUMMER = 4.0
_T_MAX_SOLAR_HOUR = 14.5  # mid-afternoon, local solar time
# Dew point: about 0.5 °C in winter, 16.5 °C in late summer (mean RH near 70 %).
_TD_ANNUAL_MEAN = 8.5
_TD_ANNUAL_AMPL = 8.0
_TD_COLDEST_DOY = 30.0
# Without fronts; the fronts take about 3 hPa off on average, for a mean near 1015 hPa.
_P_MEAN_HPA = 1018.0

# Slow weather anomalies: AR(1) on a 3-hour grid, interpolated smoothly (Catmull-Rom) in
# between; (standard deviation, correlation time in h).
_GRID_H = 3
_T_ANOM = (2.0, 72.0)
_TD_ANOM = (1.5, 48.0)  # on top of 0.8 x the temperature anomaly: warm spells are moister
_P_ANOM = (5.0, 96.0)
_CLOUD = (0.25, 24.0)  # multiplies the diurnal swing around 1.0

_P_TIDE_HPA = 0.6
_FRONT_MEAN_GAP_H = 6 * 24.0  # a front every 6 days on average (Poisson)
_MARGIN_H = 5 * 24  # fronts outside the window still reach into it

# BME280 noise at high oversampling (datasheet RMS noise: 0.005 °C, 0.02 %RH, 0.2 Pa at x16;
# a little more in forced mode on a real board).
_NOISE_T_C = 0.015
_NOISE_RH = 0.05
_NOISE_P_HPA = 0.015

_TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
# BME280 operating ranges (datasheet table 1): -40..85 °C, 0..100 %RH, 300..1100 hPa.
_RANGES = {
    "temperature_c": (-40.0, 85.0),
    "humidity_pct": (0.0, 100.0),
    "pressure_hpa": (300.0, 1100.0),
}


def _day_of_year(ts_s: float) -> float:
    """Fractional day of year (0 = 1 January, 00:00 UTC), good to a day over centuries."""
    return (ts_s / 86400.0 - 10957.0) % 365.2425  # 10957 days from 1970-01-01 to 2000-01-01


def _sunrise_solar_hour(doy: float) -> float:
    """Sunrise in local solar hours (Cooper's declination, no refraction)."""
    decl = math.radians(23.44) * math.sin(2.0 * math.pi * (284.0 + doy) / 365.0)
    cos_h0 = max(-1.0, min(1.0, -math.tan(_LAT_RAD) * math.tan(decl)))
    return 12.0 - math.degrees(math.acos(cos_h0)) / 15.0


def _diurnal_shape(ts_s: float, doy: float) -> float:
    """-1 at sunrise, +1 at mid-afternoon: cosine rise, slower cosine fall through the night."""
    solar_h = (ts_s / 3600.0 + _LON_DEG / 15.0) % 24.0
    sunrise = _sunrise_solar_hour(doy)
    rise = _T_MAX_SOLAR_HOUR - sunrise
    if sunrise <= solar_h <= _T_MAX_SOLAR_HOUR:
        return -math.cos(math.pi * (solar_h - sunrise) / rise)
    since_max = (solar_h - _T_MAX_SOLAR_HOUR) % 24.0
    return math.cos(math.pi * since_max / (24.0 - rise))


def _seasonal(mean: float, ampl: float, coldest_doy: float, doy: float) -> float:
    return mean - ampl * math.cos(2.0 * math.pi * (doy - coldest_doy) / 365.2425)


def _ar1(rng: random.Random, n: int, sd: float, tau_h: float) -> list[float]:
    """Stationary AR(1) series on the _GRID_H grid."""
    phi = math.exp(-_GRID_H / tau_h)
    step_sd = sd * math.sqrt(1.0 - phi * phi)
    x = rng.gauss(0.0, sd)
    out = []
    for _ in range(n):
        out.append(x)
        x = phi * x + rng.gauss(0.0, step_sd)
    return out


def _fronts(rng: random.Random, t0_h: float, t1_h: float) -> list[tuple[float, ...]]:
    """Fronts as (centre_h, depth_hpa, sd_before_h, sd_after_h, cooling_c, dew_rise_c)."""
    fronts = []
    t = t0_h + rng.expovariate(1.0 / _FRONT_MEAN_GAP_H)
    while t < t1_h:
        depth = rng.uniform(10.0, 25.0)
        fronts.append(
            (
                t,
                depth,
                rng.uniform(10.0, 20.0),  # pressure falls over most of a day ...
                rng.uniform(6.0, 12.0),  # ... and recovers faster behind the front
                depth * rng.uniform(0.12, 0.25),  # 1.2 .. 6 °C cooler air behind it
                rng.uniform(2.0, 5.0),  # rain: dew point closes on the temperature
            )
        )
        t += rng.expovariate(1.0 / _FRONT_MEAN_GAP_H)
    return fronts


def _front_effects(fronts, centres, t_h: float) -> tuple[float, float, float, float]:
    """(pressure drop hPa, cooling °C, dew point rise °C, 0..1 cloudiness) at hour t_h.

    Only fronts centred from 120 h before to 120 h after t_h count (6 sd of the widest bell).
    """
    dp = cool = dew = cloud = 0.0
    first = bisect.bisect_left(centres, t_h - 120.0)
    last = bisect.bisect_right(centres, t_h + 120.0)
    for centre, depth, sd_before, sd_after, cooling, dew_rise in fronts[first:last]:
        dt = t_h - centre
        sd = sd_before if dt < 0.0 else sd_after
        bell = math.exp(-0.5 * (dt / sd) ** 2)
        dp = max(dp, depth * bell)  # overlapping lows merge rather than add up
        # cold air arrives with the front (3 h logistic) and is mixed away over ~36 h
        cool += cooling / (1.0 + math.exp(-dt / 3.0)) * math.exp(-max(dt, 0.0) / 36.0)
        dew += dew_rise * math.exp(-0.5 * (dt / 8.0) ** 2)
        cloud = max(cloud, bell)
    return dp, cool, dew, cloud


def _pressure_tide(ts_s: float) -> float:
    """Semidiurnal atmospheric tide: about 0.6 hPa at 45 °N, highs near 10 and 22 h solar."""
    solar_h = (ts_s / 3600.0 + _LON_DEG / 15.0) % 24.0
    return _P_TIDE_HPA * math.cos(2.0 * math.pi * (solar_h - 10.0) / 12.0)


def _relative_humidity(t_c: float, td_c: float) -> float:
    """Magnus formula (Alduchov & Eskridge 1996 coefficients), %RH."""
    a, b = 17.625, 243.04
    return 100.0 * math.exp(a * td_c / (b + td_c) - a * t_c / (b + t_c))


def _interp(series: list[float], x: float) -> float:
    """Catmull-Rom spline through the grid points: smooth, so no kinks at grid hours."""
    i = min(max(int(x), 1), len(series) - 3)
    f = x - i
    p0, p1, p2, p3 = series[i - 1], series[i], series[i + 1], series[i + 2]
    return p1 + 0.5 * f * (
        p2 - p0 + f * (2.0 * p0 - 5.0 * p1 + 4.0 * p2 - p3 + f * (3.0 * (p1 - p2) + p3 - p0))
    )


def generate(start_unix: int, interval_s: int, count: int, seed: int = 0) -> list[Row]:
    """`count` readings every `interval_s` seconds from `start_unix`; same arguments, same rows.

    Rows are (unix_ts, temperature_c, humidity_pct, pressure_hpa) rounded to 0.01.
    """
    if interval_s <= 0:
        raise ValueError(f"interval_s must be positive, got {interval_s}")
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    if count == 0:
        return []
    # One stream per process, so changing one model does not reshuffle the others.
    streams = {
        name: random.Random(f"citynode-weather/{seed}/{name}")
        for name in ("t", "td", "p", "cloud", "fronts", "noise")
    }
    grid0_h = start_unix // 3600 - _MARGIN_H  # grid anchored on a whole hour
    end_h = (start_unix + interval_s * (count - 1)) / 3600.0
    n = int((end_h - grid0_h) / _GRID_H) + _MARGIN_H // _GRID_H + 4
    t_anom = _ar1(streams["t"], n, *_T_ANOM)
    td_anom = _ar1(streams["td"], n, *_TD_ANOM)
    p_anom = _ar1(streams["p"], n, *_P_ANOM)
    cloud_anom = _ar1(streams["cloud"], n, *_CLOUD)
    fronts = _fronts(streams["fronts"], float(grid0_h), grid0_h + float(n * _GRID_H))
    centres = [front[0] for front in fronts]
    noise = streams["noise"]

    rows = []
    for k in range(count):
        ts = start_unix + k * interval_s
        t_h = ts / 3600.0
        x = (t_h - grid0_h) / _GRID_H
        doy = _day_of_year(ts)
        front_dp, front_cool, front_dew, front_cloud = _front_effects(fronts, centres, t_h)
        t_slow = _interp(t_anom, x)

        half_swing = (_DIURNAL_HALF_WINTER + _DIURNAL_HALF_SUMMER) / 2.0 - (
            _DIURNAL_HALF_SUMMER - _DIURNAL_HALF_WINTER
        ) / 2.0 * math.cos(2.0 * math.pi * (doy - _T_COLDEST_DOY) / 365.2425)
        sunshine = max(0.3, min(1.3, 1.0 + _interp(cloud_anom, x))) * (1.0 - 0.6 * front_cloud)
        temp = (
            _seasonal(_T_ANNUAL_MEAN, _T_ANNUAL_AMPL, _T_COLDEST_DOY, doy)
            + half_swing * sunshine * _diurnal_shape(ts, doy)
            + t_slow
            - front_cool
        )
        dew_point = (
            _seasonal(_TD_ANNUAL_MEAN, _TD_ANNUAL_AMPL, _TD_COLDEST_DOY, doy)
            + 0.8 * t_slow
            + _interp(td_anom, x)
            - front_cool  # the cold air behind a front is no moister ...
            + front_dew  # ... but the rain band along it is
        )
        pressure = _P_MEAN_HPA + _interp(p_anom, x) - front_dp + _pressure_tide(ts)

        temp += noise.gauss(0.0, _NOISE_T_C)
        rh = _relative_humidity(temp, dew_point) + noise.gauss(0.0, _NOISE_RH)
        pressure += noise.gauss(0.0, _NOISE_P_HPA)
        rows.append(
            (
                ts,
                round(temp, 2) + 0.0,  # + 0.0 turns -0.0 into 0.0
                round(min(100.0, max(0.0, rh)), 2) + 0.0,
                round(pressure, 2),
            )
        )
    return rows


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_row(name: str, lineno: int, line: str) -> Row:
    parts = line.split(",")
    if len(parts) != len(_FIELDS):
        raise ValueError(f"{name} line {lineno}: expected {len(_FIELDS)} fields, got {len(parts)}")
    stamp = parts[0]
    if not _TS_RE.fullmatch(stamp):
        raise ValueError(f"{name} line {lineno}: bad timestamp {stamp!r}")
    try:
        ts = int(datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())
    except ValueError:
        raise ValueError(f"{name} line {lineno}: bad timestamp {stamp!r}") from None
    values = []
    for field, text in zip(_FIELDS[1:], parts[1:], strict=True):
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or text != text.strip():
            raise ValueError(f"{name} line {lineno}: bad {field} {text!r}")
        low, high = _RANGES[field]
        if not low <= value <= high:
            raise ValueError(f"{name} line {lineno}: {field} {text} outside {low:g}..{high:g}")
        values.append(value)
    return (ts, values[0], values[1], values[2])


def read_trace(path) -> list[Row]:
    """Rows of a trace CSV (header `HEADER`, ISO UTC timestamps with Z, increasing in time).

    Malformed input raises ValueError naming the file and line, e.g.
    "trace.csv line 17: bad humidity_pct 'abc'".
    """
    path = Path(path)
    name = path.name
    with path.open(encoding="utf-8", newline=None) as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last row
    if not lines:
        raise ValueError(f"{name} line 1: empty file, expected header {HEADER!r}")
    if lines[0] != HEADER:
        raise ValueError(f"{name} line 1: expected header {HEADER!r}, got {lines[0]!r}")
    rows = []
    for lineno, line in enumerate(lines[1:], start=2):
        row = _parse_row(name, lineno, line)
        if rows and row[0] <= rows[-1][0]:
            raise ValueError(
                f"{name} line {lineno}: timestamp {line.split(',')[0]} not after the previous row"
            )
        rows.append(row)
    return rows


def write_trace(path, rows) -> None:
    """Write rows (unix_ts, temperature_c, humidity_pct, pressure_hpa) in the trace CSV format."""
    with Path(path).open("w", encoding="utf-8", newline="\n") as f:
        f.write(HEADER + "\n")
        for ts, temp, rh, pressure in rows:
            f.write(f"{_iso(int(ts))},{temp:.2f},{rh:.2f},{pressure:.2f}\n")

# Particulate matter for the simulated world: PM2.5 and PM10 as a low-cost optical sensor beside
# a city street would read them, made from the generated weather rows (host_tools/sim/weather.py).
#
# A model for simulation and benchmarks, not a forecast: an urban background (Koper, summer:
# EEA annual means for coastal Slovenian stations are of the order of 10-15 ug/m3 PM2.5) with
# morning and evening traffic peaks, slow regional swings (AR(1), hours), cleaner air after a
# rain front (falling pressure), and the humidity growth optical sensors show: particles take up
# water and scatter more light, so the reading rises steeply above ~70 %RH (kappa-Koehler form,
# as in the corrections the backend may apply; the node applies none). PM10 = PM2.5 plus a coarse
# fraction. Values rounded to 0.1 ug/m3, the SDS011's resolution.

import math
import random

_BACKGROUND = 9.0  # ug/m3 PM2.5, dry, between peaks
_PEAK = 7.0  # ug/m3 added at a traffic peak's height
_PEAKS_H = ((7.5, 1.5), (18.5, 2.0))  # local hour, width (h): rush hours
_UTC_OFFSET_H = 2  # CEST (the demo's day is in July)
_KAPPA = 0.25  # hygroscopicity of urban aerosol (kappa-Koehler; 0.1-0.4 in the literature)
_COARSE = 0.6  # PM10 - PM2.5 as a fraction of PM2.5, on average


def _hour(ts):
    return ((ts / 3600.0) + _UTC_OFFSET_H) % 24.0


def growth(rh):
    """Optical overreading from water uptake at rh %RH: 1 + kappa * aw / (1 - aw)."""
    aw = min(rh, 98.0) / 100.0
    return 1.0 + _KAPPA * aw / (1.0 - aw)


def add_pm(rows, seed=0):
    """rows of (ts, T, RH, P) -> (ts, T, RH, P, PM2.5, PM10); same rows and seed, same values."""
    rng = random.Random("citynode-pm/%d" % seed)
    slow = 0.0
    last_ts = None
    last_p = None
    out = []
    for row in rows:
        ts, _, rh, p = row[:4]
        dt_h = 0.0 if last_ts is None else max(0.0, (ts - last_ts) / 3600.0)
        # regional swing: AR(1) with a 6 h time constant, sd 0.35 (log units)
        a = math.exp(-dt_h / 6.0)
        slow = a * slow + math.sqrt(max(0.0, 1.0 - a * a)) * rng.gauss(0.0, 0.35)
        washout = 1.0
        if last_p is not None and dt_h > 0 and (last_p - p) / dt_h > 0.5:
            washout = 0.6  # pressure falling fast: a front, rain washing particles out
        h = _hour(ts)
        traffic = sum(math.exp(-(((h - c) / w) ** 2)) for c, w in _PEAKS_H)
        dry = (_BACKGROUND + _PEAK * traffic) * math.exp(slow) * washout
        pm25 = dry * growth(rh) * math.exp(rng.gauss(0.0, 0.08))
        pm10 = pm25 * (1.0 + _COARSE * math.exp(rng.gauss(0.0, 0.25)))
        out.append(tuple(row[:4]) + (round(min(pm25, 999.9), 1), round(min(pm10, 999.9), 1)))
        last_ts, last_p = ts, p
    return out

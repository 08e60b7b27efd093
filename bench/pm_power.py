"""Daily charge a particulate sensor costs a node, per sensor and sampling interval (issue 11).

The duty comes from the real firmware: `citynode demo --sensors bme280,<sensor> --interval S`
runs one node (firmware/sensors.py asleep between samples, woken 30 s before each) on the
simulated board, whose byte-level sensor counts how long its fan and laser ran (the summary's
pm_fan_duty). The currents are the datasheets':

- Nova SDS011 (datasheet V1.3, "Technical parameters"): working 70 mA +-10 mA, sleep (laser and
  fan off) < 4 mA; 5 V.
- Plantower PMS5003 (data manual 2016, "Technical index"): working <= 100 mA, standby <= 200 uA;
  5 V.
- Sensirion SPS30 (datasheet v1.0 2020, table 3): measurement mode 55 mA typical (80 max),
  sleep mode 38 uA typical; 5 V.

Maxima where the datasheet gives only a maximum, so the figures are upper bounds for the PMS5003
and typical for the others. mAh are at the sensor's 5 V rail; "battery mAh" is what a 3.7 V
Li-ion cell gives through a boost converter of 85 % efficiency (x 5 / (3.7 x 0.85)). The MCU,
radio and BME280 (0.16 uA at one forced reading a minute: nothing) are not in these figures.

    .venv/bin/python bench/pm_power.py [--hours 6]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# sensor: (active mA, sleep mA, source)
CURRENTS = {
    "sds011": (70.0, 4.0, "SDS011 datasheet V1.3: 70 +-10 mA working, < 4 mA sleep"),
    "pms5003": (100.0, 0.2, "PMS5003 data manual: <= 100 mA working, <= 200 uA standby"),
    "sps30": (55.0, 0.038, "SPS30 datasheet v1.0: 55 mA measuring (typ), 38 uA sleep (typ)"),
}
INTERVALS = (30, 60, 120, 300, 600, 900)
BOOST = 5.0 / (3.7 * 0.85)


def duty(sensor, interval, hours):
    """The fan-and-laser duty the firmware gives this sensor at this interval (demo run)."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "host_tools.cli", "demo", "--nodes", "1"]
            + ["--hours", str(hours), "--interval", str(interval), "--json"]
            + ["--sensors", "bme280," + sensor, "--db", str(Path(tmp) / "d.db")],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
    if proc.returncode != 0:
        sys.exit("pm_power: demo failed for %s at %d s:\n%s" % (sensor, interval, proc.stderr))
    s = json.loads(proc.stdout)
    if s["readings_lost"]:
        sys.exit("pm_power: the demo lost readings (%s, %d s)" % (sensor, interval))
    return s["pm_fan_duty"], s["pm_readings_stored"], s["readings_stored"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hours", type=float, default=6.0, help="simulated hours a run (6)")
    args = p.parse_args()
    print("## Particulate sensor power (bench/pm_power.py, --hours %g)\n" % args.hours)
    print(
        "| sensor | interval s | fan duty (measured) | PM readings | mA average (5 V) "
        "| mAh/day (5 V) | battery mAh/day (3.7 V, 85 % boost) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for sensor, (active, sleep, _) in CURRENTS.items():
        for interval in INTERVALS:
            d, pm_stored, stored = duty(sensor, interval, args.hours)
            avg = d * active + (1 - d) * sleep
            print(
                "| %s | %d | %.3f | %d of %d | %.2f | %.0f | %.0f |"
                % (sensor, interval, d, pm_stored, stored, avg, avg * 24, avg * 24 * BOOST)
            )
    print("\nCurrents:")
    for sensor, (_, _, source) in CURRENTS.items():
        print("- %s: %s" % (sensor, source))


if __name__ == "__main__":
    main()

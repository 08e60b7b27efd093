# Runs firmware/bme280.py against boards/sim/bme280.py on the MicroPython unix port, for tests.
# Usage: micropython bme280_mp_runner.py REPO_ROOT CASES.jsonl; one JSON result line per case.

import json
import sys

sys.path.insert(0, sys.argv[1])

from boards.sim.bme280 import SimBME280, SimI2C  # noqa: E402
from firmware.bme280 import BME280, SensorError  # noqa: E402

# One case per line, so a 64 KB heap never holds them all
with open(sys.argv[2]) as cases:
    for line in cases:
        case = json.loads(line)
        sim = SimBME280(case["calib"])
        sim.set_raw(case["raw"][0], case["raw"][1], case["raw"][2])
        try:
            result = list(BME280(SimI2C({0x76: sim})).read())
        except SensorError as e:
            result = str(e)
        print(json.dumps(result))

# The sensors of a node that has more than the BME280 (config "sensors"), read as one reading of
# the node's channels; loaded only by such nodes: a BME280-only node's heap does not carry it.
#
# Each sensor is a small driver (firmware/bme280.py, sds011.py, pms5003.py, sps30.py): its
# constructor opens it, read() returns its values as ints in the channels' units, and the
# particulate ones sleep() and wake() (fan and laser off between samples, on 30 s before
# the next one: the node's biggest energy cost, bench/pm_power.py). A sensor that fails leaves
# its channels absent (_ABSENT) in the reading and is opened again at the next sample; the others
# go on. Its faults are counted per sensor (STATUS fields 10-13, protocols/SPEC.md) and in the
# node's sensor_faults. A reading with absent values goes out in a frame of the channels present.

try:
    from micropython import const
except ImportError:  # CPython: host tests import this file unchanged

    def const(x):
        return x


# The journal's value for a channel whose sensor gave nothing: below any raw value a channel
# has (SPEC.md), and a small int on 32-bit ports (no allocation to compare it).
_ABSENT = const(-0x3FFFFFFF)
# Fan and laser running before a sample counts: 30 s for all three (SDS011: issue 11 and Nova's
# guidance; PMS5003 datasheet: "at least 30 seconds after the sensor wakeup"; SPS30 datasheet
# 1.1: start-up time up to 30 s at low concentrations). Sleeping pays only above this interval.
_SPINUP_MS = const(30000)
_MARGIN_MS = const(10000)  # sleep the PM sensor only if it would stay asleep this long
_LATE_MS = const(1000)  # a lightsleep may end a little early: still spun up
_SPS30_ADDRESS = const(0x69)  # its only one (SPS30 datasheet 6)


class Sensors:
    # The node's sensors (cfg.sensors; channels: their SPEC.md ids). read() -> a tuple, one
    # value a channel (_ABSENT where a sensor failed or is still spinning up), or None if no
    # sensor gave anything; idle_ms(ms) sleeps until the next sample, waking the PM sensor
    # _SPINUP_MS before.

    def __init__(self, cfg, board, log, stats):
        self.cfg = cfg
        self.channels = channels(cfg.sensors)
        self._board = board
        self._log = log
        self.stats = stats  # the node's counters: sensor_faults counts every sensor's
        n = len(cfg.sensors)
        self._drivers = [None] * n  # type: list
        self.faults = [0] * n
        self._pm = -1
        self._woke = None  # board ms at which the PM sensor was woken; None: asleep
        for i in range(n):
            if cfg.sensors[i]["type"] != "bme280":
                self._pm = i
            self._open(i)

    def _open(self, i):
        spec = self.cfg.sensors[i]
        kind = spec["type"]
        uart = spec.get("uart")  # the serial ones'; the others are on the I2C bus
        board = self._board
        try:
            # firmware/<kind>.py, class <KIND>: opens it (awake) or raises
            cls = getattr(__import__("firmware." + kind, None, None, (kind,)), kind.upper())
            if uart is None:
                address = board.BME280_ADDRESS if kind == "bme280" else _SPS30_ADDRESS
                where = "i2c 0x%02x" % address
                d = cls(board.i2c(), address=address, sleep_ms=board.sleep_ms)
            else:
                where = "uart %d" % uart
                d = cls(board.uart(uart), board.sleep_ms, where)
        except MemoryError:
            raise
        except Exception as e:  # the driver's SensorError, a bus error: count, go on
            self._fault(i, e)
            return None
        if i == self._pm:
            self._woke = board.ticks_ms()
        self._drivers[i] = d
        self._log.info("sensor", kind + " ready", at=where)
        return d

    def _fault(self, i, e):
        # count it; the sensor is opened again at the next sample
        self._drivers[i] = None
        self.faults[i] += 1
        self.stats["sensor_faults"] += 1
        self._log.error("sensor", str(e) or type(e).__name__)

    def read(self):
        values = [_ABSENT] * len(self.channels)
        got = False
        at = 0
        pm = self._pm
        for i in range(len(self.cfg.sensors)):
            width = 3 if self.cfg.sensors[i]["type"] == "bme280" else 2
            d = self._drivers[i]
            if d is None:
                d = self._open(i)
            if d is not None and (
                i != pm
                or (  # a PM sensor counts once its fan has run _SPINUP_MS
                    self._woke is not None
                    and self._board.ticks_ms() - self._woke >= _SPINUP_MS - _LATE_MS
                )
            ):
                try:
                    v = d.read()
                except MemoryError:
                    raise
                except Exception as e:
                    self._fault(i, e)
                else:
                    for k in range(width):
                        values[at + k] = v[k]
                    got = True
            at += width
        # sleep the PM sensor until idle_ms() wakes it, if the interval leaves time to
        if self.cfg.interval_s * 1000 > _SPINUP_MS + _MARGIN_MS and self._woke is not None:
            self._woke = None
            d = self._drivers[pm]
            try:
                if d is not None:
                    d.sleep()
            except MemoryError:
                raise
            except Exception as e:
                self._fault(pm, e)
        return tuple(values) if got else None

    def idle_ms(self, ms):
        # board.idle_ms(ms), waking the PM sensor _SPINUP_MS before the next sample; False
        # when a simulated world ends.
        board = self._board
        idle_ms = board.idle_ms
        d = self._drivers[self._pm] if self._pm >= 0 else None
        if d is None or self._woke is not None:
            return idle_ms(ms)
        if ms > _SPINUP_MS:
            # (early_ms tells the simulated board that this sleep ends before the sample)
            if not idle_ms(ms - _SPINUP_MS, _SPINUP_MS):
                return False
            ms = _SPINUP_MS
        try:
            d.wake()
            self._woke = board.ticks_ms()
        except MemoryError:
            raise
        except Exception as e:
            self._fault(self._pm, e)
        return idle_ms(ms)

    # (method names node.py calls are qstrs a BME280-only node holds too: names it has already)

    def frame(self, readings, ages):
        # node.py's _place(): (readings, ages, 0, channels) for the oldest frame's worth
        channels, readings, ages = present(self.channels, readings, ages)
        return readings, ages, 0, channels

    def update(self, fields):
        # Add each sensor's faults since boot to a STATUS frame's fields.
        for i in range(len(self.cfg.sensors)):
            # STATUS field of each kind's faults (SPEC.md "STATUS frame"): 10 + its place here
            kind = ("bme280", "sds011", "pms5003", "sps30").index(self.cfg.sensors[i]["type"])
            fields[10 + kind] = self.faults[i]


def channels(sensors):
    # SPEC.md channel ids of a reading, in the order of config "sensors"
    out = ()  # type: tuple
    for spec in sensors:
        out += (1, 2, 3) if spec["type"] == "bme280" else (4, 5)
    return out


def present(channels, readings, ages):
    # The oldest readings that have the same channels present, without the absent values:
    # (channels, readings, ages) for one frame (a frame has one channel set, SPEC.md).
    if not readings:
        return channels, readings, ages
    first = readings[0]
    width = len(first)
    n = 1
    while n < len(readings):
        r = readings[n]
        for j in range(width):
            if (r[j] == _ABSENT) != (first[j] == _ABSENT):
                break
        else:
            n += 1
            continue
        break
    if _ABSENT not in first and n == len(readings):
        return channels, readings, ages
    # the channels, then each reading, with only the places first has a value in
    # (loops, not comprehensions: each of those would be code of its own on the heap)
    out = []
    for r in [channels] + readings[:n]:
        v = []
        for j in range(width):
            if first[j] != _ABSENT:
                v.append(r[j])
        out.append(tuple(v))
    return out[0], out[1:], ages[:n]

# The real board definitions: each compiles for its MCU, and on the MicroPython unix port, with
# fake machine/network/lora/time modules that record what is asked of them, builds its buses and
# radio on the pins boards/README.md documents, handles Wi-Fi, sleep and watchdog as it says.
import ast
import json
import subprocess
import sys

import pytest

from host_tools import build

ROOT = build.ROOT
BOARDS = ("esp32_devkitc", "heltec_v3", "lilygo_t3_v161", "pico_w", "pico_lora_sx1262")
WIFI = {"ssid": "koper-city", "password": "secret-pass"}

# Fakes of the hardware modules: they record every constructor call and pin request in LOG and
# keep a virtual clock (time and machine.lightsleep advance it), so tests are exact and fast.
PRELUDE = r"""
import sys, json
LOG = []
NOW = [0]
_P = 1 << 30

class Mod:
    def __init__(self, **kw):
        for k in kw:
            setattr(self, k, kw[k])

def _sleep_ms(ms):
    LOG.append(["sleep_ms", ms])
    NOW[0] += ms

ftime = Mod(
    ticks_ms=lambda: NOW[0] % _P,
    ticks_diff=lambda a, b: ((a - b + _P // 2) % _P) - _P // 2,
    ticks_add=lambda a, d: (a + d) % _P,
    sleep_ms=_sleep_ms,
    sleep=lambda s: _sleep_ms(int(s * 1000)),
    # the RTC: ms since 2024 plus what ran before the last wake (it counts through deep sleep)
    time_ns=lambda: (1704067200000 + BEFORE[0] + NOW[0]) * 1000000,
)

class Pin:
    IN = 1
    OUT = 2
    IRQ_RISING = 4
    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
    def init(self, mode=-1, pull=-1, value=None):
        pass
    def irq(self, handler=None, trigger=0):
        pass
    def __call__(self, v=None):
        pass

def _pin(p):
    return p.id if p is not None else None

class I2C:
    def __init__(self, id, *, scl, sda, freq=400000):
        LOG.append(["I2C", id, _pin(sda), _pin(scl), freq])

class SPI:
    def __init__(self, id, baudrate=1000000, *, polarity=0, phase=0, sck=None, mosi=None,
                 miso=None):
        LOG.append(["SPI", id, _pin(sck), _pin(mosi), _pin(miso), baudrate, polarity, phase])

class WDT:
    def __init__(self, id=0, timeout=5000):
        LOG.append(["WDT", timeout])
    def feed(self):
        LOG.append(["feed", NOW[0]])

def _lightsleep(ms=None):
    LOG.append(["lightsleep", ms])
    NOW[0] += ms

BEFORE = [0]
RTC_MEM = [b""]

class RTC:
    def memory(self, data=None):
        if data is None:
            return RTC_MEM[0]
        RTC_MEM[0] = bytes(data)

class DeepSleep(Exception):
    pass

def _deepsleep(ms=None):  # the chip powers down: nothing after this call runs
    LOG.append(["deepsleep", ms])
    raise DeepSleep(ms)

def wake(ms):
    # ms of deep sleep pass; the chip resets: ticks_ms starts again, the RTC counted on
    BEFORE[0] += NOW[0] + ms
    NOW[0] = 0
    CAUSE[0] = 4

CAUSE = [1]
fmachine = Mod(Pin=Pin, I2C=I2C, SPI=SPI, WDT=WDT, lightsleep=_lightsleep, RTC=RTC,
               deepsleep=_deepsleep,
               reset_cause=lambda: CAUSE[0], PWRON_RESET=1, HARD_RESET=2, WDT_RESET=3,
               DEEPSLEEP_RESET=4, SOFT_RESET=5)

# WLAN: NET["after"] = ms from connect() to connected (None: never); NET["fail"] = the status
# it reports while not connected.
NET = {"after": 0, "fail": 1, "connects": 0}

class WLAN:
    def __init__(self, iface):
        self._active = False
        self._t = None
        NET["wlan"] = self
    def active(self, v=None):
        if v is None:
            return self._active
        self._active = bool(v)
        LOG.append(["active", self._active])
    def connect(self, ssid, key):
        NET["connects"] += 1
        LOG.append(["connect", ssid, key, NOW[0]])
        self._t = NOW[0]
    def disconnect(self):
        LOG.append(["disconnect", NOW[0]])
        self._t = None
    def isconnected(self):
        after = NET["after"]
        return (self._active and self._t is not None and after is not None
                and NOW[0] - self._t >= after)
    def status(self):
        return 3 if self.isconnected() else NET["fail"]

fnetwork = Mod(WLAN=WLAN, STA_IF=0, STAT_IDLE=0, STAT_CONNECTING=1, STAT_GOT_IP=3,
               STAT_CONNECT_FAIL=-1, STAT_NO_AP_FOUND=-2, STAT_WRONG_PASSWORD=-3,
               country=lambda c: LOG.append(["country", c]),
               hostname=lambda h: LOG.append(["hostname", h]))

def _modem(name, spi, cs, kw):
    rec = {"class": name, "cs": cs.id}
    for k in kw:
        v = kw[k]
        rec[k] = v.id if isinstance(v, Pin) else v
    LOG.append(["modem", rec])

class SX1262:
    def __init__(self, spi, cs, busy, dio1=None, dio2_rf_sw=True, dio3_tcxo_millivolts=None,
                 dio3_tcxo_start_time_us=1000, reset=None, lora_cfg=None, ant_sw=None):
        _modem("SX1262", spi, cs, {"busy": busy, "dio1": dio1, "dio2_rf_sw": dio2_rf_sw,
               "dio3_tcxo_millivolts": dio3_tcxo_millivolts, "reset": reset,
               "lora_cfg": lora_cfg, "ant_sw": ant_sw})

class SX1276:
    def __init__(self, spi, cs, dio0=None, dio1=None, reset=None, lora_cfg=None, ant_sw=None):
        _modem("SX1276", spi, cs, {"dio0": dio0, "dio1": dio1, "reset": reset,
               "lora_cfg": lora_cfg, "ant_sw": ant_sw})

sys.modules["time"] = ftime
sys.modules["machine"] = fmachine
sys.modules["network"] = fnetwork
if not NO_LORA:
    sys.modules["lora"] = Mod(SX1262=SX1262, SX1276=SX1276)

def build(name, cfg):
    return getattr(__import__("boards." + name), name).Board(cfg)

def out(**kw):
    print("RESULT " + json.dumps(kw))
"""


def run_board(run_mp, body, no_lora=False):
    """Runs PRELUDE + body on the unix port (64 KB heap, .mpy build); returns the dicts the
    script printed with out(...)."""
    script = "NO_LORA = %s\n%s\n%s" % (no_lora, PRELUDE, body)
    text = run_mp(script)
    return [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]


def config(board, **extra):
    cfg = {"node_id": 17, "board": board}
    if board in ("esp32_devkitc", "pico_w"):
        cfg["wifi"] = dict(WIFI)
    cfg.update(extra)
    return cfg


def board_arch(name):
    """ARCH of boards/<name>.py, read from its source (it imports machine: no CPython import)."""
    tree = ast.parse((ROOT / "boards" / (name + ".py")).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Board":
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and stmt.targets[0].id == "ARCH":
                    return stmt.value.value
    raise AssertionError("boards/%s.py: class Board has no ARCH" % name)


def readme_pins():
    """The pin table of boards/README.md as {board: {column: value}}."""
    text = (ROOT / "boards" / "README.md").read_text()
    table = text.split("<!-- pins -->")[1].split("<!-- /pins -->")[0].strip().splitlines()
    head = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {}
    for line in table[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = {}
        for key, cell in zip(head, cells, strict=True):
            row[key] = None if cell == "-" else int(cell) if cell.isdigit() else cell
        rows[row["board"]] = row
    return rows


# --- compiled for the real targets ------------------------------------------------------------


@pytest.mark.parametrize("name", BOARDS)
def test_board_compiles_for_its_arch(tmp_path, name):
    arch = board_arch(name)
    assert arch in set(build.ARCHES.values())
    mpy_cross = build.tool("mpy-cross")
    for src in ("boards/%s.py" % name, "boards/hw.py"):
        out = tmp_path / "out.mpy"
        proc = subprocess.run(
            [mpy_cross, "-march=" + arch, "-o", str(out), src],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert out.stat().st_size > 0


def test_readme_lists_every_board():
    rows = readme_pins()
    assert sorted(rows) == sorted(BOARDS)
    for name in BOARDS:
        assert rows[name]["ARCH"] == board_arch(name)


# --- wiring: what each board asks of machine and lora --------------------------------------


@pytest.mark.parametrize("name", BOARDS)
def test_board_builds_its_buses_and_radio_on_the_documented_pins(run_mp, name):
    doc = readme_pins()[name]
    (res,) = run_board(
        run_mp,
        """
b = build(%r, %r)
b.i2c()
b.i2c()  # built once
modem = None
if b.RADIO:
    modem = b.radio()
    assert b.radio() is modem
out(name=b.NAME, arch=b.ARCH, radio=b.RADIO, mip=list(b.MIP_PACKAGES), sensors=list(b.SENSORS),
    address=b.BME280_ADDRESS, log=[e for e in LOG if e[0] in ("I2C", "SPI", "modem")])
"""
        % (name, config(name)),
    )
    assert res["name"] == name
    assert res["arch"] == doc["ARCH"]
    assert res["sensors"] == ["bme280"]
    assert res["address"] == 0x76
    assert res["radio"] == doc["radio"]
    assert res["mip"] == (doc["MIP_PACKAGES"].split() if doc["MIP_PACKAGES"] else [])
    log = res["log"]
    assert log[0] == ["I2C", doc["I2C id"], doc["SDA"], doc["SCL"], 100000]
    if doc["radio"] is None:
        assert len(log) == 1
        return
    assert len(log) == 3, log
    assert log[1][:5] == ["SPI", doc["SPI id"], doc["SCK"], doc["MOSI"], doc["MISO"]]
    assert log[1][5:] == [2000000, 0, 0]  # baud, CPOL, CPHA (SPI mode 0, both chips)
    modem = log[2][1]
    assert modem["cs"] == doc["CS"]
    assert modem["reset"] == doc["RESET"]
    assert modem["dio1"] == doc["DIO1"]
    assert modem["ant_sw"] is None
    cfg = modem["lora_cfg"]
    expected_cfg = {
        "freq_khz": 868100,
        "sf": 7,
        "bw": "125",
        "coding_rate": 5,
        "preamble_len": 8,
        "output_power": 14,
        "syncword": 0x12,
        "crc_en": True,
        "implicit_header": False,
    }
    if doc["radio"] == "sx1262":
        assert modem["class"] == "SX1262"
        assert modem["busy"] == doc["BUSY"]
        assert modem["dio2_rf_sw"] is True
        assert modem["dio3_tcxo_millivolts"] == doc["TCXO mV"]
        assert doc["MIP_PACKAGES"] == "lora-sx126x lora-sync"
    else:
        assert modem["class"] == "SX1276"
        assert modem["dio0"] == doc["DIO0"]
        assert doc["MIP_PACKAGES"] == "lora-sx127x lora-sync"
        expected_cfg["tx_ant"] = "PA_BOOST"
    assert cfg == expected_cfg


def test_board_config_overrides_reach_the_buses_and_modem(run_mp):
    (res,) = run_board(
        run_mp,
        """
b = build("heltec_v3", {"node_id": 3, "bme280_address": 0x77, "i2c_freq": 400000,
                        "lora": {"sf": 9, "freq_khz": 868300, "output_power": 10}})
b.i2c()
b.radio()
out(address=b.BME280_ADDRESS, i2c=[e for e in LOG if e[0] == "I2C"][0],
    cfg=[e for e in LOG if e[0] == "modem"][0][1]["lora_cfg"])
""",
    )
    assert res["address"] == 0x77
    assert res["i2c"][4] == 400000
    assert (res["cfg"]["sf"], res["cfg"]["freq_khz"], res["cfg"]["output_power"]) == (
        9,
        868300,
        10,
    )


def test_radio_without_drivers_names_the_mip_packages(run_mp):
    (res,) = run_board(
        run_mp,
        """
b = build("lilygo_t3_v161", {})
try:
    b.radio()
except ImportError as e:
    out(err=str(e))
""",
        no_lora=True,
    )
    assert res["err"] == (
        "board lilygo_t3_v161 needs micropython-lib lora-sx127x and lora-sync: "
        "mpremote mip install lora-sx127x lora-sync"
    )


def test_radio_on_a_board_without_one_is_a_precise_error(run_mp):
    (res,) = run_board(
        run_mp,
        """
try:
    build("pico_w", {"wifi": {"ssid": "x"}}).radio()
except ValueError as e:
    out(err=str(e))
""",
    )
    assert res["err"] == "board pico_w has no LoRa radio"


# --- configuration errors ---------------------------------------------------------------------

BAD_CONFIGS = [
    ("esp32_devkitc", {}, 'config: board esp32_devkitc sends over Wi-Fi: add "wifi": '),
    ("pico_w", {"wifi": "koper"}, "config: wifi must be an object, got 'koper'"),
    ("pico_w", {"wifi": {"password": "secret-pass"}}, "config: wifi.ssid must be a string"),
    ("pico_w", {"wifi": {"ssid": "x" * 33}}, "config: wifi.ssid must be a string of 1..32"),
    ("pico_w", {"wifi": {"ssid": "k", "password": "short"}}, "config: wifi.password must be"),
    ("pico_w", {"wifi": {"ssid": "k", "pass": "secret-pass"}}, "config: wifi: unknown key 'pass'"),
    ("pico_w", {"wifi": {"ssid": "k", "country": "SVN"}}, "config: wifi.country must be a 2-le"),
    (
        "pico_w",
        {"wifi": {"ssid": "k", "timeout_ms": 50}},
        "config: wifi.timeout_ms must be 1000..",
    ),
    (
        "pico_lora_sx1262",
        {"wifi": WIFI},
        'config: board pico_lora_sx1262 has no Wi-Fi (remove "wifi")',
    ),
    ("esp32_devkitc", {"wifi": WIFI, "lora": {}}, "config: board esp32_devkitc has no LoRa radio"),
    ("heltec_v3", {"lora": {"sf": 13}}, "config: lora.sf must be 7..12, got 13"),
    ("heltec_v3", {"lora": {"sf": "9"}}, "config: lora.sf must be an integer, got '9'"),
    ("heltec_v3", {"lora": {"sf": True}}, "config: lora.sf must be an integer, got True"),
    ("heltec_v3", {"lora": {"freq_khz": 915000}}, "config: lora.freq_khz must be 863063..869937"),
    (
        "lilygo_t3_v161",
        {"lora": {"output_power": 20}},
        "config: lora.output_power must be -9..14, got 20",
    ),
    (
        "heltec_v3",
        {"lora": {"SF": 9}},
        "config: lora: unknown key 'SF' (known: ack_freq_khz, freq_khz, max_batch, "
        "output_power, sf)",
    ),
    ("heltec_v3", {"lora": {"max_batch": 0}}, "config: lora.max_batch must be 1..255, got 0"),
    (
        "heltec_v3",
        {"lora": {"ack_freq_khz": 915000}},
        "config: lora.ack_freq_khz must be 863063..869937",
    ),
    ("heltec_v3", {"lora": [7]}, "config: lora must be an object, got [7]"),
    (
        "heltec_v3",
        {"bme280_address": 0x40},
        "config: bme280_address must be 118 (0x76) or 119 (0x77), got 64",
    ),
    ("heltec_v3", {"i2c_freq": 1000000}, "config: i2c_freq must be 10000..400000, got 1000000"),
    ("heltec_v3", {"idle": "nap"}, 'config: idle must be "light", "wait" or "deep", got \'nap\''),
    ("pico_w", {"idle": "deep"}, "config: board pico_w cannot deep sleep and keep RTC memory"),
    ("heltec_v3", {"idle": "deep", "link": "lora"}, 'config: idle "deep" is for Wi-Fi nodes'),
]


@pytest.mark.parametrize("name,cfg,message", BAD_CONFIGS)
def test_bad_board_config_is_a_precise_value_error(run_mp, name, cfg, message):
    (res,) = run_board(
        run_mp,
        """
try:
    build(%r, %r)
    out(err=None)
except Exception as e:
    out(type=type(e).__name__, err=str(e))
"""
        % (name, cfg),
    )
    assert res["type"] == "ValueError"  # firmware/bringup.py logs ValueError and retries
    assert res["err"].startswith(message), res["err"]


# --- Wi-Fi: bounded attempts, early failure, back-off ---------------------------------------


def test_wifi_connects_within_one_attempt(run_mp):
    (res,) = run_board(
        run_mp,
        """
NET["after"] = 2350
b = build("esp32_devkitc", %r)
t0 = b.ticks_ms()
up = b.network_up()
out(up=up, took=b.ticks_ms() - t0, again=b.network_up(), connects=NET["connects"],
    log=[e for e in LOG if e[0] in ("country", "hostname", "active", "connect")],
    error=b.net_error, failures=b.wifi_failures)
"""
        % config("esp32_devkitc"),
    )
    assert res["up"] is True and res["again"] is True
    assert 2350 <= res["took"] <= 2450  # polled every 100 ms
    assert res["connects"] == 1
    assert res["log"] == [
        ["country", "SI"],
        ["hostname", "citynode-17"],
        ["active", True],
        ["connect", "koper-city", "secret-pass", 0],
    ]
    assert res["error"] is None and res["failures"] == 0


def test_wifi_attempt_is_bounded_and_backs_off_with_jitter(run_mp):
    res = run_board(
        run_mp,
        """
NET["after"] = None  # the access point never answers
b = build("pico_w", %r)
attempts = []
disconnects = 0
for i in range(12):
    del LOG[:]  # keep the 64 KB heap for the board
    t0 = b.ticks_ms()
    n0 = NET["connects"]
    up = b.network_up()
    took = b.ticks_ms() - t0
    assert not up
    # While backing off: False at once, no new attempt.
    t1 = b.ticks_ms()
    assert not b.network_up() and b.ticks_ms() == t1 and NET["connects"] == n0 + 1
    wait = b._wifi_next - b.ticks_ms()
    attempts.append([took, wait, b.wifi_failures])
    disconnects += len([e for e in LOG if e[0] == "disconnect"])
    NOW[0] += wait  # the back-off runs out
out(attempts=attempts, error=b.net_error, connects=NET["connects"], disconnects=disconnects)
NET["after"] = 0  # the access point is back
out(up=b.network_up(), failures=b.wifi_failures, error=b.net_error)
"""
        % config("pico_w", wifi={"ssid": "koper-city", "password": "", "timeout_ms": 4000}),
    )
    first, back = res
    assert first["connects"] == 12
    assert first["disconnects"] == 12  # each failed attempt stops the driver's own retries
    assert first["error"] == "wifi 'koper-city': not connected after 4000 ms (still connecting)"
    for i, (took, wait, failures) in enumerate(first["attempts"]):
        assert 4000 <= took <= 4100  # bounded by wifi.timeout_ms
        assert failures == i + 1
        base = min(5000 << i, 300000)
        assert base <= wait <= base * 5 // 4, (i, wait)
    waits = [w for _, w, _ in first["attempts"]]
    assert len(set(waits)) > 1  # jittered, not a fixed schedule
    assert back == {"up": True, "failures": 0, "error": None}


@pytest.mark.parametrize(
    "status,why",
    [
        (-3, "wrong password"),
        (-2, "no access point"),
        (-1, "connection failed"),
        (-9, "status -9"),
    ],
)
def test_wifi_failure_status_is_named_but_does_not_cut_the_attempt(run_mp, status, why):
    # The ESP32 port keeps the previous disconnect reason during a new attempt and retries
    # by itself: only the timeout ends an attempt.
    (res,) = run_board(
        run_mp,
        """
NET["after"] = None
NET["fail"] = %d
b = build("esp32_devkitc", %r)
t0 = b.ticks_ms()
up = b.network_up()
out(up=up, took=b.ticks_ms() - t0, error=b.net_error)
"""
        % (status, config("esp32_devkitc", wifi=dict(WIFI, timeout_ms=3000))),
    )
    assert res["up"] is False
    assert 3000 <= res["took"] <= 3100
    assert res["error"] == "wifi 'koper-city': not connected after 3000 ms (%s)" % why


def test_wifi_connects_although_the_previous_failure_status_lingers(run_mp):
    (res,) = run_board(
        run_mp,
        """
NET["after"] = 1800
NET["fail"] = -3  # what the port still reports from the last attempt
b = build("esp32_devkitc", %r)
out(up=b.network_up(), error=b.net_error)
"""
        % config("esp32_devkitc"),
    )
    assert res == {"up": True, "error": None}


def test_board_without_wifi_config_reports_network_down(run_mp):
    (res,) = run_board(
        run_mp,
        'out(up=build("heltec_v3", {}).network_up(), connects=NET["connects"])',
    )
    assert res == {"up": False, "connects": 0}


# --- sleep and watchdog --------------------------------------------------------------------


def test_idle_light_takes_wifi_down_and_feeds_the_watchdog(run_mp):
    (res,) = run_board(
        run_mp,
        """
b = build("pico_w", %r)
assert b.network_up()
w = b.wdt(30000)
del LOG[:]
t0 = b.ticks_ms()
ok = b.idle_ms(60000)
out(ok=ok, slept=b.ticks_ms() - t0, active=NET["wlan"].active(), log=LOG)
"""
        % config("pico_w"),
    )
    assert res["ok"] is True
    assert res["slept"] == 60000
    assert res["active"] is False
    log = res["log"]
    assert log[:2] == [["disconnect", log[0][1]], ["active", False]]
    sleeps = [e[1] for e in log if e[0] == "lightsleep"]
    assert sum(sleeps) == 60000 and max(sleeps) <= 8388 // 2
    assert not [e for e in log if e[0] == "sleep_ms"]
    feeds = [e[1] for e in log if e[0] == "feed"]
    gaps = [b - a for a, b in zip(feeds, feeds[1:], strict=False)]
    assert feeds[0] == 0 and max(gaps) <= 8388 // 2 and feeds[-1] == 60000


def test_idle_wait_keeps_wifi_up(run_mp):
    (res,) = run_board(
        run_mp,
        """
b = build("esp32_devkitc", %r)
assert b.network_up()
del LOG[:]
b.idle_ms(10000)
out(active=NET["wlan"].active(), connected=NET["wlan"].isconnected(),
    kinds=sorted(set(e[0] for e in LOG)), slept=sum(e[1] for e in LOG if e[0] == "sleep_ms"))
"""
        % config("esp32_devkitc", idle="wait"),
    )
    assert res == {"active": True, "connected": True, "kinds": ["sleep_ms"], "slept": 10000}


def test_deep_sleep_keeps_state_in_rtc_memory_and_the_clock_counts_on(run_mp):
    (res,) = run_board(
        run_mp,
        """
b = build("esp32_devkitc", %r)
assert b.deep and b.network_up()
NOW[0] += 5000
del LOG[:]
try:
    b.deepsleep(55000, b"kept")
    out(err="deepsleep returned")
except DeepSleep:
    pass
slept = LOG[:]
power_on = build("esp32_devkitc", %r).wake_state(1)
wake(55000)
b = build("esp32_devkitc", %r)
state = b.wake_state(b.reset_cause())
t = b.ticks_ms()
NOW[0] += 1000
out(slept=slept, power_on=power_on, state=state.decode(), t=[t, b.ticks_ms()])
"""
        % ((config("esp32_devkitc", idle="deep"),) * 3),
    )
    # Wi-Fi off, then the chip sleeps; the state comes back only after a deep-sleep wake, and
    # the ms clock goes on from where it was (5 s awake + 55 s asleep), not from 0.
    assert [e[0] for e in res["slept"]] == ["disconnect", "active", "deepsleep"]
    assert res["slept"][-1] == ["deepsleep", 55000]
    assert res["power_on"] is None and res["state"] == "kept"
    assert res["t"] == [60000, 61000]


def test_wdt_is_clamped_to_the_rp2040_maximum_and_started_once(run_mp):
    (res,) = run_board(
        run_mp,
        """
b = build("pico_lora_sx1262", {})
w = b.wdt(30000)
same = b.wdt(2000) is w
c = build("heltec_v3", {})
c.wdt(10)
CAUSE[0] = 3
out(wdts=[e[1] for e in LOG if e[0] == "WDT"], same=same, cause=b.reset_cause())
""",
    )
    assert res == {"wdts": [8388, 1000], "same": True, "cause": 3}


def test_clock_grows_across_the_ticks_wrap(run_mp):
    (res,) = run_board(
        run_mp,
        """
NOW[0] = (1 << 30) - 1500  # time.ticks_ms() wraps 1.5 s after boot
b = build("pico_lora_sx1262", {})
seen = []
for i in range(6):
    seen.append(b.ticks_ms())
    NOW[0] += 1000
NOW[0] += 5 * 86400 * 1000  # five days in one lightsleep
seen.append(b.ticks_ms())
out(seen=seen)
""",
    )
    # counted on from the port's ticks at boot, so that every value is the port's
    # time.ticks_ms() modulo 2**30 (what the LoRa driver's tx_at_ms is compared with)
    base = (1 << 30) - 1500
    ticks = [base + i * 1000 for i in range(6)] + [base + 6000 + 5 * 86400 * 1000]
    assert res["seen"] == ticks
    assert [t % (1 << 30) for t in res["seen"]][1:3] == [(1 << 30) - 500, 500]


def test_wait_readable_polls_a_real_udp_socket(run_mp):
    (res,) = run_board(
        run_mp,
        """
import socket
b = build("pico_w", %r)
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(47000, 47100):
    try:
        rx.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
        break
    except OSError:
        pass
empty = b.wait_readable(rx, 20)
tx = b.udp_socket()
tx.sendto(b"ack", b.uplink_address(("127.0.0.1", port)))
out(empty=empty, ready=b.wait_readable(rx, 2000), data=rx.recv(16).decode(),
    cached=b.uplink_address(("127.0.0.1", port)) is b.uplink_address(("127.0.0.1", port)))
"""
        % config("pico_w"),
    )
    assert res == {"empty": False, "ready": True, "data": "ack", "cached": True}


def test_wifi_attempt_feeds_the_watchdog(run_mp):
    (res,) = run_board(
        run_mp,
        """
NET["after"] = None
b = build("esp32_devkitc", %r)
b.wdt(8388)
del LOG[:]
def quiet_sleep_ms(ms):  # unlogged: keeps the 64 KB heap small
    NOW[0] += ms
ftime.sleep_ms = quiet_sleep_ms
b.network_up()
out(feeds=[e[1] for e in LOG if e[0] == "feed"], now=NOW[0])
"""
        % config("esp32_devkitc", wifi=dict(WIFI, timeout_ms=9000)),
    )
    assert res["now"] >= 9000
    feeds = res["feeds"]
    gaps = [b - a for a, b in zip(feeds, feeds[1:], strict=False)]
    assert feeds[0] == 0 and res["now"] - feeds[-1] <= 4194 and max(gaps) <= 4194


def test_mpy_sizes_bench_reports_every_board_file_for_both_arches():
    proc = subprocess.run(
        [sys.executable, "bench/mpy_sizes.py", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    table = json.loads(proc.stdout)
    for name in BOARDS + ("hw",):
        sizes = table["boards/%s.mpy" % name]
        assert set(sizes) == {"xtensawin", "armv6m"} and all(s > 0 for s in sizes.values())

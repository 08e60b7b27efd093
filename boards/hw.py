# What every real board (ESP32, ESP32-S3, RP2040) shares: clock, waits that feed the watchdog,
# Wi-Fi with bounded attempts and back-off, UDP, and the micropython-lib LoRa modem built from
# the pins a board module declares. Each boards/<name>.py subclasses RealBoard; README.md there
# is the board API contract and the pin table.

import random
import select
import time

import machine
from micropython import const

# RP2040 datasheet 4.7: a 24-bit watchdog counter that erratum RP2040-E1 decrements twice per
# microsecond, so at most 0xffffff / 2 us = 8388 ms (MicroPython's rp2 machine.WDT refuses more).
# One figure on every board keeps the firmware's timing board-independent.
_WDT_MAX_MS = const(8388)
_WDT_MIN_MS = const(1000)
_SLICE_MS = const(60000)  # longest single sleep when no watchdog runs

_WIFI_POLL_MS = const(100)
_WIFI_TIMEOUT_MS = const(15000)  # one association + DHCP attempt; typical is 1-4 s
_BACKOFF_MIN_MS = const(5000)  # after the first failed attempt; doubles up to _BACKOFF_MAX_MS
_BACKOFF_MAX_MS = const(300000)

_SPI_BAUD = const(2000000)  # well under both chips' limits (SX1276 10 MHz, SX1262 16 MHz)

# EU868 (ERC 70-03, ETSI EN 300 220; ../shared/docs/FIELD.md): 863-870 MHz, 25 mW ERP = 14 dBm
# outside 869.4-869.65 MHz. A 125 kHz channel's centre must sit 62.5 kHz inside the band.
_FREQ_MIN_KHZ = const(863063)
_FREQ_MAX_KHZ = const(869937)
_POWER_MAX_DBM = const(14)
_POWER_MIN_DBM = const(-9)

# Deep sleep (config "idle": "deep", ESP32 boards): what the firmware keeps for the next wake
# goes into RTC slow memory (2 KB on the ESP32, kept in deep sleep, lost with power) after a
# magic and the RTC time (ms) at which the board's ms clock read 0.
_RTC_MAGIC = b"CNds"
_RTC_HEADER = const(12)
IDLE_MODES = ("light", "wait", "deep")

# the modem's (lora_cfg) and the link's (firmware/lora_link.py: the acks' channel, the
# longest frame a backlog is packed into)
_LORA_KEYS = ("ack_freq_khz", "freq_khz", "max_batch", "output_power", "sf")
_WIFI_KEYS = ("country", "password", "ssid", "timeout_ms")


def lora_cfg(raw):
    """The micropython-lib lora_cfg for this node: EU868 defaults, overridable by config "lora".

    868.1 MHz is LoRaWAN's first EU868 uplink channel (1 % duty-cycle sub-band). Preamble 8
    symbols as LoRaWAN (the driver's default is 12: both ends must agree). Sync word 0x12 is
    LoRa's private one: LoRaWAN gateways listen on 0x34, so our raw-LoRa frames neither reach
    nor confuse public networks' gateways (FIELD.md, "micropython-lib's lora driver")."""
    cfg = {
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
    lora = _section(raw, "lora", _LORA_KEYS)
    if lora is not None:
        cfg["sf"] = _int(lora, "lora.sf", "sf", 7, 7, 12)
        cfg["freq_khz"] = _int(
            lora, "lora.freq_khz", "freq_khz", 868100, _FREQ_MIN_KHZ, _FREQ_MAX_KHZ
        )
        cfg["output_power"] = _int(
            lora, "lora.output_power", "output_power", 14, _POWER_MIN_DBM, _POWER_MAX_DBM
        )
        # checked here, used by the link
        _int(lora, "lora.ack_freq_khz", "ack_freq_khz", 869525, _FREQ_MIN_KHZ, _FREQ_MAX_KHZ)
        _int(lora, "lora.max_batch", "max_batch", 30, 1, 255)
    return cfg


def _int(d, label, key, default, lo, hi):
    value = d.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("config: %s must be an integer, got %r" % (label, value))
    if value < lo or value > hi:
        raise ValueError("config: %s must be %d..%d, got %d" % (label, lo, hi, value))
    return value


def _section(raw, name, keys):
    d = raw.get(name)
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ValueError("config: %s must be an object, got %r" % (name, d))
    for key in d:
        if key not in keys:
            raise ValueError(
                "config: %s: unknown key %r (known: %s)" % (name, key, ", ".join(keys))
            )
    return d


class Clock:
    """Milliseconds since boot as an int that only grows. time.ticks_ms() wraps every 2**30 ms
    (12.4 days) and the firmware subtracts times directly, so each call adds the ticks_diff
    since the previous one: right as long as calls come under 2**29 ms (6.2 days) apart; the
    node reads the clock every cycle and its interval is at most a day."""

    def __init__(self):
        # Counted from the port's own origin (the reset), not from 0: a time on this clock is
        # then the same time.ticks_ms() value modulo 2**30, which is how micropython-lib's
        # modem.send(tx_at_ms=) takes the gateway's ack times (ticks_diff with time.ticks_ms()).
        # Deep sleep's set() breaks that, but a LoRa board never deep sleeps (config refuses).
        self._last = time.ticks_ms()
        self._ms = int(self._last)  # type: ignore[call-overload]  # (the stubs: _TicksMs)

    def __call__(self):
        now = time.ticks_ms()
        self._ms += time.ticks_diff(now, self._last)
        self._last = now
        return self._ms

    def set(self, ms):
        """Continue from ms (a deep-sleep wake: the clock counts on from the first boot)."""
        self._last = time.ticks_ms()
        self._ms = ms


def _rtc_ms():
    # The ESP32's RTC keeps counting through deep sleep; time.ticks_ms() restarts at a wake.
    return time.time_ns() // 1000000


# Reset causes (machine.reset_cause()) through which an ESP32's RTC timer counts on: ESP-IDF
# "System Time": the RTC timer persists "across any resets (with the exception of power-on
# resets)"; a reset by the EN pin (HARD_RESET) is a chip power-up. machine.WDT_RESET,
# DEEPSLEEP_RESET, SOFT_RESET on the esp32 port.
ESP32_RTC_KEEPS = (3, 4, 5)


class RealBoard:
    """Board API (README.md). Subclasses set the class attributes below; pins are GPIO numbers."""

    NAME = "?"
    ARCH = "?"  # mpy-cross -march of the board's MCU
    # micropython-lib packages `citynode flash` installs with mip
    MIP_PACKAGES = ()  # type: tuple[str, ...]
    SENSORS = ("bme280",)
    BME280_ADDRESS = 0x76  # SDO to GND; 0x77 with SDO to VDDIO (config "bme280_address")
    DEEP_SLEEP = False  # machine.deepsleep with RTC memory kept (ESP32): config "idle": "deep"
    # Reset causes through which the RTC (time.time_ns) counts on (firmware/clock.py links a boot
    # that never learned the time to the next by it). None on the RP2040: MicroPython's
    # ports/rp2/main.c starts its RTC at 2021-01-01 at every reset (a soft reset keeps it, but
    # machine.reset_cause() then still names the last hardware reset: no board can tell).
    RTC_KEEPS = ()  # type: tuple[int, ...]
    WIFI = False  # the MCU has Wi-Fi
    WIFI_REQUIRED = False  # Wi-Fi is this board's only uplink: config must have "wifi"
    I2C_ID = 0
    I2C_SDA = -1
    I2C_SCL = -1
    RADIO = None  # type: str | None  # "sx1262", "sx1276"
    SPI_ID = 1
    SPI_SCK = -1
    SPI_MOSI = -1
    SPI_MISO = -1
    LORA_CS = -1
    LORA_RESET = -1
    LORA_BUSY = -1  # SX126x
    LORA_DIO0 = -1  # SX127x
    LORA_DIO1 = -1
    LORA_TCXO_MV = 0  # SX126x: TCXO supplied from DIO3 at this voltage; 0 = crystal
    # SX127x: "PA_BOOST" when only the PA_BOOST pin reaches the antenna
    LORA_TX_ANT = None  # type: str | None
    # UART for a particulate sensor (SDS011, PMS5003: 9600 8N1), README.md "PM sensor UART";
    # config "sensors": [{"type": "sds011", "uart": PM_UART_ID}]
    PM_UART_ID = -1
    PM_UART_TX = -1  # to the sensor's RX
    PM_UART_RX = -1  # from the sensor's TX

    def __init__(self, raw):
        if not isinstance(raw, dict):
            raise ValueError("config: top level must be a JSON object")
        self.ticks_ms = Clock()
        address = raw.get("bme280_address", self.BME280_ADDRESS)
        if address not in (0x76, 0x77) or isinstance(address, bool):
            raise ValueError(
                "config: bme280_address must be 118 (0x76) or 119 (0x77), got %r" % (address,)
            )
        self.BME280_ADDRESS = address
        self._i2c_freq = _int(raw, "i2c_freq", "i2c_freq", 100000, 10000, 400000)
        idle = raw.get("idle", "light")
        if idle not in IDLE_MODES:
            raise ValueError('config: idle must be "light", "wait" or "deep", got %r' % (idle,))
        if idle == "deep" and not self.DEEP_SLEEP:
            raise ValueError(
                'config: board %s cannot deep sleep and keep RTC memory (idle "deep" is for '
                "ESP32 boards)" % self.NAME
            )
        if idle == "deep" and raw.get("link") == "lora":
            raise ValueError(
                'config: idle "deep" is for Wi-Fi nodes (a LoRa node\'s airtime account would '
                "not survive it)"
            )
        self._light = idle == "light"
        self.deep = idle == "deep"
        self._i2c = None
        self._wdt = None
        self._slice_ms = _SLICE_MS
        self._modem = None
        self._addr_cache = {}
        self.lora_cfg = None
        if self.RADIO is not None:
            self.lora_cfg = lora_cfg(raw)
        elif "lora" in raw:
            raise ValueError('config: board %s has no LoRa radio (remove "lora")' % self.NAME)
        # Wi-Fi state; the counters and net_error are for the firmware's status reports.
        self._wlan = None
        self.wifi_failures = 0
        self.net_error = None
        self._wifi_next = 0
        wifi = _section(raw, "wifi", _WIFI_KEYS)
        if wifi is None:
            if self.WIFI_REQUIRED:
                raise ValueError(
                    'config: board %s sends over Wi-Fi: add "wifi": '
                    '{"ssid": ..., "password": ...}' % self.NAME
                )
        elif not self.WIFI:
            raise ValueError('config: board %s has no Wi-Fi (remove "wifi")' % self.NAME)
        else:
            self._wifi_setup(wifi, raw.get("node_id"))

    # --- clock and waits -------------------------------------------------------------------

    def sleep_ms(self, ms):
        """A short wait inside a task (a sensor's conversion time); the CPU stays up."""
        self._wait(ms, time.sleep_ms)

    def idle_ms(self, ms, early_ms=0):
        """Sleep until the next sample. With config "idle": "light" (default) the board uses
        machine.lightsleep, and first takes Wi-Fi down: the ESP32 stops its radio in light
        sleep, so the access point would drop the station after missed beacons anyway, and
        on the Pico W lightsleep was reported to misbehave with the CYW43 up (micropython
        issue 9006).
        network_up() rejoins, at most once per batch. early_ms: this sleep ends that long
        before the next sample (a particulate sensor spins up; only the simulator uses it).
        "wait" keeps Wi-Fi associated (ESP-IDF
        modem sleep) and waits with time.sleep_ms: for mains power or short intervals.
        Returns True (only a simulated world ends)."""
        if self._light:
            self._wifi_off()
            self._wait(ms, machine.lightsleep)
        else:
            self._wait(ms, time.sleep_ms)
        return True

    def _wait(self, ms, sleep):
        # In slices of half the watchdog's timeout, feeding it between slices.
        end = self.ticks_ms() + ms
        while True:
            self.feed()
            left = end - self.ticks_ms()
            if left <= 0:
                return
            sleep(min(left, self._slice_ms))

    def wake_state(self, cause):
        """After a deep-sleep wake (cause DEEPSLEEP_RESET), what deepsleep() kept, and the
        ms clock continues from before the sleep; None after any other reset."""
        if cause != machine.DEEPSLEEP_RESET:
            return None
        mem = machine.RTC().memory()
        if len(mem) < _RTC_HEADER or mem[:4] != _RTC_MAGIC:
            return None
        self.ticks_ms.set(_rtc_ms() - int.from_bytes(mem[4:_RTC_HEADER], "little"))
        return bytes(mem[_RTC_HEADER:])

    def deepsleep(self, ms, state):
        """Keep state (bytes) in RTC memory and deep sleep for ms: the board wakes through a
        reset (reset cause DEEPSLEEP_RESET) and runs main.py again. Never returns."""
        start = max(0, _rtc_ms() - self.ticks_ms())  # the RTC time at which this clock read 0
        machine.RTC().memory(_RTC_MAGIC + start.to_bytes(8, "little") + state)
        self._wifi_off()
        machine.deepsleep(ms)

    def rtc_ms(self):
        """ms on the RTC (it counts on through the resets in RTC_KEEPS)."""
        return _rtc_ms()

    # --- watchdog and resets ---------------------------------------------------------------

    def wdt(self, timeout_ms):
        """Start the hardware watchdog (it cannot be stopped) and return it; the timeout is
        clamped to 1000..8388 ms. The board feeds it in its own waits; later calls return
        the same watchdog."""
        if self._wdt is None:
            timeout_ms = max(_WDT_MIN_MS, min(timeout_ms, _WDT_MAX_MS))
            self._wdt = machine.WDT(timeout=timeout_ms)
            self._slice_ms = timeout_ms // 2
        return self._wdt

    def feed(self):
        if self._wdt is not None:
            self._wdt.feed()

    def reset_cause(self):
        """machine.reset_cause() as the port reports it (protocols/SPEC.md STATUS field 2):
        on both ports PWRON_RESET 1, WDT_RESET 3; ESP32 also HARD 2, DEEPSLEEP 4, SOFT 5."""
        return machine.reset_cause()

    def reset(self, cause=None):
        """Reset the MCU now (the firmware's last resort after a crash). cause is for the
        simulated board; real hardware latches its own reset cause."""
        machine.reset()

    # --- buses and radio -------------------------------------------------------------------

    def uart(self, uart_id):
        """machine.UART uart_id at 9600 8N1 on the board's PM sensor pins, non-blocking reads
        (timeout 0: readinto returns None when nothing waits)."""
        if uart_id != self.PM_UART_ID:
            raise ValueError(
                "config: board %s has its PM sensor on UART %d, got %r"
                % (self.NAME, self.PM_UART_ID, uart_id)
            )
        return machine.UART(
            uart_id,
            9600,
            bits=8,
            parity=None,
            stop=1,
            tx=machine.Pin(self.PM_UART_TX),
            rx=machine.Pin(self.PM_UART_RX),
            timeout=0,
            rxbuf=256,
        )

    def i2c(self):
        if self._i2c is None:
            self._i2c = machine.I2C(
                self.I2C_ID,
                scl=machine.Pin(self.I2C_SCL),
                sda=machine.Pin(self.I2C_SDA),
                freq=self._i2c_freq,
            )
        return self._i2c

    def radio(self):
        """The micropython-lib modem (lora.SX1262 / lora.SX1276, sync API) configured with
        lora_cfg; built on first use. Raises ValueError on a board without radio, ImportError
        when the mip packages are missing, and the driver's RuntimeError when the chip does
        not answer (wiring, SPI, or TCXO setting)."""
        if self.RADIO is None:
            raise ValueError("board %s has no LoRa radio" % self.NAME)
        if self._modem is None:
            try:
                import lora
            except ImportError:
                raise ImportError(
                    "board %s needs micropython-lib %s: mpremote mip install %s"
                    % (self.NAME, " and ".join(self.MIP_PACKAGES), " ".join(self.MIP_PACKAGES))
                )
            Pin = machine.Pin
            spi = machine.SPI(
                self.SPI_ID,
                _SPI_BAUD,
                polarity=0,
                phase=0,
                sck=Pin(self.SPI_SCK),
                mosi=Pin(self.SPI_MOSI),
                miso=Pin(self.SPI_MISO),
            )
            cs = Pin(self.LORA_CS, Pin.OUT, value=1)
            if self.RADIO == "sx1262":
                self._modem = lora.SX1262(
                    spi,
                    cs,
                    busy=Pin(self.LORA_BUSY, Pin.IN),
                    dio1=Pin(self.LORA_DIO1, Pin.IN),
                    dio2_rf_sw=True,  # DIO2 drives the board's RF switch
                    dio3_tcxo_millivolts=self.LORA_TCXO_MV or None,
                    reset=Pin(self.LORA_RESET),
                    lora_cfg=self.lora_cfg,
                )
            else:
                cfg = dict(self.lora_cfg or ())
                if self.LORA_TX_ANT:
                    cfg["tx_ant"] = self.LORA_TX_ANT
                self._modem = lora.SX1276(
                    spi,
                    cs,
                    dio0=Pin(self.LORA_DIO0, Pin.IN),
                    dio1=Pin(self.LORA_DIO1, Pin.IN),
                    reset=Pin(self.LORA_RESET),
                    lora_cfg=cfg,
                )
            # The firmware reads the channel and SF the modem was set up with from modem.cfg
            # (firmware/lora_link.py, gateway.py); micropython-lib's modem keeps no copy to read,
            # so the board adds one (the driver's stubs rightly know no such attribute).
            self._modem.cfg = self.lora_cfg  # type: ignore[union-attr]
        return self._modem

    # --- Wi-Fi -----------------------------------------------------------------------------

    def _wifi_setup(self, wifi, node_id):
        ssid = wifi.get("ssid")
        if not isinstance(ssid, str) or not 0 < len(ssid) <= 32:
            raise ValueError(
                "config: wifi.ssid must be a string of 1..32 characters, got %r" % (ssid,)
            )
        password = wifi.get("password", "")
        if not isinstance(password, str) or not (password == "" or 8 <= len(password) <= 63):
            # WPA2-PSK passphrases are 8..63 characters; "" joins an open network.
            raise ValueError('config: wifi.password must be "" or 8..63 characters')
        country = wifi.get("country", "SI")
        if not isinstance(country, str) or len(country) != 2:
            raise ValueError("config: wifi.country must be a 2-letter code, got %r" % (country,))
        self._wifi_timeout_ms = _int(
            wifi, "wifi.timeout_ms", "timeout_ms", _WIFI_TIMEOUT_MS, 1000, 60000
        )
        self._ssid = ssid
        self._password = password
        import network

        network.country(country)  # channels 1-13 in the EU
        if isinstance(node_id, int):
            network.hostname("citynode-%d" % node_id)
        self._wlan = network.WLAN(network.STA_IF)
        # Names of the statuses a failed attempt ends with (network module of each port).
        self._wifi_why = {}
        for attr, text in (
            ("STAT_WRONG_PASSWORD", "wrong password"),
            ("STAT_NO_AP_FOUND", "no access point"),
            ("STAT_CONNECT_FAIL", "connection failed"),
            ("STAT_CONNECTING", "still connecting"),
        ):
            code = getattr(network, attr, None)
            if code is not None:
                self._wifi_why[code] = text

    def network_up(self):
        """True when Wi-Fi is connected. Otherwise one attempt of at most wifi.timeout_ms
        (15 s), unless the back-off after failed attempts (5 s doubling to 5 min, +0..25 %
        jitter) has not run out, in which case it returns False at once. net_error says why
        the last attempt failed ("wifi 'ssid': not connected after 15000 ms (wrong
        password)"); wifi_failures counts consecutive failures."""
        wlan = self._wlan
        if wlan is None:
            return False
        if wlan.isconnected():
            return True
        if self.ticks_ms() < self._wifi_next:
            return False
        if self._wifi_attempt(wlan):
            self.wifi_failures = 0
            self.net_error = None
            return True
        self.wifi_failures += 1
        backoff = min(_BACKOFF_MIN_MS << min(self.wifi_failures - 1, 7), _BACKOFF_MAX_MS)
        backoff += random.getrandbits(16) * (backoff // 4) >> 16
        self._wifi_next = self.ticks_ms() + backoff
        return False

    def _wifi_attempt(self, wlan):
        # Runs to isconnected() or the timeout, never shorter: the ESP32 port keeps the last
        # disconnect reason (NO_AP_FOUND, AUTH_FAIL) across a new connect() and retries by
        # itself, so a failure status seen during an attempt is not final. The status at the
        # end only names the failure.
        wlan.active(True)
        wlan.connect(self._ssid, self._password)
        end = self.ticks_ms() + self._wifi_timeout_ms
        while not wlan.isconnected():
            if self.ticks_ms() >= end:
                status = wlan.status()
                self.net_error = "wifi %r: not connected after %d ms (%s)" % (
                    self._ssid,
                    self._wifi_timeout_ms,
                    self._wifi_why.get(status) or "status %r" % (status,),
                )
                wlan.disconnect()  # stop the driver's own retries until our next attempt
                return False
            self.sleep_ms(_WIFI_POLL_MS)
        return True

    def _wifi_off(self):
        wlan = self._wlan
        if wlan is not None and wlan.active():
            wlan.disconnect()
            wlan.active(False)

    # --- UDP -------------------------------------------------------------------------------

    def udp_socket(self):
        import socket

        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(socket.getaddrinfo("0.0.0.0", 0)[0][-1])
        s.setblocking(False)
        return s

    def uplink_address(self, host_port):
        """The host's socket address, resolved once (DNS on a board is slow and may fail:
        the OSError reaches the caller's send, which keeps the readings)."""
        addr = self._addr_cache.get(host_port)
        if addr is None:
            import socket

            addr = socket.getaddrinfo(host_port[0], host_port[1])[0][-1]
            self._addr_cache[host_port] = addr
        return addr

    def wait_readable(self, sock, timeout_ms):
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        end = self.ticks_ms() + timeout_ms
        while True:
            self.feed()
            left = end - self.ticks_ms()
            if poller.poll(max(0, min(left, self._slice_ms))):
                return True
            if left <= self._slice_ms:
                return False

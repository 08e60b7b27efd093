# Node configuration: /config.json on the board's filesystem, written at provisioning.
# Checked field by field so that a bad file is reported precisely instead of crashing the node.

import json

try:
    import binascii
except ImportError:  # pragma: no cover
    import ubinascii as binascii

PATH = "config.json"
ROLES = ("node", "gateway")
LINKS = ("udp", "lora", "mqtt")  # "mqtt" is also implied by an "mqtt://" uplink


class ConfigError(Exception):
    pass


class Config:
    """Validated node settings, set by parse() (fields and defaults: README "Provisioning"):
    node_id, key, role, board, interval_s, batch, journal_capacity, ack_timeout_ms,
    status_every_s, wdt_ms, uplink ((host, port) of the host or broker; None on LoRa;
    "serial"), link ("udp", "lora" or "mqtt"), lora (dict), airtime_budget_ms (None: duty cycle
    only), sensors (config "sensors" when a node has more than the BME280, firmware/sensors.py;
    () for the BME280 alone) and raw (the parsed file, until the board is built).
    Attributes only, no methods and no class-level defaults: once the node is built this
    module leaves the heap, and the running node keeps the instance alone (its class's table
    of defaults cost 0.5 KB)."""

    # (bare annotations, for the type checker: MicroPython's compiler drops them)
    raw: dict
    node_id: int
    key: bytes
    role: str
    board: str
    interval_s: int
    batch: int
    journal_capacity: int
    ack_timeout_ms: int
    status_every_s: int
    wdt_ms: int
    uplink: object
    link: str
    lora: dict
    airtime_budget_ms: object
    sensors: tuple


def parse(raw):
    if not isinstance(raw, dict):
        raise ConfigError("config: top level must be a JSON object")
    c = Config()
    c.raw = raw
    c.sensors = ()
    c.node_id = _int(raw, "node_id", None, 0, 0xFFFFFFFF)
    c.role = _str(raw, "role", "node")
    if c.role not in ROLES:
        raise ConfigError("config: role must be one of %s, got %r" % (ROLES, c.role))
    c.key = _key(raw) if c.role == "node" else b""  # a gateway holds no node keys
    c.link = _str(raw, "link", "udp")
    if c.link not in LINKS:
        raise ConfigError("config: link must be one of %s, got %r" % (LINKS, c.link))
    lora = raw.get("lora") or {}
    if not isinstance(lora, dict):
        raise ConfigError("config: lora must be an object")
    c.lora = lora
    # daily airtime budget (ms), as public networks' fair-use policy; None = duty cycle only
    c.airtime_budget_ms = raw.get("airtime_budget_ms")
    if c.airtime_budget_ms is not None:
        c.airtime_budget_ms = _int(raw, "airtime_budget_ms", None, 1, 86400000)
    c.board = _str(raw, "board", None)
    c.interval_s = _int(raw, "interval_s", 60, 1, 86400)
    if "sensors" in raw and c.role == "node":  # checked by firmware/sensor_config.py
        from firmware import sensor_config, unload

        c.sensors = sensor_config.parse(raw)
        unload("sensor_config")
    c.batch = _int(raw, "batch", 10, 1, 64)
    c.journal_capacity = _int(raw, "journal_capacity", 10080, 16, 1000000)
    # LoRa: the gateway answers 2 s after the uplink ends (GATEWAY.md), then the ack's airtime
    ack_default = 6000 if c.link == "lora" else 2000
    c.ack_timeout_ms = _int(raw, "ack_timeout_ms", ack_default, 10, 60000)
    # STATUS frames: at boot, then every status_every_s of the node's clock; 0 = at boot only
    c.status_every_s = _int(raw, "status_every_s", 172800, 0, 31 * 86400)
    c.wdt_ms = _int(raw, "wdt_ms", 30000, 1000, 600000)
    if c.link == "lora" and c.role == "node":
        c.uplink = None
        return c
    uplink = _str(raw, "uplink", None)
    if uplink == "serial" and c.role == "gateway":
        c.uplink = "serial"  # gwlink messages on the USB serial console (GATEWAY.md)
        return c
    if "://" in uplink or c.link == "mqtt":
        c.uplink = _mqtt_uplink(raw, c, uplink)
        c.link = "mqtt"
        return c
    host, _, port = uplink.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            "config: uplink must be 'host:port' or 'mqtt://host:port', got %r" % uplink
        )
    c.uplink = (host, int(port))
    return c


def _mqtt_uplink(raw, c, uplink):
    """(host, port) of the MQTT broker in "mqtt://host[:port]" (port 1883 by default)."""
    scheme, _, rest = uplink.partition("://")
    if c.role == "gateway":
        raise ConfigError(
            "config: MQTT is for nodes: a gateway's uplink must be 'host:port' or 'serial', "
            "got %r" % uplink
        )
    if scheme == "mqtts":
        raise ConfigError("config: uplink %r: TLS (mqtts://) is not supported on a node" % uplink)
    if scheme != "mqtt":
        if c.link == "mqtt":
            raise ConfigError(
                "config: link 'mqtt' needs uplink 'mqtt://host:port', got %r" % uplink
            )
        raise ConfigError(
            "config: uplink must be 'host:port' or 'mqtt://host:port', got %r" % uplink
        )
    if "link" in raw and c.link != "mqtt":
        raise ConfigError(
            "config: uplink %r is an MQTT broker but link is %r (leave link out)"
            % (uplink, c.link)
        )
    if "@" in rest:
        raise ConfigError("config: uplink %r: no user name or password on a node" % uplink)
    if "/" in rest:
        raise ConfigError(
            "config: uplink %r: no topic (a node publishes to citynode/up/<node_id>)" % uplink
        )
    host, colon, port = rest.rpartition(":")
    if not colon:
        host, port = rest, "1883"
    if not host:
        raise ConfigError("config: uplink %r has no host" % uplink)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("config: uplink %r: port must be 1..65535" % uplink)
    return (host, int(port))


def _missing(name):
    return ConfigError("config: missing required field %r" % name)


def _int(raw, name, default, lo, hi):
    value = raw.get(name, default)
    if value is None:
        raise _missing(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError("config: %s must be an integer, got %r" % (name, value))
    if value < lo or value > hi:
        raise ConfigError("config: %s must be %d..%d, got %d" % (name, lo, hi, value))
    return value


def _str(raw, name, default):
    value = raw.get(name, default)
    if value is None:
        raise _missing(name)
    if not isinstance(value, str):
        raise ConfigError("config: %s must be a string, got %r" % (name, value))
    return value


def _key(raw):
    text = _str(raw, "key", None)
    if len(text) != 32:
        raise ConfigError("config: key must be 32 hex characters (16 bytes), got %d" % len(text))
    try:
        return binascii.unhexlify(text)
    except ValueError:
        raise ConfigError("config: key is not hexadecimal")


def load(path=PATH):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        raise ConfigError("config: cannot read %s (not provisioned?)" % path)
    try:
        raw = json.loads(text)
    except ValueError:
        raise ConfigError("config: %s is not valid JSON" % path)
    return parse(raw)

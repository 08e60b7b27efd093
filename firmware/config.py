# Node configuration: /config.json on the board's filesystem, written at provisioning.
# Checked field by field so that a bad file is reported precisely instead of crashing the node.

import json

try:
    import binascii
except ImportError:  # pragma: no cover
    import ubinascii as binascii

PATH = "config.json"
ROLES = ("node",)


class ConfigError(Exception):
    pass


class Config:
    """Validated node settings. Fields and defaults are documented in README "Provisioning"."""

    def __init__(self, raw):
        if not isinstance(raw, dict):
            raise ConfigError("config: top level must be a JSON object")
        self.raw = raw
        self.node_id = _int(raw, "node_id", None, 0, 0xFFFFFFFF)
        self.key = _key(raw)
        self.role = _str(raw, "role", "node")
        if self.role not in ROLES:
            raise ConfigError("config: role must be one of %s, got %r" % (ROLES, self.role))
        self.board = _str(raw, "board", None)
        self.interval_s = _int(raw, "interval_s", 60, 1, 86400)
        self.batch = _int(raw, "batch", 10, 1, 64)
        self.max_pending = _int(raw, "max_pending", 1440, 1, 100000)
        self.ack_timeout_ms = _int(raw, "ack_timeout_ms", 2000, 10, 60000)
        uplink = _str(raw, "uplink", None)
        host, _, port = uplink.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("config: uplink must be 'host:port', got %r" % uplink)
        self.uplink = (host, int(port))


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
    return Config(raw)

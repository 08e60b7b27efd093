# Config "sensors": which sensors a node has (firmware/sensors.py). Loaded by config.py only for
# a config that has the key, and dropped with it: a BME280-only node's heap never holds it.

from firmware.config import ConfigError


def parse(raw):
    """The sensors of config "sensors" (firmware/sensors.py): at most one BME280 and one
    particulate sensor (both PM ones would give channels 4 and 5 twice); the BME280 alone is
    (): today's node, byte for byte."""
    # keys each type takes (a local: a global's name would be a qstr, kept for good)
    keys = {
        "bme280": ("type",),
        "sds011": ("type", "uart"),
        "pms5003": ("type", "uart"),
        "sps30": ("type",),
    }
    sensors = raw["sensors"]
    if not isinstance(sensors, list) or not sensors:
        raise ConfigError(
            'config: sensors must be a list like [{"type": "bme280"}], got %r' % (sensors,)
        )
    channels = []
    pm = None
    for i, s in enumerate(sensors):
        kind = s.get("type") if isinstance(s, dict) else None
        if kind not in keys:
            raise ConfigError(
                "config: sensors[%d] must be an object with type one of %s, got %r"
                % (i, ", ".join(keys), s)
            )
        for key in s:
            if key not in keys[kind]:
                raise ConfigError(
                    "config: sensors[%d] (%s): unknown key %r (known: %s)"
                    % (i, kind, key, ", ".join(keys[kind]))
                )
        if kind == "bme280":
            if 1 in channels:
                raise ConfigError("config: sensors: bme280 listed twice")
            channels.extend((1, 2, 3))
            continue
        if pm is not None:
            raise ConfigError(
                "config: sensors: one particulate sensor a node, got %s and %s (both would "
                "send PM2.5 and PM10)" % (pm, kind)
            )
        pm = kind
        channels.extend((4, 5))
        if "uart" in keys[kind]:
            uart = s.get("uart")
            if not isinstance(uart, int) or isinstance(uart, bool) or not 0 <= uart <= 2:
                raise ConfigError(
                    "config: sensors[%d] (%s): uart must be the UART id 0..2, got %r"
                    % (i, kind, uart)
                )
    if pm is None:
        return ()
    if raw.get("idle") == "deep":
        raise ConfigError(
            'config: idle "deep" cannot spin %s up before its sample; use "light"' % pm
        )
    return tuple(sensors)

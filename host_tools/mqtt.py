# MQTT at the receiver's two edges, with paho-mqtt (2.x callback API): a source (gateways
# publish raw frames to a topic; acks go back on `<that topic>/ack`) and a remote sink (one JSON
# reading per message on `<prefix>/<node_id>/<quantity>`, QoS 1, not retained), with optional
# Home Assistant MQTT discovery so each node's sensors appear there without configuration.
#
# URLs: mqtt://[user[:password]@]host[:port][/topic] (mqtts:// for TLS). The topic is taken
# verbatim after the first "/", so "+" and "#" wildcards work: mqtt://broker/citynode/up/#.

import collections
import json
import logging
import ssl
import threading
import time
import urllib.parse

import paho.mqtt.client as paho

from host_tools.sinks import DeliveryError, SinkError, reading_json

DEFAULT_PREFIX = "citynode"
HA_PREFIX = "homeassistant"
ACK_SUFFIX = "/ack"

# quantity -> (name, Home Assistant device_class or None, unit or None). Classes and units are
# the ones Home Assistant's sensor integration lists for them.
HA_SENSORS = {
    "temperature_c": ("Temperature", "temperature", "°C"),
    "humidity_pct": ("Humidity", "humidity", "%"),
    "pressure_hpa": ("Pressure", "atmospheric_pressure", "hPa"),
    "pm2_5_ugm3": ("PM2.5", "pm25", "µg/m³"),
    "pm10_ugm3": ("PM10", "pm10", "µg/m³"),
    "battery_v": ("Battery voltage", "voltage", "V"),
}


class MqttUrl:
    """A parsed mqtt:// URL: host, port, tls, username, password, topic ("" if none)."""

    def __init__(self, text, what):
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in ("mqtt", "mqtts"):
            raise SinkError("%s: expected mqtt://HOST[:PORT][/TOPIC], got %r" % (what, text))
        netloc, _, self.topic = rest.partition("/")
        parts = urllib.parse.urlsplit("//" + netloc)
        try:
            port = parts.port
        except ValueError:
            raise SinkError("%s: bad port in %r" % (what, text)) from None
        if not parts.hostname:
            raise SinkError("%s: no broker host in %r" % (what, text))
        self.tls = scheme == "mqtts"
        self.host = parts.hostname
        self.port = port if port is not None else (8883 if self.tls else 1883)
        self.username = urllib.parse.unquote(parts.username) if parts.username else None
        self.password = urllib.parse.unquote(parts.password) if parts.password else None

    @property
    def address(self):
        return "%s:%d" % (self.host, self.port)

    def configure(self, client):
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)


def reading_topic(prefix, node_id, quantity):
    return "%s/%d/%s" % (prefix, node_id, quantity)


def ha_discovery(node_id, quantity, prefix=DEFAULT_PREFIX, ha_prefix=HA_PREFIX):
    """(topic, payload dict) of the Home Assistant MQTT discovery config for one node's sensor:
    homeassistant/sensor/citynode_<node>_<quantity>/config, its state on the reading topic."""
    name, device_class, unit = HA_SENSORS.get(quantity, (quantity, None, None))
    object_id = "citynode_%d_%s" % (node_id, quantity)
    config = {
        "name": name,
        "unique_id": object_id,
        "object_id": object_id,
        "state_topic": reading_topic(prefix, node_id, quantity),
        "value_template": "{{ value_json.value }}",
        "state_class": "measurement",
        "device": {
            "identifiers": ["citynode_%d" % node_id],
            "name": "citynode %d" % node_id,
            "manufacturer": "citynode",
            "model": "citynode sensor node",
        },
    }
    if device_class:
        config["device_class"] = device_class
    if unit:
        config["unit_of_measurement"] = unit
    return "%s/sensor/%s/config" % (ha_prefix, object_id), config


def _reason_text(reason_code):
    text = str(reason_code)
    return text if text else "code %s" % getattr(reason_code, "value", reason_code)


class MqttSink:
    """Publishes readings (QoS 1, retain off) and waits for the broker's PUBACK of every one
    before deliver() returns. A failure drops the connection and its queue; the forwarder's
    retry connects afresh and publishes the batch again (copies carry the same reading id).
    With `ha_prefix`, each (node, quantity) gets its discovery config (retained, as Home
    Assistant expects) before its first reading on every connection."""

    def __init__(self, url, prefix=DEFAULT_PREFIX, ha_prefix=None, timeout=10.0, client_id=None):
        self.url = MqttUrl(url, "--mqtt-out")
        if self.url.topic:
            prefix = self.url.topic.rstrip("/")
        if not prefix or "+" in prefix or "#" in prefix:
            raise SinkError("--mqtt-out: topic prefix %r must be a plain topic" % prefix)
        self.prefix = prefix
        self.ha_prefix = ha_prefix
        self.timeout = timeout
        self.client_id = client_id or "citynode-receiver-%d" % (time.time_ns() % 10**9)
        self.name = "mqtt %s/%s" % (self.url.address, prefix)
        self._client = None
        self._connected = threading.Event()
        self._lost = None  # why the connection ended, set by on_disconnect
        self._announced = set()

    # --- connection ---

    def _connect(self):
        if self._client is not None and self._connected.is_set():
            return self._client
        self._drop()
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=True,
            reconnect_on_failure=False,  # the forwarder decides when to try again
        )
        self.url.configure(client)
        client.connect_timeout = self.timeout
        client.max_inflight_messages_set(1000)
        result = {}

        def on_connect(client, userdata, flags, reason_code, properties):
            result["rc"] = reason_code
            if not reason_code.is_failure:
                self._connected.set()
            else:
                self._lost = "broker refused the connection: %s" % _reason_text(reason_code)
                self._connected.clear()

        def on_disconnect(client, userdata, flags, reason_code, properties):
            self._lost = "connection lost: %s" % _reason_text(reason_code)
            self._connected.clear()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        self._lost = None
        try:
            client.connect(self.url.host, self.url.port, keepalive=30)
        except ConnectionRefusedError:
            raise DeliveryError("connect", "%s: connection refused" % self.where) from None
        except (TimeoutError, OSError) as e:
            text = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise DeliveryError("connect", "%s: cannot connect: %s" % (self.where, text)) from None
        client.loop_start()
        self._client = client
        deadline = time.monotonic() + self.timeout
        while not self._connected.wait(0.05):
            if "rc" in result or time.monotonic() > deadline:
                why = self._lost or "no CONNACK within %.1f s" % self.timeout
                self._drop()
                raise DeliveryError("connect", "%s: %s" % (self.where, why))
        self._announced.clear()  # a new session: announce again (a broker may have restarted)
        return client

    @property
    def where(self):
        return "mqtt %s" % self.url.address

    def _drop(self):
        client, self._client = self._client, None
        self._connected.clear()
        if client is not None:
            try:
                client.disconnect()
            except Exception:  # already gone
                pass
            client.loop_stop()

    # --- delivery ---

    def deliver(self, rows):
        client = self._connect()
        infos = []
        announcing = set()
        for row in rows:
            node_id, _, quantity, _ = row
            if self.ha_prefix and (node_id, quantity) not in self._announced:
                if (node_id, quantity) not in announcing:
                    topic, config = ha_discovery(node_id, quantity, self.prefix, self.ha_prefix)
                    infos.append(client.publish(topic, json.dumps(config), qos=1, retain=True))
                    announcing.add((node_id, quantity))
            topic = reading_topic(self.prefix, node_id, quantity)
            infos.append(client.publish(topic, json.dumps(reading_json(row)), qos=1))
        self._wait(infos)
        self._announced |= announcing

    def _wait(self, infos):
        deadline = time.monotonic() + self.timeout
        for info in infos:
            while not info.is_published():
                if info.rc != paho.MQTT_ERR_SUCCESS or not self._connected.is_set():
                    why = self._lost or paho.error_string(info.rc)
                    self._drop()
                    raise DeliveryError("connection", "%s: %s" % (self.where, why))
                if time.monotonic() > deadline:
                    self._drop()
                    raise DeliveryError(
                        "timeout",
                        "%s: %d of %d messages not acknowledged within %.1f s"
                        % (
                            self.where,
                            sum(not i.is_published() for i in infos),
                            len(infos),
                            self.timeout,
                        ),
                    )
                time.sleep(0.002)

    def close(self):
        self._drop()


class MqttSource:
    """Frames from gateways on an MQTT topic (binary payload: one frame per message). The ack
    for a frame is published (QoS 1) on the message's topic + "/ack"; messages on topics ending
    in "/ack" are ignored, so a "#" filter does not feed acks back in. paho reconnects by itself
    (1 to 30 s apart) and the subscription is renewed on every connection."""

    def __init__(self, url, client_id=None, log=None):
        self.url = MqttUrl(url, "--mqtt-in")
        if not self.url.topic:
            raise SinkError("--mqtt-in: no topic in %r (mqtt://HOST[:PORT]/TOPIC)" % url)
        self.topic = self.url.topic
        self.name = "mqtt-in %s/%s" % (self.url.address, self.topic)
        self.client_id = client_id or "citynode-gateway-in-%d" % (time.time_ns() % 10**9)
        self.log = log if log is not None else logging.getLogger("citynode.receiver")
        self.counters = collections.Counter()
        self.connected = threading.Event()
        self._client = None

    def start(self, intake):
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        self.url.configure(client)
        client.reconnect_delay_set(1, 30)

        def on_connect(client, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                self.counters["mqtt_connect_refused"] += 1
                self.log.warning(
                    "%s: broker refused the connection: %s", self.name, _reason_text(reason_code)
                )
                return
            client.subscribe(self.topic, qos=1)
            self.connected.set()
            self.log.info("%s: connected, subscribed", self.name)

        def on_connect_fail(client, userdata):
            self.counters["mqtt_connect_failed"] += 1
            self.log.warning("%s: cannot connect to the broker; retrying", self.name)

        def on_disconnect(client, userdata, flags, reason_code, properties):
            self.connected.clear()
            self.counters["mqtt_disconnected"] += 1
            self.log.warning(
                "%s: connection lost (%s); reconnecting", self.name, _reason_text(reason_code)
            )

        def on_message(client, userdata, message):
            topic = message.topic
            if topic.endswith(ACK_SUFFIX):
                return
            self.counters["mqtt_messages"] += 1
            ack_topic = topic + ACK_SUFFIX

            def reply(ack):
                info = client.publish(ack_topic, ack, qos=1)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    raise OSError(
                        "mqtt publish to %s: %s" % (ack_topic, paho.error_string(info.rc))
                    )

            if not intake.put(bytes(message.payload), reply):
                self.counters["intake_full"] += 1

        client.on_connect = on_connect
        client.on_connect_fail = on_connect_fail
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.connect_async(self.url.host, self.url.port, keepalive=30)
        client.loop_start()
        self._client = client

    def stop(self):
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

# MQTT at the receiver's two edges, with paho-mqtt (2.x callback API): two sources (gateways
# publish raw frames to a topic, acks go back on `<that topic>/ack`; nodes publish their own
# frames on `citynode/up/<node_id>`, consumed by several receivers through one MQTT v5 shared
# subscription, acks on `citynode/down/<node_id>`) and a remote sink (one JSON reading per
# message on `<prefix>/<node_id>/<quantity>`, QoS 1, not retained), with optional Home Assistant
# MQTT discovery so each node's sensors appear there without configuration.
#
# URLs: mqtt://[user[:password]@]host[:port][/topic] (mqtts:// for TLS). The topic is taken
# verbatim after the first "/", so "+" and "#" wildcards work: mqtt://broker/citynode/up/#.

import collections
import functools
import json
import logging
import math
import os
import random
import secrets
import socket
import ssl
import sys
import threading
import time
import urllib.parse

import paho.mqtt.client as paho

from host_tools.receive.interfaces import RemoteSink, Source
from host_tools.receive.logfold import FoldingLog
from host_tools.receive.receiver import MAX_DATAGRAM
from host_tools.receive.sinks import DeliveryError, SinkError, reading_json
from protocols import uplink
from protocols.frame import MAX_U32, FrameError

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
# Home Assistant shows a sensor unavailable when no state came for this long. A node sends a
# frame every `batch` readings (10 at one a minute by default: README "Provisioning"), so a
# sensor's state comes every 10 min; 30 min lets two frames go missing (a retry after a lost
# ack comes a cycle later) before the last value is no longer shown as current.
HA_EXPIRE_AFTER_S = 1800
ONLINE = "online"  # the receiver's status payloads: Home Assistant's defaults
OFFLINE = "offline"
ONLINE_EVERY_S = 60  # "online" again with a batch at least this far apart (several receivers)


class MqttUrl:
    """A parsed mqtt:// URL: host, port, tls, username, password, topic ("" if none)."""

    def __init__(self, text, what, form="mqtt://HOST[:PORT][/TOPIC]"):
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in ("mqtt", "mqtts"):
            raise SinkError("%s: expected %s, got %r" % (what, form, text))
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


def ha_root(prefix):
    """Home Assistant's topics: beside the readings' tree, not in it, so that a backend taking
    every message under <prefix>/# still gets readings only."""
    return prefix + "-ha"


def state_topic(prefix, node_id, quantity):
    """The sensor's newest reading, retained: what Home Assistant reads."""
    return "%s/%d/%s" % (ha_root(prefix), node_id, quantity)


def status_topic(prefix):
    """The receiver's availability, retained: "online", or "offline" (also its last will)."""
    return ha_root(prefix) + "/status"


@functools.cache
def citynode_version():
    """citynode's version for Home Assistant's `origin`: FW_VERSION of firmware/__init__.py,
    the one `citynode flash` checks on the boards it flashes; None if it cannot be read."""
    from host_tools.flash import FlashError, firmware_version

    try:
        return firmware_version()
    except (OSError, FlashError):
        return None


def ha_discovery(
    node_id, quantity, prefix=DEFAULT_PREFIX, ha_prefix=HA_PREFIX, expire_after=HA_EXPIRE_AFTER_S
):
    """(topic, payload dict) of the Home Assistant MQTT discovery config for one node's sensor:
    homeassistant/sensor/<entity>/config, entity sensor.<entity> (<entity>: citynode_<node>_
    <quantity>), its value from the retained state topic, unavailable while the receiver's
    status is "offline" or once no state came for `expire_after` seconds (None: never).
    `origin` is citynode and its version; the device has no sw_version: a node's firmware
    version comes only in its STATUS frames, which reach no sink."""
    name, device_class, unit = HA_SENSORS.get(quantity, (quantity, None, None))
    entity = "citynode_%d_%s" % (node_id, quantity)
    config = {
        "name": name,
        "unique_id": entity,
        "default_entity_id": "sensor." + entity,  # object_id is deprecated (HA 2025.10)
        "state_topic": state_topic(prefix, node_id, quantity),
        "value_template": "{{ value_json.value }}",
        "state_class": "measurement",
        "availability": [
            {
                "topic": status_topic(prefix),
                "payload_available": ONLINE,
                "payload_not_available": OFFLINE,
            }
        ],
        "device": {
            "identifiers": ["citynode_%d" % node_id],
            "name": "citynode %d" % node_id,
            "manufacturer": "citynode",
            "model": "citynode sensor node",
        },
        "origin": {"name": "citynode"},
    }
    if citynode_version():
        config["origin"]["sw_version"] = citynode_version()
    if expire_after:
        config["expire_after"] = expire_after
    if device_class:
        config["device_class"] = device_class
    if unit:
        config["unit_of_measurement"] = unit
    return "%s/sensor/%s/config" % (ha_prefix, entity), config


def _acked(info):
    return info.rc == paho.MQTT_ERR_SUCCESS and info.is_published()


def _reason_text(reason_code):
    text = str(reason_code)
    return text if text else "code %s" % getattr(reason_code, "value", reason_code)


class MqttSink(RemoteSink):
    """Publishes readings (QoS 1, retain off) and waits for the broker's PUBACK of every one
    before deliver() returns. A failure drops the connection and its queue; the forwarder's
    retry connects afresh and publishes the batch again (copies carry the same reading id).

    With `ha_prefix`, for Home Assistant: each (node, quantity) gets its discovery config
    (retained, as Home Assistant expects) before its first reading on every connection; the
    newest reading of each sensor is also published, retained, on its state topic, so Home
    Assistant has it after a restart; and the receiver's status topic says "online" (retained,
    on connecting and at least every ONLINE_EVERY_S with a batch) and "offline" (on close(),
    or as the last will the broker publishes when the connection dies without a DISCONNECT).

    Retained states only move forward: a batch retains its newest reading per sensor (largest
    ts), and only if no newer one is retained already (a node's backlog arriving after fresher
    readings). What is retained is read back from the broker on connecting, so a restarted
    receiver, or another receiver publishing to the same prefix, compares with it too. Several
    receivers share one status topic: the last to speak wins, and a live one says "online"
    again within ONLINE_EVERY_S of a dead one's will."""

    def __init__(
        self,
        url,
        prefix=DEFAULT_PREFIX,
        ha_prefix=None,
        timeout=10.0,
        client_id=None,
        expire_after=HA_EXPIRE_AFTER_S,
    ):
        self.url = MqttUrl(url, "--mqtt-out")
        if self.url.topic:
            prefix = self.url.topic.rstrip("/")
        if not prefix or "+" in prefix or "#" in prefix:
            raise SinkError("--mqtt-out: topic prefix %r must be a plain topic" % prefix)
        if expire_after is not None and not (isinstance(expire_after, int) and expire_after >= 0):
            raise ValueError(
                "expire_after must be whole seconds >= 0 or None, got %r" % (expire_after,)
            )
        self.prefix = prefix
        self.ha_prefix = ha_prefix
        self.expire_after = expire_after
        self.status_topic = status_topic(prefix)
        self.timeout = timeout
        self.client_id = client_id or "citynode-receiver-%d" % (time.time_ns() % 10**9)
        self.name = "mqtt %s/%s" % (self.url.address, prefix)
        self._client = None
        self._connected = threading.Event()
        self._lost = None  # why the connection ended, set by on_disconnect
        self._announced = set()
        self._lock = threading.Lock()  # guards _state_ts, which paho's thread updates too
        self._state_ts = {}  # (node_id, quantity) -> ts of the newest state retained
        self._synced = threading.Event()  # the retained states have been read
        self._online_at = None  # time.monotonic() of the last "online"

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
        if self.ha_prefix:
            client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
            client.on_subscribe = self._on_subscribe
            client.on_message = self._on_message
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
        if self.ha_prefix:
            self._go_online(client)
        return client

    def _go_online(self, client):
        """Read the retained states, then say "online". The broker sends a subscription's
        retained messages before anything published after it, so the echo of our own
        "online" (live, hence not flagged retained) comes after every retained state. A
        broker that refuses the subscription or never echoes (an ACL) leaves only the states
        this sink published to compare with: the wait gives up after the timeout."""
        self._synced.clear()
        states = ha_root(self.prefix) + "/+/+"  # not status: one level less
        client.subscribe([(states, 1), (self.status_topic, 1)])
        self._wait([client.publish(self.status_topic, ONLINE, qos=1, retain=True)])
        self._online_at = time.monotonic()
        self._synced.wait(self.timeout)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            self._synced.set()  # no echo will come

    def _on_message(self, client, userdata, message):
        topic = message.topic
        if topic == self.status_topic:
            if not message.retain:
                self._synced.set()
            return
        node, _, quantity = topic[len(ha_root(self.prefix)) + 1 :].partition("/")
        try:
            ts = float(json.loads(message.payload)["ts"])
        except (ValueError, TypeError, KeyError):  # not ours: no JSON reading, or a deletion
            return
        if node.isdigit() and math.isfinite(ts):
            key = (int(node), quantity)
            with self._lock:
                if ts > self._state_ts.get(key, -math.inf):
                    self._state_ts[key] = ts

    @property
    def where(self):
        return "mqtt %s" % self.url.address

    def _drop(self, abort=False):
        """Close the connection: with a DISCONNECT, or (abort, after a failure) by closing the
        socket, so that the broker publishes the last will ("offline") when it notices."""
        client, self._client = self._client, None
        self._connected.clear()
        if client is None:
            return
        sock = client.socket() if abort else None
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
            elif not abort:
                client.disconnect()
        except Exception:  # already gone
            pass
        client.loop_stop()

    # --- delivery ---

    def deliver(self, rows):
        client = self._connect()
        infos = []
        announcing = set()
        newest = {}  # (node_id, quantity) -> the batch's newest row
        for row in rows:
            node_id, _, ts, quantity, _ = row
            key = (node_id, quantity)
            if self.ha_prefix:
                if key not in self._announced and key not in announcing:
                    topic, config = ha_discovery(
                        node_id, quantity, self.prefix, self.ha_prefix, self.expire_after
                    )
                    infos.append(client.publish(topic, json.dumps(config), qos=1, retain=True))
                    announcing.add(key)
                if key not in newest or ts >= newest[key][2]:
                    newest[key] = row
            topic = reading_topic(self.prefix, node_id, quantity)
            infos.append(client.publish(topic, json.dumps(reading_json(row)), qos=1))
        retained = {}
        with self._lock:
            for key, row in newest.items():
                if row[2] >= self._state_ts.get(key, -math.inf):  # equal: the same, again
                    retained[key] = row[2]
        for node_id, quantity in retained:
            payload = json.dumps(reading_json(newest[node_id, quantity]))
            topic = state_topic(self.prefix, node_id, quantity)
            infos.append(client.publish(topic, payload, qos=1, retain=True))
        online = self.ha_prefix and time.monotonic() - self._online_at >= ONLINE_EVERY_S
        if online:
            infos.append(client.publish(self.status_topic, ONLINE, qos=1, retain=True))
        self._wait(infos)
        self._announced |= announcing
        with self._lock:
            for key, ts in retained.items():
                self._state_ts[key] = max(ts, self._state_ts.get(key, -math.inf))
        if online:
            self._online_at = time.monotonic()

    def _wait(self, infos, timeout=None):
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for info in infos:
            # rc first: is_published() raises on a message paho refused, as it does when the
            # connection was lost an instant before on_disconnect said so
            while not _acked(info):
                if info.rc != paho.MQTT_ERR_SUCCESS or not self._connected.is_set():
                    why = self._lost or paho.error_string(info.rc)
                    self._drop(abort=True)
                    raise DeliveryError("connection", "%s: %s" % (self.where, why))
                if time.monotonic() > deadline:
                    self._drop(abort=True)
                    raise DeliveryError(
                        "timeout",
                        "%s: %d of %d messages not acknowledged within %.1f s"
                        % (self.where, sum(not _acked(i) for i in infos), len(infos), timeout),
                    )
                time.sleep(0.002)

    def close(self):
        """Say "offline" (with Home Assistant) and disconnect."""
        client = self._client
        if client is not None and self.ha_prefix and self._connected.is_set():
            try:
                info = client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
                self._wait([info], min(self.timeout, 2.0))
            except DeliveryError:
                return  # dropped without a DISCONNECT: the broker publishes the will
        self._drop()


class MqttSource(Source):
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
        self._in_flight = collections.deque(maxlen=_IN_FLIGHT)  # acks handed to paho

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
                self._in_flight.append(info)
                if info.rc != paho.MQTT_ERR_SUCCESS:
                    raise OSError(
                        "mqtt publish to %s: %s" % (ack_topic, paho.error_string(info.rc))
                    )

            if len(message.payload) > MAX_DATAGRAM:  # no frame is that long
                self.counters["oversize"] += 1
                return
            if not intake.put(bytes(message.payload), reply, time.time()):
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
            wait_published(self._in_flight, ACK_DRAIN_S)  # the last acks out first
            client.disconnect()
            client.loop_stop()


# --- nodes publishing their own frames ---------------------------------------------------

ACK_DRAIN_S = 3.0  # how long stop() waits for acks handed to paho to reach the broker
_IN_FLIGHT = 4096  # acks remembered for that wait (older ones are long gone)


def wait_published(infos, timeout):
    """Wait until every QoS 1 publish in infos (paho MQTTMessageInfo) reached the broker, at
    most timeout seconds in all; returns how many did not."""
    deadline = time.monotonic() + timeout
    left = 0
    for info in list(infos):
        remaining = deadline - time.monotonic()
        if info.rc != paho.MQTT_ERR_SUCCESS or info.is_published():
            continue
        if remaining <= 0:
            left += 1
            continue
        try:
            info.wait_for_publish(remaining)
        except (RuntimeError, ValueError):  # paho: the publish was refused or the queue is gone
            pass
        if not info.is_published():
            left += 1
    return left


UP_TOPIC = "citynode/up/"  # + node id: the node's frames
DOWN_TOPIC = "citynode/down/"  # + node id: the host's acks to it
DEFAULT_GROUP = "citynode"
UP_URL_FORM = "mqtt://HOST[:PORT][/GROUP]"


def up_node_id(topic):
    """The node id of an uplink topic citynode/up/<id>, else None. The id must be a u32 written
    as a node writes it (decimal, no sign, no leading zero): the ack goes to
    citynode/down/<the same text>, so "007" is refused rather than answered where no node
    listens."""
    if not topic.startswith(UP_TOPIC):
        return None
    text = topic[len(UP_TOPIC) :]
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
        return None
    if len(text) > 1 and text[0] == "0":
        return None
    node_id = int(text)
    return node_id if node_id <= MAX_U32 else None


def _os_error_text(error):
    if error is None:
        return "no reason given"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


class MqttUplinkSource(Source):
    """Frames that nodes publish themselves (one frame a message, QoS 1) on
    citynode/up/<node_id>, read through the MQTT v5 shared subscription
    $share/<group>/citynode/up/+ : every receiver started on the same broker with the same
    group is one member, the broker hands each message to one member, and a member that goes
    away gets no more. The ack for a frame is published (QoS 1, not retained) on
    citynode/down/<node_id>, <node_id> taken from the message's topic.

    Dropped and counted: a payload longer than MAX_DATAGRAM (`oversize`: no frame is), a topic
    whose last level is not a node id (`mqtt_up_bad_topic`), and a frame whose header names
    another node than its topic (`mqtt_up_id_mismatch`). A node publishes only its own frames:
    the broker's ACL can tie a topic to a login (mosquitto: `pattern write citynode/up/%u`), and
    the ack goes to the topic's node, so answering node B's frame sent on A's topic would send
    B's ack where B does not listen. A payload that is no frame at all is passed on, for the
    verifier to reject and count with its reason.

    Sessions: every connection starts clean, with no session expiry, so a receiver's session
    ends with its connection (a crash, SIGKILL, a cut network after 1.5 keep-alives) and the
    broker hands the group's next messages to the members still there. A session that outlived
    the connection would lose more with a shared subscription, not less: mosquitto 2.0 keeps
    giving a disconnected session its turn of the group's messages, queued for a receiver that
    may never come back (a restarted one has a new client id) and dropped when the session
    expires; EMQX's documentation likewise asks for clean sessions with shared subscriptions.

    Acknowledgements: paho sends the PUBACK when on_message returns, that is once the frame is
    in the intake, before it is stored. A receiver killed in between loses that frame, from the
    broker and from its memory, and that is safe: the guarantee is end to end. The host's ack
    on citynode/down/<id> goes out only after the readings are durably stored, and a node keeps
    its readings and sends them again (re-encoded with their new ages) until such an ack covers
    them; the copy goes to a live member. Holding the PUBACK back until the write would not
    help: a broker redelivers an unacknowledged message only on a new connection of the same
    session, which a dead receiver does not make, and mosquitto gives the messages in flight to
    a member that disconnects to no other member. A message delivered twice (a node's own QoS 1
    re-send) is harmless: its readings are stored once under their identity (SPEC.md
    "Identity") and it is acked again.

    Connection: paho's network thread, reconnecting after a pause that doubles from backoff[0]
    to backoff[1] seconds, each drawn between half and all of it (receivers of a restarted
    broker do not come back in step), back to backoff[0] once connected. Logged once per change
    of state (connected, cannot connect or lost, refused), not per attempt; attempts and
    messages are counted. The subscription is made on every connection."""

    KEEPALIVE_S = 15
    ACK_QUEUE = 10000  # acks waiting for the broker; past this, sending one fails (counted)

    def __init__(self, url, group=DEFAULT_GROUP, client_id=None, log=None, backoff=(0.5, 30.0)):
        self.url = MqttUrl(url, "--mqtt-up", UP_URL_FORM)
        if self.url.topic:
            group = self.url.topic
        if not group or any(c in group for c in "/+#"):
            raise SinkError(
                "--mqtt-up: group %r in %r: a share name is one or more characters without "
                "'/', '+' or '#' (%s)" % (group, url, UP_URL_FORM)
            )
        if not 0 < backoff[0] <= backoff[1]:
            raise ValueError("backoff must be (min, max) with 0 < min <= max, got %r" % (backoff,))
        self.group = group
        self.topic_filter = "$share/%s/%s+" % (group, UP_TOPIC)
        self.name = "mqtt-up %s %s" % (self.url.address, self.topic_filter)
        self.client_id = client_id or "citynode-up-%s-%d-%s" % (
            socket.gethostname()[:32],
            os.getpid(),
            secrets.token_hex(3),  # client ids must be unique: the broker drops an older twin
        )
        self.log = log if log is not None else logging.getLogger("citynode.receiver")
        self.folded = FoldingLog(self.log)  # drops are counted; their lines folded
        self.counters = collections.Counter()
        self.connected = threading.Event()  # set while connected and subscribed
        self.backoff = backoff
        self._pause = None  # the back-off's current pause; None after a connection
        self._state = None
        self._down_since = None
        self._was_up = False
        self._refused = False
        self._stopping = False
        self._client = None
        self._in_flight = collections.deque(maxlen=_IN_FLIGHT)  # acks handed to paho

    def _enter(self, state, level, msg, *args):
        """Log msg if the connection changes state: a broker down for an hour is one line."""
        if state == self._state:
            return
        self._state = state
        self.log.log(level, "%s: " + msg, self.name, *args)

    def _back_off(self, client):
        low, high = self.backoff
        self._pause = low if self._pause is None else min(self._pause * 2, high)
        pause = random.uniform(self._pause / 2, self._pause)
        client.reconnect_delay_set(pause, pause)  # paho's next wait, its own doubling reset

    def _went_down(self):
        self.connected.clear()
        if self._down_since is None:
            self._down_since = time.monotonic()

    def start(self, intake):
        client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5
        )
        self.url.configure(client)
        client.max_inflight_messages_set(1000)  # acks in flight to the broker
        client.max_queued_messages_set(self.ACK_QUEUE)
        client.reconnect_delay_set(self.backoff[0], self.backoff[0])
        counters = self.counters

        def on_connect(client, userdata, flags, reason_code, properties):
            if reason_code.is_failure:
                counters["mqtt_up_refused"] += 1
                self._refused = True
                self._went_down()
                self._enter(
                    ("refused", str(reason_code)),
                    logging.WARNING,
                    "broker refused the connection: %s; retrying with back-off",
                    _reason_text(reason_code),
                )
                return
            client.subscribe(self.topic_filter, qos=1)

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            reason_code = reason_codes[0]
            if reason_code.is_failure:
                counters["mqtt_up_subscribe_refused"] += 1
                self._enter(
                    ("not subscribed", str(reason_code)),
                    logging.ERROR,
                    "broker refused the subscription: %s; no frames arrive until it allows it "
                    "(an MQTT v5 broker with shared subscriptions, and an ACL letting this "
                    "login read citynode/up/+)",
                    _reason_text(reason_code),
                )
                return
            self._pause = None
            self.connected.set()
            if self._down_since is None:
                self._enter("up", logging.INFO, "connected, subscribed")
            else:
                self._enter(
                    "up",
                    logging.INFO,
                    "connected %safter %.1f s, subscribed",
                    "again " if self._was_up else "",
                    time.monotonic() - self._down_since,
                )
                self._down_since = None
            self._was_up = True

        def on_connect_fail(client, userdata):
            # paho calls this inside its `except OSError`: the exception is still at hand
            counters["mqtt_up_connect_failed"] += 1
            self._went_down()
            self._enter(
                "down",
                logging.WARNING,
                "cannot connect to the broker: %s; retrying with back-off (at most %g s apart)",
                _os_error_text(sys.exc_info()[1]),
                self.backoff[1],
            )
            self._back_off(client)

        def on_disconnect(client, userdata, flags, reason_code, properties):
            self._went_down()
            if self._stopping:
                return
            if self._refused:  # the broker closing a refused connection: counted, logged
                self._refused = False
            else:
                counters["mqtt_up_disconnected"] += 1
                if flags.is_disconnect_packet_from_server:
                    why = "the broker sent DISCONNECT (%s)" % _reason_text(reason_code)
                elif reason_code.value == 128:  # paho's "unspecified": the socket closed
                    why = "closed without a DISCONNECT (the broker stopped, or the network)"
                else:
                    why = _reason_text(reason_code)  # e.g. paho's keep-alive timeout
                self._enter(
                    "down",
                    logging.WARNING,
                    "connection lost: %s; reconnecting with back-off (at most %g s apart)",
                    why,
                    self.backoff[1],
                )
            self._back_off(client)

        def on_message(client, userdata, message):
            rx_time = time.time()  # SPEC.md "Timing": when the frame was read, not handled
            counters["mqtt_up_messages"] += 1
            payload = message.payload
            if len(payload) > MAX_DATAGRAM:
                counters["oversize"] += 1
                return
            topic = message.topic
            node_id = up_node_id(topic)
            if node_id is None:
                counters["mqtt_up_bad_topic"] += 1
                self.folded.warning(
                    ("bad topic",),
                    "%s: message on %r dropped: not %s<node id> (a u32 in decimal)",
                    self.name,
                    topic[:80],
                    UP_TOPIC,
                )
                return
            try:
                header_id = uplink.peek(payload)[2]
            except FrameError:
                header_id = node_id  # no frame: the verifier rejects it with its reason
            if header_id != node_id:
                counters["mqtt_up_id_mismatch"] += 1
                self.folded.warning(
                    ("id mismatch", node_id),
                    "%s: frame of node %d on %s dropped: a node publishes only its own frames",
                    self.name,
                    header_id,
                    topic,
                )
                return
            ack_topic = DOWN_TOPIC + topic[len(UP_TOPIC) :]
            if not intake.put(bytes(payload), lambda ack: self._send_ack(ack_topic, ack), rx_time):
                counters["intake_full"] += 1

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_connect_fail = on_connect_fail
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        client.connect_async(
            self.url.host, self.url.port, keepalive=self.KEEPALIVE_S, clean_start=True
        )
        self._client = client
        client.loop_start()

    def _send_ack(self, topic, ack):
        """reply() of every frame read: publish its ack, or raise OSError."""
        client = self._client
        if client is None or not self.connected.is_set():
            raise OSError("%s: not connected, ack to %s not sent" % (self.name, topic))
        info = client.publish(topic, ack, qos=1)
        self._in_flight.append(info)
        if info.rc == paho.MQTT_ERR_NO_CONN:  # lost just now: paho sends it on reconnecting
            return
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise OSError("%s: ack to %s: %s" % (self.name, topic, paho.error_string(info.rc)))

    def stop(self):
        client, self._client = self._client, None
        if client is None:
            return
        # The last batch's acks were handed to paho, not yet to the broker: let them go out
        # (bounded) before disconnecting, or the nodes send those readings again for nothing.
        wait_published(self._in_flight, ACK_DRAIN_S)
        self._stopping = True
        self.connected.clear()
        client.disconnect()
        client.loop_stop()
        self.folded.flush(final=True)

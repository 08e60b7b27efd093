# Every source and sink of the receive path is written against host_tools/receive/interfaces.py:
# it names its interface as a base, and an instance has what the interface says (runtime_checkable
# isinstance: every method and attribute present).
import io
import socket

import pytest

from host_tools.receive import interfaces
from host_tools.receive.gateway_serial import SerialGatewaySource
from host_tools.receive.mqtt import MqttSink, MqttSource, MqttUplinkSource
from host_tools.receive.pg import PostgresSink
from host_tools.receive.receiver import Intake, UdpSource
from host_tools.receive.sinks import (
    InfluxFileSink,
    InfluxHttpSink,
    JsonlSink,
    SqliteSink,
    TeeSink,
    WebhookSink,
)
from host_tools.receive.spool import Spool


@pytest.fixture
def instances(tmp_path):
    """(interface, instance) of every concrete source and sink that opens nothing remote when
    built; closed afterwards."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sqlite = SqliteSink(tmp_path / "r.db")
    made = [
        (interfaces.Intake, Intake()),
        (interfaces.Source, UdpSource(sock)),
        (interfaces.Source, MqttSource("mqtt://127.0.0.1:9/citynode/up")),
        (interfaces.Source, MqttUplinkSource("mqtt://127.0.0.1:9")),
        (interfaces.Source, SerialGatewaySource(["loop://"])),
        (interfaces.Sink, sqlite),
        (interfaces.Sink, JsonlSink(io.StringIO())),
        (interfaces.Sink, TeeSink([sqlite])),
        (interfaces.Sink, InfluxFileSink(tmp_path / "influx.lp")),
        (interfaces.Sink, Spool(tmp_path / "spool.db")),
        (interfaces.RemoteSink, WebhookSink("http://127.0.0.1:9/hook")),
        (interfaces.RemoteSink, InfluxHttpSink("http://127.0.0.1:9/api/v2/write?bucket=b")),
        (interfaces.RemoteSink, MqttSink("mqtt://127.0.0.1:9")),
    ]
    yield made
    sock.close()
    for interface, obj in made:
        if interface in (interfaces.Sink, interfaces.RemoteSink) and obj is not sqlite:
            obj.close()
    sqlite.close()


def test_every_source_and_sink_has_its_interface(instances):
    for interface, obj in instances:
        assert interface in type(obj).__mro__, type(obj)  # named against it
        assert isinstance(obj, interface), type(obj)  # and has what it says
    assert PostgresSink.__mro__[1] is interfaces.Sink  # needs a server to build


def test_an_object_missing_a_method_is_not_a_sink():
    class Half:
        def write(self, rows):
            return 0

    assert not isinstance(Half(), interfaces.Sink)
    assert not isinstance(Half(), interfaces.RemoteSink)

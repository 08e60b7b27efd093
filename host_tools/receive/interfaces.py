# The receive path's interfaces, written down: what a source, a sink and a remote sink have, so
# that a new one (a PostgreSQL sink, a second MQTT source) is written against a definition, not
# against whichever existing class it was copied from. The concrete classes name these as their
# bases; tests/test_receive_interfaces.py checks every one with isinstance (runtime_checkable).
#
#   source --intake.put()--> serve() --Receiver.handle()--> sink.write() (durable) --> ack
#                                                          spool --Forwarder--> remote.deliver()

import collections
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

# A reading as every sink takes it: (node_id, reading_index, ts, quantity, value). reading_index
# is None for a v1 frame; ts is unix seconds UTC; quantity a protocols/uplink.py CHANNELS name.
Row = tuple[int, int | None, float, str, float]
# Sends one ack back the way its datagram came; may raise OSError.
Reply = Callable[[bytes], None]


@runtime_checkable
class Intake(Protocol):
    """Where sources put datagrams (host_tools/receive/receiver.py Intake)."""

    def put(self, datagram: bytes, reply: Reply, rx_time: float | None = None) -> bool:
        """Queue one datagram read at rx_time (unix seconds UTC; None: when it is handled).
        False if the receiver is behind: the caller counts the drop, the node sends again."""
        ...


@runtime_checkable
class Source(Protocol):
    """Frames from the outside: UDP, MQTT, LoRa gateways on serial lines. Runs on a thread of
    its own and counts its own outcomes."""

    name: str  # for logs and the status file ("udp 0.0.0.0:1700"); never a credential
    counters: collections.Counter  # its own (it runs on its own thread)

    def start(self, intake: Intake) -> None:
        """Begin delivering every datagram to intake.put()."""
        ...

    def stop(self) -> None:
        """Stop delivering and release the port; may be called twice."""
        ...


@runtime_checkable
class Sink(Protocol):
    """Local, durable storage (SQLite, PostgreSQL, the spool, JSON lines, an Influx file): the
    receiver acks a frame only after write() returned (ARCHITECTURE.md "Lines not to cross").
    A reading already held (same node id and reading index) is dropped, not stored twice."""

    def write(self, rows: Sequence[Row]) -> int:
        """Store rows durably; return how many were new. Raises SinkError if they are not."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class RemoteSink(Protocol):
    """A backend the receiver never waits for (webhook, InfluxDB over HTTP, MQTT): fed from the
    spool by a Forwarder (host_tools/receive/forward.py), at least once, retried with back-off."""

    name: str  # stable: the spool keeps each remote sink's progress under it; no credentials

    def deliver(self, rows: Sequence[Row]) -> None:
        """Return once the remote end confirmed rows; raise DeliveryError (permanent for a
        refusal that retrying cannot fix) otherwise."""
        ...

    def close(self) -> None: ...

# Tests for the HTTP sinks (webhook, InfluxDB over HTTP) and the InfluxDB line protocol, against a
# real HTTP server (http.server in a subprocess) that can answer 500, hang, and be killed and
# restarted. Run as a script, this file is that server (see WebhookServer).

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from host_tools.forward import Backoff, Forwarder
from host_tools.sinks import (
    DeliveryError,
    InfluxFileSink,
    InfluxHttpSink,
    SinkError,
    WebhookSink,
    influx_line,
    influx_lines,
    reading_id,
    reading_json,
)
from host_tools.spool import Spool

ROWS = [
    (17, 1_700_000_000.25, "temperature_c", 21.5),
    (17, 1_700_000_000.25, "humidity_pct", 45.0),
    (17, 1_700_000_060.25, "temperature_c", 21.6),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebhookServer:
    """A real HTTP server in a subprocess (this file run as a script). Every POST is recorded as
    one JSON line {path, headers, body} in `record` *before* it is answered; the answer depends
    on the mode file: "ok" (200, or 204 for /api/v2/write), "500", or "hang" (never answers).
    kill() is SIGKILL; start() again binds the same port."""

    def __init__(self, tmp_path, port=None):
        self.port = port or free_port()
        self.record = tmp_path / ("webhook-%d.jsonl" % self.port)
        self.mode_file = tmp_path / ("webhook-%d.mode" % self.port)
        self.set_mode("ok")
        self.proc = None

    @property
    def url(self):
        return "http://127.0.0.1:%d/readings" % self.port

    def set_mode(self, mode):
        self.mode_file.write_text(mode)

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, str(self.port), str(self.record), str(self.mode_file)],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", "webhook server did not start: %r" % line
        return self

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def requests(self):
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines() if line]

    def readings(self):
        """Every reading the server has recorded (copies included), from the JSON bodies."""
        out = []
        for r in self.requests():
            if r["path"].startswith("/readings"):
                out.extend(json.loads(r["body"])["readings"])
        return out


def serve_main(port, record, mode_file):
    import http.server
    import threading

    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            mode = Path(mode_file).read_text().strip()
            if mode == "hang":
                time.sleep(3600)
                return
            if mode == "500":
                payload = b"boom\n"
                self.send_response(500)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            entry = {"path": self.path, "headers": dict(self.headers), "body": body.decode()}
            with lock, open(record, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
            self.send_response(204 if self.path.startswith("/api/v2/write") else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


@pytest.fixture
def server(tmp_path):
    s = WebhookServer(tmp_path).start()
    yield s
    s.kill()


# --- readings as JSON ---------------------------------------------------------------------


def test_reading_id_and_json():
    assert reading_id(17, 1_700_000_000.25, "temperature_c") == "17/1700000000.250/temperature_c"
    assert reading_id(3, 5.0, "channel_99") == "3/5.000/channel_99"
    assert reading_json(ROWS[0]) == {
        "id": "17/1700000000.250/temperature_c",
        "node_id": 17,
        "ts": 1_700_000_000.25,
        "time": "2023-11-14T22:13:20.250Z",
        "quantity": "temperature_c",
        "value": 21.5,
    }


# --- webhook -------------------------------------------------------------------------------


def test_webhook_posts_json_readings(server):
    sink = WebhookSink(server.url, timeout=5)
    sink.deliver(ROWS)
    sink.deliver(ROWS[:1])  # over the same kept-alive connection
    sink.close()
    (first, second) = server.requests()
    assert first["path"] == "/readings"
    assert first["headers"]["Content-Type"] == "application/json"
    assert json.loads(first["body"]) == {"readings": [reading_json(r) for r in ROWS]}
    assert json.loads(second["body"])["readings"][0]["id"] == "17/1700000000.250/temperature_c"


def test_webhook_500_is_a_precise_delivery_error(server):
    server.set_mode("500")
    sink = WebhookSink(server.url, timeout=5)
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    assert info.value.reason == "http_500"
    assert str(info.value) == "%s: HTTP 500 Internal Server Error: boom" % server.url
    server.set_mode("ok")
    sink.deliver(ROWS)  # the next attempt works
    assert len(server.readings()) == 3


def test_webhook_that_hangs_times_out(server):
    server.set_mode("hang")
    sink = WebhookSink(server.url, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    assert 0.4 < time.monotonic() - t0 < 3
    assert info.value.reason == "timeout"
    assert str(info.value) == "%s: no answer within 0.5 s" % server.url


def test_webhook_down_is_connect_error(tmp_path):
    url = "http://127.0.0.1:%d/readings" % free_port()
    with pytest.raises(DeliveryError) as info:
        WebhookSink(url, timeout=2).deliver(ROWS)
    assert info.value.reason == "connect"
    assert str(info.value) == "%s: connection refused" % url


def test_webhook_killed_mid_connection_then_back(server):
    sink = WebhookSink(server.url, timeout=2)
    sink.deliver(ROWS)
    server.kill()
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)  # the kept-alive connection is dead, and so is the server
    assert info.value.reason in ("connect", "io")
    server.start()
    sink.deliver(ROWS)
    assert len(server.readings()) == 6


@pytest.mark.parametrize(
    "url, message",
    [
        ("ftp://x/y", "--webhook: expected an http:// or https:// URL, got 'ftp://x/y'"),
        ("http:///path", "--webhook: expected an http:// or https:// URL, got 'http:///path'"),
        ("http://host:port/", "--webhook: bad port in 'http://host:port/'"),
    ],
)
def test_webhook_bad_urls(url, message):
    with pytest.raises(SinkError) as info:
        WebhookSink(url)
    assert str(info.value) == message


def test_forwarder_through_500s_hangs_and_a_killed_server_delivers_every_reading(server, tmp_path):
    spool = Spool(tmp_path / "spool.db")
    sink = WebhookSink(server.url, timeout=0.5)
    f = Forwarder(spool, sink, batch=40, backoff=Backoff(base=0.05, cap=0.3), poll_s=0.05)
    f.start()
    expected = set()

    def spool_some(n, t0):
        rows = [(9, t0 + i, "temperature_c", float(i)) for i in range(n)]
        spool.write(rows)
        expected.update(reading_id(*r[:3]) for r in rows)

    def delivered():
        return {r["id"] for r in server.readings()}

    def wait_all(timeout=20):
        deadline = time.monotonic() + timeout
        while delivered() != expected:
            assert time.monotonic() < deadline, "missing %d" % len(expected - delivered())
            time.sleep(0.05)

    try:
        spool_some(100, 0)
        wait_all()
        server.set_mode("500")
        spool_some(100, 1000)
        time.sleep(0.5)
        assert f.counters["failed_http_500"] >= 1
        server.set_mode("hang")
        spool_some(50, 2000)
        time.sleep(1.2)
        assert f.counters["failed_timeout"] >= 1
        server.kill()  # mid-run: hanging requests die with it
        server.set_mode("ok")
        spool_some(50, 3000)
        time.sleep(0.5)
        server.start()
        wait_all()
    finally:
        assert f.stop(5)
        spool.close()
    ids = [r["id"] for r in server.readings()]
    assert set(ids) == expected  # every reading arrived; any copies carry the same id
    assert spool_backlog_is_empty(tmp_path / "spool.db")


def spool_backlog_is_empty(path):
    s = Spool(path)
    try:
        return s._db().execute("SELECT count(*) FROM spool").fetchone() == (0,)
    finally:
        s.close()


# --- InfluxDB line protocol ---------------------------------------------------------------


def test_influx_lines_exact_format():
    assert influx_lines(ROWS) == [
        "citynode,node_id=17 humidity_pct=45.0,temperature_c=21.5 1700000000250000000",
        "citynode,node_id=17 temperature_c=21.6 1700000060250000000",
    ]
    # an integer-valued reading stays a float field (no "i" suffix), ts to the millisecond
    assert influx_lines([(3, 1.001, "battery_v", 3)]) == [
        "citynode,node_id=3 battery_v=3.0 1001000000"
    ]


def test_influx_escaping():
    line = influx_line(
        "city node,x", {"site name": "Koper, port=1", "a": "b"}, {"t=c,x y": 21.5}, 42
    )
    assert line == r"city\ node\,x,a=b,site\ name=Koper\,\ port\=1 t\=c\,x\ y=21.5 42"
    for bad in ({"k": ""}, {"k": "two\nlines"}, {"k": "back\\slash"}):
        with pytest.raises(ValueError):
            influx_line("m", bad, {"f": 1.0}, 1)
    with pytest.raises(ValueError, match="at least one field"):
        influx_line("m", {}, {}, 1)


def test_influx_file_sink(tmp_path):
    path = tmp_path / "out.lp"
    sink = InfluxFileSink(path)
    assert sink.write(ROWS) == 3
    sink.close()
    assert path.read_text() == "".join(line + "\n" for line in influx_lines(ROWS))
    with pytest.raises(SinkError, match="--influx .*: No such file or directory"):
        InfluxFileSink(tmp_path / "no" / "out.lp")


def test_influx_http_sink_posts_line_protocol(server):
    url = "http://127.0.0.1:%d/api/v2/write?org=koper&bucket=citynode" % server.port
    sink = InfluxHttpSink(url, timeout=5, token="s3cret")
    assert sink.name == "influx " + url + "&precision=ns"
    sink.deliver(ROWS)
    sink.close()
    (req,) = server.requests()
    assert req["path"] == "/api/v2/write?org=koper&bucket=citynode&precision=ns"
    assert req["headers"]["Authorization"] == "Token s3cret"
    assert req["headers"]["Content-Type"] == "text/plain; charset=utf-8"
    assert req["body"] == "".join(line + "\n" for line in influx_lines(ROWS))
    bare = InfluxHttpSink("http://127.0.0.1:%d" % server.port)
    assert bare.name == "influx http://127.0.0.1:%d/api/v2/write?precision=ns" % server.port


if __name__ == "__main__":
    os.environ.pop("PYTHONSTARTUP", None)
    serve_main(int(sys.argv[1]), sys.argv[2], sys.argv[3])

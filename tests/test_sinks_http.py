# Tests for the HTTP sinks (webhook, InfluxDB over HTTP) and the InfluxDB line protocol, against a
# real HTTP server (http.server in a subprocess) that can answer any status with any headers,
# send long bodies, hang, and be killed and restarted: answers read whole (a long 2xx body does
# not turn the next batch into a copy), 4xx refusals to the dead letters, Retry-After, and
# credentials in the URL sent as Basic authentication and never shown (also through `citynode
# receive`). Run as a script, this file is that server (see WebhookServer).

import base64
import email.utils
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from host_tools.backoff import Backoff
from host_tools.receive.forward import Forwarder
from host_tools.receive.sinks import (
    ANSWER_MAX,
    DeliveryError,
    InfluxFileSink,
    InfluxHttpSink,
    SinkError,
    WebhookSink,
    influx_line,
    influx_lines,
    reading_id,
    reading_json,
    retry_after_s,
)
from host_tools.receive.spool import Spool

ROWS = [
    (17, 40312, 1_700_000_000.25, "temperature_c", 21.5),
    (17, 40312, 1_700_000_000.25, "humidity_pct", 45.0),
    (17, 40313, 1_700_000_060.25, "temperature_c", 21.6),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.02)


class WebhookServer:
    """A real HTTP server in a subprocess (this file run as a script). Every POST it accepts is
    recorded as one JSON line {path, headers, body, port, time} in `record` *before* it is
    answered; every POST, accepted or not, as {path, headers, port, time, mode} in `attempts`.
    The answer depends on the mode file (set_mode): "ok" (200, or 204 for /api/v2/write),
    "hang" (never answers), "big N" (200 with an N-byte body), "chunked N" (the same, chunked),
    or a status code such as "500" or "429" (answered with the body "boom" and the headers
    given; "once" after it: then "ok"; "echo" after it: the request line and headers as the
    body). kill() is SIGKILL; start() again binds the same port."""

    def __init__(self, tmp_path, port=None):
        self.port = port or free_port()
        self.record = tmp_path / ("webhook-%d.jsonl" % self.port)
        self.attempts_file = tmp_path / ("webhook-%d.attempts" % self.port)
        self.mode_file = tmp_path / ("webhook-%d.mode" % self.port)
        self.set_mode("ok")
        self.proc = None

    @property
    def url(self):
        return "http://127.0.0.1:%d/readings" % self.port

    def set_mode(self, mode, headers=None):
        lines = [mode] + ["%s: %s" % kv for kv in (headers or {}).items()]
        self.mode_file.write_text("\n".join(lines) + "\n")

    def start(self):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                str(self.port),
                str(self.record),
                str(self.mode_file),
                str(self.attempts_file),
            ],
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

    @staticmethod
    def _lines(path):
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def requests(self):
        return self._lines(self.record)

    def attempts(self):
        return self._lines(self.attempts_file)

    def readings(self):
        """Every reading the server has recorded (copies included), from the JSON bodies."""
        out = []
        for r in self.requests():
            if r["path"].startswith("/readings"):
                out.extend(json.loads(r["body"])["readings"])
        return out


def serve_main(port, record, mode_file, attempts):
    import http.server
    import threading

    lock = threading.Lock()

    def append(path, entry):
        with lock, open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            lines = Path(mode_file).read_text().splitlines()
            mode, headers = lines[0].split(), [h.split(": ", 1) for h in lines[1:] if h]
            entry = {
                "path": self.path,
                "headers": dict(self.headers),
                "port": self.client_address[1],
                "time": time.time(),
            }
            append(attempts, dict(entry, mode=lines[0]))
            if mode[0] == "hang":
                time.sleep(3600)
                return
            if mode[0].isdigit():
                if mode[1:] == ["once"]:
                    Path(mode_file).write_text("ok\n")
                payload = b"boom\n"
                if mode[1:] == ["echo"]:  # the request back, as some error pages do
                    payload = ("%s %s %s" % (self.command, self.path, self.headers)).encode()
                self.send_response(int(mode[0]))
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            append(record, dict(entry, body=body.decode()))
            self.send_response(204 if self.path.startswith("/api/v2/write") else 200)
            if mode[0] == "big":
                payload = b"x" * int(mode[1])
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            elif mode[0] == "chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                left = int(mode[1])
                while left:
                    n = min(left, 1000)
                    self.wfile.write(b"%x\r\n%s\r\n" % (n, b"y" * n))
                    left -= n
                self.wfile.write(b"0\r\n\r\n")
            else:
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
    assert reading_id(17, 40312, 1_700_000_000.25, "temperature_c") == "17/40312/temperature_c"
    # a v1 reading has no index: its node, timestamp (3 decimals) and quantity
    assert reading_id(17, None, 1_700_000_000.25, "temperature_c") == (
        "17/1700000000.250/temperature_c"
    )
    assert reading_id(3, None, 5.0, "channel_99") == "3/5.000/channel_99"
    assert reading_json(ROWS[0]) == {
        "id": "17/40312/temperature_c",
        "node_id": 17,
        "reading_index": 40312,
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
    assert json.loads(second["body"])["readings"][0]["id"] == "17/40312/temperature_c"


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
        rows = [(9, t0 + i, 1_700_000_000.0 + t0 + i, "temperature_c", float(i)) for i in range(n)]
        spool.write(rows)
        expected.update(reading_id(*r[:4]) for r in rows)

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
        "citynode,node_id=17 humidity_pct=45.0,reading_index=40312i,temperature_c=21.5 "
        "1700000000250000000",
        "citynode,node_id=17 reading_index=40313i,temperature_c=21.6 1700000060250000000",
    ]
    # an integer-valued reading stays a float field (no "i" suffix), ts to the millisecond; a
    # v1 reading has no index field
    assert influx_lines([(3, None, 1.001, "battery_v", 3)]) == [
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
    assert sink.write(ROWS) == 0  # copies (more in test_ledger.py)
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


# --- answers read whole: a long 2xx body does not make the next batch a copy ----------------


def batches(n, size, node_id=9):
    return [
        [
            (node_id, k * size + i, 1_700_000_000.0 + k * size + i, "temperature_c", float(i))
            for i in range(size)
        ]
        for k in range(n)
    ]


def forward_all(server, tmp_path, sink, rows, batch, timeout=20, retry_max=0.3):
    """Spool rows, forward them through sink until the server has every id; the forwarder."""
    spool = Spool(tmp_path / "spool.db")
    backoff = Backoff(base=0.05, cap=retry_max)
    f = Forwarder(spool, sink, batch=batch, backoff=backoff, poll_s=0.05)
    f.start()
    expected = {reading_id(*r[:4]) for r in rows}
    try:
        spool.write(rows)
        deadline = time.monotonic() + timeout
        while {r["id"] for r in server.readings()} != expected:
            assert time.monotonic() < deadline, "not delivered: %s" % f.status()
            time.sleep(0.05)
        time.sleep(0.3)  # a copy would come now
    finally:
        assert f.stop(5)
        spool.close()
    return f


@pytest.mark.parametrize("mode", ["big 10240", "chunked 10240"])
def test_long_answer_then_more_batches_each_delivered_once(server, tmp_path, mode):
    """A 200 with a 10 KB body: read whole, so the kept-alive connection carries the next
    batch (read 2 KB of it, and the next POST was delivered, then taken for failed: sent
    twice)."""
    server.set_mode(mode)
    rows = [r for b in batches(5, 10) for r in b]
    f = forward_all(server, tmp_path, WebhookSink(server.url, timeout=5), rows, batch=10)
    ids = [r["id"] for r in server.readings()]
    assert len(ids) == len(set(ids)) == 50  # each batch exactly once
    assert f.counters["delivered"] == 50
    assert not [k for k in f.counters if k.startswith("failed_")]
    assert len({a["port"] for a in server.attempts()}) == 1  # one kept-alive connection


def test_answer_longer_than_the_limit_drops_the_connection(server, tmp_path):
    """A 2xx answer longer than ANSWER_MAX is not read to its end: the delivery is confirmed
    by the status line, and the connection is dropped (a new one for the next batch)."""
    server.set_mode("big %d" % (3 * ANSWER_MAX))
    rows = [r for b in batches(3, 5) for r in b]
    f = forward_all(server, tmp_path, WebhookSink(server.url, timeout=5), rows, batch=5)
    ids = [r["id"] for r in server.readings()]
    assert len(ids) == len(set(ids)) == 15
    assert not [k for k in f.counters if k.startswith("failed_")]
    assert len({a["port"] for a in server.attempts()}) == 3


# --- 4xx: refused for good ------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, permanent",
    [(400, True), (401, True), (403, True), (404, True), (413, True), (422, True)]
    + [(408, False), (429, False), (500, False), (502, False), (503, False)],
)
def test_4xx_but_408_and_429_are_permanent(server, code, permanent):
    server.set_mode(str(code))
    sink = WebhookSink(server.url, timeout=5)
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    assert info.value.reason == "http_%d" % code
    assert info.value.permanent is permanent
    assert str(info.value).startswith("%s: HTTP %d " % (server.url, code))
    assert str(info.value).endswith(": boom")


def test_redirect_says_it_is_not_followed(server):
    server.set_mode("308", {"Location": "https://u:hidden@example.org/new"})
    with pytest.raises(DeliveryError) as info:
        WebhookSink(server.url, timeout=5).deliver(ROWS)
    assert str(info.value) == (
        "%s: HTTP 308 Permanent Redirect (redirects are not followed: give the URL it points "
        "to, https://example.org/new): boom" % server.url
    )
    assert not info.value.permanent


def test_forwarder_moves_refused_batches_aside_and_carries_on(server, tmp_path, caplog):
    spool = Spool(tmp_path / "spool.db")
    sink = WebhookSink(server.url, timeout=5)
    f = Forwarder(spool, sink, batch=10, backoff=Backoff(base=5.0, cap=30.0), poll_s=0.05)
    refused, accepted = batches(2, 10), batches(2, 10, node_id=10)
    server.set_mode("404")
    with caplog.at_level(logging.WARNING, logger="citynode.forward"):
        f.start()
        try:
            for b in refused:
                spool.write(b)
            wait_until(lambda: f.counters["dead_letter"] == 20, what="dead letters")
            server.set_mode("ok")
            for b in accepted:  # not held up by the refused ones, no back-off to wait out
                spool.write(b)
            wait_until(lambda: len(server.readings()) == 20, timeout=3, what="the next batches")
            assert spool.requeue(sink.name) == 20  # the URL fixed: queued again
            wait_until(lambda: len(server.readings()) == 40, what="the requeued ones")
            time.sleep(0.3)
        finally:
            assert f.stop(5)
    ids = [r["id"] for r in server.readings()]
    all_rows = [r for b in refused + accepted for r in b]
    assert sorted(ids) == sorted(reading_id(*r[:4]) for r in all_rows)  # each exactly once
    assert len([a for a in server.attempts() if a["mode"] == "404"]) == 2  # tried once each
    lines = [r.getMessage() for r in caplog.records if "refused, not retried" in r.getMessage()]
    assert lines == [
        "%s: 10 readings refused, not retried: %s: HTTP 404 Not Found: boom; moved to the "
        "spool's dead letters (spool ids %d..%d); once the cause is fixed, queue them again "
        "with Spool(%r).requeue(%r)"
        % (sink.name, server.url, 10 * k + 1, 10 * k + 10, spool.path, sink.name)
        for k in range(2)
    ]
    assert f.counters["failed_http_404"] == 2
    assert spool.dead_count(sink.name) == 0
    spool.close()


# --- Retry-After ----------------------------------------------------------------------------


def test_retry_after_values():
    now = 1_700_000_000.0
    assert retry_after_s("120", now) == 120.0
    assert retry_after_s(" 0 ", now) == 0.0
    assert retry_after_s("Tue, 14 Nov 2023 22:13:50 GMT", now) == 30.0  # an HTTP-date
    assert retry_after_s("Tue, 14 Nov 2023 22:13:50 -0000", now) == 30.0
    assert retry_after_s("Tue, 14 Nov 2023 22:00:00 GMT", now) == 0.0  # in the past
    for bad in ("soon", "-5", "1.5", "", "Tue, 99 Nov 2023"):
        assert retry_after_s(bad, now) is None


def test_429_and_503_carry_their_retry_after(server):
    sink = WebhookSink(server.url, timeout=5)
    server.set_mode("429", {"Retry-After": "7"})
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    assert info.value.retry_after == 7.0 and not info.value.permanent
    assert str(info.value) == (
        "%s: HTTP 429 Too Many Requests (Retry-After 7 s): boom" % server.url
    )
    date = email.utils.formatdate(time.time() + 60, usegmt=True)
    server.set_mode("503", {"Retry-After": date})
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    assert 58 <= info.value.retry_after <= 60
    server.set_mode("503", {"Retry-After": "whenever"})
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    assert info.value.retry_after is None
    assert "(Retry-After 'whenever' not understood)" in str(info.value)
    server.set_mode("500", {"Retry-After": "7"})  # only 429 and 503 are asked to wait
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    assert info.value.retry_after is None


@pytest.mark.parametrize("kind", ["seconds", "http-date"])
def test_forwarder_waits_the_retry_after(server, tmp_path, kind):
    value = "1" if kind == "seconds" else email.utils.formatdate(time.time() + 2, usegmt=True)
    server.set_mode("429 once" if kind == "seconds" else "503 once", {"Retry-After": value})
    sink = WebhookSink(server.url, timeout=5)
    f = forward_all(server, tmp_path, sink, batches(1, 3)[0], batch=3, retry_max=30)
    first, second = server.attempts()
    assert first["mode"].endswith("once") and second["mode"] == "ok"
    assert second["time"] - first["time"] >= 0.95  # the back-off alone: under 0.1 s
    assert f.counters["failed_http_%s" % ("429" if kind == "seconds" else "503")] == 1


# --- credentials in the URL -----------------------------------------------------------------

PASSWORD = "s3cr%2Ft-Zq81"  # as in the URL; the server gets "s3cr/t-Zq81"


def secret_forms():
    basic = base64.b64encode(b"alice:s3cr/t-Zq81").decode()
    return [PASSWORD, "s3cr/t-Zq81", "s3cr", basic]


def assert_no_secret(text):
    for secret in secret_forms():
        assert secret not in text, "%r shown in %r" % (secret, text)


def credentials_url(server):
    return "http://alice:%s@127.0.0.1:%d/readings" % (PASSWORD, server.port)


def test_credentials_go_as_basic_auth_and_are_never_shown(server, tmp_path, caplog):
    sink = WebhookSink(credentials_url(server), timeout=0.5)
    assert sink.name == "webhook " + server.url
    sink.deliver(ROWS)
    (req,) = server.requests()
    assert req["headers"]["Authorization"] == "Basic " + secret_forms()[3]
    messages = []
    for mode in ("500", "404", "429", "hang"):
        server.set_mode(mode, {"Retry-After": "1"})
        with pytest.raises(DeliveryError) as info:
            sink.deliver(ROWS)
        messages.append(str(info.value))
    assert messages[-1] == "%s: no answer within 0.5 s" % server.url
    server.kill()
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    messages.append(str(info.value))
    assert_no_secret("\n".join(messages))
    # through a forwarder: its log lines and its status (the status file's "sinks")
    server.start()
    server.set_mode("500")
    spool = Spool(tmp_path / "spool.db")
    f = Forwarder(spool, sink, backoff=Backoff(base=0.02, cap=0.05), poll_s=0.05)
    with caplog.at_level(logging.DEBUG):
        f.start()
        try:
            spool.write(batches(1, 3)[0])
            wait_until(lambda: f.counters["failed_http_500"] >= 2)
            status = json.dumps({f.name: f.status()})
            server.set_mode("401")
            wait_until(lambda: f.counters["dead_letter"] == 3)
        finally:
            assert f.stop(5)
            spool.close()
    assert "HTTP 500" in status and "HTTP 401" in caplog.text
    assert_no_secret(status + caplog.text + json.dumps(spool_dead(tmp_path / "spool.db")))
    assert server.attempts()[-1]["headers"]["Authorization"] == "Basic " + secret_forms()[3]


def spool_dead(path):
    s = Spool(path)
    try:
        return s.dead_letters()
    finally:
        s.close()


@pytest.mark.parametrize(
    "url, message",
    [
        ("htp://alice:%s@h/x" % PASSWORD, "expected an http:// or https:// URL, got 'htp://h/x'"),
        ("http://alice:%s@h:port/x" % PASSWORD, "bad port in 'http://h:port/x'"),
    ],
)
def test_bad_url_with_credentials_is_refused_without_showing_them(url, message):
    with pytest.raises(SinkError) as info:
        WebhookSink(url)
    assert str(info.value) == "--webhook: " + message


def test_influx_http_credentials(server):
    url = "http://alice:%s@127.0.0.1:%d/write?db=city&u=alice&p=%s" % (
        PASSWORD,
        server.port,
        PASSWORD,
    )
    sink = InfluxHttpSink(url, timeout=5)
    assert sink.name == (
        "influx http://127.0.0.1:%d/write?db=city&u=alice&p=***&precision=ns" % server.port
    )
    sink.deliver(ROWS)
    (req,) = server.requests()
    assert req["headers"]["Authorization"] == "Basic " + secret_forms()[3]
    assert req["path"] == "/write?db=city&u=alice&p=s3cr%2Ft-Zq81&precision=ns"  # as given
    server.set_mode("500")
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    assert_no_secret(str(info.value) + sink.name)
    server.set_mode("400 echo")  # an error page that quotes the request
    with pytest.raises(DeliveryError) as info:
        sink.deliver(ROWS)
    assert "POST /write?db=city&u=alice&p=***&precision=ns" in str(info.value)
    assert "Authorization: Basic ***" in str(info.value)
    assert_no_secret(str(info.value))
    with pytest.raises(SinkError) as info:
        InfluxHttpSink(url, token="tok")
    assert str(info.value) == (
        "--influx: http://127.0.0.1:%d/write?db=city&u=alice&p=***&precision=ns: a user and "
        "password in the URL and another Authorization too (a token?): give one" % server.port
    )


def test_receive_never_prints_webhook_credentials(server, tmp_path):
    """`citynode receive` with a webhook URL holding a user and password: they reach the server
    as Basic authentication and appear nowhere in its log or its status file, through a 500
    (retried) and a 401 (dead letters)."""
    from conftest import ReceiveProcess

    from host_tools.keys import save_keys
    from protocols import frame, uplink

    key = bytes(range(16))
    keys = tmp_path / "keys.json"
    save_keys(keys, {7: key})
    status = tmp_path / "status.json"
    server.set_mode("500")
    rx = ReceiveProcess(
        "--keys",
        keys,
        "--udp",
        "127.0.0.1:0",
        "--db",
        tmp_path / "rx.db",
        "--webhook",
        credentials_url(server),
        "--spool",
        tmp_path / "spool.db",
        "--status-file",
        status,
        "--sink-timeout",
        "1",
        "--retry-max",
        "0.2",
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        port = int(rx.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)").group(1))
        sock.settimeout(2)

        def send(index):
            datagram = frame.encode_data(
                frame.Signer(key), 7, index, (1, 2, 3), [(2150, 4500, 101325)], [0]
            )
            sock.sendto(datagram, ("127.0.0.1", port))
            reply, _ = sock.recvfrom(512)
            assert uplink.decode_ack(reply, frame.Signer(key)).acked == [(index, index)]

        send(1)
        rx.wait_for(r"delivery failed reason=http_500")
        server.set_mode("401")
        rx.wait_for(r"refused, not retried: .*HTTP 401")
        server.set_mode("ok")
        send(2)
        wait_until(lambda: len(server.readings()) == 3, what="the second frame")
        wait_until(
            lambda: (
                status.exists()
                and json.loads(status.read_text())["sinks"]["webhook " + server.url][
                    "dead_letters"
                ]
                == 3
            ),
            what="the status file",
        )
        status_text = status.read_text()
    finally:
        sock.close()
        rx.stop()
    log = rx.drain()
    assert "webhook " + server.url in log
    assert_no_secret(log + status_text)
    assert {a["headers"].get("Authorization") for a in server.attempts()} == {
        "Basic " + secret_forms()[3]
    }


if __name__ == "__main__":
    os.environ.pop("PYTHONSTARTUP", None)
    serve_main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])

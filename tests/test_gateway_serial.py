# host_tools/receive/gateway_serial.py: gateways on real byte streams. A fake gateway is a TCP
# server (socket:// lines) or a pseudo-terminal; lines carry garbage and half frames, get unplugged
# and re-plugged; copies from two gateways are merged and the ack goes to the better one; and one
# run goes through the real receiver into SQLite and back as a DOWNLINK the node can verify.

import os
import socket
import sqlite3
import threading
import time

import pytest

from host_tools.backoff import Backoff
from host_tools.receive.gateway_serial import DRIFT, GatewayClock, SerialGatewaySource
from host_tools.receive.receiver import Intake, Receiver, Verifier, serve
from host_tools.receive.sinks import SqliteSink
from protocols import frame, gwlink, uplink

KEY = bytes(range(16))
BME = frame.BME280_CHANNELS


def wait_for(cond, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError("timed out waiting for " + what)


# --- the clock rule -------------------------------------------------------------------------


def test_offset_is_the_least_delayed_message():
    c = GatewayClock()
    c.observe(10_000, 1000.030)  # 30 ms in transit
    c.observe(11_000, 1001.005)  # 5 ms
    c.observe(12_000, 1002.050)  # 50 ms
    assert c.offset == pytest.approx(990.005 + 1.045 * DRIFT, abs=1e-9)  # risen since
    assert c.utc(12_000) == pytest.approx(1002.005, abs=1e-3)
    assert c.utc(11_500) == pytest.approx(1001.505, abs=1e-3)  # an earlier stamp
    assert c.resets == 0


@pytest.mark.parametrize("ppm", [-80, 0, 80])
def test_a_drifting_gateway_is_followed_within_milliseconds(ppm):
    import random

    rng = random.Random(ppm)
    c = GatewayClock()
    worst = 0.0
    for i in range(24 * 60):  # a status a minute for a day
        host = 1_700_000_000 + 60.0 * i
        gw_ms = round(60_000 * i * (1 + ppm * 1e-6)) + 5000
        delay = rng.uniform(0.002, 0.040)
        c.observe(gw_ms, host + delay)
        worst = max(worst, abs(c.utc(gw_ms) - host))
    assert worst < 0.050


def test_wrap_of_the_32_bit_clock_is_not_a_reboot():
    c = GatewayClock()
    near = 2**32 - 1500
    c.observe(near, 5000.0)
    c.observe(500, 5002.0)  # 2 s later, after the wrap
    assert c.resets == 0
    assert c.utc(500) == pytest.approx(5002.0)
    assert c.utc(2**32 - 500) == pytest.approx(5001.0)  # a stamp from before the wrap


@pytest.mark.parametrize(
    "gw_ms, host",
    [
        (1_000, 2000.0),  # went backwards: rebooted
        (3_600_000, 9000.0),  # an hour on the gateway, two on the host: rebooted meanwhile
        (61_000 + 11 * 3_600_000, 1060.0),  # ahead by 11 h: not the same boot either
    ],
)
def test_a_reboot_restarts_the_estimate(gw_ms, host):
    c = GatewayClock()
    c.observe(1_000_000, 1000.0)
    c.observe(gw_ms, host)
    assert c.resets == 1
    assert c.utc(gw_ms) == pytest.approx(host)


def test_a_long_silence_of_the_same_boot_is_kept():
    c = GatewayClock()
    c.observe(1_000_000, 1000.0)
    c.observe(1_000_000 + 7_200_000, 8200.3)  # two hours later, 0.3 s slower delivery
    assert c.resets == 0
    # the old minimum has risen by 0.72 s (100 ppm of 2 h): the new message is the better bound
    assert c.utc(1_000_000 + 7_200_000) == pytest.approx(8200.3, abs=1e-6)
    c.observe(1_000_000 + 7_201_000, 8201.1)  # and one delivered faster tightens it again
    assert c.utc(1_000_000 + 7_201_000) == pytest.approx(8201.1, abs=1e-6)
    c.observe(1_000_000 + 7_202_000, 8202.5)
    assert c.utc(1_000_000 + 7_202_000) == pytest.approx(8202.1 + 1.4 * DRIFT, abs=1e-6)


# --- fake gateways --------------------------------------------------------------------------


class TcpGateway:
    """A gateway at the other end of a socket:// line: sends bytes, collects what it gets."""

    def __init__(self, port=0):
        self.server = socket.create_server(("127.0.0.1", port))
        self.port = self.server.getsockname()[1]
        self.url = "socket://127.0.0.1:%d" % self.port
        self.conn = None
        self.received = bytearray()
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.conn = conn
            self.connections += 1
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    break
                if not data:
                    break
                self.received += data

    def send(self, data):
        wait_for(lambda: self.conn is not None, what="the host to connect")
        self.conn.sendall(data)

    def messages(self):
        return gwlink.Deframer().feed(bytes(self.received))

    def unplug(self):
        self._stop = True
        # shut down first: close() alone leaves a socket that a blocked accept() holds listening
        for sock in (self.server, self.conn):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()


def uplink_msg(payload, gw_id=1, seq=0, rx_ms=100_000, rssi=-100, snr_x4=20, sf=9, flags=1):
    return gwlink.Uplink(gw_id, seq, rx_ms, 185_344, 868100, rssi, snr_x4, sf, flags, payload)


def source(urls, **kw):
    kw.setdefault("backoff", lambda: Backoff(0.05, 0.2))
    return SerialGatewaySource(urls, dedupe_s=kw.pop("dedupe_s", 0.05), **kw)


def start(src, intake):
    """Start and wait until every line is open: pyserial's socket:// open() discards what
    arrived before it finished (as a real port's input flush does), so a gateway's bytes
    count only from then on."""
    src.start(intake)
    wait_for(lambda: src.counters["serial_connects"] >= len(src.urls), what="the lines to open")


@pytest.fixture
def gw():
    g = TcpGateway()
    yield g
    g.unplug()


def take(intake, n=1, timeout=5.0):
    items = []
    deadline = time.monotonic() + timeout
    while len(items) < n and time.monotonic() < deadline:
        items += intake.get_batch(0.05, 100)
    return items


def test_uplinks_through_garbage_and_half_frames_with_utc_times(gw):
    src = source(gw.url)
    intake = Intake()
    start(src, intake)
    try:
        status = gwlink.encode(gwlink.Status(1, 0, 500_000, ord("I"), "gateway started"))
        up = gwlink.encode(uplink_msg(b"frame-1", seq=1, rx_ms=499_500))
        sent_at = time.time()
        gw.send(b"\x1b[0mboot banner\r\n\x00\x00garbage" + status + up[:7])
        time.sleep(0.05)
        gw.send(up[7:] + b"\xff\xfe partial" + gwlink.encode(uplink_msg(b"frame-2", seq=2)))
        items = take(intake, 2)
        assert [d for d, _, _ in items] == [b"frame-1", b"frame-2"]
        _, _, rx_time = items[0]
        # status said 500 000 ms "now"; the frame ended 500 ms before and took 185 ms
        assert rx_time == pytest.approx(sent_at - 0.5 - 0.185344, abs=0.05)
        wait_for(lambda: src.counters["gateway_line_bad_cobs"] >= 2, what="garbage counted")
        assert src.counters["gateway_frames"] == 2 and src.counters["gateway_status"] == 1
        assert src.counters["gateway_line_garbage_bytes"] > 20
    finally:
        src.stop()


def test_ack_goes_back_as_a_downlink_for_the_receive_window(gw):
    src = source(gw.url, ack_freq_khz=None)
    intake = Intake()
    start(src, intake)
    try:
        gw.send(gwlink.encode(uplink_msg(b"frame", gw_id=42, rx_ms=2**32 - 500, sf=12)))
        ((data, reply, _),) = take(intake)
        reply(b"ACK-BYTES")
        wait_for(lambda: gw.messages(), what="the downlink")
        (down,) = gw.messages()
        assert down.gw_id == 42 and down.payload == b"ACK-BYTES"
        assert down.tx_at_ms == (2**32 - 500 + gwlink.RX_DELAY_MS) % 2**32  # wraps too
        assert (down.freq_khz, down.sf, down.tx_power_dbm) == (868100, 12, 14)
        gw.send(gwlink.encode(gwlink.TxResult(42, 1, 1000, down.msg_id, gwlink.TOO_LATE)))
        wait_for(lambda: src.counters["downlink_too_late"] == 1, what="the tx result")
        assert src.counters["downlinks_sent"] == 1
    finally:
        src.stop()


def test_unplugged_and_replugged_tcp_line(gw):
    src = source(gw.url)
    intake = Intake()
    start(src, intake)
    try:
        gw.send(gwlink.encode(uplink_msg(b"before", seq=1)))
        ((_, reply, _),) = take(intake)
        port = gw.port
        gw.send(gwlink.encode(uplink_msg(b"cut", seq=2))[:9])  # the gateway dies mid-frame
        time.sleep(0.05)
        gw.unplug()
        wait_for(lambda: src.counters["serial_disconnects"] == 1, what="the disconnect")
        with pytest.raises(OSError, match="no gateway line could take the ack.*not connected"):
            reply(b"ack")
        # pyserial's socket:// close() sleeps 0.3 s, then the line is retried with back-off
        wait_for(lambda: src.counters["serial_open_errors"] >= 2, what="attempts to reopen")
        again = TcpGateway(port)
        try:
            wait_for(lambda: src.counters["serial_connects"] == 2, what="the reconnect")
            again.send(gwlink.encode(uplink_msg(b"after", seq=5)))
            assert [d for d, _, _ in take(intake)] == [b"after"]
            assert src.counters["gateway_messages_lost"] == 3  # 2 (cut short), 3 and 4
            assert src.counters["gateway_line_garbage_bytes"] >= 8
        finally:
            again.unplug()
    finally:
        src.stop()


def test_two_gateways_one_frame_ack_through_the_stronger():
    a, b = TcpGateway(), TcpGateway()
    src = source([a.url, b.url], dedupe_s=0.3, ack_freq_khz=869525)
    intake = Intake()
    start(src, intake)
    try:
        wait_for(lambda: src.counters["serial_connects"] == 2, what="both lines")
        payload = b"heard-twice"
        a.send(gwlink.encode(uplink_msg(payload, gw_id=1, rssi=-110, snr_x4=-8)))
        b.send(gwlink.encode(uplink_msg(payload, gw_id=2, rssi=-95, snr_x4=-12)))
        items = take(intake, 2, timeout=1.0)
        assert len(items) == 1
        data, reply, _ = items[0]
        assert data == payload
        assert src.counters["gateway_copies_merged"] == 1
        reply(b"ack-1")
        wait_for(lambda: b.messages(), what="the downlink at the stronger gateway")
        (down,) = b.messages()
        assert down.gw_id == 2 and down.freq_khz == 869525 and not a.messages()
        # a copy arriving after the frame was handed on is dropped, not delivered twice
        a.send(gwlink.encode(uplink_msg(payload, gw_id=1, seq=1, rssi=-80)))
        wait_for(lambda: src.counters["gateway_late_copies"] == 1, what="the late copy")
        assert take(intake, 1, timeout=0.4) == []
        # the stronger gateway's line goes down: the ack takes the other
        b.unplug()
        wait_for(lambda: src.counters["serial_disconnects"] == 1, what="b's disconnect")
        reply(b"ack-2")
        wait_for(lambda: a.messages(), what="the downlink at the weaker gateway")
        assert a.messages()[0].payload == b"ack-2" and a.messages()[0].gw_id == 1
    finally:
        src.stop()
        a.unplug()
        b.unplug()


def test_bad_lora_crc_status_levels_and_a_gateway_sending_downlinks(gw, caplog):
    src = source(gw.url)
    intake = Intake()
    start(src, intake)
    try:
        with caplog.at_level("INFO", logger="citynode.gateway"):
            gw.send(gwlink.encode(uplink_msg(b"noise", flags=0)))
            gw.send(gwlink.encode(gwlink.Status(1, 1, 200_000, ord("E"), "radio reset")))
            gw.send(gwlink.encode(gwlink.Downlink(1, 1, 1, 1, 1, 1, b"x")))
            wait_for(lambda: src.counters["gateway_line_bad_message"] == 1, what="counters")
        assert src.counters["gateway_uplinks_lora_crc"] == 1
        assert take(intake, 1, timeout=0.3) == []
        assert any(
            r.levelname == "ERROR" and "gateway 1: radio reset" in r.getMessage()
            for r in caplog.records
        )
    finally:
        src.stop()


def status(gw_id, seq, now_ms):
    return gwlink.encode(gwlink.Status(gw_id, seq, now_ms, ord("D"), ""))


def test_gateway_ids_invented_by_a_noisy_line_are_bounded(gw, caplog):
    # Gateway 7 is real and speaks after every 10 invented ids; a line keeps 16 gateways, so
    # the invented ones are forgotten, least recently heard first, and gateway 7 never is.
    src = source(gw.url, max_gateways=16)
    intake = Intake()
    start(src, intake)
    line = src.lines[0]
    t0 = time.time()

    def gw7_ms():  # gateway 7's clock: 500 s at t0, running with the host's
        return 500_000 + round((time.time() - t0) * 1000)

    try:
        with caplog.at_level("WARNING", logger="citynode.gateway"):
            gw.send(status(7, 0, gw7_ms()))
            noise_id = 1000
            for batch in range(1, 501):
                chunk = bytearray()
                for _ in range(10):
                    chunk += status(noise_id, 40_000, 3_000_000_000)
                    noise_id += 1
                gw.send(bytes(chunk + status(7, batch, gw7_ms())))
                if batch % 50 == 0:
                    wait_for(lambda b=batch: src.counters["gateway_status"] == 11 * b + 1)
                    assert len(line.gateways) == 16
            wait_for(lambda: src.counters["gateway_status"] == 5501, what="all the statuses")
        assert len(line.gateways) == 16
        assert src.counters["gateway_state_evicted"] == 5001 - 16  # all but 16 ids forgotten
        assert list(line.gateways)[-1] == 7 and 1000 not in line.gateways
        assert src.counters["gateway_clock_resets"] == 0
        assert src.counters["gateway_messages_lost"] == 0
        evict_logs = [r for r in caplog.records if "gateway ids heard" in r.getMessage()]
        assert len(evict_logs) == 1  # one line a minute, not one per id
        assert "forgot gateway 1000" in evict_logs[0].getMessage()
        # gateway 7 kept its seq: a skipped message is still counted
        gw.send(status(7, 502, gw7_ms()))
        wait_for(lambda: src.counters["gateway_messages_lost"] == 1, what="the gap")
        # and its clock: an uplink it stamped 2 s before its latest status is dated so, where
        # a fresh clock would date it at its arrival
        sent_at, rx_ms = time.time(), gw7_ms() - 2000
        gw.send(gwlink.encode(uplink_msg(b"real", gw_id=7, seq=503, rx_ms=rx_ms)))
        ((data, _, rx_time),) = take(intake)
        assert data == b"real"
        assert rx_time == pytest.approx(sent_at - 2.0 - 0.185344, abs=0.5)
        # a forgotten gateway that comes back starts afresh: no loss counted for its seq jump
        gw.send(status(1000, 7, 3_000_000_000))
        wait_for(lambda: src.counters["gateway_status"] == 5503, what="the forgotten gateway")
        assert src.counters["gateway_messages_lost"] == 1
        assert src.counters["gateway_clock_resets"] == 0
        assert len(line.gateways) == 16
    finally:
        src.stop()


def test_max_gateways_must_be_positive():
    with pytest.raises(ValueError, match="max_gateways must be at least 1, got 0"):
        SerialGatewaySource("loop://", max_gateways=0)


# --- a pseudo-terminal, unplugged and re-plugged ------------------------------------------


def test_pty_line_unplugged_and_replugged(tmp_path):
    link = tmp_path / "ttyGW0"

    def plug():
        master, slave = os.openpty()
        os.symlink(os.ttyname(slave), link)
        return master, slave

    master, slave = plug()
    src = source(str(link))
    intake = Intake()
    start(src, intake)
    try:
        wait_for(lambda: src.counters["serial_connects"] == 1, what="the pty to open")
        os.write(master, b"\x00junk" + gwlink.encode(uplink_msg(b"tty-1")))
        assert [d for d, _, _ in take(intake)] == [b"tty-1"]
        # unplug: the device goes away
        os.close(master)
        os.close(slave)
        link.unlink()
        wait_for(lambda: src.counters["serial_disconnects"] == 1, what="the unplug")
        wait_for(lambda: src.counters["serial_open_errors"] >= 1, what="failed reopening")
        # re-plug: a new device at the same path
        master, slave = plug()
        wait_for(lambda: src.counters["serial_connects"] == 2, what="the re-plug")
        os.write(master, gwlink.encode(uplink_msg(b"tty-2", seq=1)))
        ((data, reply, _),) = take(intake)
        assert data == b"tty-2"
        reply(b"ack")
        got = bytearray()

        def read_back():
            got.extend(os.read(master, 1024))
            return gwlink.Deframer().feed(bytes(got))

        wait_for(read_back, what="the downlink on the pty")
        assert gwlink.Deframer().feed(bytes(got))[0].payload == b"ack"
    finally:
        src.stop()
        for fd in (master, slave):
            try:
                os.close(fd)
            except OSError:
                pass


# --- through the real receiver ------------------------------------------------------------


def test_end_to_end_into_sqlite_and_the_ack_back_to_the_node(gw, tmp_path):
    signer = frame.Signer(KEY)
    readings = [(2150, 4800, 101_325), (2151, 4795, 101_320), (2153, 4790, 101_322)]
    data = frame.encode_data(signer, 17, 5, BME, readings, [120, 60, 0])
    sink = SqliteSink(str(tmp_path / "r.db"))
    receiver = Receiver(Verifier({17: KEY}), sink)
    intake = Intake()
    stop = threading.Event()
    loop = threading.Thread(target=serve, args=(intake, receiver, stop), kwargs={"poll_s": 0.05})
    loop.start()
    src = source(gw.url)
    start(src, intake)
    try:
        gw.send(gwlink.encode(gwlink.Status(3, 0, 1_000_000, ord("I"), "up")))
        host_at_status = time.time()
        air_us = 185_344
        gw.send(gwlink.encode(gwlink.Uplink(3, 1, 1_000_000, air_us, 868100, -97, 30, 9, 1, data)))
        wait_for(lambda: gw.messages(), what="the ack")
        (down,) = gw.messages()
        ack = uplink.decode_ack(down.payload, signer)
        # format v2: readings 5, 6, 7 acknowledged, the frame's own tag echoed
        assert ack.node_id == 17 and ack.acked == [(5, 7)] and ack.echo == data[-4:]
        assert down.tx_at_ms == 1_000_000 + gwlink.RX_DELAY_MS and down.gw_id == 3
        rows = (
            sqlite3.connect(str(tmp_path / "r.db"))
            .execute("SELECT ts, quantity, value FROM readings ORDER BY ts, quantity")
            .fetchall()
        )
        assert len(rows) == 9
        sent = host_at_status - air_us / 1e6  # the node started sending then
        assert rows[0][0] == pytest.approx(sent - 120, abs=0.05)
        assert rows[-1][0] == pytest.approx(sent, abs=0.05)
        decoded = uplink.decode_data(data, signer)
        assert {(q, v) for _, q, v in rows[-3:]} == {
            ("temperature_c", decoded.readings[-1][0] / 100),
            ("humidity_pct", 47.9),
            ("pressure_hpa", 1013.22),
        }
    finally:
        src.stop()
        stop.set()
        loop.join()
        sink.close()

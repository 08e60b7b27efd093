# Tests for `citynode monitor` (host_tools/monitor.py, host_tools/commands/monitor.py): the
# log-line parser against the firmware's own formatter, garbage and partial lines, filters,
# colours, frames decoded with real keys, --save, and real ports: a pseudo-terminal that goes
# away and a socket:// server that is stopped and restarted.

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import log as fwlog  # the formatter the nodes run: the parser's oracle
from host_tools import cli, nodelog
from host_tools import monitor as m
from host_tools.keys import NodeKeys, Registry, load_accepted_keys, save_registry
from protocols import frame, uplink

REPO = Path(__file__).resolve().parent.parent
KEY7 = bytes(range(16))
KEY7_OLD = bytes(range(50, 66))
KEY8 = bytes(range(100, 116))
BME = (1, 2, 3)
SGR = re.compile(r"\x1b\[[0-9;]*m")
# what input must never put on a terminal (tab is kept; \n only ends our lines)
RAW_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def data_frame(node_id=7, seq=3, key=KEY7, readings=((2150, 4500, 101325), (2160, 4490, 101320))):
    return frame.encode_data(
        frame.Signer(key),
        node_id,
        seq,
        BME,
        list(readings),
        [60 * (len(readings) - 1 - i) for i in range(len(readings))],
    )


def monitor(**kw):
    out = io.StringIO()
    kw.setdefault("clock", lambda: 1_750_000_000.0)
    return m.Monitor(out, **kw), out


def fed(data, **kw):
    mon, out = monitor(**kw)
    mon.feed(data, 0.0)
    mon.flush()
    return out.getvalue()


def firmware_lines(calls):
    lines = []
    log = fwlog.Log(lambda: 540011, level=fwlog.DEBUG, out=lines.append)
    for level, subsystem, message, fields in calls:
        getattr(log, level)(subsystem, message, **fields)
    return lines


# --- the log-line parser ------------------------------------------------------------------


def test_parses_the_readme_lines():
    lines = firmware_lines(
        [
            ("info", "link", "sent frame", {"seq": 0, "readings": 10, "bytes": 29}),
            ("error", "sensor", "bme280: no device at 0x76 (OSError 19)", {}),
            (
                "warning",
                "link",
                "ack rejected",
                {"reason": "tag", "detail": "bad tag (wrong key)"},
            ),
            ("info", "node", "started", {"node": 17, "fw": "0.1.0", "board": "sim"}),
            ("debug", "clock", "tick", {"empty": ""}),
        ]
    )
    parsed = [nodelog.parse_log_line(line) for line in lines]
    assert parsed == [
        nodelog.LogLine(
            "I",
            "540.011",
            "link",
            "sent frame",
            (("bytes", "29"), ("readings", "10"), ("seq", "0")),
        ),
        nodelog.LogLine("E", "540.011", "sensor", "bme280: no device at 0x76 (OSError 19)", ()),
        nodelog.LogLine(
            "W",
            "540.011",
            "link",
            "ack rejected",
            (("detail", "bad tag (wrong key)"), ("reason", "tag")),
        ),
        nodelog.LogLine(
            "I", "540.011", "node", "started", (("board", "sim"), ("fw", "0.1.0"), ("node", "17"))
        ),
        nodelog.LogLine("D", "540.011", "clock", "tick", (("empty", ""),)),
    ]
    assert [nodelog.format_log_line(p) for p in parsed] == lines


@pytest.mark.parametrize(
    "text",
    [
        "",
        "MicroPython v1.29.0 on 2025-06-01; ESP32 module with ESP32",
        "Traceback (most recent call last):",
        '  File "firmware/app.py", line 72, in run',
        "ImportError: no module named 'firmware.journal'",
        ">>> ",
        "X 1.000 link bad level",
        "I 1.00 link two decimals",
        "I 1.000 link",  # no message separator
        "i 1.000 link lower-case level",
        "I1.000 link no space",
        "ets Jun  8 2016 00:22:57",
        "rst:0x1 (POWERON_RESET),boot:0x13 (SPI_FAST_FLASH_BOOT)",
    ],
)
def test_other_lines_are_not_log_lines(text):
    assert nodelog.parse_log_line(text) is None
    line = m.make_line(text.encode() + b"\r\n")
    assert (line.text, line.log, line.garbled) == (text, None, 0)


words = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters='="'),
    min_size=1,
    max_size=8,
)
values = st.one_of(
    st.integers(-(2**31), 2**31),
    st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0x7E, blacklist_characters='"'),
        max_size=12,
    ),
)


@settings(deadline=None)
@given(
    level=st.sampled_from(["debug", "info", "warning", "error"]),
    ms=st.integers(0, 2**32),
    subsystem=st.from_regex(r"[a-z_][a-z0-9_]{0,9}", fullmatch=True),
    message=st.lists(words, min_size=1, max_size=6).map(" ".join),
    fields=st.dictionaries(
        st.from_regex(r"[a-z_][a-z0-9_]{0,7}", fullmatch=True), values, max_size=5
    ),
)
def test_firmware_lines_round_trip(level, ms, subsystem, message, fields):
    lines = []
    fwlog.Log(lambda: ms, level=fwlog.DEBUG, out=lines.append).__getattribute__(level)(
        subsystem, message, **fields
    )
    (text,) = lines
    parsed = nodelog.parse_log_line(text)
    assert parsed is not None
    assert parsed.level == level[0].upper()
    assert parsed.uptime == "%d.%03d" % (ms // 1000, ms % 1000)
    assert parsed.subsystem == subsystem
    assert parsed.message == message
    assert dict(parsed.fields) == {k: str(v) for k, v in fields.items()}
    assert [k for k, _ in parsed.fields] == sorted(fields)
    assert nodelog.format_log_line(parsed) == text


@settings(deadline=None)
@given(st.text(max_size=200))
def test_parse_is_stable_on_any_text(text):
    parsed = nodelog.parse_log_line(text)
    if parsed is not None:
        assert nodelog.parse_log_line(nodelog.format_log_line(parsed)) == parsed


# --- garbage, partial lines, no data lost ----------------------------------------------------


def test_garbage_is_escaped_and_marked():
    out = fed(b"I 1.000 link ok\r\nnoise \xff\xfe\x00\x1b[2J\xc2\x9b end\r\ncaf\xc3\xa9\r\n")
    assert out.splitlines() == [
        "I 1.000 link ok",
        "noise \\xff\\xfe\\x00\\x1b[2J\\u009b end [garbled: 5 bytes escaped]",
        "café",
    ]


def test_a_log_line_with_a_bad_byte_is_still_a_log_line():
    line = m.make_line(b"W 2.000 link noisy \xff seq=4\r\n")
    assert line.log.fields == (("seq", "4"),) and line.garbled == 1


def test_lines_split_across_reads_are_joined():
    mon, out = monitor()
    mon.feed(b"I 1.0", 0.0)
    mon.feed(b"00 link sent", 0.1)
    mon.poll(0.2)
    assert out.getvalue() == ""
    mon.feed(b" frame seq=1\r", 0.3)
    mon.feed(b"\nW 2.000 link", 0.4)
    assert out.getvalue() == "I 1.000 link sent frame seq=1\n"


def test_an_idle_partial_line_is_flushed():
    mon, out = monitor(as_json=True)
    mon.feed(b"booting...\r\n>>> ", 10.0)
    mon.poll(10.0 + m.FLUSH_AFTER_S / 2)
    assert len(out.getvalue().splitlines()) == 1
    mon.poll(10.0 + m.FLUSH_AFTER_S)
    objs = [json.loads(s) for s in out.getvalue().splitlines()]
    assert [(o["text"], o["partial"]) for o in objs] == [("booting...", False), (">>> ", True)]
    mon.feed(b"import os\r\n", 12.0)  # the rest arrives later: a line of its own
    assert json.loads(out.getvalue().splitlines()[-1])["text"] == "import os"


def test_a_very_long_line_is_cut():
    asm = m.LineAssembler(max_line=10)
    assert asm.feed(b"0123456789abcdefghij" + b"xyz\n", 0) == [
        (b"0123456789", True),
        (b"abcdefghij", True),
        (b"xyz\n", False),
    ]
    assert asm.feed(b"A" * 25, 1) == [(b"A" * 10, True), (b"A" * 10, True)]
    assert asm.flush() == [(b"A" * 5, True)]


chunks = st.lists(
    st.binary(max_size=64) | st.sampled_from([b"\n", b"\r\n", b"I 1.000 link x a=1"]), max_size=40
)


@settings(max_examples=300, deadline=None)
@given(chunks, st.booleans(), st.booleans())
def test_any_bytes_no_crash_nothing_lost_nothing_raw_on_the_terminal(parts, color, as_json):
    save = io.BytesIO()
    mon, out = monitor(
        save=save, color=color, as_json=as_json, frames=m.FrameDecoder({7: (KEY7,)})
    )
    now = 0.0
    for i, part in enumerate(parts):
        now += 0.3
        mon.feed(part, now)
        if i % 3 == 0:
            mon.poll(now + 1)
    mon.flush()
    assert save.getvalue() == b"".join(parts)  # --save gets every byte, in order
    text = out.getvalue()
    if as_json:
        objs = [json.loads(s) for s in text.splitlines()]
        assert len(objs) == mon.counters["lines"]
    else:
        assert not RAW_CONTROL.search(SGR.sub("", text))


# --- filters and colours --------------------------------------------------------------------

SAMPLE = (
    b"boot: rst:0x1\r\n"
    b"D 0.010 clock tick\r\n"
    b"I 0.100 node started node=7\r\n"
    b"I 1.000 link sent frame seq=0\r\n"
    b"W 2.000 link no ack, will retry pending=3 seq=0\r\n"
    b"E 3.000 sensor bme280: no device at 0x76 (OSError 19)\r\n"
    b"Traceback (most recent call last):\r\n"
)


def shown(**filter_args):
    return fed(SAMPLE, line_filter=m.LineFilter(**filter_args)).splitlines()


def test_filters():
    assert len(shown()) == 7
    assert shown(min_level="W") == [
        "boot: rst:0x1",
        "W 2.000 link no ack, will retry pending=3 seq=0",
        "E 3.000 sensor bme280: no device at 0x76 (OSError 19)",
        "Traceback (most recent call last):",
    ]
    assert shown(subsystems=frozenset({"link", "sensor"}), only_log=True) == [
        "I 1.000 link sent frame seq=0",
        "W 2.000 link no ack, will retry pending=3 seq=0",
        "E 3.000 sensor bme280: no device at 0x76 (OSError 19)",
    ]
    assert shown(min_level="E", subsystems=frozenset({"link"}), only_log=True) == []


def test_filters_do_not_filter_the_save_file():
    save = io.BytesIO()
    fed(SAMPLE, save=save, line_filter=m.LineFilter("E", frozenset({"x"}), True))
    assert save.getvalue() == SAMPLE


@pytest.mark.parametrize(
    ("text", "level"),
    [("w", "W"), ("W", "W"), ("warning", "W"), ("warn", "W"), ("Error", "E"), ("d", "D")],
)
def test_parse_level(text, level):
    assert m.parse_level(text) == level


def test_bad_filter_arguments():
    with pytest.raises(ValueError, match="unknown level 'loud': use D, I, W or E"):
        m.parse_level("loud")
    with pytest.raises(ValueError, match="bad subsystem name '' in 'link,'"):
        m.parse_subsystems("link,")
    assert m.parse_subsystems("link, sensor") == {"link", "sensor"}


def test_colours_by_level():
    plain = fed(SAMPLE).splitlines()
    coloured = fed(SAMPLE, color=True).splitlines()
    assert [SGR.sub("", s) for s in coloured] == plain
    assert coloured[0] == plain[0]  # not a log line: as it came
    assert coloured[1] == "\x1b[2mD 0.010 clock tick\x1b[0m"
    assert coloured[2] == "\x1b[32mI\x1b[0m 0.100 \x1b[36mnode\x1b[0m started node=7"
    assert coloured[4].startswith("\x1b[33mW 2.000") and coloured[4].endswith("\x1b[0m")
    assert coloured[5].startswith("\x1b[1;31mE 3.000")
    assert "\x1b" not in fed(SAMPLE, color=True, as_json=True)


def test_color_choice(monkeypatch):
    from host_tools.commands import monitor as cmd

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert cmd._use_color("auto", Tty()) is True
    assert cmd._use_color("auto", io.StringIO()) is False
    assert cmd._use_color("always", io.StringIO()) is True
    assert cmd._use_color("never", Tty()) is False
    monkeypatch.setenv("NO_COLOR", "1")
    assert cmd._use_color("auto", Tty()) is False


def test_json_lines():
    (obj,) = [
        json.loads(s)
        for s in fed(
            b"W 2.000 link no ack, will retry pending=3 seq=0\n", as_json=True
        ).splitlines()
    ]
    assert obj == {
        "host_time": "2025-06-15T15:06:40.000Z",
        "kind": "log",
        "level": "W",
        "uptime_s": 2.0,
        "subsystem": "link",
        "message": "no ack, will retry",
        "fields": {"pending": "3", "seq": "0"},
        "text": "W 2.000 link no ack, will retry pending=3 seq=0",
        "partial": False,
        "garbled": 0,
    }


def test_port_events_in_json_and_on_the_status_stream():
    status = []
    mon, out = monitor(as_json=True, status=status.append)
    mon.feed(b"partial", 0.0)
    mon.flush()
    mon.event("gone", "/dev/ttyUSB0: port gone (Input/output error); waiting for it to come back")
    objs = [json.loads(s) for s in out.getvalue().splitlines()]
    assert objs[0]["text"] == "partial" and objs[0]["partial"] is True
    assert objs[1] == {
        "host_time": "2025-06-15T15:06:40.000Z",
        "kind": "port",
        "event": "gone",
        "message": "/dev/ttyUSB0: port gone (Input/output error); waiting for it to come back",
    }
    assert status == [objs[1]["message"]]


def test_timestamps():
    out = fed(b"I 1.000 link x\n", timestamps=True, frames=m.FrameDecoder())
    stamp = time.strftime("%H:%M:%S", time.localtime(1_750_000_000)) + ".000"
    assert out == stamp + " I 1.000 link x\n"


# --- frames in the log ---------------------------------------------------------------------


def test_decodes_a_frame_under_its_line():
    f = data_frame()
    out = fed(
        b"I 4.000 radio rx frame=%s rssi=-80\r\n" % f.hex().encode(),
        frames=m.FrameDecoder({7: (KEY7,)}),
    )
    assert out.splitlines() == [
        "I 4.000 radio rx frame=%s rssi=-80" % f.hex(),
        "    frame: data node=7 index=3 bytes=%d" % len(f),
        "      age=60s temperature_c=21.5 humidity_pct=45 pressure_hpa=1013.25",
        "      age=0s temperature_c=21.6 humidity_pct=44.9 pressure_hpa=1013.2",
    ]


def test_frame_in_json():
    f = data_frame(readings=((2150, 4500, 101325),))
    out = fed(f.hex().upper().encode() + b"\n", as_json=True, frames=m.FrameDecoder({7: (KEY7,)}))
    (obj,) = [json.loads(s) for s in out.splitlines()]
    assert obj["kind"] == "text"
    assert obj["frames"] == [
        {
            "bytes": len(f),
            "type": "data",
            "node_id": 7,
            "index": 3,
            "readings": [
                {
                    "age_s": 0,
                    "values": {
                        "temperature_c": 21.5,
                        "humidity_pct": 45.0,
                        "pressure_hpa": 1013.25,
                    },
                    "index": 3,
                }
            ],
        }
    ]


def test_frame_signed_with_a_key_rotated_out_still_decodes(tmp_path):
    """The registry's grace period: `keys rotate` keeps the old key; frames signed with it
    before the node is re-provisioned still verify, and say so."""
    path = tmp_path / "keys.json"
    now = time.time()
    entry = NodeKeys(7, KEY7, rotated=now, previous=KEY7_OLD, previous_until=now + 3600)
    save_registry(path, Registry({7: entry, 8: NodeKeys(8, KEY8)}))
    decoder = m.FrameDecoder(load_accepted_keys(path), keys_path=str(path))
    old = decoder.decode(data_frame(key=KEY7_OLD))
    new = decoder.decode(data_frame(key=KEY7))
    assert (old["key"], new["key"]) == ("previous", "current")
    assert old["readings"] == new["readings"]
    assert "key" not in decoder.decode(data_frame(node_id=8, key=KEY8))  # one key: no label


def test_frame_errors():
    decoder = m.FrameDecoder({7: (KEY7,)}, keys_path="keys.json")
    wrong = data_frame(key=KEY8)
    unknown = data_frame(node_id=9)
    truncated = data_frame()[:-6]
    out = fed(
        b"I 1.000 radio rx frame=%s\nI 1.000 radio rx frame=%s\nI 1.000 radio rx frame=%s\n"
        % (wrong.hex().encode(), unknown.hex().encode(), truncated.hex().encode()),
        frames=decoder,
    ).splitlines()
    assert (
        out[1]
        == "    frame: data node=7 bytes=%d: bad tag for node 7 (wrong key or corrupted frame)"
        % len(wrong)
    )
    assert out[3] == "    frame: data node=9 bytes=%d: no key for node 9 in keys.json" % len(
        unknown
    )
    assert out[5].startswith("    frame: data node=7 bytes=%d: " % len(truncated))


def test_hex_that_is_not_a_frame():
    decoder = m.FrameDecoder({7: (KEY7,)})
    not_frame = "00112233445566778899aabbccddeeff"  # looks like a key, version nibble 0
    # anywhere else: left alone (hashes, MAC addresses, keys ...)
    assert fed(b"I 1.000 config digest=%s\n" % not_frame.encode(), frames=decoder).count("\n") == 1
    assert fed(b"short 1107035e9a28\n", frames=decoder).count("\n") == 1
    # in a field named after frames: said
    out = fed(b"I 1.000 radio rx frame=%s\n" % not_frame.encode(), frames=decoder).splitlines()
    assert out[1] == "    frame: ?, 16 bytes: unsupported frame version 0 (reads 1, 2)"


def test_status_and_ack_frames():
    decoder = m.FrameDecoder({7: (KEY7,)})
    status = frame.encode_status(frame.Signer(KEY7), 7, 4, {1: 3, 3: 51200, 9: 86400})
    ack = uplink.encode_ack(frame.Signer(KEY7), 7, 1_750_000_000, [(0, 3), (5, 5)])
    out = fed(b"status %s\nack %s\n" % (status.hex().encode(), ack.hex().encode()), frames=decoder)
    assert out.splitlines() == [
        "status " + status.hex(),
        "    frame: status node=7 seq=4 bytes=%d" % len(status),
        "      boot_count=3 free_heap=51200 uptime_s=86400",
        "ack " + ack.hex(),
        "    frame: ack node=7 bytes=%d" % len(ack),
        "      host_time=1750000000 acked=0-3,5",
    ]


def test_frames_without_keys_are_named_not_verified():
    f = data_frame()
    out = fed(f.hex().encode() + b"\n").splitlines()
    assert out[1] == "    frame: data node=7 bytes=%d (not verified: no --keys)" % len(f)


# --- real ports -----------------------------------------------------------------------------


class Collector:
    """Runs follow() on a thread with a Monitor writing to memory; records status lines."""

    def __init__(self, url, save=None, frames=None, **follow_kw):
        self.out = io.StringIO()
        self.status = []
        self.monitor = m.Monitor(self.out, save=save, frames=frames, status=self.status.append)
        self.stop = threading.Event()
        self.error = None
        follow_kw.setdefault("wait", False)

        def run():
            try:
                m.follow(
                    url, self.monitor, stop=self.stop.is_set, sleep=self.stop.wait, **follow_kw
                )
            except Exception as e:  # noqa: BLE001 - handed to the test
                self.error = e

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def wait_for(self, predicate, what, timeout=10):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(
                    "timed out waiting for %s; output %r, status %r, error %r"
                    % (what, self.out.getvalue(), self.status, self.error)
                )
            time.sleep(0.01)

    def lines(self):
        return self.out.getvalue().splitlines()

    def finish(self):
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def listen(port=0):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1)
    s.settimeout(10)
    return s


def test_socket_server_stopped_and_restarted(tmp_path):
    """A board behind a TCP serial server that goes away (unplugged) and comes back: the
    monitor says so, reconnects, and loses nothing either side sent; bytes sent the moment
    a connection opens are kept."""
    server = listen()
    port = server.getsockname()[1]
    save = open(tmp_path / "raw.log", "ab")
    c = Collector("socket://127.0.0.1:%d" % port, save=save)
    conn, _ = server.accept()
    conn.sendall(b"I 1.000 node started node=7\r\nW 2.000 link no ack")
    c.wait_for(lambda: c.lines() == ["I 1.000 node started node=7"], "the first line")
    conn.close()
    server.close()
    c.wait_for(lambda: len(c.status) == 1, "the gone message")
    gone = "port gone (read failed: socket disconnected); waiting for it to come back"
    assert c.status[0] == "socket://127.0.0.1:%d: %s" % (port, gone)
    assert c.lines()[-1] == "W 2.000 link no ack"  # the partial line is not lost
    time.sleep(0.3)  # a few refused reconnections
    server = listen(port)
    conn, _ = server.accept()
    conn.sendall(b"I 0.100 node started node=7 boot=2\r\n")
    c.wait_for(
        lambda: c.lines()[-1:] == ["I 0.100 node started node=7 boot=2"],
        "the line after the restart",
    )
    assert re.fullmatch(r"socket://127\.0\.0\.1:%d: back after \d+\.\d s" % port, c.status[1])
    assert len(c.status) == 2  # refused reconnections are not reported one by one
    assert c.monitor.counters["event_gone"] == 1 and c.monitor.counters["event_back"] == 1
    conn.close()
    server.close()
    c.finish()
    save.close()
    assert (tmp_path / "raw.log").read_bytes() == (
        b"I 1.000 node started node=7\r\nW 2.000 link no ackI 0.100 node started node=7 boot=2\r\n"
    )


def test_pty_that_goes_away(tmp_path):
    """A real tty (pyserial's posix backend): lines written before the monitor opened it are
    kept; when the other end closes (unplug) the monitor waits, then gives up as asked."""
    master, slave = os.openpty()
    tty.setraw(slave)
    name = os.ttyname(slave)
    os.write(master, b"ets Jun  8 2016 00:22:57\r\n")
    c = Collector(name, give_up_s=0.5)
    os.write(master, b"I 0.500 node started node=7\r\nE 0.6")
    c.wait_for(lambda: len(c.lines()) == 2, "two lines")
    os.write(master, b"00 sensor bme280: no device at 0x76 (OSError 19)\r\n")
    c.wait_for(lambda: len(c.lines()) == 3, "the joined line")
    os.close(slave)
    os.close(master)
    c.thread.join(10)
    assert c.lines() == [
        "ets Jun  8 2016 00:22:57",
        "I 0.500 node started node=7",
        "E 0.600 sensor bme280: no device at 0x76 (OSError 19)",
    ]
    assert c.status[0].startswith("%s: port gone (" % name)
    assert isinstance(c.error, m.PortError)
    assert re.fullmatch(
        r"%s: gone for \d+\.\d s, giving up \(last error: .+\)" % re.escape(name), str(c.error)
    )


MP_NODE_SCRIPT = """
import binascii
from firmware import log
from protocols import frame, uplink
t = [540011]
node_log = log.Log(lambda: t[0], level=log.DEBUG)
f = frame.encode_data(frame.Signer(bytes(range(16))), 7, 3, (1, 2, 3),
                      [(2150, 4500, 101325), (2160, 4490, 101320)], [60, 0])
node_log.info("node", "started", node=7, fw="0.1.0", board="sim")
t[0] += 1500
node_log.info("radio", "rx", frame=binascii.hexlify(f).decode(), rssi=-80)
node_log.error("sensor", "bme280: no device at 0x76 (OSError 19)")
raise OSError(19)
"""


def test_the_firmware_on_micropython_through_a_pty(board_build):
    """The node's own log code and frame codec, on the MicroPython unix port with a board's
    heap, writing to a pseudo-terminal as a board writes to its USB serial port."""
    master, slave = os.openpty()
    tty.setraw(slave)
    name = os.ttyname(slave)
    c = Collector(name, frames=m.FrameDecoder({7: (KEY7,)}), give_up_s=0.2)
    env = dict(os.environ, MICROPYPATH=".frozen:.")  # the build, the cwd (conftest.run_mp)
    proc = subprocess.run(
        [board_build["micropython"], "-X", "heapsize=64K", "-c", MP_NODE_SCRIPT],
        stdout=master,
        stderr=master,
        env=env,
        cwd=board_build["dir"],
        timeout=60,
    )
    assert proc.returncode == 1
    c.wait_for(lambda: "ENODEV" in c.out.getvalue(), "the traceback")
    os.close(master)
    os.close(slave)
    c.thread.join(10)
    lines = c.lines()
    assert lines[:6] == [
        "I 540.011 node started board=sim fw=0.1.0 node=7",
        "I 541.511 radio rx frame=%s rssi=-80" % data_frame().hex(),
        "    frame: data node=7 index=3 bytes=%d" % len(data_frame()),
        "      age=60s temperature_c=21.5 humidity_pct=45 pressure_hpa=1013.25",
        "      age=0s temperature_c=21.6 humidity_pct=44.9 pressure_hpa=1013.2",
        "E 541.511 sensor bme280: no device at 0x76 (OSError 19)",
    ]
    assert lines[6] == "Traceback (most recent call last):"
    assert lines[-1] == "OSError: [Errno 19] ENODEV"
    assert c.monitor.counters["log"] == 3 and c.monitor.counters["garbled"] == 0


def test_follow_refuses_a_port_that_is_not_there(tmp_path):
    mon, _ = monitor()
    with pytest.raises(
        m.PortError, match=r"^cannot open /nonexistent/ttyUSB0: No such file or directory$"
    ):
        m.follow("/nonexistent/ttyUSB0", mon)
    with pytest.raises(
        m.PortError, match=r"^cannot open foo://x: invalid URL, protocol 'foo' not known$"
    ):
        m.follow("foo://x", mon, wait=True)
    (tmp_path / "file").write_text("not a tty")
    with pytest.raises(
        m.PortError, match=r"not a serial port \(Inappropriate ioctl for device\)$"
    ):
        m.follow(str(tmp_path / "file"), mon)


def test_wait_for_a_port_that_appears_later():
    server = listen()
    port = server.getsockname()[1]
    server.close()
    c = Collector("socket://127.0.0.1:%d" % port, wait=True)
    c.wait_for(lambda: c.status, "the waiting message")
    assert (
        c.status[0]
        == "socket://127.0.0.1:%d: not there (Connection refused); waiting for it" % port
    )
    server = listen(port)
    conn, _ = server.accept()
    conn.sendall(b"hello\n")
    c.wait_for(lambda: c.lines() == ["hello"], "the line")
    assert c.status[1].startswith("socket://127.0.0.1:%d: back after " % port)
    conn.close()
    server.close()
    c.finish()


def test_a_port_is_reopened_within_half_a_second():
    # A USB serial adapter buffers little while its port is closed: follow()'s back-off
    # (host_tools/backoff.py) waits 25-50 ms at first and never more than 0.5 s.
    delays = []
    with pytest.raises(m.PortError):
        m.follow(
            "loop://",
            m.Monitor(out=io.StringIO()),
            open_port=lambda *a: (_ for _ in ()).throw(OSError(2, "gone")),
            wait=True,
            give_up_s=10,
            sleep=delays.append,
            monotonic=lambda: len(delays),
        )
    assert 0.025 <= delays[0] <= 0.05 and max(delays) <= 0.5 and len(delays) == 10


# --- the command, as a user runs it --------------------------------------------------------


def test_cli_end_to_end_with_keys_save_and_ctrl_c(tmp_path):
    keys = tmp_path / "keys.json"
    save_registry(keys, Registry({7: NodeKeys(7, KEY7)}))
    save = tmp_path / "node7.log"
    save.write_bytes(b"earlier session\n")
    server = listen()
    port = server.getsockname()[1]
    stdout = open(tmp_path / "stdout", "w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "host_tools.cli",
            "monitor",
            "socket://127.0.0.1:%d" % port,
            "--keys",
            str(keys),
            "--save",
            str(save),
            "--level",
            "I",
            "--no-color",
        ],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        conn, _ = server.accept()
        f = data_frame()
        sent = (
            b"D 0.001 clock hidden by --level\r\n"
            b"I 4.000 radio rx frame=" + f.hex().encode() + b"\r\n"
            b"\xff\xfe junk\r\n"
        )
        conn.sendall(sent)
        deadline = time.monotonic() + 20
        while (
            save.read_bytes() != b"earlier session\n" + sent
            or len(Path(stdout.name).read_text().splitlines()) < 5
        ):
            assert time.monotonic() < deadline, Path(stdout.name).read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert err == (
        "citynode: monitor stopped: 3 lines (2 log, 1 other, 1 garbled), 2 shown, "
        "1 frames (0 not decoded)\n"
    )
    assert Path(stdout.name).read_text().splitlines() == [
        "I 4.000 radio rx frame=" + f.hex(),
        "    frame: data node=7 index=3 bytes=%d" % len(f),
        "      age=60s temperature_c=21.5 humidity_pct=45 pressure_hpa=1013.25",
        "      age=0s temperature_c=21.6 humidity_pct=44.9 pressure_hpa=1013.2",
        "\\xff\\xfe junk [garbled: 2 bytes escaped]",
    ]


@pytest.fixture
def citynode(capsys):
    def run(*args):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_port_not_there(citynode):
    assert citynode("monitor", "/nonexistent/ttyUSB0") == (
        2,
        "",
        "citynode: cannot open /nonexistent/ttyUSB0: No such file or directory\n",
    )


def test_cli_refuses_a_key_file_others_can_read(tmp_path, citynode):
    keys = tmp_path / "keys.json"
    save_registry(keys, Registry({7: NodeKeys(7, KEY7)}))
    os.chmod(keys, 0o644)
    code, out, err = citynode("monitor", "loop://", "--keys", keys)
    assert (code, out) == (2, "")
    assert err.startswith(
        "citynode: %s: mode 0644 gives access to group (read) and others (read)" % keys
    )
    assert "Fix: chmod 600" in err


def test_cli_save_file_that_cannot_be_opened(tmp_path, citynode):
    code, _, err = citynode("monitor", "loop://", "--save", tmp_path / "no" / "such.log")
    assert code == 2
    assert err == "citynode: cannot open %s for --save: No such file or directory\n" % (
        tmp_path / "no" / "such.log"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--level", "loud"], "argument --level: unknown level 'loud'"),
        (["--subsystem", "link,"], "argument --subsystem: bad subsystem name ''"),
        (["--baud", "0"], "argument --baud: must be positive, got 0"),
        (["--give-up", "-1"], "argument --give-up: expected a number of seconds >= 0, got -1"),
    ],
)
def test_cli_bad_options(citynode, args, message):
    code, _, err = citynode("monitor", "loop://", *args)
    assert code == 2 and message in err


def test_cli_sigterm_stops_cleanly():
    server = listen()
    port = server.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "host_tools.cli", "monitor", "socket://127.0.0.1:%d" % port],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        conn, _ = server.accept()  # the monitor is running (its SIGTERM handler is set)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.close()
    conn.close()
    assert proc.returncode == 0, err
    assert out == ""
    assert err == "citynode: monitor stopped: 0 lines (0 log, 0 other, 0 garbled), 0 shown\n"


def test_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "host_tools.cli", "monitor", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 0
    assert "usage: citynode monitor" in result.stdout and "Exit status:" in result.stdout

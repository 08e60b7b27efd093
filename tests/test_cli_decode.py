# Tests for the `citynode` CLI (host_tools/cli.py), run as a subprocess as a user would: `decode`
# output and errors (exit 2, one stderr line, never a traceback), and `receive` end to end.

import json
import random
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ReceiveProcess

from host_tools.keys import save_keys
from protocols import frame, uplink

REPO = Path(__file__).resolve().parent.parent
KEY7 = bytes(range(16))
KEY8 = bytes(range(100, 116))
RX_TIME = 1_700_000_000
BME = (1, 2, 3)


def run(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "host_tools.cli", *map(str, args)],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def assert_error_lines(result, *lines):
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == list(lines)


def data_frame(node_id=7, seq=1, key=KEY7, readings=((2150, 4500, 101325),), ages=(0,), version=2):
    """A DATA frame: v2 (seq is the first reading's index) unless version=1."""
    return frame.encode_data(
        frame.Signer(key), node_id, seq, BME, list(readings), list(ages), version=version
    )


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys.json"
    save_keys(path, {7: KEY7, 8: KEY8})
    return path


def test_decode_prints_one_object_per_reading(keys):
    hex_frame = data_frame(
        seq=9, readings=[(2150, 4500, 101325), (2160, 4510, 101320)], ages=[90, 30]
    ).hex()
    result = run("decode", hex_frame, "--keys", keys, "--rx-time", RX_TIME)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert objects[0] == {
        "node_id": 7,
        "reading_index": 9,
        "quantity": "temperature_c",
        "value": 21.5,
        "age_s": 90,
        "ts": RX_TIME - 90,
        "time": "2023-11-14T22:11:50.000Z",
    }
    assert [(o["quantity"], o["value"], o["age_s"]) for o in objects[1:]] == [
        ("humidity_pct", 45.0, 90),
        ("pressure_hpa", 1013.25, 90),
        ("temperature_c", 21.6, 30),
        ("humidity_pct", 45.1, 30),
        ("pressure_hpa", 1013.2, 30),
    ]
    assert objects[-1]["ts"] == RX_TIME - 30
    assert [o["reading_index"] for o in objects] == [9, 9, 9, 10, 10, 10]


def test_decode_a_v1_frame_prints_its_seq(keys):
    hex_frame = data_frame(seq=9, version=1).hex()
    result = run("decode", hex_frame, "--keys", keys, "--rx-time", RX_TIME)
    assert result.returncode == 0, result.stderr
    assert {json.loads(line)["seq"] for line in result.stdout.splitlines()} == {9}


def test_decode_rx_time_defaults_to_now(keys):
    before = time.time()
    result = run("decode", data_frame().hex(), "--keys", keys)
    after = time.time()
    assert result.returncode == 0, result.stderr
    ts = json.loads(result.stdout.splitlines()[0])["ts"]
    assert before - 0.001 <= ts <= after + 0.001


def test_decode_stdin_skips_blank_lines_and_whitespace(keys):
    lines = ["", "  " + data_frame(seq=1).hex() + "  ", "", "\t" + data_frame(seq=2).hex()]
    result = run("decode", "--keys", keys, "--rx-time", RX_TIME, stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    indices = [json.loads(line)["reading_index"] for line in result.stdout.splitlines()]
    assert indices == [1, 1, 1, 2, 2, 2]


def test_decode_with_a_single_key_file(tmp_path):
    key_file = tmp_path / "node.key"
    key_file.write_text(KEY8.hex() + "\n")
    key_file.chmod(0o600)
    result = run("decode", data_frame(node_id=42, key=KEY8).hex(), "--keys", key_file)
    assert result.returncode == 0, result.stderr
    assert {json.loads(line)["node_id"] for line in result.stdout.splitlines()} == {42}


def test_decode_ack(keys):
    ack = uplink.encode_ack(frame.Signer(KEY7), 7, RX_TIME, [(3, 5), (9, 9)])
    result = run("decode", ack.hex(), "--keys", keys)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "type": "ack",
        "node_id": 7,
        "host_time": RX_TIME,
        "time": "2023-11-14T22:13:20.000Z",
        "acked": [[3, 5], [9, 9]],
    }


def test_decode_status(keys):
    status = frame.encode_status(frame.Signer(KEY8), 8, 4, {9: 3600, 77: -5}, version=1)
    result = run("decode", status.hex(), "--keys", keys)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "type": "status",
        "node_id": 8,
        "seq": 4,
        "fields": {"uptime_s": 3600, "field_77": -5},
    }


def test_decode_reports_each_bad_frame_and_decodes_the_rest(keys):
    good = data_frame(seq=1).hex()
    wrong_key = data_frame(seq=2, key=KEY8).hex()
    unknown = data_frame(node_id=9, seq=3).hex()
    result = run("decode", good, wrong_key, "12zz", unknown, good[:8], "--keys", keys)
    assert_error_lines(
        result,
        "citynode: frame 2: bad tag for node 7 (wrong key or corrupted frame)",
        "citynode: frame 3: not hex: 'z' at position 3",
        "citynode: frame 4: no key for node 9 in %s" % keys,
        "citynode: frame 5: frame is 4 bytes, too short for any frame",
    )
    assert len(result.stdout.splitlines()) == 3  # frame 1's three readings


def test_decode_stdin_errors_name_the_line(keys):
    stdin = "\n%s\nabc\n" % data_frame().hex()
    result = run("decode", "--keys", keys, stdin=stdin)
    assert_error_lines(result, "citynode: frame 2 (line 3): not hex: odd number of hex digits (3)")


def test_decode_structural_error_after_a_valid_tag(keys):
    # A correctly tagged frame whose body is malformed: the codec's message, with the node.
    signer = frame.Signer(KEY7)
    body = bytes([0x11, 7, 1])  # version 1, DATA, node 7, seq 1, then no readings at all
    result = run("decode", (body + signer.tag(body)).hex(), "--keys", keys)
    assert_error_lines(result, "citynode: frame 1: node 7: frame ends inside its readings")


def test_decode_garbage_one_line_each_never_a_traceback(keys):
    rng = random.Random(7)
    good = data_frame()
    lines = []
    for i in range(300):
        if i % 3 == 0:
            b = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        else:
            b = bytearray(good)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            b = bytes(b)
        lines.append(b.hex() or "zz")
    result = run("decode", "--keys", keys, stdin="\n".join(lines) + "\n")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == 300
    assert all(re.fullmatch(r"citynode: frame \d+: \S.*", line) for line in errors)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        ('{"nodes": {"7": {"key": "%s"}}}' % ("ab" * 15), "node 7: key must be 32 hex characters"),
        ("{", "not valid JSON"),
    ],
)
def test_decode_bad_key_file(tmp_path, contents, message):
    path = tmp_path / "keys.json"
    path.write_text(contents)
    path.chmod(0o600)
    result = run("decode", data_frame().hex(), "--keys", path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("citynode: %s: " % path)
    assert message in result.stderr


def test_decode_missing_key_file(tmp_path):
    result = run("decode", "00", "--keys", tmp_path / "nope.json")
    assert_error_lines(
        result, "citynode: %s: cannot read: No such file or directory" % (tmp_path / "nope.json")
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "expected a finite number of unix seconds, got 'nan'"),
        ("inf", "expected a finite number of unix seconds, got 'inf'"),
        ("-inf", "expected a finite number of unix seconds, got '-inf'"),
        ("1e20", "1e20 is not a date in years 1..9999"),
        ("-1e20", "-1e20 is not a date in years 1..9999"),
        ("253402300800", "253402300800 is not a date in years 1..9999"),  # 10000-01-01
        ("-62135596801", "-62135596801 is not a date in years 1..9999"),  # 0000-12-31
        ("soon", "expected unix seconds, got 'soon'"),
    ],
)
def test_decode_rx_time_must_be_a_finite_date(keys, value, message):
    # `=`: argparse takes a separate "-inf" for an option, not a value
    result = run("decode", data_frame().hex(), "--keys", keys, "--rx-time=" + value)
    assert_error_lines(result, "citynode: --rx-time: " + message)
    assert result.stdout == ""


def test_decode_rx_time_as_a_separate_argument(keys):
    result = run("decode", data_frame().hex(), "--keys", keys, "--rx-time", "nan")
    assert_error_lines(
        result, "citynode: --rx-time: expected a finite number of unix seconds, got 'nan'"
    )


def test_decode_rx_time_at_the_ends_of_the_dates(keys):
    first = -62135596800  # 0001-01-01T00:00:00Z
    last = 253402300799  # 9999-12-31T23:59:59Z
    result = run("decode", data_frame(ages=[0]).hex(), "--keys", keys, "--rx-time", last)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["time"] == "9999-12-31T23:59:59.000Z"
    # a valid --rx-time whose reading, 90 s older, has no date: that frame fails, no traceback
    older = data_frame(ages=[90]).hex()
    result = run("decode", older, data_frame(ages=[0]).hex(), "--keys", keys, "--rx-time", first)
    assert_error_lines(
        result,
        "citynode: frame 1: node 7: a reading 90 s old: --rx-time minus its age, "
        "-62135596890.0, is not a date in years 1..9999",
    )
    assert [json.loads(line)["time"] for line in result.stdout.splitlines()] == [
        "0001-01-01T00:00:00.000Z"
    ] * 3


@pytest.mark.parametrize("single", [False, True], ids=["registry", "single-key"])
@pytest.mark.parametrize(
    ("mode", "who"),
    [
        (0o644, "group (read) and others (read)"),
        (0o640, "group (read)"),
        (0o666, "group (read, write) and others (read, write)"),
        (0o604, "others (read)"),
    ],
    ids=["0644", "0640", "0666", "0604"],
)
def test_decode_refuses_a_key_file_others_can_read(keys, tmp_path, mode, who, single):
    path = keys  # a registry of nodes 7 and 8
    if single:
        path = tmp_path / "node.key"
        path.write_text(KEY7.hex() + "\n")
    path.chmod(mode)
    result = run("decode", data_frame().hex(), "--keys", path, "--rx-time", RX_TIME)
    assert_error_lines(
        result,
        "citynode: %s: mode %04o gives access to %s; a key file must be private to its owner. "
        "Fix: chmod 600 %s (and rotate the keys if someone else may have read them)"
        % (path, mode, who, shlex.quote(str(path))),
    )
    assert result.stdout == ""
    path.chmod(0o600)  # the same file, private: accepted
    result = run("decode", data_frame().hex(), "--keys", path, "--rx-time", RX_TIME)
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["value"] for line in result.stdout.splitlines()] == [
        21.5,
        45.0,
        1013.25,
    ]


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    for name in ("decode", "receive", "demo"):
        assert name in result.stdout
    result = run("demo", "--help")
    assert result.returncode == 0
    for option in ("--nodes", "--hours", "--trace", "--batch", "--db", "--json", "--interval"):
        assert option in result.stdout


# --- receive ----------------------------------------------------------------------------


def test_receive_bad_address(keys):
    result = run("receive", "--keys", keys, "--udp", "nowhere", "--jsonl", "-")
    assert_error_lines(result, "citynode: --udp: expected HOST:PORT, got 'nowhere'")


def test_receive_empty_key_file(tmp_path):
    path = tmp_path / "keys.json"
    save_keys(path, {})
    result = run("receive", "--keys", path, "--jsonl", "-")
    assert_error_lines(result, "citynode: %s: no nodes, so every frame would be rejected" % path)


def test_receive_unopenable_sinks(keys, tmp_path):
    result = run("receive", "--keys", keys, "--udp", "127.0.0.1:0", "--db", tmp_path / "no/x.db")
    assert_error_lines(
        result,
        "citynode: %s: cannot open SQLite database: unable to open database file"
        % (tmp_path / "no/x.db"),
    )
    result = run("receive", "--keys", keys, "--udp", "127.0.0.1:0", "--jsonl", tmp_path / "no/x")
    assert_error_lines(
        result, "citynode: --jsonl %s: No such file or directory" % (tmp_path / "no/x")
    )


def test_receive_end_to_end(keys, tmp_path):
    db = tmp_path / "rx.db"
    daemon = ReceiveProcess(
        "--keys", keys, "--udp", "127.0.0.1:0", "--db", db, "--jsonl", "-", stdout=subprocess.PIPE
    )
    try:
        port = int(daemon.wait_for(r"listening on udp 127\.0\.0\.1:(\d+)").group(1))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"not a frame", ("127.0.0.1", port))
            daemon.wait_for(r"frame rejected reason=\w+ node=- len=11: ")
            client.sendto(data_frame(seq=5, ages=[30]), ("127.0.0.1", port))
            ack, _ = client.recvfrom(1024)
        assert uplink.decode_ack(ack, frame.Signer(KEY7)).acked == [(5, 5)]
        daemon.proc.send_signal(signal.SIGUSR1)
        daemon.wait_for(r"counters: .*frames_accepted=1 ")
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.proc.wait(timeout=10) == 0
        final = daemon.wait_for(r"^citynode: final counters: (.*)$").group(1)
        assert "frames_accepted=1" in final and "readings_accepted=1" in final
        assert "acks_sent=1" in final
        out = daemon.proc.stdout.read()
    finally:
        daemon.stop()
    assert "Traceback" not in "\n".join(daemon.seen)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT node_id, ts, quantity, value FROM readings").fetchall()
    assert sorted(r[2] for r in rows) == ["humidity_pct", "pressure_hpa", "temperature_c"]
    ack_time = uplink.decode_ack(ack, frame.Signer(KEY7)).host_time
    assert all(abs(r[1] - (ack_time - 30)) <= 1 for r in rows)  # ts = receive time - age
    assert [json.loads(line)["quantity"] for line in out.splitlines()] == [
        "temperature_c",
        "humidity_pct",
        "pressure_hpa",
    ]

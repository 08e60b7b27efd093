# Tests for the board's micropython-lib packages in `citynode flash`: fetched from a mip index and
# checked on the host before any board is changed (host_tools/mipindex.py, host_tools/flash.py).
# The index is built from the vendored, unmodified micropython-lib packages in ../shared and
# served by a real HTTP server on loopback; the boards are `citynode sim-board --board heltec_v3`.

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_flash import Served, assert_clean_error, cli, free_udp_port, mpremote
from test_simboard import Console, read_until_line

from host_tools import mipindex
from host_tools.keys import load_keys

ROOT = Path(__file__).resolve().parent.parent
VENDORED = ROOT.parent / "shared" / "vendor" / "micropython-lib" / "micropython"
LORA_FILES = ["lora/__init__.mpy", "lora/modem.mpy", "lora/sx126x.mpy", "lora/sync_modem.mpy"]

# "SNAP path sha256|dir" for everything on the board, a line each (a 80 KB heap).
_SNAPSHOT = """
import os, hashlib, binascii
def _walk(d):
    for n in os.listdir(d):
        p = (d + '/' + n).replace('//', '/')
        if os.stat(p)[0] & 0x4000:
            print('SNAP', p, 'dir')
            _walk(p)
        else:
            h = hashlib.sha256()
            with open(p, 'rb') as f:
                while True:
                    b = f.read(512)
                    if not b:
                        break
                    h.update(b)
            print('SNAP', p, binascii.hexlify(h.digest()).decode())
_walk('/')
"""


def snapshot(port):
    lines = mpremote(port, "exec", _SNAPSHOT).splitlines()
    return dict(x.split()[1:] for x in lines if x.startswith("SNAP "))


# The flashed config with "link": "lora" (flash writes a UDP uplink), then a reset: the node
# builds its radio at the next boot.
TO_LORA = (
    "import json\nc = json.load(open('config.json'))\n"
    "c.update(link='lora', interval_s=1, batch=1, ack_timeout_ms=1000)\n"
    "with open('config.json', 'w') as f:\n    json.dump(c, f)"
)


def to_lora(port):
    mpremote(port, "exec", TO_LORA, "+", "reset")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """The vendored packages as a mip index folder (built once for the module)."""
    if not VENDORED.is_dir():
        pytest.skip("%s not found: the vendored micropython-lib lives in ../shared" % VENDORED)
    out = tmp_path_factory.mktemp("index")
    mipindex.build(out, [VENDORED])
    return out


@pytest.fixture
def serve():
    servers = []

    def start(root):
        servers.append(Served(root))
        return servers[-1].url

    yield start
    for s in servers:
        s.close()


def package_json(index, name, fmt="6"):
    return json.loads((index / "package" / fmt / name / "latest.json").read_text())


def index_file(index, short):
    return (index / "file" / short[:2] / short).read_bytes()


# --- the index builder -----------------------------------------------------------------------


def test_the_index_holds_each_package_with_what_it_requires(index):
    sx126x = package_json(index, "lora-sx126x")
    assert sx126x["version"] == "0.1.6" and "deps" not in sx126x
    # require("lora") folded in, as micropython-lib's tools/build.py does
    assert sorted(t for t, _ in sx126x["hashes"]) == [
        "lora/__init__.mpy", "lora/modem.mpy", "lora/sx126x.mpy",
    ]  # fmt: skip
    for fmt in ("6", "py"):
        for name in ("lora", "lora-sx126x", "lora-sx127x", "lora-sync", "umqtt.simple"):
            for _target, short in package_json(index, name, fmt)["hashes"]:
                assert hashlib.sha256(index_file(index, short)).hexdigest().startswith(short)
    # the source distribution: the unmodified file with its version appended
    (target, short), = package_json(index, "lora-sync", "py")["hashes"][:1]  # fmt: skip
    assert target == "lora/sync_modem.py"
    source = (VENDORED / "lora" / "lora-sync" / "lora" / "sync_modem.py").read_bytes()
    assert index_file(index, short) == source + b"\n\n__version__ = '0.1.1'\n"
    mpy = index_file(index, dict(package_json(index, "lora-sync")["hashes"])[
        "lora/sync_modem.mpy"])  # fmt: skip
    assert mpy[:2] == b"M\x06"  # bytecode version 6, no native architecture
    assert mpy[2] >> 2 == 0
    # umqtt.simple requires ssl, which the excerpt lacks: left to the index, as a dep
    assert package_json(index, "umqtt.simple")["deps"] == [["ssl", "latest"]]


def test_a_manifest_it_cannot_read_is_one_line(tmp_path):
    pkg = tmp_path / "lib" / "thing"
    pkg.mkdir(parents=True)
    (pkg / "manifest.py").write_text("metadata(version='1')\npackage(NAME)\n")
    with pytest.raises(mipindex.MipIndexError) as info:
        mipindex.build(tmp_path / "out", [tmp_path / "lib"])
    assert str(info.value) == "%s:2: package() with arguments that are not plain values" % (
        pkg / "manifest.py"
    )


def test_the_builder_runs_as_the_readme_says(index, tmp_path):
    out = tmp_path / "mip-index"
    command = [sys.executable, "-m", "host_tools.mipindex", "--output", out, VENDORED]
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "lora-sx126x 0.1.6" in run.stdout.splitlines()
    assert package_json(out, "lora-sx126x") == package_json(index, "lora-sx126x")
    command[-1] = tmp_path / "nowhere"
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (run.returncode, run.stderr) == (2, "mipindex: %s: no such folder\n" % command[-1])


# --- fetching, on the host -------------------------------------------------------------------


def test_fetch_stages_checked_files_from_a_url_or_a_folder(index, serve, tmp_path):
    url = serve(index)
    for where in (url, str(index)):
        dest = tmp_path / ("http" if where == url else "folder")
        staged = mipindex.fetch(["lora-sx126x", "lora-sync"], where, "6", dest)
        assert sorted(f.target for f in staged) == LORA_FILES
        for f in staged:
            assert hashlib.sha256(f.local.read_bytes()).hexdigest() == f.sha256
            assert f.local == dest / "6" / f.target


def test_fetch_refuses_a_file_that_does_not_match_its_hash(index, serve, tmp_path):
    bad = tmp_path / "index"
    shutil.copytree(index, bad)
    short = dict(package_json(bad, "lora-sync")["hashes"])["lora/sync_modem.mpy"]
    path = bad / "file" / short[:2] / short
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    url = serve(bad)
    with pytest.raises(mipindex.FetchError) as info:
        mipindex.fetch(["lora-sx126x", "lora-sync"], url, "6", tmp_path / "stage")
    got = hashlib.sha256(bytes(data)).hexdigest()[:12]
    assert str(info.value) == (
        "package lora-sync: lora/sync_modem.mpy from %s/file/%s/%s has sha256 %s..., not %s as "
        "the index says (corrupted or tampered with)" % (url, short[:2], short, got, short)
    )


def test_fetch_names_a_missing_package_and_a_missing_dep(index, serve, tmp_path):
    url = serve(index)
    with pytest.raises(mipindex.FetchError) as info:
        mipindex.fetch(["lora-sync", "lora-sx1280"], url, "6", tmp_path / "a")
    assert str(info.value) == (
        "package lora-sx1280: not in the index: %s/package/6/lora-sx1280/latest.json" % url
    )
    with pytest.raises(mipindex.FetchError) as info:
        mipindex.fetch(["umqtt.simple"], url, "6", tmp_path / "b")
    assert str(info.value) == (
        "package ssl (required by umqtt.simple): not in the index: "
        "%s/package/6/ssl/latest.json" % url
    )


def test_a_copy_made_online_serves_offline(index, serve, tmp_path):
    """`python -m host_tools.mipindex --from URL PACKAGE...`: the packages a board needs, copied
    (checked) from an index while there is a network, into a folder to flash from later."""
    url = serve(index)
    copy = tmp_path / "copy"
    command = [sys.executable, "-m", "host_tools.mipindex", "--output", copy, "--from", url,
               "lora-sx126x", "lora-sync"]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "lora-sync lora/sync_modem.mpy" in run.stdout.splitlines()
    online = mipindex.fetch(["lora-sx126x", "lora-sync"], url, "6", tmp_path / "a")
    offline = mipindex.fetch(["lora-sx126x", "lora-sync"], copy, "6", tmp_path / "b")
    assert [(f.target, f.sha256) for f in offline] == [(f.target, f.sha256) for f in online]
    assert sorted(p.name for p in (copy / "package" / "6").iterdir()) == [
        "lora-sx126x", "lora-sync",
    ]  # fmt: skip
    command[command.index("lora-sync")] = "lora-sx1280"
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert (run.returncode, run.stderr) == (2, "mipindex: package lora-sx1280: not in the "
                                               "index: %s/package/6/lora-sx1280/latest.json\n"
                                               % url)  # fmt: skip


# --- citynode flash --------------------------------------------------------------------------


def lora_flash(port, keys, index_url, *extra):
    return cli(
        "flash", port, "--board", "heltec_v3", "--node-id", 7, "--uplink", "127.0.0.1:9",
        "--keys", keys, "--mip-index", index_url, "--boot-timeout", 10, *extra,
    )  # fmt: skip


def test_a_package_that_cannot_be_had_leaves_the_board_untouched(sim, index, serve, tmp_path):
    """Index down, a file corrupted, a dep missing: refused before the board changes."""
    board = sim(board="heltec_v3")
    keys = tmp_path / "keys.json"
    main, modem = tmp_path / "main.py", tmp_path / "modem.py"
    main.write_text("print('the old firmware')\n")
    modem.write_text("# an older driver\n")
    mpremote(board.port, "fs", "mkdir", ":lib", "+", "fs", "mkdir", ":lib/lora", "+", "fs", "cp",
             main, ":main.py", "+", "fs", "cp", modem, ":lib/lora/modem.py")  # fmt: skip
    before = snapshot(board.port)
    assert before["/main.py"] != "dir" and before["/lib/lora/modem.py"] != "dir"

    bad = tmp_path / "bad"
    shutil.copytree(index, bad)
    short = dict(package_json(bad, "lora-sync")["hashes"])["lora/sync_modem.mpy"]
    (bad / "file" / short[:2] / short).write_bytes(b"not the driver")
    down = "http://127.0.0.1:%d" % free_udp_port()
    good, corrupted = serve(index), serve(bad)
    wifi = ["--wifi-ssid", "koper", "--wifi-password", "12345678"]
    cases = [
        (down, [], "package lora-sx126x: cannot fetch %s/package/6/lora-sx126x/latest.json: "
                   "Connection refused" % down),
        (corrupted, [], "package lora-sync: lora/sync_modem.mpy from %s/file/%s/%s has sha256 "
                        % (corrupted, short[:2], short)),
        # the simulated ESP32 runs the unix port, which does not freeze umqtt: it needs it
        (good, ["--uplink", "mqtt://127.0.0.1:1883"] + wifi,
         "package ssl (required by umqtt.simple): not in the index: %s/package/6/ssl/latest.json"
         % good),
    ]  # fmt: skip
    for url, extra, message in cases:
        result = lora_flash(board.port, keys, url, *extra)
        assert_clean_error(result, 2)
        lines = [x for x in result.stderr.splitlines() if not x.startswith("[")]
        assert len(lines) == 1 and lines[0].startswith("citynode: " + message), result.stderr
        assert lines[0].endswith("; no board was changed")
        assert "node 7: preparing" not in result.stderr
        assert snapshot(board.port) == before
        assert not keys.exists()


def test_the_lora_board_is_flashed_with_its_packages_from_the_index(sim, index, serve, tmp_path):
    board = sim(board="heltec_v3")
    url = serve(index)
    keys = tmp_path / "keys.json"
    result = lora_flash(board.port, keys, url)
    err = result.stderr
    assert "Traceback" not in err
    fetches = [
        err.index("fetching package %s (from %s)" % (p, url)) for p in ("lora-sx126x", "lora-sync")
    ]
    assert max(fetches) < err.index("node 7: preparing")
    assert "node 7: copying packages lora-sx126x, lora-sync (0/4 files)" in err
    assert "node 7: verifying" in err

    files = snapshot(board.port)
    expected = {}
    for name in ("lora-sx126x", "lora-sync"):
        for target, short in package_json(index, name)["hashes"]:
            expected["/lib/" + target] = hashlib.sha256(index_file(index, short)).hexdigest()
    assert sorted(expected) == ["/lib/" + t for t in LORA_FILES]
    assert {p: files.get(p) for p in expected} == expected
    assert "/.provisioning" not in files  # verified: the marker is gone
    assert "/lib/boards/heltec_v3.mpy" in files and "/lib/boards/sim/board.mpy" in files
    config = json.loads(mpremote(board.port, "exec", "print(open('/config.json').read())"))
    assert config["board"] == "heltec_v3" and config["node_id"] == 7
    assert list(load_keys(keys)) == [7]
    # The node boots as a Heltec V3: boards/hw.py's RealBoard on the sim-board's machine
    # (boards/sim/mcu.py), its BME280 on the board's I2C pins; flash's machine.reset() is a
    # SOFT_RESET (5) on an ESP32. No Wi-Fi is configured, so its UDP frames wait.
    assert result.returncode == 0, err
    booted = re.search(r"node 7 flashed and booted: (I .*)", result.stdout)
    assert booted, result.stdout
    assert re.search(
        r" node started board=heltec_v3 boot=1 .* link=udp node=7 pending=0 reset_cause=5 ",
        booted.group(1),
    ), result.stdout

    # With "link": "lora" the node builds its radio: micropython-lib's sx126x driver on the
    # board's pins, on the sim-board's SX1262 model. A sim-board has no air: the frame takes its
    # time on air and goes nowhere, no ack comes, and the readings stay on the node.
    to_lora(board.port)
    console = Console(board.port)
    try:
        read_until_line(console, r" sensor bme280 ready address=0x76")  # on GPIO 41/42
        read_until_line(
            console, r" node started board=heltec_v3 boot=2 .* link=lora node=7 .*reset_cause=5 "
        )
        read_until_line(console, r" link sent (frame|status) ")
        pending = read_until_line(console, r" link no ack, will retry .*pending=(\d+)")
        assert int(pending.group(1)) >= 1
    finally:
        console.close()
    seen = console.seen.decode("utf-8", "replace")
    assert "Traceback" not in seen and "crashed" not in seen and "cannot start" not in seen, seen


def test_the_flashed_board_has_its_ports_reset_causes_and_watchdog(sim, index, serve, tmp_path):
    """The sim-board's machine for a real board (boards/sim/mcu.py) latches reset_cause() as the
    ESP32 port does: SOFT_RESET (5) after machine.reset(), PWRON_RESET (1) after a power cycle,
    WDT_RESET (3) after its watchdog went unfed."""
    image = tmp_path / "heltec.img"
    board = sim(image, board="heltec_v3")
    result = lora_flash(board.port, tmp_path / "keys.json", serve(index))
    assert result.returncode == 0, result.stderr
    assert re.search(r" node started board=heltec_v3 boot=1 .*reset_cause=5 ", result.stdout)
    board.stop()
    board = sim(image, board="heltec_v3")  # the same board, powered again
    console = Console(board.port)
    try:
        read_until_line(console, r" node started board=heltec_v3 boot=2 .*reset_cause=1 ")
        # "node started" comes as the node is built (firmware/wiring.py): Ctrl-C once it runs.
        # (A Ctrl-C while the sim board's node loaded its code from the simulated littlefs once
        # crashed the unix port, "FATAL: uncaught NLR": its block device is Python code called
        # from C, which a real board's is not.)
        read_until_line(console, r" link sent (frame|status) ")
        console.raw_repl()
        console.ser.write(
            b"import machine, time\nw = machine.WDT(timeout=1000)\ntime.sleep_ms(1500)\n"
            b"w.feed()\nprint('still running')\n\x04"
        )
        read_until_line(console, r"\(sim: watchdog expired, resetting\)")  # after "OK"
        read_until_line(console, r" node started board=heltec_v3 boot=3 .*reset_cause=3 ")
    finally:
        console.close()
    assert b"still running" not in console.seen


@pytest.mark.parametrize("name, cause", [("lilygo_t3_v161", 5), ("pico_lora_sx1262", 3)])
def test_the_other_lora_boards_run_their_radio_on_the_sim_board(
    sim, index, serve, tmp_path, name, cause
):
    """As the Heltec V3 above, with the SX1276 (lora-sx127x) and the RP2040 (whose
    machine.reset() is a watchdog reboot: WDT_RESET, 3)."""
    board = sim(board=name)
    result = cli(
        "flash", board.port, "--board", name, "--node-id", 7, "--uplink", "127.0.0.1:9",
        "--keys", tmp_path / "keys.json", "--mip-index", serve(index), "--boot-timeout", 10,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert re.search(r" node started board=%s boot=1 .*reset_cause=%d " % (name, cause),
                     result.stdout), result.stdout  # fmt: skip
    to_lora(board.port)
    console = Console(board.port)
    try:
        read_until_line(console, r" sensor bme280 ready address=0x76")
        read_until_line(console, r" node started board=%s boot=2 .* link=lora " % name)
        read_until_line(console, r" link sent (frame|status) ")
        read_until_line(console, r" link no ack, will retry ")
    finally:
        console.close()
    seen = console.seen.decode("utf-8", "replace")
    assert "Traceback" not in seen and "crashed" not in seen and "cannot start" not in seen, seen

# Tests for a node's identity across `citynode flash` (host_tools/flash.py): a board that becomes
# another node id drops the old node's journal, clock and sequence state (only with --reflash);
# a revoked id comes back only with --reflash; a re-run skips boards already flashed. On
# simulated boards (`citynode sim-board`) on pseudo-terminals, with the real mpremote.

import ast
import json
import re
import time

import pytest
from test_flash import (
    assert_clean_error,
    board_files,
    cli,
    flash_args,
    free_udp_port,
    mpremote,
)

from host_tools import flash
from host_tools.keys import key_id, load_keys, load_registry

# The node's own journal, as the firmware opens it at boot (firmware/wiring.py): pending count,
# index of the oldest, and the boot number of each record. mpremote's soft reset stops the node
# first, and leaves it stopped.
_JOURNAL = (
    "from firmware.journal import Journal\n"
    "j = Journal(capacity=10080)\n"
    "print(repr((len(j), j.first, [r[0] for r in j.peek(10000)])))"
)


@pytest.fixture
def keys(tmp_path):
    return tmp_path / "keys.json"


def journal(port):
    return ast.literal_eval(mpremote(port, "exec", _JOURNAL).strip().splitlines()[-1])


def config(port):
    return json.loads(mpremote(port, "exec", "print(open('/config.json').read())"))


def refusal(result):
    """The lines that are not progress: a refusal is exactly one."""
    return [x for x in result.stderr.splitlines() if not x.startswith("[")]


def wait_for_readings(port, n, timeout=30.0):
    """Let the node (no host acks its frames) store at least n readings; returns journal()."""
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(2.0)
        state = journal(port)
        if state[0] >= n or time.monotonic() > deadline:
            return state
        mpremote(port, "reset")  # journal() stopped the node: start it again


def test_a_board_of_another_node_needs_reflash_and_drops_that_nodes_readings(sim, keys):
    board = sim()
    nowhere = "127.0.0.1:%d" % free_udp_port()  # no host: nothing is acknowledged
    assert cli(*flash_args(board.port, keys, 41, nowhere)).returncode == 0

    refused = cli(*flash_args(board.port, keys, 44, nowhere))
    assert_clean_error(refused, 2)
    assert refusal(refused) == [
        "citynode: %s: the board is node 41; making it node 44 needs --reflash, which drops "
        "node 41's pending readings, clock and sequence state" % board.port
    ]
    assert sorted(load_keys(keys)) == [41] and config(board.port)["node_id"] == 41

    pending, first, boots = wait_for_readings(board.port, 3)
    assert pending >= 3 and first == 0 and len(boots) == pending, (pending, first, boots)
    # What an ack and a cut power leave beside the journal: all go with the old node.
    planted = mpremote(
        board.port, "exec",
        "for p in ('/clock.dat', '/clock.dat.tmp', '/seq.dat.tmp'):\n"
        "    with open(p, 'w') as f:\n"
        "        f.write('1 1700000000000\\n')\n"
        "import os\n"
        "print(sorted(os.listdir('/')))",
    )  # fmt: skip
    assert "'clock.dat', 'clock.dat.tmp'" in planted

    moved = cli(*flash_args(board.port, keys, 44, nowhere, "--reflash"))
    assert moved.returncode == 0, moved.stderr
    assert (
        "[1/1] %s node 44: board was node 41; its %d pending readings were dropped (not sent "
        "as node 44)" % (board.port, pending)
    ) in moved.stderr.splitlines()
    assert "%s node 44: was node 41; its key stays in %s" % (board.port, keys) in moved.stderr

    # The node 44 booted with a journal of its own: from index 0, only boots after the flash.
    files = board_files(board.port)  # stops node 44
    assert not {"clock.dat.tmp", "seq.dat.tmp"} & set(files), files
    if "clock.dat" in files:  # node 44's own (firmware/clock.py writes one a boot), not 41's
        clock = mpremote(board.port, "exec", "print(open('/clock.dat').read())")
        assert "1700000000000" not in clock, clock
    new_pending, new_first, new_boots = journal(board.port)
    assert new_first == 0 and all(b > max(boots) for b in new_boots), (new_boots, boots)
    assert new_pending < pending + len(new_boots)  # not the old ones plus the new
    assert config(board.port)["node_id"] == 44
    assert sorted(load_keys(keys)) == [41, 44]


def test_the_same_node_keeps_its_journal(sim, keys):
    """Re-flashing node 7 as node 7 (another config here) keeps every pending reading."""
    board = sim()
    nowhere = "127.0.0.1:%d" % free_udp_port()
    assert cli(*flash_args(board.port, keys, 7, nowhere)).returncode == 0
    pending, first, boots = wait_for_readings(board.port, 3)
    again = cli(*flash_args(board.port, keys, 7, nowhere, "--batch", 2))
    assert again.returncode == 0, again.stderr
    assert "dropped" not in again.stderr
    after = journal(board.port)
    assert after[1] == first and after[2][: len(boots)] == boots


def test_a_revoked_node_needs_reflash_and_is_reinstated_with_a_new_key(sim, keys):
    board = sim()
    nowhere = "127.0.0.1:%d" % free_udp_port()
    assert cli(*flash_args(board.port, keys, 17, nowhere)).returncode == 0
    old = load_keys(keys)[17]
    assert cli("keys", "revoke", 17, "--keys", keys).returncode == 0
    before = keys.read_bytes()

    refused = cli(*flash_args(board.port, keys, 17, nowhere))
    assert_clean_error(refused, 2)
    assert refusal(refused) == [
        "citynode: %s: node 17 is revoked in %s; --reflash reinstates it with a new key (as "
        "`citynode keys rotate 17 --reinstate`)" % (board.port, keys)
    ]
    assert keys.read_bytes() == before and 17 not in load_keys(keys)

    back = cli(*flash_args(board.port, keys, 17, nowhere, "--reflash"))
    assert back.returncode == 0, back.stderr
    assert "node 17: node 17 was revoked: reinstated with a new key (--reflash)" in back.stderr
    assert re.search(
        r"node 17: board was revoked node 17; its \d+ pending readings were dropped \(not sent "
        r"under the new key\)",
        back.stderr,
    )
    entry = load_registry(keys, private=False).nodes[17]
    assert entry.active and entry.key != old and entry.rotated is not None
    assert entry.previous is None  # the revoked key is not accepted again
    assert config(board.port)["key"] == entry.key.hex()
    assert old.hex() not in back.stderr + back.stdout and entry.key.hex() not in back.stderr


def test_a_revoked_id_on_a_blank_board_needs_reflash_too(sim, keys):
    board, other = sim(), None
    nowhere = "127.0.0.1:%d" % free_udp_port()
    assert cli(*flash_args(board.port, keys, 17, nowhere)).returncode == 0
    assert cli("keys", "revoke", 17, "--keys", keys).returncode == 0
    other = sim(keys.parent / "other.img")
    refused = cli(*flash_args(other.port, keys, 17, nowhere))
    assert_clean_error(refused, 2)
    assert len(refusal(refused)) == 1 and "node 17 is revoked" in refused.stderr
    assert board_files(other.port) == []


def test_a_rerun_skips_boards_already_flashed(sim, keys, tmp_path):
    a, b = sim(tmp_path / "a.img"), sim(tmp_path / "b.img")
    nowhere = "127.0.0.1:%d" % free_udp_port()
    assert cli(*flash_args(a.port, keys, 17, nowhere)).returncode == 0  # b failed, say
    pending, first, boots = wait_for_readings(a.port, 2)
    resets = a.log().count("sim-board: reset")

    rerun = cli(*flash_args([a.port, b.port], keys, 17, nowhere))
    assert rerun.returncode == 0, rerun.stderr
    assert "[1/2] %s node 17: already flashed, skipped" % a.port in rerun.stderr
    assert "[2/2] %s node 18: done" % b.port in rerun.stderr
    assert re.search(r"^%s: node 17 already flashed, booted: I .* node started .*\bnode=17\b"
                     % re.escape(a.port), rerun.stdout, re.M)  # fmt: skip
    assert a.log().count("sim-board: reset") == resets + 1  # only the reset that starts it
    after = journal(a.port)
    assert after[1] == first and after[2][: len(boots)] == boots  # nothing dropped
    keys_now = load_keys(keys)
    assert sorted(keys_now) == [17, 18]
    for key in keys_now.values():  # never a key in the output (key ids are fine)
        assert key.hex() not in rerun.stdout + rerun.stderr

    # Changed firmware on the board (one file): flashed again, not skipped.
    mpremote(a.port, "exec", "with open('/lib/firmware/log.mpy', 'wb') as f:\n    f.write(b'x')")
    again = cli(*flash_args([a.port, b.port], keys, 17, nowhere))
    assert again.returncode == 0, again.stderr
    assert "[1/2] %s node 17: already node 17 (same key): updating it" % a.port in again.stderr, (
        again.stderr
    )
    assert "[2/2] %s node 18: already flashed, skipped" % b.port in again.stderr


def test_a_rotated_key_is_not_skipped(sim, keys):
    board = sim()
    nowhere = "127.0.0.1:%d" % free_udp_port()
    assert cli(*flash_args(board.port, keys, 17, nowhere)).returncode == 0
    assert cli("keys", "rotate", 17, "--keys", keys).returncode == 0
    rotated = load_keys(keys)[17]
    again = cli(*flash_args(board.port, keys, 17, nowhere, "--reflash"))
    assert again.returncode == 0, again.stderr
    assert "already flashed" not in again.stderr
    assert "node 17 gets the registry's current key (--reflash)" in again.stderr
    assert "dropped" not in again.stderr  # the same node: its readings are its own
    assert key_id(bytes.fromhex(config(board.port)["key"])) == key_id(rotated)


# --- pieces ----------------------------------------------------------------------------------

SIM = flash.BoardDef("sim")
KEY = bytes(range(16))


def _state(node_id=None, marker=None):
    cfg = None if node_id is None else {"node_id": node_id, "key": KEY.hex()}
    return flash.BoardState("linux", marker, cfg)


@pytest.mark.parametrize(
    "state, registry, revoked, reflash, drop, reinstate",
    [
        (_state(41), {}, (), True, 41, False),
        (_state(41), {44: KEY}, (), True, 41, False),  # 44 moves here, and 41's state goes
        (_state(41, {"node": 44, "step": "copy"}), {}, (), False, 41, False),  # resumed
        (_state(44), {}, {44}, True, 44, True),
        (_state(), {}, {44}, True, None, True),
        (_state(44), {44: KEY}, (), False, None, False),
    ],
)  # fmt: skip
def test_admission_of_identity_changes(state, registry, revoked, reflash, drop, reinstate):
    plan = flash.admit(0, "p", 44, state, SIM, registry, "keys.json", reflash, revoked)
    assert plan.drop_from == drop and plan.reinstate == reinstate


@pytest.mark.parametrize(
    "state, revoked, message",
    [
        (_state(41), (), "p: the board is node 41; making it node 44 needs --reflash"),
        (_state(41, {"node": 41, "step": "copy"}), (), "the board is node 41"),
        (_state(), {44}, "p: node 44 is revoked in keys.json; --reflash reinstates it"),
    ],
)
def test_identity_refusals_are_one_line(state, revoked, message):
    with pytest.raises(flash.Refused, match=re.escape(message)) as info:
        flash.admit(0, "p", 44, state, SIM, {}, "keys.json", False, revoked)
    assert info.value.hint is None and "\n" not in str(info.value)

# Tests for `citynode keys` (host_tools/commands/keys.py): add, list, rotate, revoke, export on
# a real registry file; permissions, corrupt files and mistakes give one precise line and exit 2.

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from host_tools import cli
from host_tools.keys import (
    format_time,
    key_id,
    load_accepted_keys,
    load_keys,
    load_registry,
)
from protocols import frame

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Run in an empty directory, so the default registry is ./keys.json."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CITYNODE_KEYS", raising=False)
    return tmp_path


@pytest.fixture
def citynode(capsys):
    """citynode(*args) -> (exit status, stdout, stderr), in this process."""

    def run(*args):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse: usage errors and --help
            code = e.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_add_creates_a_private_registry_with_fresh_keys(home, citynode):
    code, out, err = citynode("keys", "add", 17, 18, 19)
    assert (code, err) == (0, "")
    keys = load_keys(home / "keys.json")
    assert sorted(keys) == [17, 18, 19]
    assert len(set(keys.values())) == 3 and all(len(k) == 16 for k in keys.values())
    assert mode(home / "keys.json") == 0o600
    assert out.splitlines() == [
        "added node %d (key id %s)" % (n, key_id(keys[n])) for n in (17, 18, 19)
    ]
    for key in keys.values():
        assert key.hex() not in out
    entry = json.loads((home / "keys.json").read_text())["nodes"]["17"]
    assert set(entry) == {"key", "created"}
    assert abs(time.time() - load_registry(home / "keys.json").nodes[17].created) < 5


def test_add_refuses_an_existing_id_and_changes_nothing(home, citynode):
    citynode("keys", "add", 17)
    before = (home / "keys.json").read_bytes()
    code, out, err = citynode("keys", "add", 18, 17)
    assert code == 2 and out == ""
    assert err == (
        "citynode: keys.json: node 17 is already in the registry; nothing added "
        "(`citynode keys rotate 17` gives it a new key)\n"
    )
    assert (home / "keys.json").read_bytes() == before
    assert sorted(load_keys(home / "keys.json")) == [17]


def test_add_refuses_a_revoked_id_too(home, citynode):
    citynode("keys", "add", 17)
    citynode("keys", "revoke", 17)
    code, _, err = citynode("keys", "add", 17)
    assert code == 2 and "node 17 is already in the registry (revoked)" in err


def test_add_refuses_an_id_given_twice(home, citynode):
    code, _, err = citynode("keys", "add", 5, 5)
    assert (code, err) == (2, "citynode: node 5 is given twice\n")
    assert not (home / "keys.json").exists()


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("seven", "node id 'seven' is not a decimal integer"),
        ("-1", "node id '-1' is not a decimal integer"),
        ("4294967296", "node id 4294967296 is out of range 0..4294967295"),
    ],
)
def test_bad_node_ids_are_usage_errors(home, citynode, arg, message):
    code, _, err = citynode("keys", "add", "--", arg)
    assert code == 2 and message in err and "Traceback" not in err


def test_list_hides_secrets_unless_asked(home, citynode):
    citynode("keys", "add", 3, 1)
    keys = load_keys(home / "keys.json")
    code, out, _ = citynode("keys", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "node",
        "status",
        "key",
        "id",
        "created",
        "rotated",
        "previous",
        "key",
    ]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["1", "active", key_id(keys[1])],
        ["3", "active", key_id(keys[3])],
    ]
    assert all(k.hex() not in out for k in keys.values())
    _, out, _ = citynode("keys", "list", "--show-secrets")
    assert all(k.hex() in out for k in keys.values())


def test_list_json(home, citynode):
    citynode("keys", "add", 7)
    citynode("keys", "rotate", 7)
    registry = load_registry(home / "keys.json")
    e = registry.nodes[7]
    code, out, _ = citynode("keys", "list", "--json")
    assert code == 0
    (obj,) = json.loads(out)
    assert obj == {
        "node_id": 7,
        "status": "active",
        "key_id": key_id(e.key),
        "created": format_time(e.created),
        "rotated": format_time(e.rotated),
        "revoked": None,
        "previous": {
            "key_id": key_id(e.previous),
            "until": format_time(e.previous_until),
            "accepted": True,
        },
    }
    (obj,) = json.loads(citynode("keys", "list", "--json", "--show-secrets")[1])
    assert obj["key"] == e.key.hex() and obj["previous"]["key"] == e.previous.hex()


def test_list_empty_registry(home, citynode):
    (home / "keys.json").write_text('{"nodes": {}}')
    os.chmod(home / "keys.json", 0o600)
    assert citynode("keys", "list") == (
        0,
        "",
        "keys.json: no nodes (add one with `citynode keys add N`)\n",
    )
    assert citynode("keys", "list", "--json")[:2] == (0, "[]\n")


def test_rotate_keeps_the_old_key_for_a_grace_period(home, citynode):
    citynode("keys", "add", 7, 8)
    old = load_keys(home / "keys.json")
    code, out, err = citynode("keys", "rotate", 7, "--grace", 2)
    assert code == 0 and err == ""
    new = load_keys(home / "keys.json")
    assert new[7] != old[7] and new[8] == old[8]
    now = time.time()
    accepted = load_accepted_keys(home / "keys.json", now=now)
    assert accepted == {7: (new[7], old[7]), 8: (old[8],)}
    assert load_accepted_keys(home / "keys.json", now=now + 2 * 3600 + 5)[7] == (new[7],)
    assert out.startswith(
        "rotated node 7 (key id %s); old key %s accepted until "
        % (
            key_id(new[7]),
            key_id(old[7]),
        )
    )


def test_rotate_without_grace_and_twice(home, citynode):
    citynode("keys", "add", 7)
    first = load_keys(home / "keys.json")[7]
    citynode("keys", "rotate", 7)
    second = load_keys(home / "keys.json")[7]
    citynode("keys", "rotate", 7)
    third = load_keys(home / "keys.json")[7]
    # every key whose grace has not ended stays accepted: a node still on the first key (its
    # re-provisioning with the second never happened) is not cut off by the second rotation
    assert load_accepted_keys(home / "keys.json")[7] == (third, second, first)
    later = time.time() + registry_file_grace() + 5
    assert load_accepted_keys(home / "keys.json", now=later)[7] == (third,)
    citynode("keys", "rotate", 7, "--grace", 0)
    assert len(load_accepted_keys(home / "keys.json")[7]) == 1


def registry_file_grace():
    from host_tools.keys import DEFAULT_GRACE_S

    return DEFAULT_GRACE_S


def test_each_rotated_key_keeps_its_own_grace(home, citynode, monkeypatch):
    citynode("keys", "add", 7)
    first = load_keys(home / "keys.json")[7]
    t0 = time.time()
    citynode("keys", "rotate", 7, "--grace", 2)  # first: accepted until t0 + 2 h
    second = load_keys(home / "keys.json")[7]
    monkeypatch.setattr(time, "time", lambda: t0 + 3600)
    citynode("keys", "rotate", 7, "--grace", 2)  # an hour later; second until t0 + 3 h
    third = load_keys(home / "keys.json")[7]
    keys = home / "keys.json"
    assert load_accepted_keys(keys, now=t0 + 3600)[7] == (third, second, first)
    assert load_accepted_keys(keys, now=t0 + 2.5 * 3600)[7] == (third, second)
    assert load_accepted_keys(keys, now=t0 + 3.5 * 3600)[7] == (third,)
    code, _, _ = citynode("keys", "revoke", 7)
    assert code == 0 and 7 not in load_accepted_keys(keys, now=t0 + 3600)


def test_revoke(home, citynode):
    citynode("keys", "add", 7, 8)
    citynode("keys", "rotate", 7)
    code, out, err = citynode("keys", "revoke", 7)
    assert code == 0 and out.startswith("revoked node 7 (key id ")
    assert sorted(load_keys(home / "keys.json")) == [8]
    assert 7 not in load_accepted_keys(home / "keys.json")  # nor its previous key
    assert 7 in load_registry(home / "keys.json").nodes  # kept for the record
    _, out, _ = citynode("keys", "list")
    assert out.splitlines()[1].split()[:2] == ["7", "revoked"]

    code, _, err = citynode("keys", "revoke", 7)
    assert code == 2 and "keys.json: node 7 is already revoked (revoked 20" in err
    code, _, err = citynode("keys", "export", 7)
    assert code == 2 and "node 7 is revoked" in err and "its key is not exported" in err
    code, _, err = citynode("keys", "rotate", 7)
    assert code == 2 and "`citynode keys rotate 7 --reinstate`" in err


def test_reinstate_gives_a_new_key_and_not_the_old_one(home, citynode):
    citynode("keys", "add", 7)
    old = load_keys(home / "keys.json")[7]
    citynode("keys", "revoke", 7)
    code, _, err = citynode("keys", "rotate", 7, "--reinstate")
    assert (code, err) == (0, "")
    assert load_accepted_keys(home / "keys.json")[7] != (old,)
    assert old not in load_accepted_keys(home / "keys.json")[7]
    code, _, err = citynode("keys", "rotate", 7, "--reinstate")
    assert code == 2 and "node 7 is not revoked" in err


def test_export_prints_the_key_a_receiver_verifies_with(home, citynode):
    """The exported key signs frames that `citynode decode` accepts with the registry."""
    citynode("keys", "add", 17)
    code, out, _ = citynode("keys", "export", 17)
    assert code == 0
    key = bytes.fromhex(out.strip())
    assert out == key.hex() + "\n"
    data = frame.encode_data(frame.Signer(key), 17, 1, (1, 2, 3), [(2150, 4500, 101325)], [0])
    code, out, err = citynode("decode", "--keys", "keys.json", "--rx-time", 1e9, data.hex())
    assert (code, err) == (0, "")
    assert [json.loads(line)["value"] for line in out.splitlines()] == [21.5, 45.0, 1013.25]
    assert json.loads(citynode("keys", "export", 17, "--json")[1]) == {
        "node_id": 17,
        "key": key.hex(),
    }


def test_unknown_node(home, citynode):
    citynode("keys", "add", 1)
    for action in ("rotate", "revoke", "export"):
        code, out, err = citynode("keys", action, 9)
        assert (code, out) == (2, "")
        assert err == "citynode: keys.json: no node 9 (add it with `citynode keys add 9`)\n"


def test_missing_registry(home, citynode):
    for action in (["list"], ["rotate", 1], ["revoke", 1], ["export", 1]):
        code, out, err = citynode("keys", *action)
        assert (code, out) == (2, "")
        assert err.startswith("citynode: keys.json: no such key registry (create it with ")
    assert not (home / "keys.json").exists()


def test_registry_path_from_option_or_environment(home, citynode, monkeypatch):
    citynode("keys", "--keys", "a.json", "add", 1)
    citynode("keys", "add", 2, "--keys", "b.json")
    monkeypatch.setenv("CITYNODE_KEYS", str(home / "c.json"))
    citynode("keys", "add", 3)
    assert [sorted(load_keys(home / n)) for n in ("a.json", "b.json", "c.json")] == [[1], [2], [3]]
    assert not (home / "keys.json").exists()


def test_refuses_a_registry_others_can_read(home, citynode):
    citynode("keys", "add", 1)
    os.chmod(home / "keys.json", 0o644)
    before = (home / "keys.json").read_bytes()
    for action in (["list"], ["add", 2], ["rotate", 1], ["revoke", 1], ["export", 1]):
        code, out, err = citynode("keys", *action)
        assert (code, out) == (2, "")
        assert err == (
            "citynode: keys.json: mode 0644 gives access to group (read) and others (read); a "
            "key file must be private to its owner. Fix: chmod 600 keys.json (and rotate the "
            "keys if someone else may have read them)\n"
        )
    assert (home / "keys.json").read_bytes() == before
    assert mode(home / "keys.json") == 0o644  # not silently "fixed" either


def test_corrupt_registry_says_where_and_names_the_backup(home, citynode):
    citynode("keys", "add", 1)
    citynode("keys", "add", 2)  # keys.json.bak now holds node 1 only
    (home / "keys.json").write_text('{"nodes": {\n  "1": {"key": }\n}}')
    code, out, err = citynode("keys", "list")
    assert (code, out) == (2, "")
    assert err == (
        "citynode: keys.json: not valid JSON: Expecting value at line 2 column 16; "
        "the version before the last change is in keys.json.bak\n"
    )
    code, _, err = citynode("keys", "add", 3)
    assert code == 2 and "line 2 column 16" in err
    assert sorted(load_registry(home / "keys.json.bak").nodes) == [1]


def test_every_change_keeps_a_backup(home, citynode):
    citynode("keys", "add", 1)
    states = [(home / "keys.json").read_bytes()]
    for action in (["add", 2], ["rotate", 1], ["revoke", 2]):
        citynode("keys", *action)
        assert (home / "keys.json.bak").read_bytes() == states[-1]
        assert mode(home / "keys.json.bak") == 0o600
        states.append((home / "keys.json").read_bytes())
    assert len(set(states)) == 4


def test_help_for_every_action():
    for args in (
        ["keys", "--help"],
        *(["keys", a, "--help"] for a in ("add", "list", "rotate", "revoke", "export")),
    ):
        result = subprocess.run(
            [sys.executable, "-m", "host_tools.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: citynode keys")


def test_as_a_user_runs_it_no_traceback(tmp_path):
    """A subprocess, as a user runs it: one line on stderr, exit 2, no traceback."""
    path = tmp_path / "keys.json"
    path.write_bytes(b'{"nodes": {"1": {"key": "zz"}}}')
    os.chmod(path, 0o600)
    result = subprocess.run(
        [sys.executable, "-m", "host_tools.cli", "keys", "list", "--keys", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "citynode: %s: node 1: key must be 32 hex characters (16 bytes), got 2\n" % path
    )

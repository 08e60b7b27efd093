# Tests for host_tools/keys.py: the JSON key file (load, atomic save, precise errors), the
# single-key file accepted by `citynode decode`, and the registry behind `citynode keys`
# (metadata, revocation, rotation grace period, permissions, backups, locking).

import json
import os
import stat
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from host_tools.keys import (
    KeyFileError,
    NodeKeys,
    Registry,
    check_private,
    format_time,
    key_id,
    load_accepted_keys,
    load_keys,
    load_keys_or_single,
    load_registry,
    locked,
    new_key,
    parse_time,
    save_keys,
    save_registry,
)
from host_tools.receive import receiver

KEY7 = bytes(range(16))
KEY8 = bytes(range(100, 116))


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def key_file(tmp_path, nodes):
    return write(tmp_path / "keys.json", json.dumps({"nodes": nodes}))


def test_load_keys(tmp_path):
    path = key_file(
        tmp_path,
        {"7": {"key": KEY7.hex()}, "8": {"key": KEY8.hex().upper(), "name": "Koper port"}},
    )
    assert load_keys(path) == {7: KEY7, 8: KEY8}


def test_save_then_load_is_atomic_and_private(tmp_path):
    path = tmp_path / "keys.json"
    write(path, "old contents")
    os.chmod(path, 0o644)
    save_keys(path, {8: KEY8, 7: KEY7})
    assert load_keys(path) == {7: KEY7, 8: KEY8}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert os.listdir(tmp_path) == ["keys.json"]  # no temp file left behind
    assert json.loads(path.read_text())["nodes"]["7"] == {"key": KEY7.hex()}


@settings(deadline=None)  # file writes with fsync: slow on a busy disk
@given(
    st.dictionaries(st.integers(0, 0xFFFFFFFF), st.binary(min_size=16, max_size=16), max_size=20)
)
def test_save_load_round_trip(tmp_path_factory, keys):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    save_keys(path, keys)
    assert load_keys(path) == keys


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (
            {"nodes": {"7": {"key": "00" * 15}}},
            "node 7: key must be 32 hex characters (16 bytes), got 30",
        ),
        ({"nodes": {"7": {"key": "0g" + "00" * 15}}}, "node 7: key is not hex: 'g' at position 2"),
        ({"nodes": {"7": {"key": 12}}}, "node 7: key must be a string of 32 hex characters"),
        ({"nodes": {"7": "00" * 16}}, 'node 7: expected an object with a "key"'),
        ({"nodes": {"seven": {"key": "00" * 16}}}, 'node id "seven" is not a decimal integer'),
        ({"nodes": {"-1": {"key": "00" * 16}}}, 'node id "-1" is not a decimal integer'),
        ({"nodes": {"4294967296": {"key": "00" * 16}}}, "node id 4294967296 is out of range"),
        (
            {"nodes": {"7": {"key": "00" * 16}, "07": {"key": "11" * 16}}},
            "node 7 is listed twice (as '07')",
        ),
        ({"keys": {}}, 'expected a JSON object with a "nodes" object'),
        ([1, 2], 'expected a JSON object with a "nodes" object'),
    ],
)
def test_load_keys_errors(tmp_path, contents, message):
    path = write(tmp_path / "keys.json", json.dumps(contents))
    with pytest.raises(KeyFileError) as info:
        load_keys(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert message in str(info.value)


def test_example_message_from_the_brief(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "keys.json", json.dumps({"nodes": {"7": {"key": "ab" * 15}}}))
    with pytest.raises(KeyFileError) as info:
        load_keys("keys.json")
    assert str(info.value) == "keys.json: node 7: key must be 32 hex characters (16 bytes), got 30"


def test_invalid_json_says_where(tmp_path):
    path = write(tmp_path / "keys.json", '{"nodes": {\n  "7": {"key": }\n}}')
    with pytest.raises(KeyFileError, match=r"not valid JSON: Expecting value at line 2 column 16"):
        load_keys(path)


def test_duplicate_json_name(tmp_path):
    text = '{"nodes": {"7": {"key": "%s"}, "7": {"key": "%s"}}}' % (KEY7.hex(), KEY8.hex())
    path = write(tmp_path / "keys.json", text)
    with pytest.raises(KeyFileError, match='duplicate name "7"'):
        load_keys(path)


def test_missing_file(tmp_path):
    with pytest.raises(KeyFileError, match="nope.json: cannot read: No such file or directory"):
        load_keys(tmp_path / "nope.json")


def test_not_utf8(tmp_path):
    path = tmp_path / "keys.json"
    path.write_bytes(b'{"nodes": {}}\xff')
    with pytest.raises(KeyFileError, match="not UTF-8"):
        load_keys(path)


def test_save_rejects_bad_keys(tmp_path):
    with pytest.raises(KeyFileError, match="node 7: key must be 16 bytes"):
        save_keys(tmp_path / "keys.json", {7: b"short"})
    with pytest.raises(KeyFileError, match="node id '7' is not an integer"):
        save_keys(tmp_path / "keys.json", {"7": KEY7})
    assert not (tmp_path / "keys.json").exists()


def test_single_key_file(tmp_path):
    path = write(tmp_path / "node.key", "  %s\n" % KEY7.hex())
    assert load_keys_or_single(path) == ({}, KEY7)


def test_single_or_json_key_file(tmp_path):
    path = key_file(tmp_path, {"7": {"key": KEY7.hex()}})
    assert load_keys_or_single(path) == ({7: KEY7}, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("00" * 15, "key must be 32 hex characters (16 bytes), got 30"),
        ("", "file is empty"),
        ("hello", "neither a JSON key file"),
        ("00" * 16 + "\n" + "11" * 16, "neither a JSON key file"),
        ("{not json", "not valid JSON"),
    ],
)
def test_single_key_errors(tmp_path, text, message):
    path = write(tmp_path / "node.key", text)
    with pytest.raises(KeyFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_keys_or_single(path)


# --- the registry: metadata, revocation, rotation grace, permissions, backups, locking ------

T0 = 1_750_000_000  # 2025-06-15T15:06:40Z
HOUR = 3600


def registry_doc(**node7):
    entry = {"key": KEY7.hex()}
    entry.update(node7)
    return {"nodes": {"7": entry, "8": {"key": KEY8.hex()}}}


def private_file(tmp_path, doc, name="keys.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o600)
    return path


def test_times_format_and_parse():
    assert format_time(T0) == "2025-06-15T15:06:40Z"
    assert parse_time("2025-06-15T15:06:40Z") == T0
    for bad in ("2025-06-15 15:06:40", "2025-06-15T15:06:40+02:00", "yesterday", 5, None):
        with pytest.raises(ValueError, match="expected a time such as"):
            parse_time(bad)


def test_registry_round_trip_keeps_metadata_and_other_fields(tmp_path):
    path = tmp_path / "keys.json"
    registry = Registry(
        {
            7: NodeKeys(
                7,
                KEY7,
                created=T0,
                rotated=T0 + HOUR,
                previous=KEY8,
                previous_until=T0 + 25 * HOUR,
                extra={"name": "Koper port", "location": [45.548, 13.730]},
            ),
            8: NodeKeys(8, KEY8, created=T0, revoked=T0 + 2 * HOUR),
            9: NodeKeys(9, bytes(16), revoked=True),
        },
        extra={"site": "Koper"},
    )
    save_registry(path, registry, now=T0 + 2 * HOUR)
    doc = json.loads(path.read_text())
    assert doc["site"] == "Koper"
    assert doc["nodes"]["7"] == {
        "key": KEY7.hex(),
        "created": "2025-06-15T15:06:40Z",
        "rotated": "2025-06-15T16:06:40Z",
        "previous": {"key": KEY8.hex(), "until": "2025-06-16T16:06:40Z"},
        "name": "Koper port",
        "location": [45.548, 13.730],
    }
    assert doc["nodes"]["8"]["revoked"] == "2025-06-15T17:06:40Z"
    assert doc["nodes"]["9"]["revoked"] is True
    again = load_registry(path)
    assert again.nodes == registry.nodes
    assert again.extra == {"site": "Koper"}


def test_load_keys_leaves_revoked_nodes_out(tmp_path):
    doc = registry_doc(revoked="2025-06-15T15:06:40Z")
    doc["nodes"]["9"] = {"key": "99" * 16, "revoked": True}
    doc["nodes"]["10"] = {"key": "aa" * 16, "revoked": False}
    doc["nodes"]["11"] = {"key": "bb" * 16, "revoked": None}
    path = private_file(tmp_path, doc)
    assert load_keys(path) == {8: KEY8, 10: b"\xaa" * 16, 11: b"\xbb" * 16}
    assert load_keys_or_single(path) == (load_keys(path), None)
    assert set(load_registry(path).nodes) == {7, 8, 9, 10, 11}


def test_accepted_keys_include_the_previous_key_during_its_grace_period(tmp_path):
    until = format_time(T0 + HOUR)
    path = private_file(tmp_path, registry_doc(previous={"key": "55" * 16, "until": until}))
    old = b"\x55" * 16
    assert load_accepted_keys(path, now=T0) == {7: (KEY7, old), 8: (KEY8,)}
    assert load_accepted_keys(path, now=T0 + HOUR - 1)[7] == (KEY7, old)
    assert load_accepted_keys(path, now=T0 + HOUR) == {7: (KEY7,), 8: (KEY8,)}
    assert load_keys(path) == {7: KEY7, 8: KEY8}  # the current key only


def test_a_revoked_node_has_no_accepted_key_even_in_a_grace_period(tmp_path):
    until = format_time(T0 + HOUR)
    doc = registry_doc(previous={"key": "55" * 16, "until": until}, revoked=format_time(T0))
    path = private_file(tmp_path, doc)
    assert load_accepted_keys(path, now=T0) == {8: (KEY8,)}


def test_save_registry_drops_an_expired_previous_key(tmp_path):
    path = tmp_path / "keys.json"
    entry = NodeKeys(7, KEY7, previous=KEY8, previous_until=T0 + HOUR)
    save_registry(path, Registry({7: entry}), now=T0)
    assert "previous" in json.loads(path.read_text())["nodes"]["7"]
    save_registry(path, Registry({7: entry}), now=T0 + HOUR)
    assert "previous" not in json.loads(path.read_text())["nodes"]["7"]


@pytest.mark.parametrize(
    ("node7", "message"),
    [
        ({"created": "June"}, 'node 7: "created": expected a time such as'),
        ({"rotated": 17}, 'node 7: "rotated": expected a time such as'),
        ({"revoked": "yes"}, 'node 7: "revoked": expected a time such as "2025-08-01T10:00:00Z"'),
        ({"revoked": 1}, 'node 7: "revoked": expected a time'),
        ({"previous": KEY8.hex()}, 'node 7: "previous": expected an object with a "key" and'),
        ({"previous": {"key": KEY8.hex()}}, 'node 7: "previous": expected an object with'),
        (
            {"previous": {"key": "00", "until": "2025-06-15T15:06:40Z"}},
            'node 7: "previous": key must be 32 hex characters (16 bytes), got 2',
        ),
        (
            {"previous": {"key": KEY8.hex(), "until": "soon"}},
            'node 7: "previous": "until": expected a time',
        ),
    ],
)
def test_registry_field_errors(tmp_path, node7, message):
    path = private_file(tmp_path, registry_doc(**node7))
    for load in (load_keys, load_registry, load_accepted_keys):
        with pytest.raises(KeyFileError) as info:
            load(path)
        assert str(info.value).startswith(str(path) + ": ")
        assert message in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o610])
def test_private_load_refuses_a_file_others_can_reach(tmp_path, mode):
    path = private_file(tmp_path, registry_doc())
    os.chmod(path, mode)
    for load in (load_registry, lambda p: load_keys(p, private=True)):
        with pytest.raises(KeyFileError) as info:
            load(path)
        message = str(info.value)
        assert message.startswith("%s: mode %04o gives access to " % (path, mode))
        assert "Fix: chmod 600 %s" % path in message
    assert load_keys(path) == {7: KEY7, 8: KEY8}  # the default stays as before: no check
    os.chmod(path, 0o600)
    assert set(load_registry(path).nodes) == {7, 8}
    os.chmod(path, 0o400)  # read-only for the owner is private too
    assert set(load_registry(path).nodes) == {7, 8}


def test_permission_message_names_what_others_can_do(tmp_path):
    path = private_file(tmp_path, registry_doc())
    os.chmod(path, 0o646)
    with pytest.raises(KeyFileError) as info:
        check_private(path)
    assert "mode 0646 gives access to group (read) and others (read, write)" in str(info.value)


def test_registry_is_never_readable_by_others_even_while_written(tmp_path, monkeypatch):
    """The temp file is 0600 from its creation (not chmod-ed afterwards), whatever the umask."""
    modes = []
    real_fsync = os.fsync

    def spy_fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            modes.append(stat.S_IMODE(st.st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    old_umask = os.umask(0)
    try:
        save_registry(tmp_path / "keys.json", Registry({7: NodeKeys(7, KEY7)}))
        save_registry(tmp_path / "keys.json", Registry({7: NodeKeys(7, KEY8)}))  # + backup
    finally:
        os.umask(old_umask)
    assert modes == [0o600, 0o600, 0o600]
    for name in ("keys.json", "keys.json.bak"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600


def test_load_keys_then_save_keys_loses_nothing(tmp_path):
    """What `citynode flash` does (load_keys, add a node, save_keys) keeps the registry's
    metadata and the revoked nodes that load_keys does not show."""
    path = tmp_path / "keys.json"
    registry = Registry(
        {
            7: NodeKeys(
                7, KEY7, created=T0, previous=KEY8, previous_until=int(time.time()) + HOUR
            ),
            8: NodeKeys(8, KEY8, created=T0, revoked=T0, extra={"name": "stolen"}),
            9: NodeKeys(9, bytes(16), created=T0, extra={"name": "harbour"}),
            10: NodeKeys(10, bytes(range(16, 32))),
        },
        extra={"site": "Koper"},
    )
    save_registry(path, registry)
    keys = load_keys(path)
    assert sorted(keys) == [7, 9, 10]
    keys[11] = b"\x11" * 16  # a new node
    keys[9] = b"\x09" * 16  # a new key for node 9
    del keys[10]  # node 10 removed
    save_keys(path, keys)
    again = load_registry(path)
    assert sorted(again.nodes) == [7, 8, 9, 11]
    assert again.extra == {"site": "Koper"}
    assert again.nodes[7] == registry.nodes[7]  # untouched, grace period included
    assert again.nodes[8] == registry.nodes[8]  # still revoked, still on record
    assert again.nodes[9] == NodeKeys(9, b"\x09" * 16, created=T0, extra={"name": "harbour"})
    assert again.nodes[11] == NodeKeys(11, b"\x11" * 16)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_save_registry_keeps_the_previous_version_as_bak(tmp_path):
    path = tmp_path / "keys.json"
    save_registry(path, Registry({7: NodeKeys(7, KEY7)}))
    assert not (tmp_path / "keys.json.bak").exists()
    first = path.read_bytes()
    save_registry(path, Registry({7: NodeKeys(7, KEY8)}))
    assert (tmp_path / "keys.json.bak").read_bytes() == first
    assert load_keys(path) == {7: KEY8}
    assert sorted(os.listdir(tmp_path)) == ["keys.json", "keys.json.bak"]


def test_save_registry_to_a_missing_directory_says_so(tmp_path):
    path = tmp_path / "nope" / "keys.json"
    with pytest.raises(KeyFileError, match="keys.json: cannot write: No such file or directory"):
        save_registry(path, Registry({7: NodeKeys(7, KEY7)}))


def test_load_registry_missing_ok(tmp_path):
    assert load_registry(tmp_path / "keys.json", missing_ok=True).nodes == {}
    with pytest.raises(KeyFileError, match="cannot read: No such file"):
        load_registry(tmp_path / "keys.json")


def test_lock_makes_read_modify_write_exclusive(tmp_path):
    """Eight writers that each add one node under locked(): no update is lost."""
    path = tmp_path / "keys.json"
    save_registry(path, Registry())
    start = threading.Barrier(8)

    def add(node_id):
        start.wait()
        with locked(path):
            registry = load_registry(path)
            time.sleep(0.01)  # widen the window a lost update would need
            registry.nodes[node_id] = NodeKeys(node_id, new_key())
            save_registry(path, registry)

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(load_registry(path).nodes) == list(range(8))


def test_new_keys_are_random_and_key_ids_do_not_show_the_key():
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100 and all(len(k) == 16 for k in keys)
    k = new_key()
    assert len(key_id(k)) == 16 and key_id(k) not in k.hex()
    # one fingerprint everywhere: people's (keys list, flash) and the replay windows' (receiver)
    assert receiver.key_id is key_id


metadata_times = st.one_of(st.none(), st.integers(0, 2**31 - 1))


@settings(deadline=None)  # file writes with fsync: slow on a busy disk
@given(
    st.dictionaries(
        st.integers(0, 0xFFFFFFFF),
        st.tuples(
            st.binary(min_size=16, max_size=16),
            metadata_times,
            metadata_times,
            st.one_of(st.none(), st.just(True), st.integers(0, 2**31 - 1)),
            st.one_of(st.none(), st.binary(min_size=16, max_size=16)),
        ),
        max_size=10,
    )
)
def test_registry_round_trip_property(tmp_path_factory, nodes):
    path = tmp_path_factory.mktemp("reg") / "keys.json"
    registry = Registry()
    for n, (key, created, rotated, revoked, previous) in nodes.items():
        until = T0 + HOUR if previous is not None else None
        registry.nodes[n] = NodeKeys(n, key, created, rotated, revoked, previous, until)
    save_registry(path, registry, now=T0)
    loaded = load_registry(path)
    for entry in registry.nodes.values():
        if not entry.active:  # a revoked node keeps no previous key
            entry.previous = entry.previous_until = None
    assert loaded.nodes == registry.nodes
    assert load_keys(path) == {n: e.key for n, e in registry.nodes.items() if e.active}

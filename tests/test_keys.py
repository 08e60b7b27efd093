# Tests for host_tools/keys.py: the JSON key file (load, atomic save, precise errors) and the
# single-key file accepted by `citynode decode`.

import json
import os
import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from host_tools.keys import KeyFileError, load_keys, load_keys_or_single, save_keys

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

# Key registry: each node's 16-byte tag key, kept in a JSON key file on the host.
# The receiver and `citynode decode` pick a frame's key here by the node id in its header.
#
# Format: {"nodes": {"<node_id>": {"key": "<32 hex chars>", ...}, ...}, ...}. Other fields (per
# node or at the top) are allowed and ignored, so provisioning can add names or locations.

import json
import os
import tempfile

KEY_BYTES = 16  # protocols/frame.py KEY_LEN: HMAC-SHA256 key, 128 bits
KEY_HEX = 2 * KEY_BYTES
_MAX_NODE_ID = 0xFFFFFFFF  # node ids are u32 varints on the wire


class KeyFileError(Exception):
    """A key file that cannot be read or is not valid; str() names the file and the place."""


def load_keys(path):
    """{node_id: key bytes} from a JSON key file. Raises KeyFileError."""
    return _parse_key_file(path, _read_text(path))


def load_keys_or_single(path):
    """For `citynode decode`: either a JSON key file -> ({node_id: key}, None), or a file holding
    just one key in hex (used for every node) -> ({}, key)."""
    text = _read_text(path)
    stripped = text.strip()
    if stripped.startswith("{"):
        return _parse_key_file(path, text), None
    if not stripped:
        raise KeyFileError("%s: file is empty (expected a JSON key file or one hex key)" % path)
    if "\n" in stripped or not _looks_hex(stripped):
        raise KeyFileError(
            "%s: neither a JSON key file (no leading '{') nor a single key of %d hex characters"
            % (path, KEY_HEX)
        )
    try:
        return {}, _parse_hex_key(stripped)
    except ValueError as e:
        raise KeyFileError("%s: %s" % (path, e)) from None


def save_keys(path, keys):
    """Write {node_id: key bytes} as a JSON key file, atomically (temp file, fsync, rename),
    readable by the owner only (mode 0600)."""
    nodes = {}
    for node_id in sorted(keys):
        key = keys[node_id]
        if isinstance(node_id, bool) or not isinstance(node_id, int):
            raise KeyFileError("%s: node id %r is not an integer" % (path, node_id))
        if not 0 <= node_id <= _MAX_NODE_ID:
            raise KeyFileError(
                "%s: node id %d is out of range 0..%d" % (path, node_id, _MAX_NODE_ID)
            )
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise KeyFileError("%s: node %d: key must be %d bytes" % (path, node_id, KEY_BYTES))
        nodes[str(node_id)] = {"key": bytes(key).hex()}
    data = (json.dumps({"nodes": nodes}, indent=2) + "\n").encode()

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".keys-", suffix=".tmp", dir=directory)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # The rename is durable only once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise KeyFileError("%s: cannot read: %s" % (path, e.strerror or e)) from None
    except UnicodeDecodeError as e:
        raise KeyFileError("%s: not UTF-8 text (byte %d)" % (path, e.start)) from None


def _no_duplicates(pairs):
    seen = {}
    for name, value in pairs:
        if name in seen:
            raise ValueError("duplicate name %s" % json.dumps(name))
        seen[name] = value
    return seen


def _parse_key_file(path, text):
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise KeyFileError(
            "%s: not valid JSON: %s at line %d column %d" % (path, e.msg, e.lineno, e.colno)
        ) from None
    except ValueError as e:  # from _no_duplicates
        raise KeyFileError("%s: %s" % (path, e)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), dict):
        raise KeyFileError('%s: expected a JSON object with a "nodes" object' % path)
    keys = {}
    for name, entry in doc["nodes"].items():
        node_id = _parse_node_id(path, name)
        if node_id in keys:
            raise KeyFileError("%s: node %d is listed twice (as %r)" % (path, node_id, name))
        if not isinstance(entry, dict) or "key" not in entry:
            raise KeyFileError('%s: node %d: expected an object with a "key"' % (path, node_id))
        try:
            keys[node_id] = _parse_hex_key(entry["key"])
        except ValueError as e:
            raise KeyFileError("%s: node %d: %s" % (path, node_id, e)) from None
    return keys


def _parse_node_id(path, name):
    if not (name.isascii() and name.isdigit()):
        raise KeyFileError("%s: node id %s is not a decimal integer" % (path, json.dumps(name)))
    node_id = int(name)
    if node_id > _MAX_NODE_ID:
        raise KeyFileError("%s: node id %s is out of range 0..%d" % (path, name, _MAX_NODE_ID))
    return node_id


def _looks_hex(s):
    return all(c in "0123456789abcdefABCDEF" for c in s)


def _parse_hex_key(value):
    if not isinstance(value, str):
        raise ValueError("key must be a string of %d hex characters" % KEY_HEX)
    if len(value) != KEY_HEX:
        raise ValueError(
            "key must be %d hex characters (%d bytes), got %d" % (KEY_HEX, KEY_BYTES, len(value))
        )
    for i, c in enumerate(value):
        if c not in "0123456789abcdefABCDEF":
            raise ValueError("key is not hex: %r at position %d" % (c, i + 1))
    return bytes.fromhex(value)

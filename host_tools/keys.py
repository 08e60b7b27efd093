# Key registry: each node's 16-byte tag key, kept in a JSON key file on the host.
# The receiver and `citynode decode` pick a frame's key here by the node id in its header;
# `citynode keys` adds, lists, rotates, revokes and exports keys (host_tools/commands/keys.py).
#
# Format: {"nodes": {"<node_id>": {"key": "<32 hex chars>", ...}, ...}, ...}. Fields this module
# manages, all optional (a file holding only "key"s is a valid registry):
#
#   "created":  "2025-06-01T10:00:00Z"  when `keys add` generated the key (UTC)
#   "rotated":  "2025-07-01T10:00:00Z"  when `keys rotate` last replaced it
#   "previous": {"key": "<hex>", "until": "2025-07-02T10:00:00Z"}
#               the key before the last rotation, still accepted until "until" so that frames
#               signed before the node was re-provisioned (in flight, or resent from its pending
#               readings) verify; dropped at the first write after it expires
#   "older":    [{"key": "<hex>", "until": ...}, ...] keys of earlier rotations whose grace has
#               not ended yet, newest first (a second rotation within a grace period must not
#               cut off a node still on the key before: every key stays until its own "until")
#   "revoked":  "2025-08-01T10:00:00Z"  (or true) the node's frames are refused; its key stays
#               in the file for the record, but load_keys() and load_accepted_keys() leave it out
#
# Other fields (per node or at the top) are allowed and kept as they are, so provisioning can
# add names or locations. Writes are atomic (temp file, fsync, rename) and the file is created
# with mode 0600: there is never a moment when another user can read it.

import calendar
import contextlib
import hashlib
import json
import os
import stat
import tempfile
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

KEY_BYTES = 16  # protocols/frame.py KEY_LEN: HMAC-SHA256 key, 128 bits
KEY_HEX = 2 * KEY_BYTES
_MAX_NODE_ID = 0xFFFFFFFF  # node ids are u32 varints on the wire
DEFAULT_GRACE_S = 24 * 3600  # how long a rotated-out key is still accepted (`keys rotate`)
_MANAGED = ("key", "created", "rotated", "previous", "older", "revoked")


class KeyFileError(Exception):
    """A key file that cannot be read or is not valid; str() names the file and the place."""


class NodeKeys:
    """One node's entry in the registry. Times are unix seconds (UTC) or None when unknown."""

    def __init__(
        self,
        node_id,
        key,
        created=None,
        rotated=None,
        revoked=None,
        previous=None,
        previous_until=None,
        extra=None,
    ):
        self.node_id = node_id
        self.key = key
        self.created = created
        self.rotated = rotated
        self.revoked = revoked  # None: active; a time, or True when the time is not known
        self.previous = previous  # the key before the last rotation, or None
        self.previous_until = previous_until  # accepted until this time
        self.older = []  # [(key, until)] of earlier rotations, newest first
        self.extra = dict(extra or {})  # fields this module does not manage, kept on save

    @property
    def active(self):
        return self.revoked is None

    def accepted_keys(self, now):
        """Keys a frame from this node may be signed with at `now`: current key first."""
        if not self.active:
            return ()
        keys = [self.key]
        if self.previous is not None and self.previous_until is not None:
            if now < self.previous_until:
                keys.append(self.previous)
        keys.extend(k for k, until in self.older if now < until)
        return tuple(keys)

    def rotate(self, new_key, now, grace_s):
        """Make new_key current. With grace_s > 0 the current key stays accepted for grace_s,
        and keys of earlier rotations stay until their own grace ends."""
        if grace_s > 0:
            if self.previous is not None and self.previous_until is not None:
                if now < self.previous_until:
                    self.older.insert(0, (self.previous, self.previous_until))
            self.older = [(k, until) for k, until in self.older if now < until]
            self.previous, self.previous_until = self.key, now + grace_s
        else:
            self.previous = self.previous_until = None
            self.older = []
        self.key = new_key

    def __eq__(self, other):
        return isinstance(other, NodeKeys) and vars(self) == vars(other)

    def __repr__(self):
        return "NodeKeys(%d, key_id=%s, active=%s)" % (self.node_id, key_id(self.key), self.active)


class Registry:
    """The whole key file: nodes by id, plus top-level fields kept as they are."""

    def __init__(self, nodes=None, extra=None):
        self.nodes = dict(nodes or {})
        self.extra = dict(extra or {})


def key_id(key):
    """A short name for a key that does not give it away: the first 8 bytes of its SHA-256, in
    hex (16 digits). People compare keys with it (host vs board: `citynode flash`, `keys list`)
    without printing secrets, and receivers store it beside each node's replay window to tell
    whose window it is (host_tools/receive/receiver.py ReplayStore, pg.py)."""
    return hashlib.sha256(key).hexdigest()[:16]


def new_key():
    """A fresh 128-bit key from the operating system's cryptographic source."""
    import secrets

    return secrets.token_bytes(KEY_BYTES)


# --- loading ------------------------------------------------------------------------------


def load_keys(path, private=False):
    """{node_id: key bytes} of the active (not revoked) nodes in a JSON key file.
    With private=True, refuse a file that group or others can read (check_private).
    Raises KeyFileError."""
    registry = _parse_key_file(path, _read_text(path, private))
    return {n: e.key for n, e in registry.nodes.items() if e.active}


def load_registry(path, private=True, missing_ok=False):
    """The whole Registry (revoked nodes and rotation history included). Refuses a file that
    group or others can read unless private=False. With missing_ok, a missing file is an empty
    registry. Raises KeyFileError."""
    if missing_ok and not os.path.lexists(path):
        return Registry()
    return _parse_key_file(path, _read_text(path, private))


def load_accepted_keys(path, now=None, private=False):
    """{node_id: (key, ...)}: every key a frame from an active node may be signed with at `now`
    (default: the current time): the current key, then the key rotated out, during its grace
    period. What a verifier that honours rotation needs. Raises KeyFileError."""
    now = time.time() if now is None else now
    registry = _parse_key_file(path, _read_text(path, private))
    accepted = {}
    for node_id, entry in registry.nodes.items():
        keys = entry.accepted_keys(now)
        if keys:
            accepted[node_id] = keys
    return accepted


def load_keys_or_single(path, private=False):
    """For `citynode decode`: either a JSON key file -> ({node_id: key}, None), or a file holding
    just one key in hex (used for every node) -> ({}, key). Revoked nodes are left out."""
    text = _read_text(path, private)
    stripped = text.strip()
    if stripped.startswith("{"):
        registry = _parse_key_file(path, text)
        return {n: e.key for n, e in registry.nodes.items() if e.active}, None
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


def check_private(path, st=None):
    """Raise KeyFileError if group or others may read or write the key file (as ssh refuses an
    unprotected private key). A no-op where POSIX permissions do not exist."""
    if os.name != "posix":  # pragma: no cover
        return
    if st is None:
        try:
            st = os.stat(path)
        except OSError as e:
            raise KeyFileError("%s: cannot read: %s" % (path, e.strerror or e)) from None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        who = []
        for name, shift in (("group", 3), ("others", 0)):
            bits = (mode >> shift) & 7
            if bits:
                can = [
                    verb for bit, verb in ((4, "read"), (2, "write"), (1, "execute")) if bits & bit
                ]
                who.append("%s (%s)" % (name, ", ".join(can)))
        raise KeyFileError(
            "%s: mode %04o gives access to %s; a key file must be private to its owner. "
            "Fix: chmod 600 %s (and rotate the keys if someone else may have read them)"
            % (path, mode, " and ".join(who), _shell_quote(path))
        )


# --- saving -------------------------------------------------------------------------------


def save_keys(path, keys):
    """Write {node_id: key bytes} as a JSON key file, atomically (temp file, fsync, rename),
    readable by the owner only (mode 0600).

    If path already holds a valid registry, what load_keys() does not show is kept, so that
    load_keys() -> change -> save_keys() loses nothing: the entries of revoked nodes, and the
    other fields of each node given (for a node whose key changed, all but "previous").
    Active nodes left out of `keys` are removed."""
    for node_id in keys:
        _check_entry(path, node_id, keys[node_id])
    try:
        old = _parse_key_file(path, _read_text(path))
    except KeyFileError:  # no file, or not a registry: written afresh, as before
        old = Registry()
    nodes = {}
    for node_id, entry in old.nodes.items():
        if not entry.active and node_id not in keys:
            nodes[node_id] = entry
    for node_id in keys:
        key = bytes(keys[node_id])
        entry = old.nodes.get(node_id)
        if entry is None:
            entry = NodeKeys(node_id, key)
        elif entry.key != key or not entry.active:
            entry = NodeKeys(node_id, key, created=entry.created, extra=entry.extra)
        nodes[node_id] = entry
    save_registry(path, Registry(nodes, old.extra), backup=False)


def save_registry(path, registry, now=None, backup=True):
    """Write a Registry atomically with mode 0600. Expired previous keys are dropped. With
    backup, the file being replaced is first kept as `<path>.bak` (also 0600, also atomic)."""
    now = time.time() if now is None else now
    doc = dict(registry.extra)
    nodes = {}
    for node_id in sorted(registry.nodes):
        entry = registry.nodes[node_id]
        _check_entry(path, node_id, entry.key)
        obj = {"key": bytes(entry.key).hex()}
        if entry.created is not None:
            obj["created"] = format_time(entry.created)
        if entry.rotated is not None:
            obj["rotated"] = format_time(entry.rotated)
        if entry.previous is not None and entry.active:
            if entry.previous_until is not None and now < entry.previous_until:
                _check_entry(path, node_id, entry.previous)
                obj["previous"] = {
                    "key": bytes(entry.previous).hex(),
                    "until": format_time(entry.previous_until),
                }
        if entry.active:
            older = [(k, until) for k, until in entry.older if now < until]
            for k, _ in older:
                _check_entry(path, node_id, k)
            if older:
                obj["older"] = [
                    {"key": bytes(k).hex(), "until": format_time(until)} for k, until in older
                ]
        if entry.revoked is True:
            obj["revoked"] = True
        elif entry.revoked is not None:
            obj["revoked"] = format_time(entry.revoked)
        for name, value in entry.extra.items():
            if name not in _MANAGED:
                obj[name] = value
        nodes[str(node_id)] = obj
    doc["nodes"] = nodes
    data = (json.dumps(doc, indent=2) + "\n").encode()
    if backup:
        try:
            with open(path, "rb") as f:
                old = f.read()
        except FileNotFoundError:
            old = None
        except OSError as e:
            raise KeyFileError("%s: cannot read: %s" % (path, e.strerror or e)) from None
        if old is not None:
            write_private(backup_path(path), old)
    write_private(path, data)


def backup_path(path):
    return "%s.bak" % os.fspath(path)


def write_private(path, data):
    """Replace path with data atomically: a temp file in the same directory, created with mode
    0600 (mkstemp), written, fsynced, renamed over path; then the directory is fsynced."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".keys-", suffix=".tmp", dir=directory)  # mode 0600
    except OSError as e:
        raise KeyFileError("%s: cannot write: %s" % (path, e.strerror or e)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise KeyFileError("%s: cannot write: %s" % (path, e.strerror or e)) from None
        raise
    # The rename is durable only once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock for a read-modify-write of the registry at path, so that two
    `citynode keys` (or `flash`) commands run at once cannot lose each other's change. The
    lock is a separate file (`<path>.lock`) because the registry itself is replaced on every
    write."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    lock_path = "%s.lock" % os.fspath(path)  # the name `citynode flash` locks too
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise KeyFileError("%s: cannot create lock file: %s" % (lock_path, e.strerror)) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- times --------------------------------------------------------------------------------


def format_time(ts):
    """Unix seconds -> "2025-06-01T10:00:00Z" (UTC, whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


def parse_time(text):
    """ "2025-06-01T10:00:00Z" -> unix seconds. ValueError if it is not that shape."""
    if not isinstance(text, str):
        raise ValueError('expected a time such as "2025-06-01T10:00:00Z", got %s' % _js(text))
    try:
        return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        raise ValueError(
            'expected a time such as "2025-06-01T10:00:00Z", got %s' % _js(text)
        ) from None


# --- parsing ------------------------------------------------------------------------------


def _read_text(path, private=False):
    try:
        with open(path, "rb") as f:
            if private:
                check_private(path, os.fstat(f.fileno()))
            data = f.read()
    except OSError as e:
        raise KeyFileError("%s: cannot read: %s" % (path, e.strerror or e)) from None
    try:
        return data.decode("utf-8")
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
    except RecursionError:
        raise KeyFileError("%s: not valid JSON: nested too deeply" % path) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), dict):
        raise KeyFileError('%s: expected a JSON object with a "nodes" object' % path)
    nodes = {}
    for name, entry in doc["nodes"].items():
        node_id = _parse_node_id(path, name)
        if node_id in nodes:
            raise KeyFileError("%s: node %d is listed twice (as %r)" % (path, node_id, name))
        nodes[node_id] = _parse_entry(path, node_id, entry)
    return Registry(nodes, {k: v for k, v in doc.items() if k != "nodes"})


def _parse_entry(path, node_id, entry):
    if not isinstance(entry, dict) or "key" not in entry:
        raise KeyFileError('%s: node %d: expected an object with a "key"' % (path, node_id))

    def fail(message):
        return KeyFileError("%s: node %d: %s" % (path, node_id, message))

    try:
        key = _parse_hex_key(entry["key"])
    except ValueError as e:
        raise fail(str(e)) from None
    times = {}
    for name in ("created", "rotated"):
        value = entry.get(name)
        try:
            times[name] = None if value is None else parse_time(value)
        except ValueError as e:
            raise fail('"%s": %s' % (name, e)) from None
    revoked = entry.get("revoked")
    if revoked is None or revoked is False:
        revoked = None
    elif revoked is not True:
        try:
            revoked = parse_time(revoked)
        except ValueError:
            raise fail(
                '"revoked": expected a time such as "2025-08-01T10:00:00Z" or true, got %s'
                % _js(revoked)
            ) from None
    previous = until = None
    prev = entry.get("previous")
    if prev is not None:
        if not isinstance(prev, dict) or "key" not in prev or "until" not in prev:
            raise fail('"previous": expected an object with a "key" and an "until"')
        try:
            previous = _parse_hex_key(prev["key"])
        except ValueError as e:
            raise fail('"previous": %s' % e) from None
        try:
            until = parse_time(prev["until"])
        except ValueError as e:
            raise fail('"previous": "until": %s' % e) from None
    older = []
    raw_older = entry.get("older", [])
    if not isinstance(raw_older, list):
        raise fail('"older": expected a list of objects with a "key" and an "until"')
    for item in raw_older:
        if not isinstance(item, dict) or "key" not in item or "until" not in item:
            raise fail('"older": expected a list of objects with a "key" and an "until"')
        try:
            older.append((_parse_hex_key(item["key"]), parse_time(item["until"])))
        except ValueError as e:
            raise fail('"older": %s' % e) from None
    extra = {k: v for k, v in entry.items() if k not in _MANAGED}
    node = NodeKeys(
        node_id, key, times["created"], times["rotated"], revoked, previous, until, extra
    )
    node.older = older
    return node


def _check_entry(path, node_id, key):
    if isinstance(node_id, bool) or not isinstance(node_id, int):
        raise KeyFileError("%s: node id %r is not an integer" % (path, node_id))
    if not 0 <= node_id <= _MAX_NODE_ID:
        raise KeyFileError("%s: node id %d is out of range 0..%d" % (path, node_id, _MAX_NODE_ID))
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise KeyFileError("%s: node %d: key must be %d bytes" % (path, node_id, KEY_BYTES))


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


def _js(value):
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _shell_quote(path):
    import shlex

    return shlex.quote(os.fspath(path))

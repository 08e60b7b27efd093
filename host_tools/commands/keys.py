# `citynode keys`: the key registry (host_tools/keys.py) from the command line: add nodes with
# fresh 128-bit keys, list them without their secrets, rotate, revoke, export one for a board.

import argparse
import json
import os
import sys
import time

from host_tools import keys as registry_file
from host_tools.commands import CliError

ENV_KEYS = "CITYNODE_KEYS"
DEFAULT_KEYS = "keys.json"
_MAX_NODE_ID = 0xFFFFFFFF


def default_keys_path():
    return os.environ.get(ENV_KEYS) or DEFAULT_KEYS


def node_id_arg(text):
    """argparse type: a node id as on the wire, a decimal u32."""
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError("node id %r is not a decimal integer" % text)
    value = int(text)
    if value > _MAX_NODE_ID:
        raise argparse.ArgumentTypeError("node id %s is out of range 0..%d" % (text, _MAX_NODE_ID))
    return value


def hours_arg(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of hours, got %r" % text) from None
    if not 0 <= value <= 24 * 366:  # also refuses nan and inf
        raise argparse.ArgumentTypeError("grace period must be 0..8784 hours, got %s" % text)
    return value


def add_arguments(p):
    p.description = (
        "The key registry is a JSON file (default ./%s, or $%s), mode 0600. Keys come from the "
        "operating system's cryptographic source (Python's secrets). Every change is written "
        "atomically, and the version it replaces is kept as FILE.bak." % (DEFAULT_KEYS, ENV_KEYS)
    )
    keys_help = "key registry (default: $%s, else ./%s)" % (ENV_KEYS, DEFAULT_KEYS)
    p.add_argument("--keys", metavar="FILE", default=None, help=keys_help)
    sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")

    def action(name, help_text, description=None):
        q = sub.add_parser(name, help=help_text, description=description or help_text)
        # Also after the action (`citynode keys add 17 --keys FILE`); SUPPRESS keeps a value
        # given before the action.
        q.add_argument("--keys", metavar="FILE", default=argparse.SUPPRESS, help=keys_help)
        return q

    q = action(
        "add",
        "add nodes, each with a new random key",
        "Add nodes, each with a new random 128-bit key; creates the registry if needed. "
        "An id already in the registry (even revoked) is refused: ids are not reused.",
    )
    q.add_argument("node_ids", nargs="+", type=node_id_arg, metavar="N", help="node id (u32)")
    q.add_argument("--json", action="store_true", help="print the new entries as JSON")

    q = action(
        "list",
        "list nodes (keys hidden unless --show-secrets)",
        "List the nodes. Keys are shown by key id (first 4 bytes of their SHA-256, to compare "
        "with a board's) unless --show-secrets is given.",
    )
    q.add_argument("--json", action="store_true", help="print a JSON array")
    q.add_argument("--show-secrets", action="store_true", help="also print the keys in hex")

    q = action(
        "rotate",
        "give a node a new key; the old one is accepted for a grace period",
        "Give a node a new key. The old key is kept as the node's previous key and still "
        "accepted for --grace hours, so frames the node signed before it was re-provisioned "
        "verify. Re-provision the node with `citynode keys export N`.",
    )
    q.add_argument("node_id", type=node_id_arg, metavar="N", help="node id")
    q.add_argument(
        "--grace",
        type=hours_arg,
        default=registry_file.DEFAULT_GRACE_S / 3600,
        metavar="HOURS",
        help="how long the old key stays accepted (default %(default)g; 0: not at all)",
    )
    q.add_argument(
        "--reinstate",
        action="store_true",
        help="rotate a revoked node: new key, accepted again (its old key is not)",
    )
    q.add_argument("--json", action="store_true", help="print the entry as JSON")

    q = action(
        "revoke",
        "refuse a node's frames from now on",
        "Revoke a node: receivers stop accepting its frames (its current and previous keys). "
        "The entry stays in the registry for the record; `rotate --reinstate` undoes it.",
    )
    q.add_argument("node_id", type=node_id_arg, metavar="N", help="node id")
    q.add_argument("--json", action="store_true", help="print the entry as JSON")

    q = action(
        "export",
        "print a node's key in hex, for provisioning",
        "Print a node's key as 32 hex characters (the \"key\" of the board's config.json).",
    )
    q.add_argument("node_id", type=node_id_arg, metavar="N", help="node id")
    q.add_argument("--json", action="store_true", help='print {"node_id": N, "key": "<hex>"}')

    q = action(
        "push",
        "copy the registry into PostgreSQL, for receivers started with --keys postgresql://...",
        "Make the node keys in a PostgreSQL database exactly the registry's (nodes not in the "
        "file are removed there): several `citynode receive --keys postgresql://...` then share "
        "them, rotations and revocations included; they read them again within 10 s.",
    )
    q.add_argument("url", metavar="URL", help="postgresql://USER@HOST[:PORT]/DB")


def run(args, now=None):
    path = args.keys or default_keys_path()
    now = int(time.time()) if now is None else now  # the registry keeps whole seconds
    handler = {
        "add": _add,
        "list": _list,
        "rotate": _rotate,
        "revoke": _revoke,
        "export": _export,
        "push": _push,
    }[args.keys_command]
    return handler(args, path, now)


# --- actions ------------------------------------------------------------------------------


def _add(args, path, now):
    seen = set()
    for n in args.node_ids:
        if n in seen:
            raise CliError("node %d is given twice" % n)
        seen.add(n)
    with registry_file.locked(path):
        registry = _load(path, missing_ok=True)
        for n in args.node_ids:
            entry = registry.nodes.get(n)
            if entry is not None:
                state = "" if entry.active else " (revoked)"
                raise CliError(
                    "%s: node %d is already in the registry%s; nothing added "
                    "(`citynode keys rotate %d` gives it a new key)" % (path, n, state, n)
                )
        added = []
        for n in args.node_ids:
            entry = registry_file.NodeKeys(n, registry_file.new_key(), created=now)
            registry.nodes[n] = entry
            added.append(entry)
        registry_file.save_registry(path, registry, now=now)
    _report(args, added, now, "added")
    return 0


def _push(args, path, now):
    from host_tools.receive.pg import PgKeyStore
    from host_tools.receive.sinks import SinkError

    if not args.url.startswith(("postgresql://", "postgres://")):
        raise CliError("push: expected a postgresql:// URL, got %r" % args.url)
    registry = _load(path)
    try:
        store = PgKeyStore(args.url)
        try:
            added, changed, removed = store.import_registry(registry)
        finally:
            store.close()
    except (SinkError, registry_file.KeyFileError) as e:
        raise CliError(str(e)) from None
    print(
        "%s: %d node(s) pushed: %d added, %d changed, %d removed"
        % (path, len(registry.nodes), added, changed, removed),
        file=sys.stderr,
    )
    return 0


def _list(args, path, now):
    registry = _load(path)
    entries = [registry.nodes[n] for n in sorted(registry.nodes)]
    if args.json:
        objects = [_entry_object(e, now, args.show_secrets) for e in entries]
        print(json.dumps(objects, indent=2))
        return 0
    if not entries:
        print("%s: no nodes (add one with `citynode keys add N`)" % path, file=sys.stderr)
        return 0
    headers = ["node", "status", "key id", "created", "rotated", "previous key"]
    if args.show_secrets:
        headers.append("key")
    rows = []
    for e in entries:
        row = [
            str(e.node_id),
            _status(e),
            registry_file.key_id(e.key),
            _time_or_dash(e.created),
            _time_or_dash(e.rotated),
            _previous_text(e, now),
        ]
        if args.show_secrets:
            row.append(e.key.hex())
        rows.append(row)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _rotate(args, path, now):
    n = args.node_id
    with registry_file.locked(path):
        registry = _load(path)
        entry = _entry(registry, path, n)
        if not entry.active and not args.reinstate:
            raise CliError(
                "%s: node %d is revoked; `citynode keys rotate %d --reinstate` gives it a new "
                "key and accepts it again" % (path, n, n)
            )
        if entry.active and args.reinstate:
            raise CliError(
                "%s: node %d is not revoked; --reinstate is for revoked nodes" % (path, n)
            )
        # Every key whose grace has not ended stays accepted: a second rotation within a grace
        # period must not cut off a node that is still on the key before.
        entry.rotate(registry_file.new_key(), now, args.grace * 3600 if entry.active else 0)
        entry.rotated = now
        entry.revoked = None
        registry_file.save_registry(path, registry, now=now)
    _report(args, [entry], now, "rotated")
    return 0


def _revoke(args, path, now):
    n = args.node_id
    with registry_file.locked(path):
        registry = _load(path)
        entry = _entry(registry, path, n)
        if not entry.active:
            raise CliError("%s: node %d is already revoked (%s)" % (path, n, _status(entry)))
        entry.revoked = now
        entry.previous = entry.previous_until = None  # a revoked node has no accepted key
        entry.older = []
        registry_file.save_registry(path, registry, now=now)
    _report(args, [entry], now, "revoked")
    return 0


def _export(args, path, now):
    registry = _load(path)
    entry = _entry(registry, path, args.node_id)
    if not entry.active:
        raise CliError(
            "%s: node %d is revoked (%s); its key is not exported"
            % (path, args.node_id, _status(entry))
        )
    if args.json:
        print(json.dumps({"node_id": entry.node_id, "key": entry.key.hex()}))
    else:
        print(entry.key.hex())
    return 0


# --- helpers ------------------------------------------------------------------------------


def _load(path, missing_ok=False):
    if not os.path.lexists(path):
        if missing_ok:
            return registry_file.Registry()
        raise CliError(
            "%s: no such key registry (create it with `citynode keys add N`, or give --keys FILE"
            " or $%s)" % (path, ENV_KEYS)
        )
    registry_file.check_private(path)  # KeyFileError: printed as is, exit 2
    try:
        return registry_file.load_registry(path, private=True)
    except registry_file.KeyFileError as e:
        message = str(e)
        bak = registry_file.backup_path(path)
        if "cannot read" not in message and os.path.exists(bak):
            message += "; the version before the last change is in %s" % bak
        raise CliError(message) from None


def _entry(registry, path, n):
    entry = registry.nodes.get(n)
    if entry is None:
        raise CliError("%s: no node %d (add it with `citynode keys add %d`)" % (path, n, n))
    return entry


def _status(entry):
    if entry.active:
        return "active"
    if entry.revoked is True:
        return "revoked"
    return "revoked " + registry_file.format_time(entry.revoked)


def _time_or_dash(ts):
    return "-" if ts is None else registry_file.format_time(ts)


def _previous_text(entry, now):
    if entry.previous is None or entry.previous_until is None or not entry.active:
        return "-"
    state = "accepted until" if now < entry.previous_until else "expired"
    return "%s %s %s" % (
        registry_file.key_id(entry.previous),
        state,
        registry_file.format_time(entry.previous_until),
    )


def _entry_object(entry, now, secrets=False):
    obj = {
        "node_id": entry.node_id,
        "status": "active" if entry.active else "revoked",
        "key_id": registry_file.key_id(entry.key),
        "created": None if entry.created is None else registry_file.format_time(entry.created),
        "rotated": None if entry.rotated is None else registry_file.format_time(entry.rotated),
        "revoked": None,
        "previous": None,
    }
    if entry.revoked is True:
        obj["revoked"] = True
    elif entry.revoked is not None:
        obj["revoked"] = registry_file.format_time(entry.revoked)
    if secrets:
        obj["key"] = entry.key.hex()
    if entry.active and entry.previous is not None and entry.previous_until is not None:
        prev = {
            "key_id": registry_file.key_id(entry.previous),
            "until": registry_file.format_time(entry.previous_until),
            "accepted": now < entry.previous_until,
        }
        if secrets:
            prev["key"] = entry.previous.hex()
        obj["previous"] = prev
    for name, value in entry.extra.items():
        obj.setdefault(name, value)
    return obj


def _report(args, entries, now, verb):
    if args.json:
        print(json.dumps([_entry_object(e, now) for e in entries], indent=2))
        return
    for e in entries:
        line = "%s node %d (key id %s)" % (verb, e.node_id, registry_file.key_id(e.key))
        if verb == "rotated" and e.previous is not None:
            line += "; old key %s accepted until %s" % (
                registry_file.key_id(e.previous),
                registry_file.format_time(e.previous_until),
            )
        print(line)

# `citynode decode`: hex frames (arguments or stdin) to one JSON object per reading.

import json
import math
import sys
import time

from host_tools.commands import CliError
from host_tools.keys import load_keys_or_single
from host_tools.receive.receiver import iter_readings
from host_tools.utc import iso_utc
from protocols import frame, uplink


def _rx_time(text):
    """--rx-time: finite unix seconds whose date a datetime can hold. Parsed here rather than
    by argparse so that every bad value is one `citynode: --rx-time: ...` line."""
    try:
        ts = float(text)
    except ValueError:
        raise CliError("--rx-time: expected unix seconds, got %r" % text) from None
    if not math.isfinite(ts):
        raise CliError("--rx-time: expected a finite number of unix seconds, got %r" % text)
    try:
        iso_utc(ts)
    except ValueError as e:
        raise CliError("--rx-time: %s is %s" % (text, e)) from None
    return ts


def add_arguments(p):
    p.add_argument(
        "frames",
        nargs="*",
        metavar="HEX",
        help="frames in hex; if none, read one frame per line from stdin (blank lines skipped)",
    )
    p.add_argument(
        "--keys",
        required=True,
        metavar="FILE",
        help="JSON key file, or a file holding one 32-hex-character key used for every node",
    )
    p.add_argument(
        "--rx-time",
        metavar="UNIX",
        help="when the frames were received, unix seconds UTC (default: now); "
        "a reading's ts = rx-time - age",
    )


def _parse_hex(text):
    digits = "".join(text.split())
    if not digits:
        raise CliError("not hex: empty")
    for i, c in enumerate(digits):
        if c not in "0123456789abcdefABCDEF":
            raise CliError("not hex: %r at position %d" % (c, i + 1))
    if len(digits) % 2:
        raise CliError("not hex: odd number of hex digits (%d)" % len(digits))
    return bytes.fromhex(digits)


class _FrameDecoder:
    """Decodes one hex frame at a time into JSON-ready objects, with one Signer per key."""

    def __init__(self, keys, default_key, keys_path, rx_time):
        self.keys = keys
        self.default_key = default_key
        self.keys_path = keys_path
        self.rx_time = rx_time
        self._signers = {}

    def _signer(self, node_id):
        key = self.keys.get(node_id, self.default_key)
        if key is None:
            raise CliError("no key for node %d in %s" % (node_id, self.keys_path))
        signer = self._signers.get(key)
        if signer is None:
            signer = self._signers[key] = frame.Signer(key)
        return signer

    def decode(self, text):
        buf = _parse_hex(text)
        try:
            _, _, node_id = uplink.peek(buf)
        except frame.FrameError as e:
            raise CliError(str(e)) from None
        signer = self._signer(node_id)
        try:
            decoded = uplink.decode(buf, signer)
        except frame.FrameError as e:
            if e.reason == "tag":
                raise CliError(
                    "bad tag for node %d (wrong key or corrupted frame)" % node_id
                ) from None
            raise CliError("node %d: %s" % (node_id, e)) from None
        return self._objects(decoded)

    def _objects(self, decoded):
        if isinstance(decoded, uplink.DataFrame):
            objects = []
            per_reading = len(decoded.channels)
            for k, (age, ts, name, value) in enumerate(iter_readings(decoded, self.rx_time)):
                try:
                    time_text = iso_utc(ts)
                except ValueError as e:  # an --rx-time near year 1 or 9999
                    raise CliError(
                        "node %d: a reading %d s old: --rx-time minus its age, %r, is %s"
                        % (decoded.node_id, age, ts, e)
                    ) from None
                # v1: the frame's seq; v2: the reading's index (its identity, with node_id)
                if decoded.index is None:
                    ident = ("seq", decoded.seq)
                else:
                    ident = ("reading_index", decoded.index + k // per_reading)
                objects.append(
                    {
                        "node_id": decoded.node_id,
                        ident[0]: ident[1],
                        "quantity": name,
                        "value": value,
                        "age_s": age,
                        "ts": ts,
                        "time": time_text,
                    }
                )
            return objects
        if isinstance(decoded, uplink.Ack):
            return [
                {
                    "type": "ack",
                    "node_id": decoded.node_id,
                    "host_time": decoded.host_time,
                    "time": iso_utc(decoded.host_time),
                    "acked": [list(r) for r in decoded.acked],
                    **({} if decoded.echo is None else {"echo": decoded.echo.hex()}),
                }
            ]
        fields = {
            uplink.STATUS_FIELDS.get(f, "field_%d" % f): v for f, v in decoded.fields.items()
        }
        return [
            {"type": "status", "node_id": decoded.node_id, "seq": decoded.seq, "fields": fields}
        ]


def run(args):
    rx_time = _rx_time(args.rx_time) if args.rx_time is not None else time.time()
    # a key file must be private to its owner (README), as `receive` and `monitor` require
    keys, default_key = load_keys_or_single(args.keys, private=True)
    decoder = _FrameDecoder(keys, default_key, args.keys, rx_time)
    if args.frames:
        numbered = [(n, text, "") for n, text in enumerate(args.frames, 1)]
    elif sys.stdin.isatty():
        raise CliError("no frames: give HEX arguments or pipe frames on stdin, one per line")
    else:
        numbered = _stdin_frames(sys.stdin)
    bad = 0
    for n, text, where in numbered:
        try:
            objects = decoder.decode(text)
        except CliError as e:
            bad += 1
            sys.stdout.flush()  # keep stdout and stderr in order on a terminal
            print("citynode: frame %d%s: %s" % (n, where, e), file=sys.stderr)
            continue
        for obj in objects:
            print(json.dumps(obj))
    return 2 if bad else 0


def _stdin_frames(stream):
    n = 0
    for line_no, line in enumerate(stream, 1):
        if line.strip():
            n += 1
            yield n, line.strip(), "" if line_no == n else " (line %d)" % line_no

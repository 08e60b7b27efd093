# The `citynode` command: one table of commands, one handler each, one error type (CliError)
# that prints `citynode: message` and exits 2. Run as `citynode` or `python -m host_tools.cli`.

import argparse
import collections
import datetime
import json
import logging
import os
import signal
import socket
import sys
import threading
import time

from host_tools.keys import KeyFileError, load_keys, load_keys_or_single
from host_tools.receiver import Receiver, Verifier, iter_readings, serve_udp
from host_tools.sinks import JsonlSink, SinkError, SqliteSink, TeeSink
from protocols import frame, uplink

DEFAULT_DB = "citynode.db"
DEFAULT_UDP = "0.0.0.0:1700"
REPORT_EVERY_S = 60.0

log = logging.getLogger("citynode")


class CliError(Exception):
    """Anything the user can fix; main() prints it as `citynode: message` and exits 2."""


def _iso_utc(ts):
    dt = datetime.datetime.fromtimestamp(ts, tz=datetime.UTC)
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- decode -----------------------------------------------------------------------------


def add_decode_args(p):
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
        type=float,
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
            _, _, node_id = frame.peek(buf)
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
            return [
                {
                    "node_id": decoded.node_id,
                    "seq": decoded.seq,
                    "quantity": name,
                    "value": value,
                    "age_s": age,
                    "ts": ts,
                    "time": _iso_utc(ts),
                }
                for age, ts, name, value in iter_readings(decoded, self.rx_time)
            ]
        if isinstance(decoded, frame.Ack):
            return [
                {
                    "type": "ack",
                    "node_id": decoded.node_id,
                    "host_time": decoded.host_time,
                    "time": _iso_utc(decoded.host_time),
                    "acked": [list(r) for r in decoded.acked],
                }
            ]
        fields = {
            uplink.STATUS_FIELDS.get(f, "field_%d" % f): v for f, v in decoded.fields.items()
        }
        return [
            {"type": "status", "node_id": decoded.node_id, "seq": decoded.seq, "fields": fields}
        ]


def cmd_decode(args):
    keys, default_key = load_keys_or_single(args.keys)
    rx_time = args.rx_time if args.rx_time is not None else time.time()
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


# --- receive ----------------------------------------------------------------------------


def add_receive_args(p):
    p.add_argument("--keys", required=True, metavar="FILE", help="JSON key file")
    p.add_argument(
        "--udp",
        default=DEFAULT_UDP,
        metavar="HOST:PORT",
        help="address to listen on (default %s; port 0 picks a free one)" % DEFAULT_UDP,
    )
    p.add_argument(
        "--db",
        metavar="PATH",
        help="SQLite file (default %s unless --jsonl is given)" % DEFAULT_DB,
    )
    p.add_argument("--jsonl", metavar="-|FILE", help="also (or only) append JSON lines here")


def _parse_host_port(text):
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1]:1700
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise CliError("--udp: expected HOST:PORT, got %r" % text)
    return host, int(port)


def _bind_udp(text):
    host, port = _parse_host_port(text)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except socket.gaierror as e:
        raise CliError("--udp: cannot resolve %r: %s" % (host, e.strerror)) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise CliError("cannot listen on udp %s: %s" % (text, e.strerror or e)) from None
    return sock


def _open_sinks(args):
    sinks = []
    try:
        if args.db or not args.jsonl:
            sinks.append(SqliteSink(args.db or DEFAULT_DB))
        if args.jsonl == "-":
            sinks.append(JsonlSink(sys.stdout))
        elif args.jsonl:
            try:
                stream = open(args.jsonl, "a", encoding="utf-8")
            except OSError as e:
                raise CliError("--jsonl %s: %s" % (args.jsonl, e.strerror or e)) from None
            sinks.append(JsonlSink(stream))
    except BaseException:
        for sink in sinks:
            sink.close()
        raise
    return sinks[0] if len(sinks) == 1 else TeeSink(sinks)


def cmd_receive(args):
    keys = load_keys(args.keys)
    if not keys:
        raise CliError("%s: no nodes, so every frame would be rejected" % args.keys)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    sock = _bind_udp(args.udp)
    try:
        sink = _open_sinks(args)
    except BaseException:
        sock.close()
        raise
    receiver = Receiver(Verifier(keys), sink)
    stop = threading.Event()
    report = {"now": False, "next": time.monotonic() + REPORT_EVERY_S}

    def on_poll():
        if report["now"] or time.monotonic() >= report["next"]:
            report["now"] = False
            report["next"] = time.monotonic() + REPORT_EVERY_S
            log.info("counters: %s", receiver.counters_line())

    def on_stop(signum, _frame):
        stop.set()

    def on_usr1(signum, _frame):
        report["now"] = True  # logged from the loop, not from inside the signal handler

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum, handler in [
            (signal.SIGINT, on_stop),
            (signal.SIGTERM, on_stop),
            (getattr(signal, "SIGUSR1", None), on_usr1),
        ]:
            if signum is not None:
                previous[signum] = signal.signal(signum, handler)
    try:
        host, port = sock.getsockname()[:2]
        log.info("listening on udp %s:%d for %d node(s); Ctrl-C to stop", host, port, len(keys))
        serve_udp(sock, receiver, stop, on_poll=on_poll)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        sock.close()
        sink.close()
    print("citynode: final counters: %s" % receiver.counters_line(), file=sys.stderr)
    return 0


# --- demo (host_tools/demo.py) ----------------------------------------------------------


def add_demo_args(p):
    p.add_argument("--nodes", type=int, default=3, metavar="N", help="simulated nodes (3)")
    p.add_argument("--hours", type=float, default=24.0, metavar="H", help="simulated hours (24)")
    p.add_argument("--trace", metavar="CSV", help="sensor trace to replay")
    p.add_argument("--batch", type=int, default=10, metavar="N", help="readings per frame (10)")
    p.add_argument("--db", default="./citynode.db", metavar="PATH", help="SQLite file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--interval", type=int, default=60, metavar="S", help="sampling interval, s (60)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (0)")
    p.add_argument("--workdir", metavar="DIR", help="keep node filesystems and console logs here")


def cmd_demo(args):
    from host_tools import demo

    try:
        return demo.main(args)
    except demo.DemoError as e:
        raise CliError(str(e)) from None


# --- the table --------------------------------------------------------------------------

Command = collections.namedtuple("Command", ("handler", "add_arguments", "help"))

COMMANDS = {
    "decode": Command(cmd_decode, add_decode_args, "decode hex frames to JSON readings"),
    "receive": Command(cmd_receive, add_receive_args, "receive frames over UDP, store, ack"),
    "demo": Command(cmd_demo, add_demo_args, "simulate a fleet of nodes end to end"),
}


def build_parser():
    parser = argparse.ArgumentParser(prog="citynode", description="citynode host tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(handler=command.handler)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except (CliError, KeyFileError, SinkError) as e:
        print("citynode: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (`citynode decode ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

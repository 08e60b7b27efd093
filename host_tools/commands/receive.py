# `citynode receive`: frames from UDP, verified, stored durably, then acknowledged.

import logging
import signal
import socket
import sys
import threading
import time

from host_tools.commands import CliError
from host_tools.keys import load_keys
from host_tools.receiver import Receiver, Verifier, serve_udp
from host_tools.sinks import JsonlSink, SqliteSink, TeeSink

HELP = "receive frames over UDP, store, ack"
DEFAULT_DB = "citynode.db"
DEFAULT_UDP = "0.0.0.0:1700"
REPORT_EVERY_S = 60.0

log = logging.getLogger("citynode")


def add_arguments(p):
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


def run(args):
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

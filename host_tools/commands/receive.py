# `citynode receive`: frames from UDP and MQTT sources, verified, stored durably, then
# acknowledged; remote sinks (webhook, MQTT, InfluxDB over HTTP) fed from an on-disk spool.
#
# Threads: one per source (receiver.UdpSource, mqtt.MqttSource) feeding one Intake; the main
# thread runs receiver.serve() (verify, one durable write per batch, acks); one forwarder per
# remote sink (forward.Forwarder). Status: counters logged every 60 s and on SIGUSR1, and a JSON
# status file (--status-file) rewritten every few seconds, read back by `citynode receive
# --status`.

import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time

from host_tools.commands import CliError
from host_tools.keys import KeyFileError, load_accepted_keys
from host_tools.receive.receiver import Intake, Receiver, UdpSource, Verifier, counters_line, serve
from host_tools.receive.sinks import (
    InfluxFileSink,
    InfluxHttpSink,
    JsonlSink,
    SinkError,
    SqliteSink,
    TeeSink,
    WebhookSink,
)

DEFAULT_DB = "citynode.db"
DEFAULT_UDP = "0.0.0.0:1700"
DEFAULT_SPOOL = "citynode-spool.db"
REPORT_EVERY_S = 60.0
STATUS_EVERY_S = 5.0
STOP_WAIT_S = 15.0  # how long shutdown waits for a forwarder inside a delivery

log = logging.getLogger("citynode")


def add_arguments(p):
    p.add_argument(
        "--keys",
        metavar="FILE|URL",
        help="JSON key file, or postgresql://... where `citynode keys push` put it (shared by "
        "every receiver); required to receive",
    )
    p.add_argument(
        "--replay-state",
        metavar="PATH",
        help="SQLite file (or postgresql://...) keeping each node's replay window for v1 and "
        "STATUS frames across restarts (default: the --db database if PostgreSQL, else the key "
        "file's path + .replay; 'none': in memory only)",
    )
    src = p.add_argument_group("sources (several at once; default --udp %s)" % DEFAULT_UDP)
    src.add_argument(
        "--udp",
        action="append",
        metavar="HOST:PORT",
        help="UDP address to listen on; repeatable (port 0 picks a free one)",
    )
    src.add_argument(
        "--mqtt-in",
        action="append",
        metavar="URL",
        help="MQTT topic carrying raw frames from gateways, mqtt://HOST[:PORT]/TOPIC "
        "(wildcards allowed); acks go to <topic>/ack; repeatable",
    )
    src.add_argument(
        "--mqtt-up",
        action="append",
        metavar="URL",
        help="MQTT v5 broker that nodes publish their frames to (citynode/up/<node id>, acks on "
        "citynode/down/<node id>), mqtt://HOST[:PORT][/GROUP]: the receivers given the same "
        "GROUP (default citynode) share one subscription, each frame going to one of them; "
        "repeatable (one per broker)",
    )
    src.add_argument(
        "--serial",
        action="append",
        metavar="URL",
        help="LoRa gateway node on a serial line (/dev/ttyUSB0, socket://HOST:PORT, ...); "
        "repeatable: copies of a frame heard by several gateways are merged",
    )
    src.add_argument("--serial-baud", type=int, default=115200, metavar="BAUD")
    out = p.add_argument_group("sinks (default: --db %s when no other sink is given)" % DEFAULT_DB)
    out.add_argument(
        "--db",
        metavar="PATH|URL",
        help="SQLite file, or postgresql://USER@HOST/DB (several receivers on one database); "
        "table readings",
    )
    out.add_argument("--jsonl", metavar="-|FILE", help="append JSON lines here")
    out.add_argument(
        "--influx",
        metavar="FILE|URL",
        help="InfluxDB line protocol: appended to FILE, or POSTed to an http(s) write URL "
        "such as http://HOST:8086/api/v2/write?org=O&bucket=B (token from $INFLUX_TOKEN)",
    )
    out.add_argument(
        "--webhook", action="append", metavar="URL", help="POST JSON readings here; repeatable"
    )
    out.add_argument(
        "--mqtt-out",
        metavar="URL",
        help="publish readings to mqtt://HOST[:PORT][/PREFIX] as PREFIX/<node>/<quantity> "
        "(PREFIX default citynode)",
    )
    out.add_argument(
        "--ha-discovery",
        nargs="?",
        const="homeassistant",
        metavar="PREFIX",
        help="with --mqtt-out: publish Home Assistant discovery configs (prefix default "
        "homeassistant)",
    )
    out.add_argument(
        "--spool",
        metavar="PATH",
        help="on-disk spool for the remote sinks (default %s)" % DEFAULT_SPOOL,
    )
    out.add_argument(
        "--spool-max-mb",
        type=float,
        metavar="MB",
        help="size limit of the spool; when reached frames are not acked (nodes keep them)",
    )
    out.add_argument(
        "--sink-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a remote sink may take to confirm a delivery (default 10)",
    )
    out.add_argument(
        "--retry-max",
        type=float,
        default=60.0,
        metavar="S",
        help="longest pause between delivery attempts to a remote sink that is down (default "
        "60; the pauses double from 0.5 s, with jitter)",
    )
    st = p.add_argument_group("status")
    st.add_argument(
        "--status-file",
        metavar="PATH",
        help="rewrite this JSON status file every %d s (and on SIGUSR1)" % STATUS_EVERY_S,
    )
    st.add_argument(
        "--silent-after",
        type=float,
        default=3,
        metavar="N",
        help="with --status: name the nodes not heard for N of their frame periods (default 3)",
    )
    st.add_argument(
        "--status",
        action="store_true",
        help="print the status file of a running receiver (--status-file) and exit: "
        "0 if it is fresh, 1 if stale",
    )


# --- set-up -----------------------------------------------------------------------------


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


def _remote_sinks(args):
    """The remote sinks asked for (not yet connected: that is the forwarders' job)."""
    from host_tools.receive.mqtt import MqttSink

    timeout = args.sink_timeout
    if timeout <= 0:
        raise CliError("--sink-timeout must be positive, got %g" % timeout)
    sinks = [WebhookSink(url, timeout) for url in args.webhook or []]
    if args.influx and args.influx.startswith(("http://", "https://")):
        sinks.append(InfluxHttpSink(args.influx, timeout, token=os.environ.get("INFLUX_TOKEN")))
    if args.mqtt_out:
        sinks.append(MqttSink(args.mqtt_out, ha_prefix=args.ha_discovery, timeout=timeout))
    elif args.ha_discovery:
        raise CliError("--ha-discovery needs --mqtt-out")
    names = [s.name for s in sinks]
    for name in names:
        if names.count(name) > 1:
            raise CliError("%s is given twice" % name)
    return sinks


def _is_pg(text):
    return text.startswith(("postgresql://", "postgres://"))


def _load_keys(source):
    """Every key a frame may be signed with, per node: from a key file (refused unless 0600)
    or from PostgreSQL (`citynode keys push URL` puts a key file there)."""
    if _is_pg(source):
        from host_tools.receive.pg import PgKeyStore

        store = PgKeyStore(source)
        try:
            return store.load_accepted()
        finally:
            store.close()
    return load_accepted_keys(source, private=True)


def _local_sinks(args, spool):
    """The sinks written before the ack, spool first (the likeliest to be full: if it fails,
    nothing of the batch is written anywhere)."""
    sinks = [spool] if spool is not None else []
    remote = args.webhook or args.mqtt_out or (args.influx or "").startswith("http")
    try:
        if args.db and _is_pg(args.db):
            from host_tools.receive.pg import PostgresSink

            sinks.append(PostgresSink(args.db))
        elif args.db or not (args.jsonl or args.influx or remote):
            sinks.append(SqliteSink(args.db or DEFAULT_DB))
        if args.jsonl == "-":
            sinks.append(JsonlSink(sys.stdout))
        elif args.jsonl:
            try:
                stream = open(args.jsonl, "a", encoding="utf-8")
            except OSError as e:
                raise CliError("--jsonl %s: %s" % (args.jsonl, e.strerror or e)) from None
            sinks.append(JsonlSink(stream))
        if args.influx and not args.influx.startswith(("http://", "https://")):
            sinks.append(InfluxFileSink(args.influx))
    except BaseException:
        for sink in sinks[1 if spool is not None else 0 :]:
            sink.close()
        raise
    return sinks[0] if len(sinks) == 1 else TeeSink(sinks)


def _sources(args):
    from host_tools.receive.mqtt import MqttSource, MqttUplinkSource

    sources = []
    try:
        udp = args.udp or ([] if (args.mqtt_in or args.mqtt_up or args.serial) else [DEFAULT_UDP])
        for text in udp:
            sources.append(UdpSource(_bind_udp(text)))
        for url in args.mqtt_in or []:
            sources.append(MqttSource(url))
        uplinks = [MqttUplinkSource(url) for url in args.mqtt_up or []]
        for i, source in enumerate(uplinks):
            # a second member of one group in one process would only halve each one's share
            if any(source.name == other.name for other in uplinks[:i]):
                raise CliError(
                    "--mqtt-up %s: broker %s and group %s are given twice"
                    % (args.mqtt_up[i], source.url.address, source.group)
                )
        sources.extend(uplinks)
        if args.serial:  # one source for every line, so that copies can be merged
            from host_tools.receive.gateway_serial import SerialGatewaySource

            sources.append(SerialGatewaySource(args.serial, baudrate=args.serial_baud))
    except BaseException:
        for source in sources:
            source.stop()
        raise
    return sources


# --- status -----------------------------------------------------------------------------


class Status:
    """Collects every counter of the running receiver; logs them, writes the status file."""

    def __init__(self, receiver, sources, spool, forwarders, path, nodes):
        self.receiver = receiver
        self.sources = sources
        self.spool = spool
        self.forwarders = forwarders
        self.path = path
        self.nodes = nodes
        self.started = time.time()
        self.write_errors = 0

    def counters(self):
        """Every counter summed by name. dict() copies each Counter in one step (C code, under
        the GIL), so a source thread adding a key meanwhile cannot break the iteration."""
        total = dict(self.receiver.counters)
        parts = [s.counters for s in self.sources]
        if self.spool is not None:
            parts.append(self.spool.counters)
        for part in parts:
            for k, v in dict(part).items():
                total[k] = total.get(k, 0) + v
        return total

    def log_lines(self):
        log.info("counters: %s", counters_line(self.counters()))
        for f in self.forwarders:
            s = f.status()
            log.info(
                "sink %s: state=%s backlog=%s %s%s",
                f.name,
                s["state"],
                "?" if s["backlog"] is None else s["backlog"],
                counters_line(s["counters"]),
                " last_error=%s" % s["last_error"] if s["last_error"] else "",
            )

    def snapshot(self):
        now = time.time()
        return {
            "time": now,
            "pid": os.getpid(),
            "uptime_s": round(now - self.started, 1),
            "status_every_s": STATUS_EVERY_S,
            "nodes": self.nodes,
            "sources": [s.name for s in self.sources],
            "counters": self.counters(),
            "sinks": {f.name: f.status() for f in self.forwarders},
            "node_health": self.receiver.health.snapshot(now),
        }

    def write_file(self):
        if not self.path:
            return
        tmp = "%s.tmp%d" % (self.path, os.getpid())
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.snapshot(), f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, self.path)
        except OSError as e:
            self.write_errors += 1
            if self.write_errors == 1 or self.write_errors % 100 == 0:
                log.warning("cannot write status file %s: %s", self.path, e.strerror or e)


def show_status(path, silent_after=3):
    """`citynode receive --status`: print the status file, then a line for every node that
    needs a look (not heard for `silent_after` frame periods, readings dropped, sensor faults,
    resets, reading indices used twice); 0 if the file is fresh, 1 if stale."""
    if not path:
        raise CliError("--status needs --status-file PATH (the running receiver's)")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        raise CliError(
            "status file %s: %s (is a receiver running with --status-file %s?)"
            % (path, e.strerror or e, path)
        ) from None
    except ValueError as e:
        raise CliError("status file %s: not valid JSON: %s" % (path, e)) from None
    now = time.time()
    age = now - doc.get("time", 0)
    print(json.dumps(doc, indent=1, sort_keys=True))
    from host_tools.receive.health import problems_of_snapshot

    for node_id, what in problems_of_snapshot(doc, now, silent_after):
        print("citynode: node %d: %s" % (node_id, what), file=sys.stderr)
    if age > 3 * doc.get("status_every_s", STATUS_EVERY_S):
        print(
            "citynode: status file %s is %.0f s old: the receiver (pid %s) is not running or stuck"
            % (path, age, doc.get("pid", "?")),
            file=sys.stderr,
        )
        return 1
    return 0


# --- run ----------------------------------------------------------------------------------


def run(args):
    if args.status:
        if args.silent_after <= 0:
            raise CliError("--silent-after must be positive, got %g" % args.silent_after)
        return show_status(args.status_file, args.silent_after)
    keys = _check_args(args)
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s"
    )
    remote = _remote_sinks(args)
    spool = _open_spool(args, remote)
    sink = sources = None
    try:
        sink = _local_sinks(args, spool)
        sources = _sources(args)
    except BaseException:
        if sink is not None:
            sink.close()
        elif spool is not None:
            spool.close()
        raise
    try:
        forwarders = _forwarders(args, spool, remote)
        store = _replay_store(args)
    except BaseException:
        _close_all(sources, sink)
        raise
    receiver = Receiver(Verifier(keys, store=store), sink)
    if args.status_file:
        _restore_health(receiver, args.status_file)
    status = Status(receiver, sources, spool, forwarders, args.status_file, len(keys))
    reloader = KeyReloader(args.keys, receiver.verifier)
    return _serve(receiver, sources, forwarders, sink, status, reloader)


def _check_args(args):
    """The keys every frame may be signed with (the current one, and during a rotation's grace
    period the previous one; a key file others can read is refused: README "Keys"), once the
    arguments that need no I/O are known to be good."""
    if not args.keys:
        raise CliError("--keys FILE is required to receive")
    keys = _load_keys(args.keys)
    if not keys:
        raise CliError("%s: no nodes, so every frame would be rejected" % args.keys)
    if args.retry_max <= 0:
        raise CliError("--retry-max must be positive, got %g" % args.retry_max)
    if args.spool_max_mb is not None and args.spool_max_mb <= 0:
        raise CliError("--spool-max-mb must be positive, got %g" % args.spool_max_mb)
    return keys


def _open_spool(args, remote):
    """The on-disk spool the remote sinks are fed from; None without remote sinks."""
    if not remote:
        if args.spool or args.spool_max_mb:
            raise CliError("--spool is for remote sinks (--webhook, --mqtt-out, --influx URL)")
        return None
    from host_tools.receive.spool import Spool

    max_bytes = int(args.spool_max_mb * 1e6) if args.spool_max_mb else None
    return Spool(args.spool or DEFAULT_SPOOL, max_bytes=max_bytes)


def _forwarders(args, spool, remote):
    """One Forwarder per remote sink, registered in the spool."""
    from host_tools.backoff import Backoff
    from host_tools.receive.forward import Forwarder

    try:
        return [
            Forwarder(spool, s, backoff=Backoff(min(0.5, args.retry_max), args.retry_max))
            for s in remote
        ]
    except Exception as e:  # registering in the spool failed: a disk problem
        raise SinkError("spool %s: %s" % (spool.path, e)) from None


def _replay_state_path(args):
    """Where the replay windows live: --replay-state, else beside the readings in PostgreSQL
    (shared by every receiver), else beside the key file; "none": in memory only."""
    if args.replay_state:
        return args.replay_state
    if args.db and _is_pg(args.db):
        return args.db
    if _is_pg(args.keys):
        return "none"  # no file to put it beside: give --replay-state
    return args.keys + ".replay"


def _replay_store(args):
    """The replay windows' store (SQLite or PostgreSQL), or None (in memory only)."""
    state = _replay_state_path(args)
    if state == "none":
        return None
    from host_tools.receive.receiver import ReplayStore, StateError

    try:
        if _is_pg(state):
            from host_tools.receive.pg import PgReplayStore

            store = PgReplayStore(state)
        else:
            store = ReplayStore(state)
    except (StateError, SinkError) as e:
        raise CliError("--replay-state %s" % e) from None
    except (sqlite3.Error, OSError) as e:
        raise CliError("--replay-state %s: %s" % (state, e)) from None
    if store.bad_rows:
        log.warning(
            "replay state %s: %d rows could not be read and were skipped (copies of v2 readings "
            "are still dropped by the sinks)",
            state,
            store.bad_rows,
        )
    return store


def _close_all(sources, sink):
    for source in sources:
        source.stop()
    sink.close()


def _restore_health(receiver, path):
    """What the receiver knew of each node before a restart, from its last status file, so
    that `receive --status` still names a node that went silent meanwhile."""
    from host_tools.receive.health import from_snapshot

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return  # none yet, or unreadable: start with what is heard from now on
    if isinstance(doc, dict):
        receiver.health = from_snapshot(doc, time.time())


class KeyReloader:
    """Keeps the verifier's keys in step with the key file: reloaded when the file changes
    (checked every CHECK_S), on SIGHUP, and every REFRESH_S (a rotation's grace period ends
    without the file changing). A file that cannot be read is logged; the keys in use stay."""

    CHECK_S = 2.0
    REFRESH_S = 60.0

    def __init__(self, path, verifier, clock=time.monotonic):
        self.path = path
        self.verifier = verifier
        self.clock = clock
        self.requested = False
        self._stamp = self._file_stamp()
        self._next_check = clock() + self.CHECK_S
        # keys in PostgreSQL have no file to watch: read again every CHECK_S * 5
        self._refresh_s = self.CHECK_S * 5 if _is_pg(path) else self.REFRESH_S
        self._next_refresh = clock() + self._refresh_s

    def _file_stamp(self):
        if _is_pg(self.path):
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def poll(self):
        now = self.clock()
        if not self.requested and now < self._next_check:
            return
        self._next_check = now + self.CHECK_S
        stamp = self._file_stamp()
        changed = stamp != self._stamp
        if not (self.requested or changed or now >= self._next_refresh):
            return
        why = "SIGHUP" if self.requested else ("changed" if changed else None)
        self.requested = False
        self._next_refresh = now + self._refresh_s
        self._stamp = stamp
        try:
            keys = _load_keys(self.path)
        except (KeyFileError, SinkError) as e:
            log.error(
                "keys not reloaded, the %d node(s) loaded before stay: %s",
                len(self.verifier.keys),
                e,
            )
            return
        before = self.verifier.keys
        self.verifier.set_keys(keys)
        if why is not None or keys != before:
            added = sorted(set(keys) - set(before))
            removed = sorted(set(before) - set(keys))
            log.info(
                "keys reloaded from %s (%s): %d node(s)%s%s",
                self.path,
                why or "grace period ended",
                len(keys),
                " added %s" % _ids(added) if added else "",
                " removed %s" % _ids(removed) if removed else "",
            )


def _ids(ids):
    text = ",".join(str(i) for i in ids[:10])
    return text + (" and %d more" % (len(ids) - 10) if len(ids) > 10 else "")


def _serve(receiver, sources, forwarders, sink, status, reloader=None):
    stop = threading.Event()
    intake = Intake()
    reports = _Reports(status, reloader)
    previous = _handle_signals(stop, reports, reloader)
    try:
        for f in forwarders:
            f.start()
            log.info("forwarding to %s from the spool", f.name)
        for source in sources:
            source.start(intake)
            log.info("listening on %s for %d node(s); Ctrl-C to stop", source.name, status.nodes)
        serve(intake, receiver, stop, poll_s=0.5, on_poll=reports.poll)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _shut_down(receiver, sources, forwarders, sink, status)
    print("citynode: final counters: %s" % counters_line(status.counters()), file=sys.stderr)
    return 0


class _Reports:
    """What the receive loop does between batches (its on_poll): reload keys when due, log the
    counters every REPORT_EVERY_S and when asked (SIGUSR1), rewrite the status file every
    STATUS_EVERY_S."""

    def __init__(self, status, reloader=None, clock=time.monotonic):
        self.status = status
        self.reloader = reloader
        self.clock = clock
        self.requested = False  # SIGUSR1: logged from the loop, not from the signal handler
        self._next_log = clock() + REPORT_EVERY_S
        self._next_file = 0.0

    def poll(self):
        if self.reloader is not None:
            self.reloader.poll()
        now = self.clock()
        if self.requested or now >= self._next_log:
            self.requested = False
            self._next_log = now + REPORT_EVERY_S
            self.status.log_lines()
            self._next_file = 0.0
        if now >= self._next_file:
            self._next_file = now + STATUS_EVERY_S
            self.status.write_file()


def _handle_signals(stop, reports, reloader):
    """SIGINT/SIGTERM stop the loop, SIGUSR1 logs the counters, SIGHUP reloads the keys (both
    from the loop, not inside the handler). Returns the handlers they replaced ({} off the main
    thread, where signals cannot be handled)."""

    def on_stop(signum, _frame):
        stop.set()

    def on_usr1(signum, _frame):
        reports.requested = True

    def on_hup(signum, _frame):
        if reloader is not None:
            reloader.requested = True

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum, handler in [
            (signal.SIGINT, on_stop),
            (signal.SIGTERM, on_stop),
            (getattr(signal, "SIGUSR1", None), on_usr1),
            (getattr(signal, "SIGHUP", None), on_hup),
        ]:
            if signum is not None:
                previous[signum] = signal.signal(signum, handler)
    return previous


def _shut_down(receiver, sources, forwarders, sink, status):
    """Sources first (nothing new comes in), then the forwarders (each finishes or leaves its
    batch in the spool), a last status file, and every store closed."""
    for source in sources:
        source.stop()
    receiver.folded.flush(final=True)
    for f in forwarders:
        if not f.stop(STOP_WAIT_S):
            log.warning("%s: still delivering after %.0f s; left running", f.name, STOP_WAIT_S)
    status.write_file()
    for f in forwarders:
        backlog = f.status()["backlog"]
        if backlog:
            log.info(
                "%s: %d readings stay in the spool, delivered on the next start", f.name, backlog
            )
        f.sink.close()
    sink.close()
    if receiver.verifier.store is not None:
        receiver.verifier.store.close()

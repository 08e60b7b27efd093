# `citynode monitor PORT`: a node's serial log, coloured by level, filtered, with the frames it
# mentions in hex decoded under their line; follows the port through unplug and replug.
# The engine is host_tools/monitor.py; this module is options, set-up and exit status.

import argparse
import os
import signal
import sys
import threading

from host_tools import keys as keyfile
from host_tools import monitor as engine
from host_tools.commands import CliError

ENV_KEYS = "CITYNODE_KEYS"

_EPILOG = """\
PORT is a device (/dev/ttyUSB0, /dev/ttyACM0, COM3) or any pyserial URL (socket://host:port,
rfc2217://host:port, spy:///dev/ttyUSB0, loop://).

Lines in the node's log format (README "Reading a node's log") are coloured by level and can be
filtered; other lines (boot messages, REPL output, tracebacks) are always shown unless
--only-log, because they matter when something is wrong. Bytes that are not UTF-8, and control
characters, are shown as \\xNN and the line is marked [garbled]. A run of 12 or more hex bytes
that is a citynode frame is decoded under its line (verified with --keys).

If the port goes away (board unplugged or reset, server closed) the monitor says so and reopens
it as soon as it is back. --save appends every byte received, whatever the filters, flushed at
each line.

Exit status: 0 when stopped with Ctrl-C or SIGTERM; 2 if the port cannot be opened (without
--wait), is gone longer than --give-up, or the keys or the save file cannot be used."""


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a whole number, got %r" % text) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive, got %s" % text)
    return value


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected seconds, got %r" % text) from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("expected a number of seconds >= 0, got %s" % text)
    return value


def _level(text):
    try:
        return engine.parse_level(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _subsystems(text):
    try:
        return engine.parse_subsystems(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("port", metavar="PORT", help="serial device or pyserial URL")
    p.add_argument(
        "--baud", type=_positive_int, default=115200, help="baud rate (default %(default)s)"
    )
    p.add_argument(
        "--level",
        type=_level,
        default="D",
        metavar="L",
        help="show log lines of this level and above: D, I, W, E (default D: all)",
    )
    p.add_argument(
        "--subsystem",
        type=_subsystems,
        metavar="LIST",
        help="show log lines of these subsystems only, e.g. link,sensor",
    )
    p.add_argument(
        "--only-log", action="store_true", help="hide lines that are not in the log format"
    )
    p.add_argument(
        "--keys",
        metavar="FILE",
        help="key registry or single-key file to verify and decode frames with "
        "(default: $%s if set; mode 0600 required)" % ENV_KEYS,
    )
    p.add_argument("--save", metavar="FILE", help="append the raw log to FILE")
    p.add_argument(
        "--color",
        choices=("auto", "always", "never"),
        default="auto",
        help="colours: auto (on a terminal, unless $NO_COLOR is set), always, never",
    )
    p.add_argument(
        "--no-color", dest="color", action="store_const", const="never", help="--color never"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line (and event)")
    p.add_argument("--timestamps", action="store_true", help="prefix the host's time of day")
    p.add_argument(
        "--wait", action="store_true", help="if PORT is not there yet, wait for it to appear"
    )
    p.add_argument(
        "--give-up",
        type=_seconds,
        metavar="S",
        help="exit (status 2) when the port has been gone S seconds (default: wait forever)",
    )


def _use_color(choice, stream):
    if choice == "always":
        return True
    if choice == "never":
        return False
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _frame_decoder(path):
    if path is None:
        return engine.FrameDecoder()
    keys, default_key = keyfile.load_keys_or_single(path, private=True)
    if default_key is not None:
        return engine.FrameDecoder(default_key=default_key, keys_path=path)
    # a registry: also the keys rotated out but still in their grace period
    return engine.FrameDecoder(keyfile.load_accepted_keys(path, private=True), keys_path=path)


def run(args):
    keys_path = args.keys or os.environ.get(ENV_KEYS) or None
    frames = _frame_decoder(keys_path)  # KeyFileError: exit 2 with its message
    save = None
    if args.save:
        try:
            save = open(args.save, "ab")  # noqa: SIM115 - closed below
        except OSError as e:
            raise CliError("cannot open %s for --save: %s" % (args.save, e.strerror)) from None
    err_color = _use_color(args.color, sys.stderr)

    def status(message):
        sys.stdout.flush()
        if err_color:
            message = "\x1b[33m%s\x1b[0m" % message
        print("citynode: %s" % message, file=sys.stderr, flush=True)

    monitor = engine.Monitor(
        sys.stdout,
        as_json=args.json,
        color=_use_color(args.color, sys.stdout),
        line_filter=engine.LineFilter(args.level, args.subsystem, args.only_log),
        frames=frames,
        save=save,
        save_name=args.save,
        status=status,
        timestamps=args.timestamps,
    )
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        engine.follow(
            args.port,
            monitor,
            baudrate=args.baud,
            wait=args.wait,
            give_up_s=args.give_up,
            stop=stop.is_set,
            sleep=stop.wait,
        )
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a monitor is meant to end
    except (engine.PortError, engine.SaveError) as e:
        raise CliError(str(e)) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if save is not None:
            save.close()
    c = monitor.counters
    summary = "monitor stopped: %d lines (%d log, %d other, %d garbled), %d shown" % (
        c["lines"],
        c["log"],
        c["text"],
        c["garbled"],
        c["shown"],
    )
    if c["frames"]:
        summary += ", %d frames (%d not decoded)" % (c["frames"], c["frames_bad"])
    print("citynode: %s" % summary, file=sys.stderr)
    return 0

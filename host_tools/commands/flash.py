# `citynode flash PORT... --board NAME --node-id N`: provision boards over USB with mpremote
# (host_tools/flash.py): several ports get consecutive node ids, one board after another.
#
# Exit status: 0 every board flashed (or found already flashed) and booted; 2 refused before any
# board was changed (bad option, wrong board name, no such port, port busy, node id in use, a
# board that was another node or a revoked id without --reflash, key file unreadable, a package
# that cannot be fetched from the index or does not match its hash); 1 a board failed part-way
# (it is marked half-flashed: re-running the same command finishes it).

import os
import sys

import serial

from host_tools import flash, mipindex
from host_tools.commands import CliError
from host_tools.keys import KeyFileError, load_keys

WIFI_PASSWORD_ENV = "CITYNODE_WIFI_PASSWORD"


def add_arguments(p):
    p.add_argument("ports", nargs="+", metavar="PORT", help="serial port(s), e.g. /dev/ttyUSB0")
    p.add_argument("--board", required=True, metavar="NAME", help="board module in boards/")
    p.add_argument(
        "--node-id",
        required=True,
        type=int,
        metavar="N",
        help="node id of the first board; further ports get N+1, N+2, ...",
    )
    p.add_argument(
        "--uplink",
        required=True,
        metavar="HOST:PORT|mqtt://HOST[:PORT]",
        help="where the node sends its frames: a host's UDP port, or an MQTT broker (Wi-Fi nodes)",
    )
    p.add_argument(
        "--keys",
        default="keys.json",
        metavar="FILE",
        help="key registry, created if missing (default ./keys.json)",
    )
    p.add_argument(
        "--interval", type=int, default=60, metavar="S", help="seconds per sample (default 60)"
    )
    p.add_argument(
        "--batch", type=int, default=10, metavar="N", help="readings per frame (default 10)"
    )
    p.add_argument(
        "--idle",
        choices=("light", "wait", "deep"),
        help="how the node sleeps between samples (default light; deep: ESP32 boards, see "
        "boards/README.md)",
    )
    p.add_argument(
        "--sensor",
        choices=("sds011", "pms5003", "sps30"),
        help="a particulate sensor beside the BME280, written into config.json (SDS011 and "
        "PMS5003 on the board's PM UART, boards/README.md; SPS30 on the I2C bus)",
    )
    p.add_argument("--wifi-ssid", metavar="SSID", help="Wi-Fi network (boards with Wi-Fi)")
    p.add_argument(
        "--wifi-password",
        metavar="PASSWORD",
        help="Wi-Fi password (or set $%s, which stays out of the shell history)"
        % WIFI_PASSWORD_ENV,
    )
    p.add_argument(
        "--reflash",
        action="store_true",
        help="allow what changes a node's identity: an id already in the key registry (moves "
        "it to this board), a board that was another node (its pending readings, clock and "
        "sequence state are dropped), a revoked id (reinstated with a new key), a rotated key",
    )
    p.add_argument(
        "--mip-index",
        metavar="URL|DIR",
        help="micropython-lib package index the board's packages are fetched from, checked, "
        "before any board is changed: a URL, or a folder holding an index (offline; "
        "python -m host_tools.mipindex builds one). Default %s, as mpremote's"
        % mipindex.DEFAULT_INDEX,
    )
    p.add_argument(
        "--package",
        action="append",
        default=[],
        metavar="PKG",
        help="a micropython-lib package to install besides the board's MIP_PACKAGES (repeatable)",
    )
    p.add_argument(
        "--boot-timeout",
        type=float,
        default=flash.BOOT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the node's boot line (default %.0f)" % flash.BOOT_TIMEOUT_S,
    )


def _check_options(args):
    if not 0 <= args.node_id <= flash.MAX_NODE_ID:
        raise CliError("--node-id: must be 0..%d, got %d" % (flash.MAX_NODE_ID, args.node_id))
    last = args.node_id + len(args.ports) - 1  # the ports get N, N+1, ...
    if last > flash.MAX_NODE_ID:
        first_over = flash.MAX_NODE_ID + 1 - args.node_id  # the index of the first port over
        raise CliError(
            "--node-id %d: port %d of %d (%s) would get node id %d, out of range 0..%d"
            % (
                args.node_id,
                first_over + 1,
                len(args.ports),
                args.ports[first_over],
                flash.MAX_NODE_ID + 1,
                flash.MAX_NODE_ID,
            )
        )
    if not 1 <= args.interval <= 86400:
        raise CliError("--interval: must be 1..86400 seconds, got %d" % args.interval)
    if not 1 <= args.batch <= 64:
        raise CliError("--batch: must be 1..64 readings, got %d" % args.batch)
    if not args.boot_timeout > 0:
        raise CliError("--boot-timeout: must be more than 0 seconds")
    if args.uplink.startswith("mqtt://"):
        host, sep, port = args.uplink[len("mqtt://") :].rpartition(":")
        if not sep:  # mqtt://HOST: the MQTT port
            host, port = port, "1883"
        if not host or "/" in host or "@" in host or not port.isdigit():
            raise CliError(
                "--uplink: expected mqtt://HOST[:PORT] (no user, no topic), got %r" % args.uplink
            )
    else:
        host, sep, port = args.uplink.rpartition(":")
        if not sep or not host:
            port = ""
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise CliError(
            "--uplink: expected HOST:PORT or mqtt://HOST[:PORT] (port 1..65535), got %r"
            % args.uplink
        )
    if len(set(args.ports)) != len(args.ports):
        raise CliError("a port is given twice")
    if args.mip_index is not None:
        try:
            args.mip_index = mipindex.check_index(args.mip_index)
        except mipindex.MipIndexError as e:
            raise CliError(str(e)) from None


def _wifi(args, board):
    password = args.wifi_password
    if password is None:
        password = os.environ.get(WIFI_PASSWORD_ENV)
    if args.wifi_ssid is None:
        if password is not None and args.wifi_password is not None:
            raise CliError("--wifi-password without --wifi-ssid")
        if board.wifi_required:
            raise CliError(
                "board %s sends over Wi-Fi: give --wifi-ssid and --wifi-password" % board.name
            )
        return None
    if not board.wifi:
        raise CliError("board %s has no Wi-Fi: leave out --wifi-ssid" % board.name)
    if not 0 < len(args.wifi_ssid.encode()) <= 32:
        raise CliError("--wifi-ssid: must be 1..32 bytes")
    password = password or ""
    if password and not 8 <= len(password) <= 63:
        raise CliError("--wifi-password: WPA2 needs 8..63 characters (or none for an open net)")
    return {"ssid": args.wifi_ssid, "password": password}


def _check_port(port):
    """Refuse a port that is missing or held by another program, before touching any board."""
    if "://" not in port and not os.path.exists(port):
        raise CliError("%s: no such port (is the board plugged in?)" % port)
    try:
        ser = flash.open_serial(port)
    except (serial.SerialException, OSError) as e:
        text = str(e)
        if flash.port_busy(e):
            raise CliError(
                "%s: port is busy (close mpremote, screen, Thonny or the other program "
                "that has it open)" % port
            ) from None
        if "No such file" in text or "could not open port" in text:
            raise CliError("%s: no such port (is the board plugged in?)" % port) from None
        raise CliError("%s: cannot open: %s" % (port, text)) from None
    ser.close()


def _check_keys_writable(path):
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CliError("--keys %s: directory %s does not exist" % (path, directory))
    if not os.access(directory, os.W_OK) or (
        os.path.exists(path) and not os.access(path, os.W_OK)
    ):
        raise CliError("--keys %s: not writable: the new keys could not be saved" % path)


def run(args):
    _check_options(args)
    try:
        board = flash.board_def(args.board)
    except flash.FlashError as e:
        raise CliError("%s (%s)" % (e, e.hint) if e.hint else str(e)) from None
    wifi = _wifi(args, board)
    sensor = getattr(args, "sensor", None)
    if sensor in ("sds011", "pms5003") and board.pm_uart is None:
        raise CliError("board %s has no UART for a PM sensor (boards/README.md)" % board.name)
    if sensor and args.idle == "deep":
        raise CliError(
            "--sensor %s: a PM sensor needs --idle light (it spins up before each sample)" % sensor
        )
    if args.idle == "deep" and not board.deep_sleep:
        raise CliError(
            "--idle deep: board %s cannot deep sleep and keep RTC memory (the ESP32 boards can)"
            % board.name
        )
    for port in args.ports:
        _check_port(port)
    _check_keys_writable(args.keys)
    try:
        if os.path.exists(args.keys):
            load_keys(args.keys)
    except KeyFileError as e:
        raise CliError(str(e)) from None

    total = len(args.ports)
    progress = flash.progress_printer(total)
    flasher = flash.Flasher(
        board,
        args.keys,
        args.uplink,
        args.interval,
        args.batch,
        wifi=wifi,
        reflash=args.reflash,
        mip_index=args.mip_index,
        extra_packages=args.package,
        boot_timeout=args.boot_timeout,
        progress=progress,
        idle=args.idle,
        sensor=sensor,
    )
    try:
        flasher.build()
    except flash.FlashError as e:
        raise CliError(str(e)) from None
    try:
        return _flash(args, flasher, total, progress)
    finally:
        flasher.close()


def _flash(args, flasher, total, progress):
    plans, refusals, sessions = flasher.plan(args.ports, args.node_id)
    if refusals:
        for e in refusals:
            _report(e)
        if plans:
            print(
                "citynode: no board was changed (%d of %d refused)" % (len(refusals), total),
                file=sys.stderr,
            )
        return 2
    try:
        flasher.stage(plans)  # every package fetched and checked before any board changes
    except flash.Refused as e:
        flasher.release(sessions)
        _report(e)
        return 2

    failed = 0
    for plan in plans:
        if plan.skip:
            progress(
                plan.index, "%s node %d: already flashed, skipped" % (plan.port, plan.node_id)
            )
            try:
                seconds, line = flasher.restart(plan)
            except flash.FlashError as e:
                progress(plan.index, "%s node %d: FAILED" % (plan.port, plan.node_id), final=True)
                _report(e)
                failed += 1
                continue
            progress(
                plan.index,
                "%s node %d: already flashed, skipped; booted in %.1f s"
                % (plan.port, plan.node_id, seconds),
                final=True,
            )
            print("%s: node %d already flashed, booted: %s" % (plan.port, plan.node_id, line))
            continue
        try:
            seconds, line = flasher.flash(plan, sessions[plan.port])
        except flash.FlashError as e:
            progress(plan.index, "%s node %d: FAILED" % (plan.port, plan.node_id), final=True)
            _report(e)
            failed += 1
            continue
        progress(
            plan.index,
            "%s node %d: done in %.1f s" % (plan.port, plan.node_id, seconds),
            final=True,
        )
        print("%s: node %d flashed and booted: %s" % (plan.port, plan.node_id, line), flush=True)
    if failed:
        print(
            "citynode: %d of %d board(s) failed; the others are flashed" % (failed, total)
            if failed < total
            else "citynode: flashing failed",
            file=sys.stderr,
        )
        return 1
    return 0


def _report(e):
    print("citynode: %s" % e, file=sys.stderr)
    if e.hint:
        print("citynode:   %s" % e.hint, file=sys.stderr)
    sys.stderr.flush()

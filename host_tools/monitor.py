# `citynode monitor`'s engine: a node's serial log in, readable lines out. A sans-IO core
# (Monitor.feed(bytes, now): line assembly, log-line parser, filters, colours, frames found in
# hex) and a pyserial reading loop (follow()) that survives a port that goes away and returns.
#
# The log format is README "Reading a node's log" (firmware/log.py writes it):
#     I 540.011 link sent frame bytes=29 readings=10 seq=0
# Anything else the node prints (boot banner, REPL, tracebacks) passes through verbatim; bytes
# that are not UTF-8 or are control characters are shown escaped (\xNN) and the line is marked
# garbled, so nothing the port delivers is hidden, and nothing it delivers can crash the
# monitor or drive the terminal.

import collections
import json
import re
import time

from host_tools import serialport
from host_tools.backoff import Backoff
from host_tools.nodelog import parse_log_line
from host_tools.utc import iso_utc
from protocols import frame, uplink

LEVELS = "DIWE"
LEVEL_NAMES = {"D": "debug", "I": "info", "W": "warning", "E": "error"}
MAX_LINE = 4096  # bytes; a longer run without a newline is cut here (marked partial)
FLUSH_AFTER_S = 0.5  # a partial line idle this long is shown (a REPL prompt has no newline)
MIN_FRAME_HEX_BYTES = 12  # a run of at least this many hex bytes may be a frame

_HEX_RUN_RE = re.compile(
    r"(?<![0-9A-Fa-f])(?:[0-9A-Fa-f]{2}){%d,}(?![0-9A-Fa-f])" % MIN_FRAME_HEX_BYTES
)
# C0 controls but tab, DEL, C1 controls (U+009B is a CSI to some terminals), and the
# surrogates that stand for bytes that are not UTF-8 (surrogateescape)
_UNPRINTABLE_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\udc80-\udcff]")

# One line from the port. raw: the bytes as received, terminator included (what --save writes);
# text: printable (escaped) text without the terminator; partial: no newline (idle, cut at
# MAX_LINE, or the port went away); garbled: count of bytes/characters that had to be escaped.
Line = collections.namedtuple("Line", ("raw", "text", "partial", "garbled", "log"))


# --- line assembly ------------------------------------------------------------------------


class LineAssembler:
    """Bytes in any chunking -> (raw bytes, partial) lines. A line split across reads is joined;
    one idle for flush_after_s, or longer than max_line, is let out as partial."""

    def __init__(self, flush_after_s=FLUSH_AFTER_S, max_line=MAX_LINE):
        self.flush_after_s = flush_after_s
        self.max_line = max_line
        self._pending = bytearray()
        self._last = None  # when the pending bytes last grew

    def feed(self, data, now):
        out = []
        buf = self._pending
        buf += data
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            end = nl + 1
            while end - start > self.max_line:
                out.append((bytes(buf[start : start + self.max_line]), True))
                start += self.max_line
            out.append((bytes(buf[start:end]), False))
            start = end
        while len(buf) - start > self.max_line:
            out.append((bytes(buf[start : start + self.max_line]), True))
            start += self.max_line
        del buf[:start]
        if data:
            self._last = now
        return out

    def poll(self, now):
        """The pending partial line, if it has been idle long enough."""
        if self._pending and self._last is not None and now - self._last >= self.flush_after_s:
            return self.flush()
        return []

    def flush(self):
        """Whatever is pending, as a partial line (the port went away, or we are stopping)."""
        if not self._pending:
            return []
        out = [(bytes(self._pending), True)]
        self._pending.clear()
        return out


# --- parsing ------------------------------------------------------------------------------


def printable(raw):
    """(text, garbled count): raw bytes without their line terminator as text. Bytes that are
    not UTF-8 become \\xNN, control characters (all but tab) \\xNN as well; garbled counts
    both."""
    body = raw
    if body.endswith(b"\n"):
        body = body[:-1]
    if body.endswith(b"\r"):
        body = body[:-1]
    if body.isascii():
        text = body.decode("ascii")
    else:
        text = body.decode("utf-8", "surrogateescape")  # a bad byte 0xNN -> U+DCNN
    garbled = 0
    if _UNPRINTABLE_RE.search(text):
        text, garbled = _UNPRINTABLE_RE.subn(_escape, text)
    return text, garbled


def _escape(m):
    code = ord(m.group())
    if code >= 0xDC00:  # a byte that is not UTF-8
        return "\\x%02x" % (code - 0xDC00)
    if code >= 0x80:  # a C1 control character, valid UTF-8
        return "\\u%04x" % code
    return "\\x%02x" % code


def make_line(raw, partial=False):
    text, garbled = printable(raw)
    return Line(raw, text, partial, garbled, parse_log_line(text))


# --- filters ------------------------------------------------------------------------------


def parse_level(text):
    """ "W", "w", "warning" -> "W". ValueError otherwise."""
    t = text.strip().lower()
    for letter, name in LEVEL_NAMES.items():
        if t in (letter.lower(), name) or (t == "warn" and letter == "W"):
            return letter
    raise ValueError("unknown level %r: use D, I, W or E (debug, info, warning, error)" % text)


def parse_subsystems(text):
    """ "link,sensor" -> frozenset. ValueError for an empty or malformed name."""
    names = [n.strip() for n in text.split(",")]
    for n in names:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n):
            raise ValueError(
                "bad subsystem name %r in %r: expected names such as link,sensor" % (n, text)
            )
    return frozenset(names)


class LineFilter:
    """Which lines to show. Level and subsystem filter log lines; other lines (boot messages,
    tracebacks) are shown unless only_log, because they are often what a maintainer needs."""

    def __init__(self, min_level="D", subsystems=None, only_log=False):
        self.min_level = LEVELS.index(min_level)
        self.subsystems = subsystems
        self.only_log = only_log

    def wants(self, line):
        log = line.log
        if log is None:
            return not self.only_log
        if LEVELS.index(log.level) < self.min_level:
            return False
        return self.subsystems is None or log.subsystem in self.subsystems


# --- frames -------------------------------------------------------------------------------


class FrameDecoder:
    """Finds hex runs of >= 12 bytes in a line and decodes the ones that are frames.

    keys: {node_id: (key, ...)} (current key first, then a rotated-out key still in its grace
    period: keys.load_accepted_keys); default_key: used for any node (a single-key file); both
    empty: frames are named from their header only, not verified. Decoding goes through
    protocols/ (uplink.peek, uplink.decode), never a second parser."""

    def __init__(self, keys=None, default_key=None, keys_path=None):
        self.keys = dict(keys or {})
        self.default_key = default_key
        self.keys_path = keys_path
        self._signers = {}

    def find(self, line):
        """[result dict, ...] for the frames in a Line (hex runs that are not frames are
        skipped, unless they are the value of a field whose name says "frame")."""
        results = []
        framed = set()
        if line.log is not None:
            framed = {v for k, v in line.log.fields if "frame" in k.lower()}
        for m in _HEX_RUN_RE.finditer(line.text):
            hex_text = m.group()
            result = self.decode(bytes.fromhex(hex_text))
            if result.get("error_kind") == "not_a_frame" and hex_text not in framed:
                continue
            result.pop("error_kind", None)
            results.append(result)
        return results

    def _signer(self, key):
        signer = self._signers.get(key)
        if signer is None:
            signer = self._signers[key] = frame.Signer(key)
        return signer

    def decode(self, buf):
        """A JSON-ready dict: {"bytes", "type", "node_id", ...} and either the decoded content
        or "error"."""
        try:
            _, ftype, node_id = uplink.peek(buf)
        except frame.FrameError as e:
            return {"bytes": len(buf), "error": str(e), "error_kind": "not_a_frame"}
        result = {
            "bytes": len(buf),
            "type": {frame.TYPE_DATA: "data", frame.TYPE_ACK: "ack"}.get(ftype, "status"),
            "node_id": node_id,
        }
        keys = self.keys.get(node_id)
        if keys is None and self.default_key is not None:
            keys = (self.default_key,)
        if keys is None:
            if self.keys or self.keys_path:
                result["error"] = "no key for node %d in %s" % (node_id, self.keys_path)
            else:
                result["unverified"] = "no --keys"
            return result
        error = None
        for i, key in enumerate(keys):
            try:
                decoded = uplink.decode(buf, self._signer(key))
            except frame.FrameError as e:
                if e.reason != "tag":
                    error = "node %d: %s" % (node_id, e)
                    break
                error = "bad tag for node %d (wrong key or corrupted frame)" % node_id
                continue
            except Exception as e:  # noqa: BLE001 - a codec bug must not end the monitor
                error = "node %d: the codec failed (a bug, please report): %r" % (node_id, e)
                break
            if len(keys) > 1:
                result["key"] = "current" if i == 0 else "previous"
            result.update(_frame_content(decoded))
            return result
        result["error"] = error
        return result


def _frame_content(decoded):
    if isinstance(decoded, uplink.DataFrame):
        quantities = [uplink.quantity(ch) for ch in decoded.channels]
        readings = []
        for raw_values, age in zip(decoded.readings, decoded.ages, strict=True):
            pairs = zip(quantities, raw_values, strict=True)
            values = {name: raw / scale for (name, scale), raw in pairs}
            readings.append({"age_s": age, "values": values})
        if decoded.index is not None:  # v2: each reading's identity is index + i
            for i, reading in enumerate(readings):
                reading["index"] = decoded.index + i
            return {"index": decoded.index, "readings": readings}
        return {"seq": decoded.seq, "readings": readings}
    if isinstance(decoded, uplink.Ack):
        return {"host_time": decoded.host_time, "acked": [list(r) for r in decoded.acked]}
    fields = {uplink.STATUS_FIELDS.get(f, "field_%d" % f): v for f, v in decoded.fields.items()}
    return {"seq": decoded.seq, "fields": fields}


# --- rendering ----------------------------------------------------------------------------

RESET = "\x1b[0m"
_LEVEL_STYLE = {"D": "\x1b[2m", "I": "", "W": "\x1b[33m", "E": "\x1b[1;31m"}
_LETTER_STYLE = {"D": "\x1b[2m", "I": "\x1b[32m", "W": "\x1b[33m", "E": "\x1b[1;31m"}
_SUBSYSTEM_STYLE = "\x1b[36m"
_GARBLED_STYLE = "\x1b[35m"
_FRAME_STYLE = "\x1b[36m"
_FRAME_ERROR_STYLE = "\x1b[31m"


def render_text(line, frames=(), color=False, stamp=None):
    """The lines to print for a Line (the line, then one per decoded frame and reading)."""
    text = line.text
    log = line.log
    if color and log is not None:
        style = _LEVEL_STYLE[log.level]
        if style:
            text = style + text + RESET
        else:  # info: colour the level letter and the subsystem only
            head = len(log.level) + 1 + len(log.uptime) + 1
            sub_end = head + len(log.subsystem)
            text = "%s%s%s%s%s%s%s%s" % (
                _LETTER_STYLE["I"],
                text[:1],
                RESET,
                text[1:head],
                _SUBSYSTEM_STYLE,
                text[head:sub_end],
                RESET,
                text[sub_end:],
            )
    if line.garbled:
        marker = "[garbled: %d byte%s escaped]" % (line.garbled, "" if line.garbled == 1 else "s")
        text += " " + (_GARBLED_STYLE + marker + RESET if color else marker)
    if stamp:
        text = stamp + " " + text
    out = [text]
    indent = " " * (len(stamp) + 1 if stamp else 0) + "    "
    for f in frames:
        for i, row in enumerate(_frame_rows(f)):
            row = indent + ("  " if i else "") + row
            if color:
                row = (_FRAME_ERROR_STYLE if "error" in f else _FRAME_STYLE) + row + RESET
            out.append(row)
    return out


def _frame_rows(f):
    head = "frame: %s, %d bytes" % (f.get("type", "?"), f["bytes"])
    if "node_id" in f:
        head = "frame: %s node=%d" % (f["type"], f["node_id"])
        if "seq" in f:
            head += " seq=%d" % f["seq"]
        if "index" in f:
            head += " index=%d" % f["index"]
        head += " bytes=%d" % f["bytes"]
        if "key" in f:
            head += " key=%s" % f["key"]
    if "error" in f:
        return [head + ": " + f["error"]]
    if "unverified" in f:
        return [head + " (not verified: %s)" % f["unverified"]]
    rows = [head]
    if "readings" in f:
        for r in f["readings"]:
            values = " ".join("%s=%s" % (k, _num(v)) for k, v in r["values"].items())
            rows.append("age=%ds %s" % (r["age_s"], values))
    elif "fields" in f:
        rows.append(" ".join("%s=%s" % kv for kv in f["fields"].items()))
    elif "acked" in f:
        acked = ",".join("%d-%d" % (a, b) if a != b else "%d" % a for a, b in f["acked"])
        rows.append("host_time=%d acked=%s" % (f["host_time"], acked or "-"))
    return rows


def _num(v):
    return ("%.4f" % v).rstrip("0").rstrip(".") if isinstance(v, float) else str(v)


def line_object(line, frames=(), host_time=None):
    """The --json object for a Line."""
    obj = {"host_time": None if host_time is None else iso_utc(host_time)}
    log = line.log
    if log is not None:
        obj.update(
            kind="log",
            level=log.level,
            uptime_s=float(log.uptime),
            subsystem=log.subsystem,
            message=log.message,
            fields=dict(log.fields),
        )
    else:
        obj["kind"] = "text"
    obj["text"] = line.text
    obj["partial"] = line.partial
    obj["garbled"] = line.garbled
    if frames:
        obj["frames"] = list(frames)
    return obj


# --- the sans-IO monitor ------------------------------------------------------------------


class SaveError(Exception):
    """The --save file could not be written."""


class Monitor:
    """Bytes from a port in, rendered lines out. feed(data, now) / poll(now) / flush();
    now is a monotonic time in seconds (for the partial-line timer).

    out: text stream for the lines; save: binary file (every byte received is appended to it,
    whatever the filter, flushed at each line); events go to `status(message)`."""

    def __init__(
        self,
        out,
        *,
        as_json=False,
        color=False,
        line_filter=None,
        frames=None,
        save=None,
        save_name=None,
        status=None,
        clock=time.time,
        timestamps=False,
        flush_after_s=FLUSH_AFTER_S,
    ):
        self.out = out
        self.as_json = as_json
        self.color = color and not as_json
        self.filter = line_filter or LineFilter()
        self.frames = frames or FrameDecoder()
        self.save = save
        self.save_name = save_name
        self.status_out = status
        self.clock = clock
        self.timestamps = timestamps
        self.assembler = LineAssembler(flush_after_s)
        self.counters = collections.Counter()

    def feed(self, data, now):
        self.counters["bytes"] += len(data)
        for raw, partial in self.assembler.feed(data, now):
            self._line(raw, partial)

    def poll(self, now):
        for raw, partial in self.assembler.poll(now):
            self._line(raw, partial)

    def flush(self):
        for raw, partial in self.assembler.flush():
            self._line(raw, partial)
        self.out.flush()

    def event(self, name, message):
        """A port event (gone, back, ...): to the status stream, and in --json to out too."""
        self.counters["event_" + name] += 1
        if self.as_json:
            obj = {"host_time": iso_utc(self.clock()), "kind": "port", "event": name}
            obj["message"] = message
            self.out.write(json.dumps(obj) + "\n")
            self.out.flush()
        if self.status_out is not None:
            self.status_out(message)

    def _line(self, raw, partial):
        if self.save is not None:
            try:
                self.save.write(raw)
                self.save.flush()
            except OSError as e:
                raise SaveError(
                    "cannot write %s: %s" % (self.save_name or "save file", e.strerror or e)
                ) from None
        line = make_line(raw, partial)
        c = self.counters
        c["lines"] += 1
        c["log" if line.log is not None else "text"] += 1
        if line.garbled:
            c["garbled"] += 1
        if not self.filter.wants(line):
            return
        c["shown"] += 1
        frames = self.frames.find(line)
        c["frames"] += len(frames)
        c["frames_bad"] += sum(1 for f in frames if "error" in f)
        now = self.clock()
        if self.as_json:
            self.out.write(json.dumps(line_object(line, frames, now)) + "\n")
        else:
            stamp = None
            if self.timestamps:
                stamp = time.strftime("%H:%M:%S", time.localtime(now)) + ".%03d" % (
                    int(now * 1000) % 1000
                )
            for row in render_text(line, frames, self.color, stamp):
                self.out.write(row + "\n")
        self.out.flush()


# --- the port -----------------------------------------------------------------------------


class PortError(Exception):
    """The port cannot be used (and waiting would not help, or was not asked for)."""


def open_serial(url, baudrate, timeout):
    """The port, held exclusively, every byte kept (host_tools/serialport.py)."""
    return serialport.open_serial(url, baudrate, timeout, keep_input=True)


port_busy = serialport.port_busy


BUSY = "port is busy (close mpremote, screen, Thonny or the other program that has it open)"


def _describe(e):
    """The reason in a pyserial error, without its repetitions ("could not open port X:
    [Errno 2] No such file or directory: 'X'" -> "No such file or directory")."""
    import errno
    import os

    code = getattr(e, "errno", None)
    cause = e.__cause__ or e.__context__
    if code is None and isinstance(cause, OSError) and cause.errno is not None:
        code = cause.errno
    elif code is None and cause is not None and cause.args and isinstance(cause.args[0], int):
        code = cause.args[0]  # termios.error is (errno, message) but not an OSError
    text = os.strerror(code) if code else (str(e) or type(e).__name__)
    if port_busy(e):
        text = "busy: another program has it open"
    elif code == errno.ENOTTY:
        text = "not a serial port (%s)" % text
    elif code == errno.EACCES:
        text += " (on Linux: add yourself to the dialout group, then log in again)"
    return text


def follow(
    url,
    monitor,
    *,
    baudrate=115200,
    open_port=open_serial,
    wait=False,
    give_up_s=None,
    stop=None,
    read_timeout=0.05,
    backoff=None,
    sleep=time.sleep,
    monotonic=time.monotonic,
):
    """Read url into monitor until stop() is true (or KeyboardInterrupt). A port that fails
    (unplugged, socket closed) is reopened with back-off, forever or for give_up_s seconds.
    Raises PortError if the port cannot be opened at the start (unless wait) or is gone for
    longer than give_up_s."""
    stop = stop or (lambda: False)
    # A USB serial adapter only buffers a few hundred bytes while its port is closed, so the
    # ceiling is short: a board that comes back is reopened before its boot lines are lost.
    backoff = backoff or Backoff(0.05, 0.5)
    port = _Port(url, monitor, lambda: open_port(url, baudrate, read_timeout), monotonic)
    try:
        while not stop():
            if port.serial is None and not port.reopen(wait, give_up_s):
                sleep(backoff.next())
                continue
            data = port.read()
            if data is None:
                continue  # gone: reopened on the next turn
            now = monotonic()
            if data:
                backoff.reset()
                monitor.feed(data, now)
            else:
                monitor.poll(now)
    finally:
        port.close()
        monitor.flush()


class _Port:
    """follow()'s serial line: the port while it is open, and what the monitor is told when it
    goes away ("gone"), stays away ("waiting") and comes back ("back")."""

    def __init__(self, url, monitor, open_port, monotonic):
        self.url = url
        self.monitor = monitor
        self.open_port = open_port
        self.monotonic = monotonic
        self.serial = None
        self.opened_once = False
        self.gone_since = None  # monotonic time it went away, or first failed to open
        self.announced = False  # the monitor was told it is away

    def reopen(self, wait, give_up_s):
        """Try to open the port: True if it is open. False means try again after a back-off;
        PortError when it cannot be used, or has been away for longer than give_up_s."""
        import serial

        url = self.url
        try:
            self.serial = self.open_port()
        except ValueError as e:  # a malformed URL or setting: waiting will not help
            raise PortError("cannot open %s: %s" % (url, e)) from None
        except (serial.SerialException, OSError) as e:
            if not self.opened_once and port_busy(e):
                # Another program has it: waiting (--wait is for a board not yet plugged in)
                # would only sit beside it. Once followed, a port taken while it was away is
                # waited for like one that is gone.
                raise PortError("%s: %s" % (url, BUSY)) from None
            if not self.opened_once and not wait:
                raise PortError("cannot open %s: %s" % (url, _describe(e))) from None
            now = self.monotonic()
            if self.gone_since is None:
                self.gone_since = now
            if not self.announced:
                self.monitor.event(
                    "waiting", "%s: not there (%s); waiting for it" % (url, _describe(e))
                )
                self.announced = True
            if give_up_s is not None and now - self.gone_since >= give_up_s:
                raise PortError(
                    "%s: gone for %.1f s, giving up (last error: %s)"
                    % (url, now - self.gone_since, _describe(e))
                ) from None
            return False
        if self.opened_once or self.announced:
            away = self.monotonic() - self.gone_since if self.gone_since is not None else 0.0
            self.monitor.event("back", "%s: back after %.1f s" % (url, away))
        self.opened_once = True
        self.gone_since = None
        self.announced = False
        return True

    def read(self):
        """What the port has (b"" after read_timeout), or None if it went away (then closed)."""
        import serial

        try:
            return self.serial.read(max(4096, self.serial.in_waiting))
        except (serial.SerialException, OSError) as e:
            self.monitor.flush()  # the partial line is shown; what follows is a new start
            self.close()
            self.gone_since = self.monotonic()
            self.monitor.event(
                "gone",
                "%s: port gone (%s); waiting for it to come back" % (self.url, _describe(e)),
            )
            self.announced = True
            return None

    def close(self):
        if self.serial is not None:
            _close(self.serial)
            self.serial = None


def _close(port):
    try:
        port.close()
    except Exception:  # noqa: BLE001 - a port that is gone may fail to close; it is closed
        pass

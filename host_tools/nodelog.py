# A node's log line (firmware/log.py writes it; README "Reading a node's log"), parsed and written
# back: `citynode monitor` (host_tools/monitor.py) and `citynode flash`'s boot check read it here.
#
#     I 540.011 link sent frame bytes=29 readings=10 seq=0
#
# level, uptime (seconds since boot, three decimals), subsystem, message, then ` key=value` fields
# (a value with a space, or empty, is double-quoted by the firmware).

import collections
import re

# "L uptime subsystem message key=value ..." (firmware/log.py _write)
_LOG_RE = re.compile(r"([DIWE]) ([0-9]+\.[0-9]{3}) ([A-Za-z_][A-Za-z0-9_]*) (.*)\Z", re.S)
# The shortest message after which everything is ` key=value` fields.
_FIELD = r' [A-Za-z_][A-Za-z0-9_]*=(?:"[^"]*"|[^\s"]*)'
_SPLIT_RE = re.compile(r"(.*?)((?:%s)*)\Z" % _FIELD, re.S)
_FIELD_RE = re.compile(r' ([A-Za-z_][A-Za-z0-9_]*)=("[^"]*"|[^\s"]*)')

LogLine = collections.namedtuple("LogLine", ("level", "uptime", "subsystem", "message", "fields"))
LogLine.__doc__ = """A parsed log line. uptime is the text as written ("540.011", seconds since
boot); fields is a tuple of (key, value) pairs in line order, values unquoted."""


def parse_log_line(text):
    """A LogLine if text is a log line from its first character, else None."""
    m = _LOG_RE.match(text)
    return None if m is None else _log_line(m)


def find_log_line(text):
    """(offset, LogLine) of a log line that starts anywhere in text, else None: on a console a
    line may carry the REPL's output glued in front ("OK", Ctrl-D) of the node's first line."""
    m = _LOG_RE.search(text)
    return None if m is None else (m.start(), _log_line(m))


def _log_line(m):
    level, uptime, subsystem, rest = m.groups()
    split = _SPLIT_RE.match(rest)  # always matches: the message may take everything
    message, field_text = split.groups()
    fields = tuple(
        (key, value[1:-1] if value.startswith('"') else value)
        for key, value in _FIELD_RE.findall(field_text)
    )
    return LogLine(level, uptime, subsystem, message, fields)


def format_log_line(log):
    """The line firmware/log.py writes for a LogLine (parse_log_line's inverse)."""
    text = "%s %s %s %s" % (log.level, log.uptime, log.subsystem, log.message)
    for key, value in log.fields:
        if " " in value or not value:
            value = '"%s"' % value
        text += " %s=%s" % (key, value)
    return text

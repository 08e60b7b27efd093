# The node's serial log: one line per event, "L uptime subsystem message key=value ...".
# Maintainers grep it (README "Reading a node's log"); the host's monitor parses the same shape.

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


DEBUG = const(0)
INFO = const(1)
WARNING = const(2)
ERROR = const(3)
_LETTERS = "DIWE"


class Log:
    """Writes `I 12.345 node sent frame seq=5 readings=10` lines to the console.

    uptime comes from the board's clock (ms since boot), so simulated nodes log simulated time.
    """

    def __init__(self, ticks_ms, level=INFO, out=print):
        self._ticks_ms = ticks_ms
        self.level = level
        self._out = out

    def _write(self, level, subsystem, message, fields):
        if level < self.level:
            return
        ms = self._ticks_ms()
        line = "%s %d.%03d %s %s" % (_LETTERS[level], ms // 1000, ms % 1000, subsystem, message)
        if fields:
            for key in sorted(fields):
                value = fields[key]
                if isinstance(value, str) and (" " in value or not value):
                    value = '"%s"' % value
                line += " %s=%s" % (key, value)
        self._out(line)

    def debug(self, subsystem, message, **fields):
        self._write(DEBUG, subsystem, message, fields)

    def info(self, subsystem, message, **fields):
        self._write(INFO, subsystem, message, fields)

    def warning(self, subsystem, message, **fields):
        self._write(WARNING, subsystem, message, fields)

    def error(self, subsystem, message, **fields):
        self._write(ERROR, subsystem, message, fields)

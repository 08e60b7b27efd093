# The node's serial log: one line per event, "L uptime subsystem message key=value ...".
# Maintainers grep it (README "Reading a node's log"); the host's monitor parses the same shape.

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


DEBUG = const(0)  # Log(level=DEBUG) shows every line (tests); the node logs from INFO up
_INFO = const(1)
_WARNING = const(2)
_ERROR = const(3)
_LETTERS = const("DIWE")


_KEEP = const(8)  # lines kept in RAM for the post-mortem file
_WIDTH = const(120)  # bytes kept of each (a longer line is cut there in the file, not on screen)


class Log:
    """Writes `I 12.345 node sent frame seq=5 readings=10` lines to the console.

    uptime comes from the board's clock (ms since boot), so simulated nodes log simulated time.
    The last lines are kept in RAM; save() writes them to flash (before a reset, after an
    error) so that the next boot can show them (bringup.dump_log()).
    """

    def __init__(self, ticks_ms, level=_INFO, out=print):
        self._ticks_ms = ticks_ms
        self.level = level
        self._out = out
        # One buffer allocated at boot, not a string per line: kept lines would otherwise pin
        # small blocks all over the heap between cycles (a 64 KB heap fragments).
        self._ring = bytearray(_KEEP * _WIDTH)
        self._used = bytearray(_KEEP)  # bytes of each slot in use
        self._next = 0

    def lines(self):
        """The kept lines, oldest first."""
        out = []
        for i in range(_KEEP):
            k = (self._next + i) % _KEEP
            if self._used[k]:
                out.append(bytes(self._ring[k * _WIDTH : k * _WIDTH + self._used[k]]).decode())
        return out

    def save(self, path, reset_cause):
        """Persist the last lines and why the node is about to reset (atomic rename)."""
        try:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.write("reset_cause=%s\n" % reset_cause)
                for line in self.lines():
                    f.write(line)
                    f.write("\n")
            import os

            os.rename(tmp, path)
        except OSError:
            pass  # a full or broken filesystem must not stop the reset

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
        b = line.encode()
        n = len(b)
        if n > _WIDTH:
            n = _WIDTH
            while n and b[n] & 0xC0 == 0x80:  # not inside a UTF-8 sequence
                n -= 1
        k = self._next
        self._ring[k * _WIDTH : k * _WIDTH + n] = memoryview(b)[:n]
        self._used[k] = n
        self._next = (k + 1) % _KEEP
        self._out(line)

    def debug(self, subsystem, message, **fields):
        self._write(DEBUG, subsystem, message, fields)

    def info(self, subsystem, message, **fields):
        self._write(_INFO, subsystem, message, fields)

    def warning(self, subsystem, message, **fields):
        self._write(_WARNING, subsystem, message, fields)

    def error(self, subsystem, message, **fields):
        self._write(_ERROR, subsystem, message, fields)

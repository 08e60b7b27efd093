# Folding log: a flood of like log lines (45 000 bad datagrams) becomes a handful of lines with
# counts. Wraps a logging.Logger; callers keep their own counters, this limits only what is logged.
#
# A "kind" of line is (level, key), key any hashable the caller picks, e.g. ("frame rejected",
# reason, node). All times are from `clock` (seconds, must not go backwards; injectable for tests).
# - The first line of a kind is logged at once, as given (the caller's msg, args and source line),
#   and opens that kind's window of `window_s` seconds (default 60).
# - Further lines of the kind inside its window are only counted, not logged.
# - When the window has ended (noticed on the next call for any kind, or by flush()), one summary
#   line is logged at the kind's level if there were repeats: the first line's text plus
#   " (repeated N more times in 60 s)", N not counting the first line, the span being how long the
#   window really ran (shorter when cut by eviction or a final flush). A kind without repeats is
#   just forgotten. Its next line is a first line again: a steady flood writes 2 lines per kind
#   per window.
# - Rate cap, after Linux's lib/ratelimit.c: at most `max_per_second` lines in a rate second, which
#   begins with the first line logged after the previous one ended (so any span of one second holds
#   at most twice that). A first line over the cap is counted and its kind is not tracked (its next
#   line tries again, so each kind still gets its first example out once the rate allows). One
#   "N log lines suppressed (rate limit)" line, at the most severe level among them, opens the next
#   rate second, or comes from flush() once the second is over. Summary lines count against the
#   cap but are never dropped: each answers a first line that was let through, and dropping it
#   would lose how often the thing happened.
# - At most `max_kinds` kinds are tracked (a sender can invent node ids): a new kind over the bound
#   evicts the least recently used one, whose summary is logged first.
# - flush() logs what is due (ended windows, the suppressed count of an ended rate second): call it
#   from a periodic poll. flush(final=True), at shutdown, logs everything pending now and forgets.
# - Thread-safe: one lock around the bookkeeping. Lines go to the logger after it is released, so
#   a slow handler does not hold up other threads' counting and a handler that logs through the
#   same FoldingLog cannot deadlock (lines of different threads may then interleave in any order).

import collections
import logging
import threading
import time
from collections.abc import Mapping

_RATE_INTERVAL_S = 1.0
_REPEATED = "%s (repeated %d more times in %s s)"
_REPEATED_ONCE = "%s (repeated %d more time in %s s)"
_SUPPRESSED = "%d log lines suppressed (rate limit)"
_SUPPRESSED_ONE = "%d log line suppressed (rate limit)"
# How far up the stack the logging record's file and line are taken from: the caller of
# warning()/flush(), past _emit and _log (public method -> _log -> _emit -> Logger.log).
_CALLER_OF_LOG = 4
_CALLER_OF_FLUSH = 3


class _Kind:
    """One tracked kind: its first line's text and level, when its window opened, when it was
    last seen (for least-recently-used eviction), and its repeats not yet reported."""

    __slots__ = ("level", "text", "start", "last", "repeats")

    def __init__(self, level, text, start):
        self.level = level
        self.text = text
        self.start = start
        self.last = start
        self.repeats = 0


def _text(msg, args):
    """The message as logging would render it (LogRecord.getMessage), kept for the summary so
    the arguments themselves are not held for a whole window."""
    msg = str(msg)
    if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
        args = args[0]  # logging's "%(name)s" form
    if not args:
        return msg
    try:
        return msg % args
    except (TypeError, ValueError, KeyError):  # a bad call: show it rather than lose the line
        return "%s %r" % (msg, args)


def _seconds(span):
    return "%.0f" % span if span >= 10 else "%.1f" % span


class FoldingLog:
    """A logging.Logger that folds repeated lines of a kind into one summary with a count and
    caps the lines per second; see the module header for the exact rules."""

    def __init__(
        self, logger, window_s=60.0, max_per_second=20, max_kinds=1000, clock=time.monotonic
    ):
        if not window_s > 0:
            raise ValueError("window_s must be positive, got %r" % (window_s,))
        if max_per_second < 1:
            raise ValueError("max_per_second must be at least 1, got %r" % (max_per_second,))
        if max_kinds < 1:
            raise ValueError("max_kinds must be at least 1, got %r" % (max_kinds,))
        self.logger = logger
        self.window_s = window_s
        self.max_per_second = max_per_second
        self.max_kinds = max_kinds
        self._clock = clock
        self._lock = threading.Lock()
        self._kinds = collections.OrderedDict()  # (level, key) -> _Kind, oldest window first
        self._rate_start = None  # when the current rate second began; None: none open
        self._rate_lines = 0  # lines logged in it
        self._suppressed = 0  # first lines dropped by the cap, not yet reported
        self._suppressed_level = logging.NOTSET  # the most severe of them

    def debug(self, key, msg, *args):
        self._log(logging.DEBUG, key, msg, args)

    def info(self, key, msg, *args):
        self._log(logging.INFO, key, msg, args)

    def warning(self, key, msg, *args):
        self._log(logging.WARNING, key, msg, args)

    def error(self, key, msg, *args):
        self._log(logging.ERROR, key, msg, args)

    def log(self, level, key, msg, *args):
        self._log(level, key, msg, args)

    def flush(self, final=False):
        """Log what is due now: summaries of ended windows, the suppressed count of an ended
        rate second. final=True (at shutdown): log every pending summary and count now, with
        windows cut short, and forget all kinds."""
        out = []
        with self._lock:
            now = self._clock()
            self._end_rate_second(now, out, final)
            self._end_windows(now, out, final)
            if final:
                self._rate_start = None
                self._rate_lines = 0
        self._emit(out, _CALLER_OF_FLUSH)

    def __len__(self):
        """The number of kinds tracked now (at most max_kinds)."""
        with self._lock:
            return len(self._kinds)

    # --- inside the lock: bookkeeping only, lines to log are appended to `out` ---------------

    def _log(self, level, key, msg, args):
        if not self.logger.isEnabledFor(level):
            return  # not logged anyway: neither tracked nor counted as suppressed
        out = []
        kind_key = (level, key)
        with self._lock:
            now = self._clock()
            self._end_rate_second(now, out, False)
            self._end_windows(now, out, False)
            kind = self._kinds.get(kind_key)
            if kind is not None:
                kind.repeats += 1
                kind.last = now
            elif self._admit(now, level):
                if len(self._kinds) >= self.max_kinds:
                    self._evict(now, out)
                self._kinds[kind_key] = _Kind(level, _text(msg, args), now)
                out.append((level, msg, args))
        self._emit(out, _CALLER_OF_LOG)

    def _count_line(self, now):
        if self._rate_start is None:
            self._rate_start = now
            self._rate_lines = 0
        self._rate_lines += 1

    def _admit(self, now, level):
        """True if a first line may be logged now (and count it), else count it suppressed."""
        if self._rate_start is not None and self._rate_lines >= self.max_per_second:
            self._suppressed += 1
            self._suppressed_level = max(self._suppressed_level, level)
            return False
        self._count_line(now)
        return True

    def _end_rate_second(self, now, out, final):
        if self._rate_start is None:
            return
        if not final and now - self._rate_start < _RATE_INTERVAL_S:
            return
        self._rate_start = None
        if self._suppressed:
            self._count_line(now)  # the report is the first line of the new rate second
            n = self._suppressed
            out.append((self._suppressed_level, _SUPPRESSED if n != 1 else _SUPPRESSED_ONE, (n,)))
            self._suppressed = 0
            self._suppressed_level = logging.NOTSET

    def _end_windows(self, now, out, final):
        kinds = self._kinds
        while kinds:
            kind_key = next(iter(kinds))  # oldest window first: it ends first
            kind = kinds[kind_key]
            if not final and now < kind.start + self.window_s:
                break
            del kinds[kind_key]
            self._summary(kind, now, out)

    def _evict(self, now, out):
        kinds = self._kinds
        # A linear scan, but only when a new kind arrives at a full table, and new kinds come
        # no faster than the rate cap lets their first lines through.
        kind_key = min(kinds, key=lambda k: kinds[k].last)
        self._summary(kinds.pop(kind_key), now, out)

    def _summary(self, kind, now, out):
        if not kind.repeats:
            return
        self._count_line(now)
        span = _seconds(min(now - kind.start, self.window_s))
        template = _REPEATED if kind.repeats != 1 else _REPEATED_ONCE
        out.append((kind.level, template, (kind.text, kind.repeats, span)))

    # --- outside the lock -----------------------------------------------------------------

    def _emit(self, out, stacklevel):
        for level, msg, args in out:
            self.logger.log(level, msg, *args, stacklevel=stacklevel)

# Forwarders: deliver spooled readings (host_tools/spool.py) to remote sinks, one thread per
# sink, so a slow, hanging or dead sink never holds up receiving or the other sinks.
#
# Each forwarder reads a batch past its progress mark, hands it to sink.deliver(rows) (which
# returns only once the remote end confirmed, within the sink's timeout), then moves the mark.
# A failure is counted by reason, logged, and retried after an exponential back-off with jitter;
# the same batch is offered again, so delivery is at least once and the reading ids make it
# exactly once for a backend that keeps one copy per id (host_tools/sinks.py).

import collections
import logging
import random
import threading
import time

from host_tools.sinks import DeliveryError


class Backoff:
    """Delays between retries: base * 2^(failures-1), capped, with "equal jitter" (a uniform
    draw in [d/2, d]) so that many receivers do not retry a shared backend in lockstep."""

    def __init__(self, base=0.5, cap=60.0, rng=None):
        self.base = base
        self.cap = cap
        self.failures = 0
        self._random = (rng or random.Random()).random

    def next(self):
        self.failures += 1
        delay = min(self.cap, self.base * 2 ** min(self.failures - 1, 30))
        return delay / 2 + self._random() * delay / 2

    def reset(self):
        self.failures = 0


class Forwarder:
    """Delivers one remote sink's share of the spool, on a thread of its own."""

    def __init__(self, spool, sink, batch=500, backoff=None, poll_s=1.0, log=None):
        self.spool = spool
        self.sink = sink
        self.name = sink.name
        self.batch = batch
        self.backoff = backoff if backoff is not None else Backoff()
        self.poll_s = poll_s
        self.log = log if log is not None else logging.getLogger("citynode.forward")
        self.counters = collections.Counter()
        self.state = "idle"  # idle, delivering, retrying
        self.last_error = None
        self.retry_at = None  # time.time() of the next attempt while retrying
        self._stop = threading.Event()
        self._thread = None
        spool.register(self.name)

    def start(self):
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout=15.0):
        """Ask the thread to stop and wait up to timeout seconds (a delivery under way ends by
        its sink's own timeout). True if it stopped."""
        self._stop.set()
        self.spool.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _run(self):
        while not self._stop.is_set():
            try:
                rows = self.spool.read(self.name, self.batch)
            except Exception as e:  # a spool that cannot be read: retry, never die
                self._failed("spool", "cannot read the spool: %s: %s" % (type(e).__name__, e), 0)
                continue
            if not rows:
                self.state = "idle"
                self.spool.wait(self.poll_s)
                continue
            self.state = "delivering"
            try:
                self.sink.deliver([r[1:] for r in rows])
            except DeliveryError as e:
                self._failed(e.reason, str(e), len(rows))
                continue
            except Exception as e:  # a bug in a sink: count, log, retry; never lose the rows
                self.log.exception(
                    "%s: internal error delivering %d readings", self.name, len(rows)
                )
                self._failed("internal", "%s: %s" % (type(e).__name__, e), len(rows))
                continue
            try:
                self.spool.advance(self.name, rows[-1][0])
                self.spool.prune()
            except Exception as e:  # delivered but not recorded: they will be delivered again
                self.counters["progress_error"] += 1
                self.log.warning("%s: cannot record progress in the spool: %s", self.name, e)
            self.counters["delivered"] += len(rows)
            if self.backoff.failures:
                self.log.info(
                    "%s: delivering again after %d failed attempts",
                    self.name,
                    self.backoff.failures,
                )
            self.backoff.reset()
            self.last_error = None
            self.retry_at = None
            self.state = "idle"

    def _failed(self, reason, message, count):
        self.counters["failed_" + reason] += 1
        self.last_error = message
        self.state = "retrying"
        delay = self.backoff.next()
        self.retry_at = time.time() + delay
        try:
            waiting = self.spool.backlog(self.name)
        except Exception:
            waiting = count
        self.log.warning(
            "%s: delivery failed reason=%s attempt=%d: %s; %d readings waiting in the spool, "
            "retry in %.1f s",
            self.name,
            reason,
            self.backoff.failures,
            message,
            waiting,
            delay,
        )
        self._stop.wait(delay)

    def status(self):
        """A JSON-ready summary for the status file."""
        try:
            backlog = self.spool.backlog(self.name)
        except Exception:
            backlog = None
        return {
            "state": self.state,
            "backlog": backlog,
            "counters": dict(self.counters),
            "last_error": self.last_error,
            "retry_at": self.retry_at,
        }

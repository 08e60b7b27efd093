# Forwarders: deliver spooled readings (host_tools/receive/spool.py) to remote sinks, one thread
# per sink, so a slow, hanging or dead sink never holds up receiving or the other sinks.
#
# Each forwarder reads a batch past its progress mark, hands it to sink.deliver(rows) (which
# returns only once the remote end confirmed, within the sink's timeout), then moves the mark.
# A failure is counted by reason, logged, and retried after an exponential back-off with jitter
# (at least the Retry-After the remote end asked for, up to the back-off's cap); the same batch
# is offered again, so delivery is at least once and the reading ids make it exactly once for a
# backend that keeps one copy per id (host_tools/receive/sinks.py). A batch the remote end refused
# for good (DeliveryError.permanent: an HTTP 4xx) goes to the spool's dead letters, counted and
# logged once, and the forwarder carries on with the next (host_tools/receive/spool.py: requeue).

import collections
import logging
import threading
import time

from host_tools.backoff import Backoff
from host_tools.receive.sinks import DeliveryError


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
                if e.permanent:
                    self._dead_letter(rows, e)
                else:
                    self._failed(e.reason, str(e), len(rows), e.retry_after)
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

    def _dead_letter(self, rows, error):
        """The sink refused rows for good: to the dead letters, and on with the next batch."""
        try:
            self.spool.dead_letter(self.name, rows, error.reason, str(error))
        except Exception as e:  # kept in the queue: retried like any failure
            self._failed(
                "spool",
                "cannot move %d readings to the dead letters: %s: %s (the sink said: %s)"
                % (len(rows), type(e).__name__, e, error),
                len(rows),
            )
            return
        self.counters["failed_" + error.reason] += 1
        self.counters["dead_letter"] += len(rows)
        self.last_error = str(error)
        self.log.error(
            "%s: %d readings refused, not retried: %s; moved to the spool's dead letters "
            "(spool ids %d..%d); once the cause is fixed, queue them again with "
            "Spool(%r).requeue(%r)",
            self.name,
            len(rows),
            error,
            rows[0][0],
            rows[-1][0],
            self.spool.path,
            self.name,
        )
        self.backoff.reset()
        self.retry_at = None
        self.state = "idle"
        try:
            self.spool.prune()
        except Exception as e:  # pruned by a later delivery
            self.log.warning("%s: cannot prune the spool: %s", self.name, e)

    def _failed(self, reason, message, count, retry_after=None):
        self.counters["failed_" + reason] += 1
        self.last_error = message
        self.state = "retrying"
        delay = self.backoff.next()
        if retry_after is not None:  # asked by the remote end; --retry-max still bounds it
            delay = max(delay, min(retry_after, self.backoff.cap))
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
            dead = self.spool.dead_count(self.name)
        except Exception:
            backlog = dead = None
        return {
            "state": self.state,
            "backlog": backlog,
            "dead_letters": dead,
            "counters": dict(self.counters),
            "last_error": self.last_error,
            "retry_at": self.retry_at,
        }

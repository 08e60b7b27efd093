# The folding log (host_tools/receive/logfold.py): first lines pass, repeats fold into one counted
# summary, a global per-second cap, a bound on kinds tracked; a fake clock and a real handler.
import itertools
import logging
import re
import sys
import threading

import pytest

from host_tools.receive.logfold import FoldingLog

REJECTED = "frame rejected reason=%s node=%s len=%d: %s"
BAD_TAG = "bad tag for node 7 (wrong key or corrupted frame)"
REPEATED = re.compile(r" \(repeated (\d+) more times? in [0-9.]+ s\)$")
SUPPRESSED = re.compile(r"^(\d+) log lines? suppressed \(rate limit\)$")


class FakeClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


class Capture(logging.Handler):
    """Every record its logger lets through, with the fake time it was emitted at."""

    def __init__(self, clock):
        super().__init__(logging.DEBUG)
        self.logger = None  # set by the fixture
        self.clock = clock
        self.records = []
        self.times = []

    def emit(self, record):
        self.records.append(record)
        self.times.append(self.clock())

    def messages(self):
        return [r.getMessage() for r in self.records]


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def capture(clock, request):
    logger = logging.getLogger("test.logfold." + request.node.name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    handler = Capture(clock)
    handler.logger = logger
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


def folding(capture, clock, **kw):
    return FoldingLog(capture.logger, clock=clock, **kw)


def reject(folded, reason="tag", node=7, length=40, message=BAD_TAG):
    folded.warning(("frame rejected", reason, node), REJECTED, reason, node, length, message)


def lines_accounted(messages):
    """How many calls the logged lines stand for: 1 per line, N per summary or suppression."""
    total = 0
    for m in messages:
        repeated = REPEATED.search(m)
        suppressed = SUPPRESSED.match(m)
        if repeated:
            total += int(repeated.group(1))
        elif suppressed:
            total += int(suppressed.group(1))
        else:
            total += 1
    return total


def test_first_line_is_logged_at_once_as_given(capture, clock):
    folded = folding(capture, clock)
    reject(folded)
    folded.error("sink", "sink write failed: %s", "disk full")
    folded.info("status", "status node=%d seq=%d", 7, 12)
    records = capture.records
    assert [r.levelno for r in records] == [logging.WARNING, logging.ERROR, logging.INFO]
    assert records[0].msg == REJECTED
    assert records[0].args == ("tag", 7, 40, BAD_TAG)
    assert records[0].getMessage() == "frame rejected reason=tag node=7 len=40: " + BAD_TAG
    # The record names the caller's line, not logfold's: logs stay traceable to the receiver.
    assert records[1].pathname == __file__
    assert records[1].funcName == "test_first_line_is_logged_at_once_as_given"


def test_repeats_fold_into_one_summary_when_the_window_ends(capture, clock):
    folded = folding(capture, clock)
    reject(folded, length=40)
    for k in range(1, 5):
        clock.t = k
        reject(folded, length=40 + k)  # same kind, other details: still folded
    clock.t = 59.9
    folded.warning("other", "another kind")
    assert capture.messages() == [
        "frame rejected reason=tag node=7 len=40: " + BAD_TAG,
        "another kind",
    ]
    clock.t = 60.0  # the call for any kind notices the ended window
    folded.warning("other", "another kind")
    assert capture.messages()[2:] == [
        "frame rejected reason=tag node=7 len=40: " + BAD_TAG + " (repeated 4 more times in 60 s)"
    ]
    assert capture.records[2].levelno == logging.WARNING


def test_after_its_window_a_kind_is_logged_again_and_without_repeats_no_summary(capture, clock):
    folded = folding(capture, clock, window_s=10)
    reject(folded, length=40)
    clock.t = 10
    reject(folded, length=41)
    clock.t = 15
    reject(folded, length=42)
    clock.t = 20
    folded.flush()
    assert capture.messages() == [
        "frame rejected reason=tag node=7 len=40: " + BAD_TAG,
        "frame rejected reason=tag node=7 len=41: " + BAD_TAG,
        "frame rejected reason=tag node=7 len=41: " + BAD_TAG + " (repeated 1 more time in 10 s)",
    ]


def test_flush_logs_ended_windows_only_and_final_flush_everything(capture, clock):
    folded = folding(capture, clock)
    folded.warning("a", "line a")
    folded.warning("a", "line a")
    clock.t = 5
    folded.warning("b", "line b %d", 1)
    folded.warning("b", "line b %d", 2)
    folded.warning("b", "line b %d", 3)
    clock.t = 30
    folded.flush()
    assert capture.messages() == ["line a", "line b 1"]
    clock.t = 500  # flushed late: the summary still says how long the window was
    folded.flush()
    assert capture.messages()[2:] == [
        "line a (repeated 1 more time in 60 s)",
        "line b 1 (repeated 2 more times in 60 s)",
    ]
    assert len(folded) == 0
    folded.warning("a", "line a")
    clock.t = 502.5
    folded.warning("a", "line a")
    folded.flush(final=True)  # shutdown: the window was cut short, and the line says so
    assert capture.messages()[4:] == ["line a", "line a (repeated 1 more time in 2.5 s)"]
    assert len(folded) == 0


def test_messages_with_a_percent_sign_and_no_args_survive_the_summary(capture, clock):
    folded = folding(capture, clock)
    folded.warning("disk", "disk 100% full")
    folded.warning("disk", "disk 100% full")
    folded.flush(final=True)
    assert capture.messages() == [
        "disk 100% full",
        "disk 100% full (repeated 1 more time in 0.0 s)",
    ]


def test_the_global_cap_counts_lines_over_it_and_reports_them_in_one_line(capture, clock):
    folded = folding(capture, clock, max_per_second=3)
    for node in range(10):
        folded.warning(node, "node %d", node)
    clock.t = 0.5
    folded.error("e", "an error")  # over the cap too: the report takes the most severe level
    clock.t = 0.99
    folded.flush()  # the rate second is not over: nothing yet
    assert capture.messages() == ["node 0", "node 1", "node 2"]
    clock.t = 1.0
    folded.warning(9, "node %d", 9)  # suppressed before, so not tracked: logged now
    folded.warning(8, "node %d", 8)
    folded.warning(7, "node %d", 7)  # the report was one of this second's three lines
    assert capture.messages()[3:] == ["8 log lines suppressed (rate limit)", "node 9", "node 8"]
    assert capture.records[3].levelno == logging.ERROR
    clock.t = 2.5
    folded.flush()  # the second is over: flush reports without waiting for a call
    assert capture.messages()[6:] == ["1 log line suppressed (rate limit)"]
    assert capture.records[6].levelno == logging.WARNING
    assert lines_accounted(capture.messages()) == 14  # every call accounted for


def test_summaries_are_never_dropped_but_count_against_the_cap(capture, clock):
    folded = folding(capture, clock, window_s=1, max_per_second=2)
    folded.warning("a", "line a")
    folded.warning("a", "line a")
    folded.warning("b", "line b")
    folded.warning("c", "line c")  # over the cap
    clock.t = 1.0
    folded.warning("d", "line d")  # after the report and a's summary: over the cap again
    assert capture.messages() == [
        "line a",
        "line b",
        "1 log line suppressed (rate limit)",
        "line a (repeated 1 more time in 1.0 s)",
    ]
    folded.flush(final=True)
    assert capture.messages()[4:] == ["1 log line suppressed (rate limit)"]


def test_final_flush_reports_suppressed_lines_at_once(capture, clock):
    folded = folding(capture, clock, max_per_second=1)
    folded.info("a", "a")
    folded.info("b", "b")
    folded.info("c", "c")
    folded.flush(final=True)
    assert capture.messages() == ["a", "2 log lines suppressed (rate limit)"]
    assert capture.records[1].levelno == logging.INFO


def test_the_least_recently_used_kind_is_evicted_with_its_summary(capture, clock):
    folded = folding(capture, clock, max_kinds=3)
    for t, key in [(0, "a"), (1, "b"), (2, "c"), (2.5, "c"), (3, "a"), (3.5, "b")]:
        clock.t = t
        folded.warning(key, "line %s", key)
    assert capture.messages() == ["line a", "line b", "line c"]
    clock.t = 4
    folded.warning("d", "line d")  # c was used least recently (2.5), a and b later
    assert capture.messages()[3:] == ["line c (repeated 1 more time in 2.0 s)", "line d"]
    assert len(folded) == 3
    clock.t = 5
    folded.warning("a", "line a")  # still tracked: folded
    folded.warning("c", "line c")  # evicted: a first line again (evicting b, no summary lost)
    assert capture.messages()[5:] == ["line b (repeated 1 more time in 4.0 s)", "line c"]


def test_invented_keys_keep_memory_and_lines_per_second_bounded(capture, clock):
    folded = folding(capture, clock, max_per_second=20, max_kinds=100)
    most_tracked = 0
    for i in range(45000):  # a new node id in every datagram, 500 a second for 90 s
        clock.t = i / 500
        reject(folded, reason="unknown_node", node=i)
        most_tracked = max(most_tracked, len(folded))
    assert most_tracked == 100
    per_second = [0] * 90
    for t in capture.times:
        per_second[int(t)] += 1
    assert per_second == [20] * 90  # the cap, including each second's suppression report
    folded.flush(final=True)  # shutdown: the last second's count, over the cap
    assert SUPPRESSED.match(capture.messages()[-1])
    assert len(capture.records) == 20 * 90 + 1
    assert lines_accounted(capture.messages()) == 45000


def test_a_flood_of_few_kinds_writes_a_few_lines(capture, clock):
    folded = folding(capture, clock)
    kinds = [("tag", 7), ("tag", 9), ("too_short", "-")]
    for i in range(45000):  # 500 datagrams a second for 90 s, the receiver polling twice a second
        clock.t = i / 500
        reason, node = kinds[i % 3]
        reject(folded, reason=reason, node=node)
        if i % 250 == 0:
            folded.flush()
    folded.flush(final=True)
    messages = capture.messages()
    # Per kind: first line at 0 s, its summary and a new first line at 60 s, a summary at the end.
    assert len(messages) == 12
    assert messages.count("frame rejected reason=tag node=7 len=40: " + BAD_TAG) == 2
    assert (
        "frame rejected reason=tag node=7 len=40: "
        + BAD_TAG
        + " (repeated 9999 more times in 60 s)"
    ) in messages
    assert lines_accounted(messages) == 45000


def test_levels_are_separate_kinds_and_disabled_levels_cost_nothing(capture, clock):
    capture.logger.setLevel(logging.INFO)
    folded = folding(capture, clock, max_per_second=2)
    for _ in range(5):
        folded.debug("k", "debug line")  # below the level: not tracked, not rate-counted
    folded.warning("k", "same key")
    folded.error("k", "same key")
    folded.error("k", "same key")
    assert len(folded) == 2
    folded.flush(final=True)
    assert [(r.levelno, r.getMessage()) for r in capture.records] == [
        (logging.WARNING, "same key"),
        (logging.ERROR, "same key"),
        (logging.ERROR, "same key (repeated 1 more time in 0.0 s)"),
    ]


def test_concurrent_threads_lose_no_count(capture):
    ticks = itertools.count()

    def clock():  # 1 ms later at every call; FoldingLog calls it under its lock
        return next(ticks) / 1000

    folded = FoldingLog(
        capture.logger,
        window_s=2.0,
        max_per_second=20,
        max_kinds=50,
        clock=clock,
    )
    threads_n, calls_n = 8, 5000
    start = threading.Barrier(threads_n)

    def flood(thread):
        start.wait()
        for i in range(calls_n):
            level = logging.ERROR if i % 7 == 0 else logging.WARNING
            folded.log(level, (thread, i % 40), "thread %d kind %d", thread, i % 40)
            if i % 500 == 0:
                folded.flush()

    threads = [threading.Thread(target=flood, args=(n,)) for n in range(threads_n)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so a missing lock shows
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    folded.flush(final=True)
    messages = capture.messages()
    # Eviction, window ends, suppression and summaries all happened, and nothing was lost.
    assert any(SUPPRESSED.match(m) for m in messages)
    assert any(REPEATED.search(m) for m in messages)
    assert lines_accounted(messages) == threads_n * calls_n


def test_bad_settings_are_refused(capture, clock):
    logger = capture.logger
    with pytest.raises(ValueError):
        FoldingLog(logger, window_s=0)
    with pytest.raises(ValueError):
        FoldingLog(logger, max_per_second=0)
    with pytest.raises(ValueError):
        FoldingLog(logger, max_kinds=0)

# firmware/clock.py and wiring.open_clock on CPython (they run unchanged on both): offsets learned
# from acks, and the RTC link between boots (a boot that never learned the time is placed by the
# next one's clock when the RTC counted on through the reset between them). The fleet runs in
# tests/test_node.py check the same on the unix port, end to end.

from hypothesis import given
from hypothesis import strategies as st

from firmware.wiring import open_clock


def epoch(clock):
    return clock._rtc[clock.boot][1]


def boots(path, plan):
    """Run boots one after another. plan: [(gap_ms before the boot, kept, uptime_ms)]; the RTC
    restarts at 0 whenever kept is False (a power-on). Returns ([(rtc at boot, epoch)], the
    last boot's Clock)."""
    rtc = 0
    placed = []
    clock = None
    for boot, (gap, kept, uptime) in enumerate(plan, start=1):
        rtc = rtc + gap if kept else 0
        clock = open_clock(boot, rtc, kept, str(path))
        placed.append((rtc, epoch(clock)))
        rtc += uptime
    return placed, clock


def test_a_boot_without_time_is_placed_by_the_next_boot_over_the_rtc(tmp_path):
    path = tmp_path / "clock.dat"
    placed, clock = boots(path, [(0, False, 600_000), (2_000, True, 10_000)])
    assert [e for _, e in placed] == [0, 0]
    # boot 1's reading at 300 s: 300 s + 2 s + 10 s ago, seen from boot 2 at 10 s
    assert clock.age_ms(1, 300_000, 10_000) == 312_000
    assert clock.offset() is None  # no ack was needed for it


def test_a_power_cut_between_two_boots_links_nothing(tmp_path):
    path = tmp_path / "clock.dat"
    placed, clock = boots(path, [(0, False, 600_000), (2_000, False, 10_000)])
    assert [e for _, e in placed] == [0, 1]
    assert clock.age_ms(1, 300_000, 10_000) is None


def test_an_rtc_that_went_back_starts_a_new_epoch(tmp_path):
    """A reset the board thinks kept the RTC, but the RTC reads less than at the last boot."""
    path = tmp_path / "clock.dat"
    open_clock(1, 50_000, False, str(path))
    clock = open_clock(2, 40_000, True, str(path))
    assert epoch(clock) == 1
    assert clock.age_ms(1, 0, 0) is None


def test_a_missing_boot_breaks_the_chain(tmp_path):
    """Boot 2 left no record (an older firmware, a lost file): boot 3 cannot know what the RTC
    did across boot 2's resets, so boot 1 stays unlinked."""
    path = tmp_path / "clock.dat"
    open_clock(1, 0, False, str(path))
    clock = open_clock(3, 100_000, True, str(path))
    assert epoch(clock) == 1
    assert clock.age_ms(1, 0, 0) is None


def test_the_rtc_comes_before_the_offsets_from_acks(tmp_path):
    """Offsets come from acks' host time in whole seconds: two boots' offsets may be a second
    or more apart from the truth; within one RTC epoch the RTC places a reading to the ms."""
    path = tmp_path / "clock.dat"
    first = open_clock(1, 0, False, str(path))
    first.sync(1_700_000_000, 400)  # the host said :00 when the truth was :00.6
    second = open_clock(2, 10_000, True, str(path))
    second.sync(1_700_000_011, 0)  # ... and :11 when it was :10.6
    assert second.age_ms(1, 9_000, 500) == 1_500  # not 2 900, as the offsets would say


def test_offsets_place_what_the_rtc_cannot_and_the_old_file_format_is_read(tmp_path):
    path = tmp_path / "clock.dat"
    path.write_text("1 1700000000000\n")  # the first format: "<boot> <offset>"
    # boot 1 has no RTC record: no link, but its offset is known
    clock = open_clock(2, 5_000, True, str(path))
    assert clock.sync(1_700_000_100, 0) == 0
    assert clock.age_ms(1, 0, 0) == 100_000
    again = open_clock(2, None, False, str(path))  # a deep-sleep wake: read, not placed again
    assert again.offset() == 1_700_000_100_000
    assert again.offset(1) == 1_700_000_000_000
    lines = path.read_text().splitlines()
    assert lines == ["1 1700000000000 - -", "2 1700000100000 5000 0"]


def test_torn_lines_are_skipped(tmp_path):
    path = tmp_path / "clock.dat"
    path.write_text("1 - 0 0\n2 12 x 0\n3\nzz 1\n4 - 500 0")
    clock = open_clock(5, 900, True, str(path))
    assert epoch(clock) == 0  # boot 4's record is whole: the chain goes on
    assert clock.age_ms(4, 0, 0) == 400
    assert clock.age_ms(1, 0, 0) == 900  # boot 1 is in the same epoch 0
    assert clock.age_ms(2, 0, 0) is None


def test_only_the_last_boots_are_kept(tmp_path):
    path = tmp_path / "clock.dat"
    boots(path, [(1_000, True, 1_000)] * 20)
    assert len(path.read_text().splitlines()) == 8


plans = st.lists(
    st.tuples(st.integers(0, 10**9), st.booleans(), st.integers(0, 10**9)),
    min_size=1,
    max_size=10,
)


@given(plans, st.data())
def test_ages_over_the_rtc_are_the_true_ages_within_an_epoch(tmp_path_factory, plan, data):
    """Whatever resets and power cuts happen, a reading of an earlier boot gets an age exactly
    when no power-on came between, and then the true one."""
    path = tmp_path_factory.mktemp("clock") / "clock.dat"
    placed, clock = boots(path, plan)
    last = len(plan)
    now = data.draw(st.integers(0, plan[-1][2]))
    for boot in range(max(1, last - 7), last):
        ms = data.draw(st.integers(0, plan[boot - 1][2]))
        powered_on = any(not kept for _, kept, _ in plan[boot:last])
        age = clock.age_ms(boot, ms, now)
        if powered_on:
            assert age is None
        else:
            true = (placed[-1][0] + now) - (placed[boot - 1][0] + ms)
            assert age == true

# Time without a wall clock: readings are stamped (boot, ms since boot); acks tell each boot's
# offset to UTC. A frame's ages come from these, so readings taken before any ack, or during
# an earlier boot that got an ack, are placed correctly at the host (SPEC.md "Timing").
#
# A boot that never learned the time (the host was down, then the node was reset: a crash, the
# watchdog, a technician's `mpremote ... + reset`) is linked to the next boot by the board's RTC
# where it keeps counting through that reset (boards/README.md `rtc_ms`, `RTC_KEEPS`: the
# ESP32's RTC timer does through every reset but power-on; the RP2040's restarts at every
# reset). Each boot records the RTC time at which its ms clock read 0 and an RTC epoch, which
# changes whenever the RTC may have restarted; two boots of one epoch are a known distance apart,
# so one's readings are placed from the other's clock. Across a power cut nothing links them.
#
# clock.dat: a line a boot, "<boot> <offset ms or -> <rtc at boot ms or -> <epoch or ->"; the
# first format's "<boot> <offset>" lines are still read. Reading it and placing a new boot on the
# RTC is boot-time code: firmware/wiring.py open_clock(), unloaded after boot.

try:
    from micropython import const
except ImportError:  # CPython: host tests import this file unchanged

    def const(x):
        return x


_KEEP = const(8)  # boots remembered (older journal records are unplaceable)
_STEP_MS = const(2000)  # a re-sync that moves the offset by more than this is logged and persisted


class Clock:
    """Built at boot by firmware/wiring.py open_clock() (which reads clock.dat and places the
    boot on the RTC)."""

    def __init__(self, boot, path, offsets, rtc):
        self.boot = boot
        self._path = path
        self._offsets = offsets  # boot -> UTC ms minus ms since that boot
        self._rtc = rtc  # boot -> (RTC ms when that boot's clock read 0, RTC epoch)

    def offset(self, boot=None):
        return self._offsets.get(self.boot if boot is None else boot)

    def sync(self, host_time_s, ticks_ms):
        """An authenticated, fresh ack says it is host_time_s now. Returns the step in ms
        (0 the first time), or None if the offset moved too little to record."""
        new = host_time_s * 1000 - ticks_ms
        old = self._offsets.get(self.boot)
        if old is not None and abs(new - old) <= _STEP_MS:
            return None
        self._offsets[self.boot] = new
        self._save()
        return 0 if old is None else new - old

    def age_ms(self, boot, ms, now_ms):
        """How long ago (ms) a reading stamped (boot, ms) was sampled, or None if that cannot
        be known: an earlier boot that neither shares an RTC epoch with this boot nor learned
        the time (with this boot)."""
        if boot == self.boot:
            return now_ms - ms
        # The RTC first: to the ms, where the offsets learned from acks are to the second each
        then = self._rtc.get(boot)
        now = self._rtc.get(self.boot)
        if then is not None and now is not None and then[1] == now[1]:
            return (now[0] + now_ms) - (then[0] + ms)
        then = self._offsets.get(boot)
        now = self._offsets.get(self.boot)
        if then is not None and now is not None:
            return (now + now_ms) - (then + ms)
        return None

    def _save(self):
        keep = sorted(set(self._offsets) | set(self._rtc))[-_KEEP:]
        self._offsets = {b: self._offsets[b] for b in keep if b in self._offsets}
        self._rtc = {b: self._rtc[b] for b in keep if b in self._rtc}
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            for b in keep:
                offset = self._offsets.get(b)
                rtc = self._rtc.get(b)
                f.write(
                    "%d %s %s\n"
                    % (
                        b,
                        "-" if offset is None else "%d" % offset,
                        "- -" if rtc is None else "%d %d" % rtc,
                    )
                )
        import os

        os.rename(tmp, self._path)

# Time without a wall clock: readings are stamped (boot, ms since boot); acks tell each boot's
# offset to UTC. A frame's ages come from these, so readings taken before any ack, or during
# an earlier boot that got an ack, are placed correctly at the host (SPEC.md "Timing").

_KEEP = 8  # boots whose offsets are remembered (older journal records are unplaceable)
_STEP_MS = 2000  # a re-sync that moves the offset by more than this is logged and persisted


class Clock:
    def __init__(self, boot, path="clock.dat"):
        self.boot = boot
        self._path = path
        self._offsets = {}  # boot -> UTC ms minus ms since that boot
        try:
            with open(path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) == 2 and parts[0].isdigit() and parts[1].lstrip("-").isdigit():
                        self._offsets[int(parts[0])] = int(parts[1])
        except OSError:
            pass  # no file yet: no boot has had an ack

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
        be known (an earlier boot that never learned the time, or this boot not yet)."""
        if boot == self.boot:
            return now_ms - ms
        then = self._offsets.get(boot)
        now = self._offsets.get(self.boot)
        if then is None or now is None:
            return None
        return (now + now_ms) - (then + ms)

    def _save(self):
        keep = sorted(self._offsets)[-_KEEP:]
        self._offsets = {b: self._offsets[b] for b in keep}
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            for b in keep:
                f.write("%d %d\n" % (b, self._offsets[b]))
        import os

        os.rename(tmp, self._path)

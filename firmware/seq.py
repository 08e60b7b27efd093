# Frame sequence numbers that are never reused, across reboots too, without a flash write a frame.
# Like LoRaWAN devices' frame counters: persist a reserved upper bound, skip the rest at boot.

import os

try:
    from micropython import const
except ImportError:

    def const(x):
        return x


RESERVE = const(64)  # frames between flash writes; a reboot skips at most this many seqs
_MAX = const(0xFFFFFFFF)


class SeqError(Exception):
    pass


class Sequence:
    def __init__(self, path="seq.dat", reserve=RESERVE, resume=None):
        """resume: (next, bound) kept through a deep sleep (state()): no flash access."""
        self._path = path
        self._reserve = reserve
        if resume is not None:
            self._next, self._bound = resume
            return
        bound = self._read()
        self._next = bound
        self._bound = bound
        self._reserve_more()

    def state(self):
        return self._next, self._bound

    def _read(self):
        try:
            with open(self._path) as f:
                text = f.read().strip()
        except OSError:
            return 0  # never provisioned a counter: start at 0
        if not text.isdigit():
            # A corrupt counter must not restart at 0 and reuse seqs: refuse to send.
            raise SeqError("seq: %s is corrupt (%r); re-provision the node" % (self._path, text))
        return int(text)

    def _reserve_more(self):
        bound = self._bound + self._reserve
        if bound > _MAX:
            raise SeqError("seq: 32-bit sequence space exhausted; re-key the node")
        tmp = self._path + ".tmp"
        with open(tmp, "w") as f:
            f.write("%d\n" % bound)
        os.rename(tmp, self._path)  # atomic on littlefs and POSIX
        self._bound = bound

    def take(self):
        if self._next >= self._bound:
            self._reserve_more()
        seq = self._next
        self._next += 1
        return seq

# Delays between retries, for every host loop that retries: forwarders to remote sinks
# (host_tools/receive/forward.py), serial gateways (receive/gateway_serial.py) and the monitor
# reopening a port (host_tools/monitor.py). STYLE.md: bounded retries with back-off and jitter.

import random


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

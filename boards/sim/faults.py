# Fault injection for the simulated board (config "sim": {"faults": {...}}, simulated seconds;
# `citynode sim-board --fault`, real seconds): a driver that hangs (the watchdog must reset the
# node) or raises (the crash handler must log and reset). Each fault fires once per node (once
# per sim-board run): a marker file on its flash remembers it. Loaded only when configured.

import time


class Faults:
    def __init__(self, faults):
        self._hang_at_ms = faults.get("hang_at_s", -1) * 1000
        self._crash_at_ms = faults.get("crash_at_s", -1) * 1000

    def check(self, board):
        """Called from the board's sleep_ms (a sensor's conversion wait)."""
        if self._due(board, "hang", self._hang_at_ms):
            print("(sim: injected fault: the driver hangs)")
            while True:  # time passes, nobody feeds the watchdog
                if board._control is None:  # real time: nothing else checks the watchdog
                    time.sleep_ms(100)
                    board._check_wdt()
                else:
                    board._wait(b"S 1000")
        if self._due(board, "crash", self._crash_at_ms):
            raise RuntimeError("sim: injected fault in a driver")

    def _due(self, board, name, at_ms):
        if at_ms < 0 or board.ticks_ms() < at_ms:
            return False
        marker = "sim_fault_" + name
        try:
            open(marker).close()
            return False
        except OSError:
            with open(marker, "w") as f:
                f.write("1")
            return True

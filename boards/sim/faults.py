# Fault injection for the simulated board (config "sim": {"faults": {...}}, simulated seconds;
# `citynode sim-board --fault`, real seconds): a driver that hangs (the watchdog must reset the
# node) or raises (the crash handler must log and reset); in the fleet simulator also a power
# cut (the process ends without a reset cause: the next boot is a power-on, the RTC restarted).
# Each fault fires once per node (once per sim-board run): a marker file on its flash remembers
# it. Loaded only when configured.

import time

from micropython import const

# Process exit status "my power was cut" (host_tools/sim/fleet.py POWER_CUT_EXIT). Names here
# are few on purpose: every one is a qstr that stays on the simulated board's heap, which the
# flashed sim-board node fills to the edge of MicroPython's next qstr pool (firmware/README.md).
_POWER_CUT_EXIT = const(5)


class Faults:
    def __init__(self, faults):
        self._faults = faults  # {"hang_at_s": s, "crash_at_s": s, "power_cut_at_s": s}

    def check(self, board):
        """Called from the board's sleep_ms (a sensor's conversion wait)."""
        if self._due(board, "hang"):
            print("(sim: injected fault: the driver hangs)")
            while True:  # time passes, nobody feeds the watchdog
                if board._control is None:  # real time: nothing else checks the watchdog
                    time.sleep_ms(100)
                    board._check_wdt()
                else:
                    board._wait(b"S 1000")
        if self._due(board, "crash"):
            raise RuntimeError("sim: injected fault in a driver")
        if self._due(board, "power_cut"):
            raise SystemExit(_POWER_CUT_EXIT)  # no reset cause written: a power-on follows

    def _due(self, board, name):
        at_ms = self._faults.get(name + "_at_s", -1) * 1000
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

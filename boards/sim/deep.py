# Deep sleep on the simulated board (config "idle": "deep"), as boards/hw.py does it on an
# ESP32: deepsleep(ms, state) keeps state in "RTC memory" (a file on the node's flash folder),
# says "D <ms>" to the fleet simulator and ends the process; the simulator starts it again at
# its next sample with reset cause DEEPSLEEP_RESET, its clock counting on
# (host_tools/sim/fleet.py). Loaded only by such nodes.

from micropython import const

_RESET_FILE = const("sim_reset_cause")  # boards/sim/board.py's: the latched reset cause
_DEEPSLEEP_RESET = const(4)
_DEEPSLEEP_EXIT = const(4)  # process exit status: "wake me when the sleep is over"
_RTC_FILE = const("sim_rtc_memory")


def attach(board, raw):
    if raw.get("link") == "lora" or not (raw.get("sim") or {}).get("clock"):
        raise ValueError('config: idle "deep" needs a Wi-Fi node and the fleet simulator')

    def wake_state(cause):
        """After a deep-sleep wake, what deepsleep() kept; else None."""
        if cause != _DEEPSLEEP_RESET:
            return None
        try:
            with open(_RTC_FILE, "rb") as f:
                return f.read()
        except OSError:
            return None

    def deepsleep(ms, state):
        with open(_RTC_FILE, "wb") as f:
            f.write(state)
        with open(_RESET_FILE, "w") as f:
            f.write("%d" % _DEEPSLEEP_RESET)
        board._control.sendto(b"D %d" % ms, board._control_addr)
        raise SystemExit(_DEEPSLEEP_EXIT)  # the simulator starts the process again at the wake

    board.wake_state = wake_state
    board.deepsleep = deepsleep

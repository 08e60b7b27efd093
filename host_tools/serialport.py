# Serial ports for `citynode flash` and `citynode monitor`: one way to open a board's port, held
# exclusively, and one way to tell "another program has it" from other failures.

import errno


def open_serial(url, baudrate=115200, timeout=0.1, keep_input=False):
    """Any pyserial URL (a device path, socket://, loop://, spy://, rfc2217://), held
    exclusively: pyserial locks a device with flock() as mpremote does, so whichever program
    comes second is refused at once (port_busy()) instead of the two reading each other's
    bytes (mpremote would wait for its answers for ever). URL handlers take the option and
    have nothing to lock. keep_input: keep what arrived before the port was open (a monitor
    wants a board's first lines after a replug)."""
    import serial

    # pyserial's defaults assert DTR and RTS, which keeps an ESP32 dev board's auto-reset
    # circuit idle (it resets or straps IO0 only when the two differ) and lets a Pico's USB
    # CDC console send (MicroPython holds output until the host sets DTR).
    port = serial.serial_for_url(
        url, baudrate=baudrate, timeout=timeout, exclusive=True, do_not_open=True
    )
    # open() ends with reset_input_buffer(), which throws away what arrived before it returned;
    # with keep_input that one call is skipped (posix spells it with a _).
    names = []
    if keep_input:
        names = [n for n in ("reset_input_buffer", "_reset_input_buffer") if hasattr(port, n)]
    for name in names:
        setattr(port, name, _keep_input)
    try:
        port.open()
    finally:
        for name in names:
            delattr(port, name)
    return port


def _keep_input():
    pass


def port_busy(e):
    """Whether a failure to open a port means another program has it: its exclusive lock
    (EWOULDBLOCK), a tty in exclusive mode (TIOCEXCL: EBUSY), Windows' sharing violation."""
    if getattr(e, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY):
        return True
    text = str(e)
    return "exclusively lock" in text or "Access is denied" in text

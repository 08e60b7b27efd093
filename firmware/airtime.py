# LoRa time on air (Semtech formula, integer µs) and the airtime governor that keeps a radio
# within EU868 duty cycles and an optional daily budget. Runs unchanged on MicroPython and CPython;
# the node and gateway roles ask it before every transmission (FIELD.md "EU868 limits").
#
# Rules the governor enforces, per sub-band unless said otherwise:
# 1. Off-time (ETSI EN 300 220 as coded in LoRaMac-node v4.4 RegionCommonCalcBackOff): after a
#    transmission of T_air starting at t, the sub-band stays closed until t + T_air / duty_cycle
#    (i.e. an off-time of T_air / duty_cycle - T_air after its end).
# 2. Hourly (ETSI's observation period is one hour): the airtime in any one-hour window ending at
#    the end of a new transmission, itself included, stays within duty_cycle x 1 h. Rule 1 alone
#    lets such a window hold up to one frame more than that; rule 2 closes that gap.
# 3. Daily, all sub-bands together, if a budget is given (public networks' fair use: 30 s/day):
#    the airtime in any 24 h window ending at the end of a new transmission stays within it.
# Rules 2 and 3 keep airtime sums in fixed rings of time buckets (60 one-minute buckets, 96
# quarter-hours): constant RAM, no list of transmissions. A transmission counts in the bucket of
# its end, and a window counts every bucket it touches, so the sums can only over-count: the
# limits hold exactly, and the price is a deferral a bucket early now and then near saturation.

try:
    from micropython import const
except ImportError:  # CPython

    def const(x):
        return x


from array import array

# --- time on air ------------------------------------------------------------------------

# LoRa bandwidths are 500 kHz divided by these (SX1276 datasheet 4.1.1.4, RegModemConfig1;
# the kHz names are rounded: "7.8" is 7.8125 kHz). Keys as micropython-lib's lora_cfg["bw"].
_BW_DIV = {
    "7.8": 64,
    "10.4": 48,
    "15.6": 32,
    "20.8": 24,
    "31.25": 16,
    "41.7": 12,
    "62.5": 8,
    "125": 4,
    "250": 2,
    "500": 1,
}
_LDRO_SYMBOL_US = const(16000)  # low data rate optimisation from 16 ms symbols (micropython-lib)
MAX_PAYLOAD = const(255)


def _bw_div(bw):
    key = bw if isinstance(bw, str) else "%g" % bw
    div = _BW_DIV.get(key)
    if div is None:
        raise ValueError("bw %r kHz is not a LoRa bandwidth (7.8 .. 500)" % (bw,))
    return div


def symbol_us(lora_cfg):
    """Symbol time in µs: 2^SF / BW, exact for every LoRa bandwidth."""
    sf = lora_cfg.get("sf", 7)
    if not isinstance(sf, int) or sf < 6 or sf > 12:
        raise ValueError("sf must be 6..12, got %r" % (sf,))
    return (1 << sf) * _bw_div(lora_cfg.get("bw", "125")) * 2  # 2^SF * div / 500 kHz


def time_on_air_us(lora_cfg, payload_len):
    """Time on air in µs of a payload of payload_len bytes (SX1276 datasheet 4.1.1.7, AN1200.13):

        T_sym = 2^SF / BW;  T_preamble = (n_preamble + 4.25) T_sym
        n_payload = 8 + max(ceil((8 PL - 4 SF + 28 + 16 CRC - 20 IH) / (4 (SF - 2 DE))) CR, 0)

    lora_cfg is micropython-lib's dict ("sf", "bw" in kHz, "coding_rate" 5..8 for 4/5..4/8,
    "preamble_len", "implicit_header", "crc_en"); missing keys take that driver's defaults
    (SF7, 125 kHz, 4/5, 12 symbols, explicit header, CRC on) because that is what the radio
    then uses. Low data rate optimisation (DE) is on for symbols of 16 ms or more (SF11 and
    SF12 at 125 kHz), as the driver configures it. Integer arithmetic, exact to the µs."""
    if not isinstance(payload_len, int) or payload_len < 0 or payload_len > MAX_PAYLOAD:
        raise ValueError("payload_len must be 0..255, got %r" % (payload_len,))
    sf = lora_cfg.get("sf", 7)
    t_sym = symbol_us(lora_cfg)
    cr = lora_cfg.get("coding_rate", 5)
    if cr not in (5, 6, 7, 8):
        raise ValueError("coding_rate must be 5..8 (4/5..4/8), got %r" % (cr,))
    preamble = lora_cfg.get("preamble_len", 12)
    if not isinstance(preamble, int) or preamble < 6 or preamble > 65535:
        raise ValueError("preamble_len must be 6..65535, got %r" % (preamble,))
    ih = 1 if lora_cfg.get("implicit_header", False) else 0
    crc = 1 if lora_cfg.get("crc_en", True) else 0
    de = 1 if t_sym >= _LDRO_SYMBOL_US else 0
    bits = 8 * payload_len - 4 * sf + 28 + 16 * crc - 20 * ih
    per_block = 4 * (sf - 2 * de)
    blocks = (bits + per_block - 1) // per_block if bits > 0 else 0
    n_payload = 8 + blocks * cr
    # in quarter symbols: (preamble + 4.25) * 4 = 4 preamble + 17; t_sym is a multiple of 4
    return (t_sym >> 2) * (4 * preamble + 17 + 4 * n_payload)


# --- limits -----------------------------------------------------------------------------

# EU868 sub-bands (FIELD.md; ERC Rec 70-03 annex 1, as LoRaMac-node's EU868 bands):
# (lowest kHz, highest kHz, 1 / duty cycle). A channel belongs to the band holding its centre
# frequency, low <= f < high.
EU868 = (
    (863000, 865000, 1000),  # 0.1 %
    (865000, 868000, 100),  # 1 %
    (868000, 868600, 100),  # 1 %: LoRaWAN 868.1/868.3/868.5
    (868700, 869200, 1000),  # 0.1 %
    (869400, 869650, 10),  # 10 %: 869.525 MHz, good for gateway acks
    (869700, 870000, 100),  # 1 %
)

HOUR_MS = const(3_600_000)
DAY_MS = const(86_400_000)
NEVER = const(-1)  # can_send(): this frame can never fit the limits (too long)

# Reasons, as Governor.reason reports the last deferral.
OFF_TIME = "off_time"
HOURLY = "hourly"
DAILY = "daily"
TOO_LONG = "too_long"


class _Window:
    """Airtime (µs) in a sliding window of span_ms, as n bucket sums plus two spare buckets
    (one for the oldest bucket a window still touches, one for a frame ending in the future).
    A frame may last at most one bucket (60 s in the hourly window): LoRa frames up to 255
    bytes do at every bandwidth from 62.5 kHz up (SF12: 18.3 s); narrower bandwidths at SF12
    could exceed it, and would then be under-counted by a bucket."""

    def __init__(self, span_ms, n, limit_us):
        self.span = span_ms
        self.width = span_ms // n
        self.slots = n + 2
        self.limit = limit_us
        self.sums = array("L", [0] * self.slots)
        self.head = 0  # absolute index (time // width) of the newest bucket

    def _advance(self, idx):
        head = self.head
        if idx <= head:
            return
        sums = self.sums
        slots = self.slots
        if idx - head >= slots:
            for i in range(slots):
                sums[i] = 0
        else:
            for b in range(head + 1, idx + 1):
                sums[b % slots] = 0
        self.head = idx

    def add(self, end_ms, us):
        idx = end_ms // self.width
        self._advance(idx)
        # an end before the newest bucket goes into the newest: later, so never under-counted
        b = idx if idx > self.head else self.head
        self.sums[b % self.slots] += us

    def wait_ms(self, start_ms, us):
        """ms from start_ms until a transmission of us µs starting then fits; NEVER if it cannot.
        Exact for the bucket model: the window ending at start + duration counts the buckets
        lo = (start + duration - span) // width .. head."""
        limit = self.limit
        if us > limit:
            return NEVER
        dur = (us + 999) // 1000
        width = self.width
        head = self.head
        oldest = head - self.slots + 1
        lo = (start_ms + dur - self.span) // width
        if lo < oldest:
            lo = oldest
        if lo > head:
            return 0
        sums = self.sums
        slots = self.slots
        total = 0
        for b in range(lo, head + 1):
            total += sums[b % slots]
        if total + us <= limit:
            return 0
        for b in range(lo, head + 1):  # let the oldest buckets leave the window, one by one
            total -= sums[b % slots]
            if total + us <= limit:
                return (b + 1) * width + self.span - dur - start_ms
        return 0  # not reached: with every bucket gone, us <= limit fits

    def used_us(self, now_ms):
        """Airtime counted in the window ending now (an upper bound of the true figure)."""
        lo = (now_ms - self.span) // self.width
        oldest = self.head - self.slots + 1
        if lo < oldest:
            lo = oldest
        total = 0
        for b in range(lo, self.head + 1):
            total += self.sums[b % self.slots]
        return total


class Governor:
    """Decides when a radio may transmit. Ask can_send() before each frame, call record() when
    it was sent. Counters: frames, airtime_ms, deferrals, deferred_ms, by reason
    (deferred_off_time, deferred_hourly, deferred_daily, too_long), over_limit (record() of a
    frame that can_send() would have deferred); `reason` is the last deferral's.

    now_ms: a callable returning monotonic milliseconds that do not wrap (the board's
    ticks_ms()). subbands: (low kHz, high kHz, 1/duty cycle) rows, default EU868.
    daily_budget_ms: rolling 24 h airtime budget over all sub-bands, or None."""

    HOUR_BUCKETS = 60
    DAY_BUCKETS = 96

    def __init__(self, now_ms, subbands=EU868, daily_budget_ms=None):
        self.now_ms = now_ms
        self.subbands = subbands
        n = len(subbands)
        self._closed_until = [0] * n
        self._hour = {}  # sub-band -> _Window, made on the sub-band's first use
        self._day = None
        if daily_budget_ms is not None:
            if daily_budget_ms <= 0:
                raise ValueError("daily_budget_ms must be positive, got %r" % (daily_budget_ms,))
            self._day = _Window(DAY_MS, self.DAY_BUCKETS, daily_budget_ms * 1000)
        self.daily_budget_ms = daily_budget_ms
        self.frames = 0
        self.airtime_ms = 0
        self.deferrals = 0
        self.deferred_ms = 0
        self.deferred_off_time = 0
        self.deferred_hourly = 0
        self.deferred_daily = 0
        self.too_long = 0
        self.over_limit = 0
        self.reason = None
        self._why = None

    def subband(self, freq_khz):
        """Index of the sub-band holding freq_khz; ValueError if none does."""
        bands = self.subbands
        for i in range(len(bands)):
            if bands[i][0] <= freq_khz < bands[i][1]:
                return i
        raise ValueError("%d kHz is in no sub-band of this region" % freq_khz)

    def _hour_window(self, b):
        w = self._hour.get(b)
        if w is None:
            w = self._hour[b] = _Window(
                HOUR_MS, self.HOUR_BUCKETS, HOUR_MS * 1000 // self.subbands[b][2]
            )
        return w

    def _wait(self, b, now, us):
        """Wait in ms (or NEVER) for us µs on sub-band b at time now, its reason in self._why;
        counts nothing. Every rule only opens as time passes, so the earliest moment all allow
        is the latest of their own earliest moments."""
        wait = self._closed_until[b] - now
        self._why = OFF_TIME
        if wait < 0:
            wait = 0
        w = self._hour_window(b).wait_ms(now, us)
        if w == NEVER:
            self._why = TOO_LONG
            return NEVER
        if w > wait:
            wait = w
            self._why = HOURLY
        if self._day is not None:
            w = self._day.wait_ms(now, us)
            if w == NEVER:
                self._why = TOO_LONG
                return NEVER
            if w > wait:
                wait = w
                self._why = DAILY
        return wait

    def can_send(self, freq_khz, airtime_us):
        """0 if a frame of airtime_us may start now on freq_khz, else the ms to wait (exact: the
        earliest moment every rule allows it, if nothing else is sent meanwhile), or NEVER if
        the frame is longer than a limit allows at all. A non-zero answer counts one deferral
        (or one too_long): ask once per frame and wait, rather than poll."""
        b = self.subband(freq_khz)
        wait = self._wait(b, self.now_ms(), airtime_us)
        if wait == 0:
            return 0
        reason = self.reason = self._why
        if wait == NEVER:
            self.too_long += 1
            return NEVER
        self.deferrals += 1
        self.deferred_ms += wait
        if reason == OFF_TIME:
            self.deferred_off_time += 1
        elif reason == HOURLY:
            self.deferred_hourly += 1
        else:
            self.deferred_daily += 1
        return wait

    def record(self, freq_khz, airtime_us):
        """A frame of airtime_us started now on freq_khz."""
        b = self.subband(freq_khz)
        now = self.now_ms()
        if self._wait(b, now, airtime_us) != 0:
            self.over_limit += 1  # sent anyway (the caller did not ask): counted, still governed
        closed = self._closed_until[b]
        start = now if now > closed else closed
        # off-time as LoRaMac-node: closed for T_air * (1 / duty cycle), rounded up to the ms
        div = self.subbands[b][2]
        self._closed_until[b] = (
            start + (airtime_us // 1000) * div + ((airtime_us % 1000) * div + 999) // 1000
        )
        end = now + (airtime_us + 999) // 1000
        self._hour_window(b).add(end, airtime_us)
        if self._day is not None:
            self._day.add(end, airtime_us)
        self.frames += 1
        self.airtime_ms += (airtime_us + 500) // 1000

    def used_ms(self, freq_khz=None):
        """Airtime counted in the last hour on freq_khz's sub-band, or in the last 24 h over all
        sub-bands (freq_khz None, needs a daily budget); upper bounds, in ms."""
        now = self.now_ms()
        if freq_khz is None:
            if self._day is None:
                raise ValueError("no daily budget: airtime is only kept per sub-band and hour")
            return self._day.used_us(now) // 1000
        return self._hour_window(self.subband(freq_khz)).used_us(now) // 1000


def best_batch(
    frame_bytes, interval_s, lora_cfg, duty_div=100, daily_budget_ms=None, margin_pct=20, max_n=255
):
    """The smallest number of readings per frame that keeps a node sampling every interval_s
    within the limits with margin_pct % to spare: its frames' airtime at most
    (100 - margin_pct) % of 1/duty_div of the time, and of daily_budget_ms a day if given.
    frame_bytes(n) is the frame size for n readings (an estimate or the real encoder; a
    ValueError from it, or a size over 255, ends the search). None if no batch fits."""
    if interval_s <= 0:
        raise ValueError("interval_s must be positive, got %r" % (interval_s,))
    if not 0 <= margin_pct < 100:
        raise ValueError("margin_pct must be 0..99, got %r" % (margin_pct,))
    keep = 100 - margin_pct
    for n in range(1, max_n + 1):
        try:
            size = frame_bytes(n)
        except ValueError:
            return None
        if size > MAX_PAYLOAD:
            return None
        t_us = time_on_air_us(lora_cfg, size)
        period_ms = n * interval_s * 1000
        # duty cycle: T_air * duty_div <= period * keep %, compared in µs * 100
        if t_us * duty_div * 100 > period_ms * 1000 * keep:
            continue
        # daily: frames a day * T_air <= budget * keep %, i.e. DAY * T_air * 100 <= ...
        if daily_budget_ms is not None:
            if DAY_MS * t_us * 100 > daily_budget_ms * 1000 * period_ms * keep:
                continue
        return n
    return None

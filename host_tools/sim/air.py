# Simulated LoRa air for the fleet simulator and tests: radios at 2-D positions share one medium;
# transmissions take their real time on air, lose power with distance, collide when they overlap
# on the same channel and spreading factor, and reach the radios listening there. Sans-IO and
# deterministic for a seed: the caller owns the clock (µs) and asks what was received by when.
#
# The model, and where its numbers come from:
# - Time on air: the Semtech formula (SX1276 datasheet 4.1.1.7), as firmware/airtime.py computes
#   it on the node (tests check the two agree).
# - Path loss: log-distance, PL(d) = PL(d0) + 10 n log10(d / d0) (+ log-normal shadowing if
#   sigma > 0; Rappaport, "Wireless Communications", 2nd ed., 4.9-4.10). Default: Hata's urban
#   model (Hata 1980, IEEE Trans. Veh. Technol. VT-29(3)) at 868 MHz for a 30 m gateway mast and
#   nodes at 1.5 m, small or medium city: PL(1 km) 126.0 dB, n 3.52. Also given: Petäjäjärvi et
#   al. 2015 (ITST, Oulu, node on the ground: 128.95 dB at 1 km, n 2.32, sigma 7.8 dB) and
#   LoRaSim's (Bor et al., MSWiM 2016: 127.41 dB at 40 m, n 2.08, sigma 3.57 dB).
# - Noise floor: -174 dBm/Hz + 10 log10(BW) + NF, NF 6 dB (Semtech AN1200.22); SNR = RSSI minus
#   the noise and interference power.
# - Sensitivity: SX1276 datasheet rev. 7, RFS_L125_HF/L250_HF/L500_HF (band 1): SF7 -123 dBm ..
#   SF12 -136 dBm at 125 kHz; elsewhere the noise floor plus the SNR each SF demodulates at.
# - Collisions (Bor et al. 2016, the LoRaSim model): transmissions collide when they overlap in
#   time on overlapping channels with the same SF (different SFs are treated as orthogonal). A
#   packet survives if it is at least 6 dB stronger than the sum of the interferers overlapping its
#   critical section, which starts after all but the last 5 preamble symbols (LoRaSim compares
#   with each interferer alone; the sum is the stricter, physical reading).
# - A receiver gets a packet if it listens on its channel, SF and bandwidth when the critical
#   section starts (the SX127x locks onto a preamble and then receives to the end even if its
#   receive window times out), and is not transmitting at any moment of the packet (half-duplex).

import bisect
import collections
import math
import random

SNR_MIN_DB = {6: -5.0, 7: -7.5, 8: -10.0, 9: -12.5, 10: -15.0, 11: -17.5, 12: -20.0}
SX1276_SENSITIVITY_DBM = {
    125: {6: -118, 7: -123, 8: -126, 9: -129, 10: -132, 11: -133, 12: -136},
    250: {7: -120, 8: -123, 9: -125, 10: -128, 11: -130, 12: -133},
    500: {7: -116, 8: -119, 9: -122, 10: -125, 11: -128, 12: -130},
}
CAPTURE_DB = 6.0
NOISE_FIGURE_DB = 6.0
LOCK_SYMBOLS = 5  # preamble symbols a receiver needs (the critical section starts after the rest)

# outcomes of a packet at a listening receiver
DELIVERED = "delivered"
COLLISION = "collision"
BELOW_SENSITIVITY = "below_sensitivity"
HALF_DUPLEX = "half_duplex"
RANDOM_LOSS = "random_loss"

_BW_DIV = {7.8: 64, 10.4: 48, 15.6: 32, 20.8: 24, 31.25: 16, 41.7: 12, 62.5: 8, 125: 4, 250: 2}
_BW_DIV[500] = 1


def time_on_air_us(
    payload_len, sf, bw=125, coding_rate=5, preamble_len=8, implicit_header=False, crc_en=True
):
    """Time on air in µs (SX1276 datasheet 4.1.1.7), integer; bw in kHz, coding_rate 5..8.
    Low data rate optimisation from 16 ms symbols. The same arithmetic as firmware/airtime.py."""
    if not 0 <= payload_len <= 255:
        raise ValueError("payload is %d bytes, a LoRa frame holds 0..255" % payload_len)
    if not 6 <= sf <= 12:
        raise ValueError("sf must be 6..12, got %r" % (sf,))
    div = _BW_DIV.get(bw)
    if div is None:
        raise ValueError("bw %r kHz is not a LoRa bandwidth" % (bw,))
    if coding_rate not in (5, 6, 7, 8):
        raise ValueError("coding_rate must be 5..8, got %r" % (coding_rate,))
    t_sym = (1 << sf) * div * 2
    de = 1 if t_sym >= 16000 else 0
    bits = 8 * payload_len - 4 * sf + 28 + (16 if crc_en else 0) - (20 if implicit_header else 0)
    per_block = 4 * (sf - 2 * de)
    blocks = -(-bits // per_block) if bits > 0 else 0
    return (t_sym >> 2) * (4 * preamble_len + 17 + 4 * (8 + blocks * coding_rate))


class LogDistance:
    """Log-distance path loss: PL(d) = pl0_db + 10 exponent log10(d / d0_m), plus a log-normal
    shadowing term of sigma_db (drawn per packet and receiver) when the medium uses it."""

    def __init__(self, pl0_db, d0_m, exponent, sigma_db=0.0, name="log-distance"):
        self.pl0_db = pl0_db
        self.d0_m = d0_m
        self.exponent = exponent
        self.sigma_db = sigma_db
        self.name = name

    def loss_db(self, d_m):
        return self.pl0_db + 10 * self.exponent * math.log10(max(d_m, 1.0) / self.d0_m)

    def range_m(self, max_loss_db):
        """Distance at which the median loss reaches max_loss_db."""
        return self.d0_m * 10 ** ((max_loss_db - self.pl0_db) / (10 * self.exponent))

    def __repr__(self):
        return "%s(PL(%g m)=%.2f dB, n=%.2f, sigma=%.1f dB)" % (
            self.name,
            self.d0_m,
            self.pl0_db,
            self.exponent,
            self.sigma_db,
        )


def hata_urban(freq_mhz=868.0, base_m=30.0, mobile_m=1.5, sigma_db=0.0):
    """Hata's (1980) urban model for a small or medium city, as a log-distance model from 1 km:
    PL = 69.55 + 26.16 log f - 13.82 log hb - a(hm) + (44.9 - 6.55 log hb) log d_km,
    a(hm) = (1.1 log f - 0.7) hm - (1.56 log f - 0.8). Valid 150-1500 MHz, 1-20 km."""
    lf = math.log10(freq_mhz)
    a_hm = (1.1 * lf - 0.7) * mobile_m - (1.56 * lf - 0.8)
    pl0 = 69.55 + 26.16 * lf - 13.82 * math.log10(base_m) - a_hm
    slope = 44.9 - 6.55 * math.log10(base_m)
    return LogDistance(pl0, 1000.0, slope / 10, sigma_db, name="hata-urban")


HATA_URBAN = hata_urban()
PETAJAJARVI_GROUND = LogDistance(128.95, 1000.0, 2.32, 7.8, name="petajajarvi-ground")
LORASIM = LogDistance(127.41, 40.0, 2.08, 3.57, name="lorasim")


def noise_floor_dbm(bw_khz, noise_figure_db=NOISE_FIGURE_DB):
    return -174.0 + 10 * math.log10(bw_khz * 1000) + noise_figure_db


def sensitivity_dbm(sf, bw_khz, noise_figure_db=NOISE_FIGURE_DB):
    """The SX1276 datasheet's figure where it gives one, else noise floor + the SF's SNR limit."""
    table = SX1276_SENSITIVITY_DBM.get(bw_khz, {})
    if sf in table:
        return float(table[sf])
    return noise_floor_dbm(bw_khz, noise_figure_db) + SNR_MIN_DB[sf]


def _dbm_to_mw(dbm):
    return 10 ** (dbm / 10)


Delivery = collections.namedtuple(
    "Delivery",
    (
        "tx_id",
        "sender",
        "payload",
        "rssi",
        "snr",
        "t_start_us",
        "t_end_us",
        "freq_khz",
        "sf",
        "bw",
    ),
)


class Transmission:
    __slots__ = (
        "id",
        "sender",
        "t_start",
        "t_end",
        "freq_khz",
        "sf",
        "bw",
        "payload",
        "power_dbm",
        "t_crit",
        "delivered",
    )

    def __init__(self, tx_id, sender, t_start, airtime, freq_khz, sf, bw, payload, power, pre):
        self.id = tx_id
        self.sender = sender
        self.t_start = t_start
        self.t_end = t_start + airtime
        self.freq_khz = freq_khz
        self.sf = sf
        self.bw = bw
        self.payload = bytes(payload)
        self.power_dbm = power
        t_sym = (1 << sf) * _BW_DIV[bw] * 2
        self.t_crit = t_start + max(0, pre - LOCK_SYMBOLS) * t_sym
        self.delivered = 0

    def overlaps_channel(self, other):
        return self.sf == other.sf and abs(self.freq_khz - other.freq_khz) * 2 < self.bw + other.bw

    def __repr__(self):
        return "Transmission(%d from %r, %d..%d us, %d kHz SF%d)" % (
            self.id,
            self.sender,
            self.t_start,
            self.t_end,
            self.freq_khz,
            self.sf,
        )


class Medium:
    """The shared air. Radios are registered with positions (metres); transmit() schedules a
    frame; listen() opens a receive window; deliveries(until_us) resolves every frame that has
    ended by then and returns, per receiver, what it received. Time only moves forward: a
    transmit() or listen() before a moment already resolved is refused (ValueError).

    stats counts frames ("frames", "frames_delivered": heard by at least one receiver) and the
    outcome at each listening receiver (delivered, collision, below_sensitivity, half_duplex,
    random_loss)."""

    def __init__(
        self,
        seed=0,
        path_loss=HATA_URBAN,
        shadowing=False,
        loss_prob=0.0,
        capture_db=CAPTURE_DB,
        noise_figure_db=NOISE_FIGURE_DB,
        sensitivity=None,
    ):
        if not 0.0 <= loss_prob <= 1.0:
            raise ValueError("loss_prob must be 0..1, got %r" % (loss_prob,))
        self.seed = seed
        self.path_loss = path_loss
        self.shadowing = shadowing
        self.loss_prob = loss_prob
        self.capture_db = capture_db
        self.noise_figure_db = noise_figure_db
        self._sensitivity = sensitivity  # {(sf, bw): dBm} overrides
        self.radios = {}  # id -> (x, y, antenna gain dB)
        self._windows = collections.defaultdict(list)  # id -> [[freq, sf, bw, from, until]]
        self._txs = []  # (t_start, id, Transmission), sorted
        self._pending = []  # (t_end, id, Transmission) not yet resolved, a heap-free sorted list
        self._by_radio = collections.defaultdict(list)  # sender -> its transmissions
        self._next_id = 0
        self._horizon = 0  # every frame ending by this moment is resolved
        self._max_airtime = 0
        self._power = {}  # (tx id, rx id) -> received dBm
        self.stats = collections.Counter()
        self.log = None  # set to a list to record (tx id, receiver, outcome) tuples

    # --- set-up -------------------------------------------------------------------------

    def add_radio(self, radio_id, x_m, y_m, gain_db=0.0):
        if radio_id in self.radios:
            raise ValueError("radio %r is already on the air" % (radio_id,))
        self.radios[radio_id] = (float(x_m), float(y_m), float(gain_db))

    def distance_m(self, a, b):
        xa, ya, _ = self.radios[a]
        xb, yb, _ = self.radios[b]
        return math.hypot(xa - xb, ya - yb)

    def listen(self, radio_id, freq_khz, sf, bw=125, t_from_us=None, t_until_us=None):
        """Open a receive window on (freq, sf, bw) from t_from_us (default: the moment already
        resolved) to t_until_us (None: until stop_listening)."""
        self._radio(radio_id)
        if bw not in _BW_DIV:
            raise ValueError("bw %r kHz is not a LoRa bandwidth" % (bw,))
        if t_from_us is None:
            t_from_us = self._horizon
        if t_from_us < self._horizon:
            raise ValueError(
                "listen from %d us: the air is already resolved up to %d us"
                % (t_from_us, self._horizon)
            )
        if t_until_us is not None and t_until_us < t_from_us:
            raise ValueError("a receive window cannot end before it starts")
        self._windows[radio_id].append([freq_khz, sf, bw, t_from_us, t_until_us])

    def stop_listening(self, radio_id, t_us):
        """Close every open window of the radio at t_us."""
        if t_us < self._horizon:
            raise ValueError("stop at %d us: already resolved up to %d us" % (t_us, self._horizon))
        for w in self._windows.get(radio_id, ()):
            if w[4] is None or w[4] > t_us:
                w[4] = max(t_us, w[3])

    def locked(self, radio_id, t_us):
        """The end (us) of a frame still in the air that radio_id locked onto (it listened on
        its channel at the frame's critical section, at or before t_us, and hears it above
        its sensitivity), or None: a receiver that has locked receives to the end even if its
        receive window times out meanwhile (the SX127x's and SX126x's behaviour)."""
        end = None
        for _, _, tx in self._pending:
            if tx.sender == radio_id or tx.t_crit > t_us or tx.t_end <= t_us:
                continue
            for freq, sf, bw, t_from, t_until in self._windows.get(radio_id, ()):
                if (
                    freq == tx.freq_khz
                    and sf == tx.sf
                    and bw == tx.bw
                    and t_from <= tx.t_crit
                    and (t_until is None or tx.t_crit <= t_until)
                    and self.received_dbm(tx, radio_id) >= self.sensitivity(tx.sf, tx.bw)
                ):
                    end = tx.t_end if end is None else max(end, tx.t_end)
                    break
        return end

    def _radio(self, radio_id):
        if radio_id not in self.radios:
            raise ValueError("no radio %r: add_radio() it first" % (radio_id,))

    # --- transmit -----------------------------------------------------------------------

    def transmit(
        self,
        radio_id,
        t_start_us,
        freq_khz,
        sf,
        bw,
        payload,
        tx_power_dbm,
        coding_rate=5,
        preamble_len=8,
        implicit_header=False,
        crc_en=True,
    ):
        """Schedule a frame; returns its Transmission (id, t_end ...). ValueError for a moment
        already resolved, a radio already transmitting then, or settings LoRa does not have."""
        self._radio(radio_id)
        if t_start_us < self._horizon:
            raise ValueError(
                "transmit at %d us: the air is already resolved up to %d us"
                % (t_start_us, self._horizon)
            )
        airtime = time_on_air_us(
            len(payload), sf, bw, coding_rate, preamble_len, implicit_header, crc_en
        )
        for other in self._by_radio[radio_id]:
            if other.t_start < t_start_us + airtime and t_start_us < other.t_end:
                raise ValueError(
                    "radio %r is already transmitting %d..%d us"
                    % (radio_id, other.t_start, other.t_end)
                )
        tx = Transmission(
            self._next_id,
            radio_id,
            t_start_us,
            airtime,
            freq_khz,
            sf,
            bw,
            payload,
            tx_power_dbm,
            preamble_len,
        )
        self._next_id += 1
        self._max_airtime = max(self._max_airtime, airtime)
        bisect.insort(self._txs, (tx.t_start, tx.id, tx))
        bisect.insort(self._pending, (tx.t_end, tx.id, tx))
        self._by_radio[radio_id].append(tx)
        self.stats["frames"] += 1
        return tx

    # --- receive ------------------------------------------------------------------------

    def deliveries(self, until_us):
        """{receiver: [Delivery, ...]} for every frame that ended by until_us and was not
        reported before, in order of end time. Later transmit() and listen() calls must not
        start before until_us."""
        if until_us < self._horizon:
            raise ValueError(
                "until %d us is before %d us, already resolved" % (until_us, self._horizon)
            )
        out = collections.defaultdict(list)
        pending = self._pending
        k = bisect.bisect_right(pending, (until_us, math.inf))
        done, self._pending = pending[:k], pending[k:]
        self._horizon = until_us
        for _, _, tx in done:
            for rx_id in self._listeners(tx):
                d = self._receive(tx, rx_id)
                if d is not None:
                    out[rx_id].append(d)
            if tx.delivered:
                self.stats["frames_delivered"] += 1
        self._prune()
        return dict(out)

    def _listeners(self, tx):
        """Radios listening on tx's channel when its critical section starts, in id order."""
        found = []
        for rx_id, windows in self._windows.items():
            if rx_id == tx.sender:
                continue
            for freq, sf, bw, t_from, t_until in windows:
                if (
                    freq == tx.freq_khz
                    and sf == tx.sf
                    and bw == tx.bw
                    and t_from <= tx.t_crit
                    and (t_until is None or tx.t_crit <= t_until)
                ):
                    found.append(rx_id)
                    break
        found.sort(key=repr)
        return found

    def _rng(self, tx_id, rx_id, what):
        return random.Random("%s:%s:%d:%r" % (self.seed, what, tx_id, rx_id))

    def received_dbm(self, tx, rx_id):
        """Power of tx at rx_id, dBm (with its shadowing draw, fixed per frame and receiver)."""
        key = (tx.id, rx_id)
        p = self._power.get(key)
        if p is None:
            gain = self.radios[tx.sender][2] + self.radios[rx_id][2]
            p = tx.power_dbm + gain - self.path_loss.loss_db(self.distance_m(tx.sender, rx_id))
            if self.shadowing and self.path_loss.sigma_db > 0:
                p -= self._rng(tx.id, rx_id, "shadow").gauss(0.0, self.path_loss.sigma_db)
            self._power[key] = p
        return p

    def sensitivity(self, sf, bw):
        if self._sensitivity and (sf, bw) in self._sensitivity:
            return self._sensitivity[(sf, bw)]
        return sensitivity_dbm(sf, bw, self.noise_figure_db)

    def _receive(self, tx, rx_id):
        outcome, rssi, snr = self._outcome(tx, rx_id)
        self.stats[outcome] += 1
        if self.log is not None:
            self.log.append((tx.id, rx_id, outcome))
        if outcome != DELIVERED:
            return None
        tx.delivered += 1
        return Delivery(
            tx.id,
            tx.sender,
            tx.payload,
            rssi,
            snr,
            tx.t_start,
            tx.t_end,
            tx.freq_khz,
            tx.sf,
            tx.bw,
        )

    def _outcome(self, tx, rx_id):
        for own in self._by_radio.get(rx_id, ()):
            if own.t_start < tx.t_end and tx.t_start < own.t_end:
                return HALF_DUPLEX, None, None
        rssi = self.received_dbm(tx, rx_id)
        if rssi < self.sensitivity(tx.sf, tx.bw):
            return BELOW_SENSITIVITY, rssi, None
        interference_mw = 0.0
        lo = bisect.bisect_left(self._txs, (tx.t_start - self._max_airtime, -1))
        for t_start, _, other in self._txs[lo:]:
            if t_start >= tx.t_end:
                break
            if (
                other is tx
                or other.t_end <= tx.t_crit
                or other.sender == rx_id
                or not tx.overlaps_channel(other)
            ):
                continue
            interference_mw += _dbm_to_mw(self.received_dbm(other, rx_id))
        noise_mw = _dbm_to_mw(noise_floor_dbm(tx.bw, self.noise_figure_db))
        snr = rssi - 10 * math.log10(noise_mw + interference_mw)
        if interference_mw > 0 and rssi - 10 * math.log10(interference_mw) < self.capture_db:
            return COLLISION, rssi, snr
        if self.loss_prob and self._rng(tx.id, rx_id, "loss").random() < self.loss_prob:
            return RANDOM_LOSS, rssi, snr
        return DELIVERED, rssi, snr

    def _prune(self):
        """Forget what can no longer touch an unresolved or future frame, so that long runs keep
        bounded memory: transmissions that ended before the earliest start still to come."""
        cutoff = self._horizon
        for _, _, tx in self._pending:
            cutoff = min(cutoff, tx.t_start)
        cutoff -= self._max_airtime  # whatever started before this has ended by the cutoff
        k = bisect.bisect_left(self._txs, (cutoff, -1))
        if k < 1024:  # in chunks: each pass walks the per-radio lists and the power cache
            return
        gone = {tx.id for _, _, tx in self._txs[:k]}
        del self._txs[:k]
        for rid, txs in self._by_radio.items():
            if txs and txs[0].t_start < cutoff:
                self._by_radio[rid] = [t for t in txs if t.t_start >= cutoff]
        self._power = {key: p for key, p in self._power.items() if key[0] not in gone}
        for rid, windows in self._windows.items():
            self._windows[rid] = [w for w in windows if w[4] is None or w[4] >= cutoff]

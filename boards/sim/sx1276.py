# A register-level Semtech SX1276 (LoRa mode) for the simulator: the chip's SPI register access,
# FIFO, operating modes, IRQ flags and DIO0/DIO1 lines, as micropython-lib's lora-sx127x drives it.
# Runs on CPython in the fleet simulator (host_tools/sim/fleet.py holds the chip, as it holds the
# BME280); the node's SPI bytes reach it through boards/sim/lora_hw.py. On TX and RX it uses the
# shared air (host_tools/sim/air.py) through a port object.
#
# "DS" = Semtech SX1276/77/78/79 datasheet, rev. 7 (May 2020). Strict: a write the datasheet does
# not allow (a reserved value, a read-only register, LongRangeMode outside Sleep, the FIFO in
# Sleep...) raises ChipError naming it instead of being taken; registers the sim does not model
# raise too, so nothing a driver writes is silently dropped.

FXOSC_HZ = 32000000  # DS 2.1.1: F(XOSC) 32 MHz; Frf = F(XOSC) * Frf / 2^19 (DS 4.1.4, RegFrf)
# A receive timeout that falls inside a frame the receiver locked onto waits for the frame: it
# fires this long after the frame's end only if the air did not deliver it (collision). A
# millisecond, because the fleet simulator resolves the air per millisecond.
_AFTER_FRAME_US = 1000

# RegOpMode (0x01), DS 6.4 Table 41
OPMODE_LORA = 0x80  # LongRangeMode: "can be modified only in Sleep mode"
OPMODE_SHARED = 0x40  # AccessSharedReg: FSK registers from LoRa mode (not modelled)
OPMODE_LF = 0x08  # LowFrequencyModeOn
SLEEP, STDBY, FSTX, TX, FSRX, RXCONT, RXSINGLE, CAD = range(8)
MODE_NAMES = ("Sleep", "Standby", "FSTX", "TX", "FSRX", "RxContinuous", "RxSingle", "CAD")

# RegIrqFlags (0x12), DS 6.4: write 1 to clear
IRQ_RX_TIMEOUT = 0x80
IRQ_RX_DONE = 0x40
IRQ_PAYLOAD_CRC_ERROR = 0x20
IRQ_VALID_HEADER = 0x10
IRQ_TX_DONE = 0x08

# DS 4.1.1.1 Table 12: RegModemConfig1 Bw codes -> kHz (0x0A..0x0F reserved)
BW_KHZ = (7.8, 10.4, 15.6, 20.8, 31.25, 41.7, 62.5, 125, 250, 500)
VERSION = 0x12  # RegVersion (0x42), DS 6.4: "Version code of the chip"

# LoRa-mode register reset values (DS 6.4 Table 41, "Default" column, LoRa page) and the
# registers the driver uses. Reads and writes of any other address raise.
_RESET = {
    0x01: OPMODE_LF | STDBY,  # 0x09: FSK/OOK mode, LF on, Standby (DS 6.2 RegOpMode reset)
    0x06: 0x6C,  # RegFrf 434 MHz
    0x07: 0x80,
    0x08: 0x00,
    0x09: 0x4F,  # RegPaConfig
    0x0A: 0x09,  # RegPaRamp
    0x0B: 0x2B,  # RegOcp
    0x0C: 0x20,  # RegLna
    0x0D: 0x00,  # RegFifoAddrPtr
    0x0E: 0x80,  # RegFifoTxBaseAddr
    0x0F: 0x00,  # RegFifoRxBaseAddr
    0x10: 0x00,  # RegFifoRxCurrentAddr (read-only)
    0x11: 0x00,  # RegIrqFlagsMask
    0x12: 0x00,  # RegIrqFlags
    0x13: 0x00,  # RegRxNbBytes (read-only)
    0x18: 0x10,  # RegModemStat (read-only)
    0x19: 0x00,  # RegPktSnrValue (read-only)
    0x1A: 0x00,  # RegPktRssiValue (read-only)
    0x1B: 0x00,  # RegRssiValue (read-only)
    0x1D: 0x72,  # RegModemConfig1: 125 kHz, 4/5, explicit header
    0x1E: 0x70,  # RegModemConfig2: SF7, CRC off, SymbTimeout(9:8) 0
    0x1F: 0x64,  # RegSymbTimeoutLsb: 100 symbols
    0x20: 0x00,  # RegPreambleMsb/Lsb: 8 symbols
    0x21: 0x08,
    0x22: 0x01,  # RegPayloadLength
    0x23: 0xFF,  # RegMaxPayloadLength
    0x24: 0x00,  # RegHopPeriod
    0x26: 0x00,  # RegModemConfig3
    0x31: 0xC3,  # RegDetectOptimize
    0x33: 0x27,  # RegInvertIQ (0x27 once in LoRa mode: see lora-sx127x's note)
    0x36: 0x03,  # errata 2.1 register (DS errata note: 0x02 / 0x03)
    0x37: 0x0A,  # RegDetectionThreshold
    0x39: 0x12,  # RegSyncWord
    0x3A: 0x00,  # errata 2.1 register, chosen by the chip
    0x3B: 0x1D,  # RegInvertIQ2
    0x40: 0x00,  # RegDioMapping1
    0x41: 0x00,  # RegDioMapping2
    0x42: VERSION,
    0x4D: 0x84,  # RegPaDac
}
_READ_ONLY = (0x10, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x25, 0x42)
# Registers shared by the FSK/OOK and LoRa pages (DS 6.1): the rest of 0x0D..0x3F belongs to the
# mode LongRangeMode selects, and the FSK/OOK page is not modelled.
_COMMON = (0x01, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0C, 0x40, 0x41, 0x42, 0x4D)
# Modem settings (DS 4.1.1 and 6.4): taken by the modem when it starts TX or RX, so a change
# while it transmits or receives is not a defined operation
_MODEM_SETTINGS = (0x06, 0x07, 0x08, 0x1D, 0x1E, 0x20, 0x21, 0x22, 0x26, 0x31, 0x33, 0x37, 0x39)


class ChipError(ValueError):
    """A write or command the real chip would reject or the datasheet does not allow."""


class SX1276:
    """One SX1276 on the simulated air. port: an object with transmit(chip, t_us, params,
    payload) -> t_end_us, listen(chip, t_us, params), stop(chip, t_us) and locked(chip, t_us)
    -> the end (us) of a frame the receiver has locked onto, or None (boards/sim/lora_hw.py).
    pa_boost_only: the board routes only PA_BOOST to the antenna (LILYGO T3)."""

    NAME = "SX1276"

    def __init__(self, port=None, pa_boost_only=False, label="SX1276"):
        self.port = port
        self.pa_boost_only = pa_boost_only
        self.label = label
        self.now_us = 0
        self._reset_state()

    def _reset_state(self):
        self.regs = dict(_RESET)
        self.fifo = bytearray(256)
        self._tx_end = None  # us at which the current transmission ends
        self._rx_timeout = None  # us at which RxSingle times out
        self._listening = False
        self._addr = None  # register address of the SPI access under way (None: next byte)
        self._write = False
        self.transactions = 0

    def _fail(self, what):
        raise ChipError("%s: %s" % (self.label, what))

    # --- pins -------------------------------------------------------------------------------

    def reset(self, t_us):
        """NRESET pulsed low (DS 7.2.2): every register back to its reset value."""
        self.now_us = t_us
        self._stop_air(t_us)
        self._reset_state()

    def nss(self, level, t_us):
        """NSS falling starts an access, rising ends it (DS 2.2)."""
        self.now_us = t_us
        self._addr = None
        if level:
            self.transactions += 1

    def dio(self):
        """(DIO0, DIO1) levels. DIO mapping, DS 4.1.6 Table 18: DIO0 00 RxDone, 01 TxDone,
        10 CadDone; DIO1 00 RxTimeout, 01 FhssChangeChannel, 10 CadDetected."""
        m = self.regs[0x40]
        flags = self.regs[0x12]
        d0 = (IRQ_RX_DONE, IRQ_TX_DONE, 0x04, 0)[m >> 6]
        d1 = (IRQ_RX_TIMEOUT, 0x02, 0x01, 0)[(m >> 4) & 3]
        return (1 if flags & d0 else 0, 1 if flags & d1 else 0)

    # --- SPI (DS 2.2: first byte wnr bit + 7-bit address, then data; burst auto-increments,
    # except at RegFifo, where each byte moves RegFifoAddrPtr) -------------------------------

    def transfer(self, mosi, t_us):
        self.now_us = t_us
        out = bytearray(len(mosi))
        for i, b in enumerate(mosi):
            if self._addr is None:
                self._write = bool(b & 0x80)
                self._addr = b & 0x7F
                out[i] = 0
                continue
            addr = self._addr
            if self._write:
                out[i] = self._peek(addr)
                self._store(addr, b)
            else:
                out[i] = self._load(addr)
            if addr != 0x00:
                self._addr = addr + 1
        return bytes(out)

    def _lora(self):
        return bool(self.regs[0x01] & OPMODE_LORA)

    def mode(self):
        return self.regs[0x01] & 7

    def _check_addr(self, addr, verb):
        if addr not in self.regs and addr != 0x00:
            self._fail("%s of register 0x%02x, which the sim does not model" % (verb, addr))
        if addr not in _COMMON and not self._lora():
            self._fail(
                "%s of register 0x%02x in FSK/OOK mode (LongRangeMode 0): the FSK/OOK page is "
                "not modelled" % (verb, addr)
            )

    def _peek(self, addr):
        return self.regs.get(addr, 0)

    def _load(self, addr):
        self._check_addr(addr, "read")
        if addr == 0x00:
            return self._fifo_access("read", 0)
        return self.regs[addr]

    def _fifo_access(self, verb, value):
        mode = self.mode()
        # DS 4.1.2.3: the FIFO is cleared and not accessible in Sleep; it is filled in Standby
        # before TX and read after RxDone
        if mode == SLEEP:
            self._fail("FIFO %s in Sleep mode (DS 4.1.2.3: not accessible in Sleep)" % verb)
        if mode == TX or (verb == "write" and mode != STDBY):
            self._fail(
                "FIFO %s in %s mode (DS 4.1.2.3: filled in Standby, read after RxDone)"
                % (verb, MODE_NAMES[mode])
            )
        ptr = self.regs[0x0D]
        if verb == "write":
            self.fifo[ptr] = value
        else:
            value = self.fifo[ptr]
        self.regs[0x0D] = (ptr + 1) & 0xFF
        return value

    def _store(self, addr, v):
        self._check_addr(addr, "write")
        if addr == 0x00:
            self._fifo_access("write", v)
            return
        if addr in _READ_ONLY:
            self._fail("write 0x%02x to read-only register 0x%02x" % (v, addr))
        mode = self.mode()
        if addr in _MODEM_SETTINGS and mode in (TX, RXCONT, RXSINGLE):
            self._fail(
                "register 0x%02x written in %s mode: modem settings are taken at TX/RX start "
                "(set them in Sleep or Standby, DS 4.1.3)" % (addr, MODE_NAMES[mode])
            )
        if addr == 0x01:
            self._opmode(v)
            return
        if addr == 0x12:  # DS 6.4 RegIrqFlags: writing 1 clears the flag
            self.regs[0x12] &= ~v & 0xFF
            return
        if addr == 0x1D:
            if v >> 4 > 9:
                self._fail("RegModemConfig1 Bw 0x%x is reserved (DS 6.4: 0..9)" % (v >> 4))
            if not 1 <= (v >> 1) & 7 <= 4:
                self._fail(
                    "RegModemConfig1 CodingRate %d is reserved (DS 6.4: 1..4 = 4/5..4/8)"
                    % ((v >> 1) & 7)
                )
        elif addr == 0x1E:
            if not 6 <= v >> 4 <= 12:
                self._fail("RegModemConfig2 SpreadingFactor %d (DS 6.4: 6..12)" % (v >> 4))
            if v & 0x08:
                self._fail("TxContinuousMode is a test mode the sim does not model")
        elif addr == 0x22 and v == 0:
            self._fail("RegPayloadLength 0 (DS 6.4: a value of 0 is not permitted)")
        elif addr == 0x4D and v not in (0x84, 0x87):
            self._fail("RegPaDac 0x%02x (DS 3.4.3/6.4: 0x84 default, 0x87 for +20 dBm)" % v)
        elif addr == 0x36 and v not in (0x02, 0x03):
            self._fail("register 0x36 = 0x%02x (errata 2.1 allows 0x02 or 0x03)" % v)
        elif addr == 0x3B and v not in (0x19, 0x1D):
            self._fail("RegInvertIQ2 0x%02x (0x19 inverted, 0x1D normal)" % v)
        elif addr == 0x40 and (v & 0xC0 == 0xC0 or v & 0x30 == 0x30):
            self._fail("RegDioMapping1 0x%02x: mapping 11 is not defined in LoRa mode" % v)
        self.regs[addr] = v

    def _opmode(self, v):
        old = self.regs[0x01]
        if (v ^ old) & OPMODE_LORA and old & 7 != SLEEP and v & 7 != SLEEP:
            # DS 6.4 RegOpMode bit 7: "This bit can be modified only in Sleep mode. A write
            # operation on other device modes is ignored." A write that selects Sleep and the
            # new LongRangeMode at once is taken (lora-sx127x's _set_mode does this, and the
            # chip ends in Sleep with the new mode, as Semtech's own driver relies on).
            self._fail(
                "RegOpMode LongRangeMode changed in %s mode (DS 6.4: only in Sleep mode; the "
                "chip ignores the write)" % MODE_NAMES[old & 7]
            )
        if v & OPMODE_SHARED:
            self._fail("RegOpMode AccessSharedReg: FSK registers from LoRa mode are not modelled")
        mode = v & 7
        if mode != SLEEP and mode != STDBY and not v & OPMODE_LORA:
            self._fail("RegOpMode %s in FSK/OOK mode: the sim models LoRa only" % MODE_NAMES[mode])
        if mode == CAD:
            self._fail("RegOpMode CAD: channel activity detection is not modelled")
        old_mode = old & 7
        if old_mode != mode:
            self._leave(old_mode)
        self.regs[0x01] = v & 0xFF
        if mode == SLEEP:
            self.fifo = bytearray(256)  # DS 4.1.2.3: cleared in Sleep
        if old_mode != mode:
            if mode == TX:
                self._start_tx()
            elif mode in (RXCONT, RXSINGLE):
                self._start_rx(mode)

    def _leave(self, mode):
        if mode == TX and self._tx_end is not None:
            self._fail(
                "TX cut short by a mode change at %d us (the frame ends at %d us): the sim's air "
                "cannot take a frame back" % (self.now_us, self._tx_end)
            )
        self._stop_air(self.now_us)

    def _stop_air(self, t_us):
        if self._listening and self.port is not None:
            self.port.stop(self, t_us)
        self._listening = False
        self._rx_timeout = None

    # --- modem settings -----------------------------------------------------------------------

    def params(self):
        """The modem settings as the air needs them (checked against DS 4.1.1)."""
        r = self.regs
        sf = r[0x1E] >> 4
        bw = BW_KHZ[r[0x1D] >> 4]
        implicit = bool(r[0x1D] & 1)
        frf = (r[0x06] << 16) | (r[0x07] << 8) | r[0x08]
        t_sym_us = (1 << sf) * 1000 / bw
        ldro = bool(r[0x26] & 0x08)
        if t_sym_us > 16000 and not ldro:
            # DS 4.1.1.6: LowDataRateOptimize "mandated for when the symbol length exceeds 16 ms"
            self._fail(
                "SF%d at %g kHz: symbols of %.1f ms need LowDataRateOptimize"
                % (sf, bw, t_sym_us / 1000)
            )
        if sf == 6 and not implicit:
            self._fail("SF6 needs implicit header mode (DS 4.1.1.2)")
        detect = r[0x31] & 7
        want = (0x05, 0x0C) if sf == 6 else (0x03, 0x0A)
        if (detect, r[0x37]) != want:
            self._fail(
                "SF%d with RegDetectOptimize 0x%x / RegDetectionThreshold 0x%02x (DS 4.1.1.2 and "
                "6.4: 0x%x / 0x%02x)" % (sf, detect, r[0x37], want[0], want[1])
            )
        return {
            "freq_khz": round(frf * FXOSC_HZ / (1 << 19) / 1000),
            "sf": sf,
            "bw": bw,
            "coding_rate": ((r[0x1D] >> 1) & 7) + 4,
            "preamble_len": (r[0x20] << 8) | r[0x21],
            "implicit_header": implicit,
            "crc_en": bool(r[0x1E] & 0x04),
            "syncword": r[0x39],
            "invert_iq": r[0x3B] == 0x19,
            "power_dbm": self.output_dbm(),
        }

    def output_dbm(self):
        """Output power (DS 3.4.2 and 6.4 RegPaConfig): PA_BOOST Pout = 17 - (15 - OutputPower),
        +3 dB with RegPaDac 0x87; RFO Pout = 10.8 + 0.6 MaxPower - (15 - OutputPower)."""
        pa = self.regs[0x09]
        if pa & 0x80:
            dbm = 2 + (pa & 0x0F)
            if self.regs[0x4D] == 0x87:
                dbm += 3
            return dbm
        return 10.8 + 0.6 * ((pa >> 4) & 7) - (15 - (pa & 0x0F))

    # --- TX and RX on the air ------------------------------------------------------------------

    def _start_tx(self):
        p = self.params()
        if not self.regs[0x09] & 0x80 and self.pa_boost_only:
            self._fail(
                "TX on the RFO pin (RegPaConfig PaSelect 0), but this board routes only PA_BOOST "
                "to the antenna: set tx_ant PA_BOOST"
            )
        n = self.regs[0x22]
        base = self.regs[0x0E]
        payload = bytes(self.fifo[(base + i) & 0xFF] for i in range(n))
        self._tx_end = self.port.transmit(self, self.now_us, p, payload)

    def _start_rx(self, mode):
        p = self.params()
        self.port.listen(self, self.now_us, p)
        self._listening = True
        if mode == RXSINGLE:
            # DS 4.1.5: RxSingle times out after SymbTimeout symbols without a preamble
            n = ((self.regs[0x1E] & 3) << 8) | self.regs[0x1F]
            if n < 4:
                self._fail("SymbTimeout %d symbols (DS 6.4: 4..1023)" % n)
            t_sym = (1 << p["sf"]) * 1000 / p["bw"]
            self._rx_timeout = self.now_us + int(n * t_sym)

    def next_event_us(self):
        times = [t for t in (self._tx_end, self._rx_timeout) if t is not None]
        return min(times) if times else None

    def run_until(self, t_us):
        """Let the chip's own events (end of TX, RX timeout) happen up to t_us."""
        if self._tx_end is not None and self._tx_end <= t_us:
            self.now_us = self._tx_end
            self._tx_end = None
            self._irq(IRQ_TX_DONE)
            self.regs[0x01] = (self.regs[0x01] & ~7) | STDBY  # DS 4.1.3: then Standby
        if self._rx_timeout is not None and self._rx_timeout <= t_us:
            t = self._rx_timeout
            locked = self.port.locked(self, t) if self.port is not None else None
            if locked is not None and locked >= t:
                # receiving a frame whose preamble it locked onto: the timeout does not end it
                self._rx_timeout = locked + _AFTER_FRAME_US
                self.port.stop(self, t)  # but no later frame starts in this window
                return
            self.now_us = t
            self._stop_air(t)
            self._irq(IRQ_RX_TIMEOUT)
            self.regs[0x01] = (self.regs[0x01] & ~7) | STDBY

    def _irq(self, flag):
        if not self.regs[0x11] & flag:  # RegIrqFlagsMask: 1 masks the IRQ
            self.regs[0x12] |= flag

    def deliver(self, payload, rssi_dbm, snr_db, crc_ok, meta, t_us):
        """A frame the air delivered to this receiver (it was listening at its preamble)."""
        mode = self.mode()
        if mode not in (RXCONT, RXSINGLE):
            return False
        p = self.params()
        if meta.get("syncword", p["syncword"]) != p["syncword"]:
            return False  # another network's sync word: the chip does not lock (DS 4.1.1.5)
        if meta.get("invert_iq", False) != p["invert_iq"]:
            return False
        self.now_us = t_us
        base = self.regs[0x0F]
        for i, b in enumerate(payload):
            self.fifo[(base + i) & 0xFF] = b
        self.regs[0x10] = base
        self.regs[0x13] = len(payload)
        snr4 = max(-128, min(127, round(snr_db * 4)))
        self.regs[0x19] = snr4 & 0xFF
        # DS 5.5.5: Packet Strength (dBm) = -157 + PacketRssi (HF port), + SNR/4 when SNR < 0
        raw = rssi_dbm + 157 - (snr4 / 4 if snr4 < 0 else 0)
        self.regs[0x1A] = max(0, min(255, round(raw)))
        self._irq(IRQ_RX_DONE | IRQ_VALID_HEADER | (0 if crc_ok else IRQ_PAYLOAD_CRC_ERROR))
        if mode == RXSINGLE:  # DS 4.1.5: RxSingle returns to Standby after RxDone
            self._stop_air(t_us)
            self.regs[0x01] = (self.regs[0x01] & ~7) | STDBY
        return True

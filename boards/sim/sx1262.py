# A command-level Semtech SX1262 for the simulator: SPI opcodes, the BUSY line, DIO1 interrupts,
# the 256-byte data buffer, TCXO on DIO3 and the RF switch on DIO2, as micropython-lib's
# lora-sx126x drives it. Runs on CPython in the fleet simulator; the node's SPI bytes and pin
# edges reach it through boards/sim/lora_hw.py, and on TX and RX it uses the shared air
# (host_tools/sim/air.py) through a port object, as boards/sim/sx1276.py does.
#
# "DS" = Semtech SX1261/2 datasheet, rev. 2.1 (December 2021). Strict: an unknown opcode, a
# parameter outside its range, a command in a mode the datasheet does not allow it in, or a
# command sent while BUSY is high raises ChipError naming it. (The driver could not tell: its
# status decoding masks 0x6, so the "command error" statuses 4 and 5 never reach it.)

from boards.sim.sx1276 import ChipError

FXOSC_HZ = 32000000  # DS 13.4.1 SetRfFrequency: RFfreq = f * 2^25 / F(XTAL), 32 MHz
# A receive timeout that falls inside a frame the receiver locked onto waits for the frame: it
# fires this long after the frame's end only if the air did not deliver it (collision). A
# millisecond, because the fleet simulator resolves the air per millisecond.
_AFTER_FRAME_US = 1000

# Chip modes as GetStatus reports them (DS 13.5.1, bits 6:4)
SLEEP, STDBY_RC, STDBY_XOSC, FS, RX, TX = 0, 2, 3, 4, 5, 6
MODE_NAMES = {0: "SLEEP", 2: "STDBY_RC", 3: "STDBY_XOSC", 4: "FS", 5: "RX", 6: "TX"}

# IRQ bits (DS 13.3.1 Table 13-29)
IRQ_TX_DONE = 1 << 0
IRQ_RX_DONE = 1 << 1
IRQ_HEADER_VALID = 1 << 4
IRQ_CRC_ERR = 1 << 6
IRQ_TIMEOUT = 1 << 9

XOSC_START_ERR = 1 << 5  # GetDeviceErrors OpError bit (DS 13.6.1 Table 13-85)

# LoRa bandwidth codes (DS 13.4.5.2 Table 13-48) -> kHz
BW_KHZ = {
    0x00: 7.8,
    0x08: 10.4,
    0x01: 15.6,
    0x09: 20.8,
    0x02: 31.25,
    0x0A: 41.7,
    0x03: 62.5,
    0x04: 125,
    0x05: 250,
    0x06: 500,
}
# DS 13.3.6 Table 13-35: SetDIO3AsTCXOCtrl tcxoVoltage codes -> mV
TCXO_MV = (1600, 1700, 1800, 2200, 2400, 2700, 3000, 3300)

# BUSY (DS 8.3.1): high while the chip processes a command; the host waits for it to fall.
_BUSY_CMD_US = 20  # a command's processing, typically well under the driver's 105 us
_BUSY_START_US = 3500  # reset or a cold wake: start-up calibration of every block (DS 13.1.12)
_BUSY_CALIBRATE_US = 3500  # Calibrate of all blocks (DS 13.1.12)
_BUSY_WARM_WAKE_US = 340  # wake from warm-start sleep (DS 13.1.1; the cold start: above)

# The registers the driver touches (DS 9.x and 15 errata), with the values the sim starts at:
# 0x0740/0x0741 LoRa sync word (DS Table 12-1: 0x1424, private networks), 0x0736 IQ polarity
# (DS 15.4), 0x08AC RX gain (DS 9.6: 0x94 power saving, 0x96 boosted), 0x0889 TX modulation
# (DS 15.1), 0x08D8 TX clamp (DS 15.2), 0x0902 / 0x0944 RTC and event clear (DS 15.3).
_REGS = {
    0x0740: 0x14,
    0x0741: 0x24,
    0x0736: 0x0D,
    0x08AC: 0x94,
    0x0889: 0x04,
    0x08D8: 0xC8,
    0x0902: 0x00,
    0x0944: 0x00,
}

# Commands: opcode -> (name, parameter bytes written, bytes read back after the status byte).
# Write commands execute on NSS rising (DS 8.3.1); reads answer while their bytes are clocked.
_CMDS = {
    0x80: ("SetStandby", 1),
    0x84: ("SetSleep", 1),
    0x82: ("SetRx", 3),
    0x83: ("SetTx", 3),
    0x8A: ("SetPacketType", 1),
    0x8B: ("SetModulationParams", 4),  # LoRa: SF, BW, CR, LDRO (+4 unused of 8)
    0x8C: ("SetPacketParams", 6),  # LoRa: preamble(2), header, length, CRC, IQ (+3 unused)
    0x8F: ("SetBufferBaseAddress", 2),
    0x86: ("SetRfFrequency", 4),
    0x95: ("SetPaConfig", 4),
    0x8E: ("SetTxParams", 2),
    0x08: ("SetDioIrqParams", 8),
    0x02: ("ClearIrqStatus", 2),
    0x07: ("ClearDeviceErrors", 2),
    0x97: ("SetDIO3AsTCXOCtrl", 4),
    0x9D: ("SetDIO2AsRfSwitchCtrl", 1),
    0x89: ("Calibrate", 1),
    0x98: ("CalibrateImage", 2),
    0x0D: ("WriteRegister", 3),  # address (2) + at least one data byte
    0x0E: ("WriteBuffer", 2),  # offset + at least one data byte
    0x1D: ("ReadRegister", 2),
    0x1E: ("ReadBuffer", 1),
    0x12: ("GetIrqStatus", 0),
    0x13: ("GetRxBufferStatus", 0),
    0x14: ("GetPacketStatus", 0),
    0x17: ("GetDeviceErrors", 0),
    0x11: ("GetPacketType", 0),
    0xC0: ("GetStatus", 0),
}
_READS = (0x1D, 0x1E, 0x12, 0x13, 0x14, 0x17, 0x11, 0xC0)


class SX1262:
    """One SX1262 on the simulated air. port as for boards/sim/sx1276.SX1276. tcxo_mv: the
    board's TCXO, powered from DIO3, rated at this voltage (0: a crystal); rf_switch_dio2: the
    board's antenna switch is driven by DIO2 (DS 13.3.5)."""

    NAME = "SX1262"

    def __init__(self, port=None, tcxo_mv=0, rf_switch_dio2=False, label="SX1262"):
        self.port = port
        self.tcxo_mv = tcxo_mv
        self.rf_switch_dio2 = rf_switch_dio2
        self.label = label
        self.now_us = 0
        self._power_on(0)

    def _fail(self, what):
        raise ChipError("%s: %s" % (self.label, what))

    def _power_on(self, t_us):
        self.mode = STDBY_RC
        self.busy_until = t_us + _BUSY_START_US
        self.asleep = False
        self.irq = 0
        self.irq_mask = 0
        self.dio1_mask = 0
        self.op_errors = 0
        # A board with a TCXO: the start-up calibration could not start the crystal oscillator
        # before DIO3 powered the TCXO (DS 13.3.6: XOSC_START_ERR is flagged).
        if self.tcxo_mv:
            self.op_errors |= XOSC_START_ERR
        self.tcxo_code = None  # SetDIO3AsTCXOCtrl voltage code
        self.tcxo_delay_us = 0
        self.dio2_switch = False
        self.packet_type = None
        self.modulation = None  # (sf, bw code, cr, ldro)
        self.packet = None  # (preamble, implicit, length, crc, invert_iq)
        self.freq_hz = None
        self.pa = None
        self.power = None
        self.tx_base = 0
        self.rx_base = 0
        self.buffer = bytearray(256)
        self.regs = dict(_REGS)
        self.rx_len = 0
        self.rx_start = 0
        self.pkt_status = (0, 0, 0)
        self._tx_end = None
        self._rx_timeout = None
        self._rx_continuous = False
        self._listening = False
        self._xosc_failed = False
        self._cmd = None
        self._miso_status = 0
        self._sleep_cfg = 0
        self._woken = False  # NSS fell to wake it from sleep: no bytes until BUSY falls

    # --- pins -------------------------------------------------------------------------------

    def reset(self, t_us):
        """NRESET released after a low pulse (DS 8.1): the chip starts again in STDBY_RC."""
        self.now_us = t_us
        self._stop_air(t_us)
        self._power_on(t_us)

    def busy(self, t_us):
        """BUSY: -1 high until something wakes the chip, else how many us it stays high."""
        if self.asleep or self._xosc_failed:
            return -1
        return max(0, self.busy_until - t_us)

    def dio(self):
        """(DIO1,): high while an IRQ routed to it by SetDioIrqParams is set (DS 13.3.1)."""
        return (1 if self.irq & self.dio1_mask else 0,)

    def nss(self, level, t_us):
        self.now_us = t_us
        if not level:  # falling edge
            if self.asleep:  # DS 13.1.1: a falling edge of NSS wakes the chip from sleep
                self.asleep = False
                warm = self._sleep_cfg & 0x04
                if not warm:
                    self._power_on(t_us)
                self.mode = STDBY_RC
                self.busy_until = t_us + (_BUSY_WARM_WAKE_US if warm else _BUSY_START_US)
                self._cmd = None
                self._woken = True
                return
            self._woken = False
            if self.busy(t_us):
                self._fail(
                    "NSS went low while BUSY was high (for %d us more): DS 8.3.1, wait for BUSY "
                    "low before each command" % self.busy(t_us)
                )
            self._cmd = bytearray()
            self._miso_status = self.status()
            return
        cmd, self._cmd = self._cmd, None
        if cmd is None or not cmd:
            return  # a wake-up pulse, or NSS toggled without clocks
        self._execute(bytes(cmd), t_us)

    def status(self):
        """The status byte (DS 13.5.1): chip mode in bits 6:4, command status in bits 3:1 (0:
        nothing to report; the sim raises instead of reporting a failed command)."""
        return (self.mode << 4) & 0x70

    # --- SPI ------------------------------------------------------------------------------------

    def transfer(self, mosi, t_us):
        self.now_us = t_us
        if self._cmd is None:
            if self._woken:
                self._fail("SPI bytes clocked while the chip was waking from sleep (BUSY high)")
            self._fail("SPI bytes clocked with NSS high")
        out = bytearray(len(mosi))
        for i, b in enumerate(mosi):
            n = len(self._cmd)
            self._cmd.append(b)
            out[i] = self._miso(n)
        return bytes(out)

    def _miso(self, n):
        """MISO for byte n of the command clocked so far (DS 13: status on the byte after the
        opcode and parameters of a read command, then the data)."""
        cmd = self._cmd
        op = cmd[0]
        if op not in _READS:
            return self._miso_status
        if op == 0x1D:  # ReadRegister: opcode, address (2), status, data...
            if n < 3:
                return self._miso_status
            if n == 3:
                return self._miso_status
            addr = ((cmd[1] << 8) | cmd[2]) + n - 4
            if addr not in self.regs:
                self._fail("ReadRegister 0x%04x: a register the sim does not model" % addr)
            return self.regs[addr]
        if op == 0x1E:  # ReadBuffer: opcode, offset, status, data...
            if n <= 2:
                return self._miso_status
            return self.buffer[(cmd[1] + n - 3) & 0xFF]
        if n <= 1:
            return self._miso_status
        k = n - 2
        if op == 0x12:
            data = (self.irq >> 8, self.irq & 0xFF)
        elif op == 0x13:
            data = (self.rx_len, self.rx_start)
        elif op == 0x14:
            data = self.pkt_status
        elif op == 0x17:
            data = (self.op_errors >> 8, self.op_errors & 0xFF)
        elif op == 0x11:
            data = (self.packet_type if self.packet_type is not None else 0,)
        else:  # GetStatus: the status byte is all
            data = ()
        return data[k] if k < len(data) else 0

    # --- commands -----------------------------------------------------------------------------

    def _execute(self, cmd, t_us):
        op = cmd[0]
        if op not in _CMDS:
            self._fail("opcode 0x%02x is not an SX1262 command (DS 11 Table 11-1..11-5)" % op)
        name, nargs = _CMDS[op]
        args = cmd[1:]
        if op not in _READS and len(args) < nargs:
            self._fail("%s takes %d parameter bytes, got %d" % (name, nargs, len(args)))
        self.busy_until = t_us + _BUSY_CMD_US
        getattr(self, "_op_" + name)(args, t_us)

    def _need_standby(self, name):
        if self.mode not in (STDBY_RC, STDBY_XOSC):
            self._fail(
                "%s in %s mode (DS 13: accepted in STDBY_RC / STDBY_XOSC only)"
                % (name, MODE_NAMES[self.mode])
            )

    def _op_GetIrqStatus(self, a, t):
        pass

    _op_GetRxBufferStatus = _op_GetPacketStatus = _op_GetDeviceErrors = _op_GetIrqStatus
    _op_GetPacketType = _op_GetStatus = _op_GetIrqStatus
    _op_ReadRegister = _op_ReadBuffer = _op_GetIrqStatus

    def _op_SetStandby(self, a, t):
        if a[0] > 1:
            self._fail("SetStandby(0x%02x): StdbyConfig is 0 (RC) or 1 (XOSC) (DS 13.1.2)" % a[0])
        self._leave(t)
        if a[0] == 1:
            self._start_xosc(t)
            if not self._xosc_failed:
                self.mode = STDBY_XOSC
        else:
            self.mode = STDBY_RC

    def _start_xosc(self, t):
        """The 32 MHz reference for STDBY_XOSC, FS, TX and RX. With a TCXO it needs DIO3's
        supply (SetDIO3AsTCXOCtrl) at the TCXO's voltage, and takes the programmed delay."""
        if self.mode in (STDBY_XOSC, FS, TX, RX):
            return
        if self.tcxo_mv:
            if self.tcxo_code is None:
                # no supply: the oscillator never starts, BUSY stays high (the lora README's
                # "BUSY timeout" troubleshooting case)
                self.op_errors |= XOSC_START_ERR
                self._xosc_failed = True
                return
            mv = TCXO_MV[self.tcxo_code]
            if mv < self.tcxo_mv:
                self.op_errors |= XOSC_START_ERR
                self._xosc_failed = True
                return
            self.busy_until = max(self.busy_until, t + self.tcxo_delay_us)

    def _op_SetSleep(self, a, t):
        if a[0] & ~0x05:
            self._fail(
                "SetSleep(0x%02x): only bits 2 (warm start) and 0 (RTC wake) are defined "
                "(DS 13.1.1)" % a[0]
            )
        self._need_standby("SetSleep")
        self._sleep_cfg = a[0]
        self.asleep = True
        self.mode = SLEEP

    def _op_SetPacketType(self, a, t):
        # DS 13.4.2: "the first command in the radio configuration sequence"; the parameters
        # of the previous packet type are lost; accepted in STDBY_RC only
        if self.mode != STDBY_RC:
            self._fail(
                "SetPacketType in %s mode (DS 13.4.2: STDBY_RC only)" % MODE_NAMES[self.mode]
            )
        if a[0] != 1:
            self._fail("SetPacketType(%d): the sim models LoRa (1) only" % a[0])
        self.packet_type = a[0]
        self.modulation = None
        self.packet = None

    def _need_lora(self, name):
        if self.packet_type != 1:
            self._fail("%s before SetPacketType(LoRa) (DS 13.4.2: that comes first)" % name)

    def _op_SetModulationParams(self, a, t):
        self._need_lora("SetModulationParams")
        sf, bw, cr, ldro = a[0], a[1], a[2], a[3]
        if not 5 <= sf <= 12:
            self._fail("SetModulationParams: SF %d (DS 13.4.5.2: 5..12)" % sf)
        if bw not in BW_KHZ:
            self._fail("SetModulationParams: BW code 0x%02x is reserved (DS Table 13-48)" % bw)
        if not 1 <= cr <= 4:
            self._fail("SetModulationParams: CR code %d (DS Table 13-49: 1..4 = 4/5..4/8)" % cr)
        if ldro > 1:
            self._fail("SetModulationParams: LowDataRateOptimize %d (0 or 1)" % ldro)
        self.modulation = (sf, bw, cr, ldro)

    def _op_SetPacketParams(self, a, t):
        self._need_lora("SetPacketParams")
        preamble = (a[0] << 8) | a[1]
        if preamble == 0:
            self._fail("SetPacketParams: preamble length 0 (DS 13.4.6.2: 1..65535)")
        for name, v in (("HeaderType", a[2]), ("CRCType", a[4]), ("InvertIQ", a[5])):
            if v > 1:
                self._fail("SetPacketParams: %s %d (0 or 1)" % (name, v))
        self.packet = (preamble, bool(a[2]), a[3], bool(a[4]), bool(a[5]))

    def _op_SetBufferBaseAddress(self, a, t):
        self.tx_base, self.rx_base = a[0], a[1]

    def _op_SetRfFrequency(self, a, t):
        rf = (a[0] << 24) | (a[1] << 16) | (a[2] << 8) | a[3]
        hz = rf * FXOSC_HZ / (1 << 25)
        if not 150e6 <= hz <= 960e6:
            self._fail("SetRfFrequency %.3f MHz (DS 3.1: 150..960 MHz)" % (hz / 1e6))
        self.freq_hz = hz

    def _op_SetPaConfig(self, a, t):
        duty, hp_max, device, lut = a[0], a[1], a[2], a[3]
        if device != 0:
            self._fail("SetPaConfig deviceSel %d: 0 selects the SX1262's PA (DS 13.1.14)" % device)
        if duty > 4:
            self._fail(
                "SetPaConfig paDutyCycle %d (DS 13.1.14: at most 0x04 on the SX1262)" % duty
            )
        if hp_max > 7:
            self._fail("SetPaConfig hpMax %d (DS 13.1.14: 0x00..0x07)" % hp_max)
        if lut != 1:
            self._fail("SetPaConfig paLut %d (DS 13.1.14: always 0x01)" % lut)
        self.pa = (duty, hp_max)

    def _op_SetTxParams(self, a, t):
        power = a[0] - 256 if a[0] > 127 else a[0]
        if not -9 <= power <= 22:
            self._fail(
                "SetTxParams power %d dBm (DS 13.4.4: -9..22 with the high-power PA)" % power
            )
        if a[1] > 7:
            self._fail("SetTxParams RampTime 0x%02x (DS Table 13-41: 0x00..0x07)" % a[1])
        self.power = power

    def _op_SetDioIrqParams(self, a, t):
        self.irq_mask = (a[0] << 8) | a[1]
        self.dio1_mask = (a[2] << 8) | a[3]

    def _op_ClearIrqStatus(self, a, t):
        self.irq &= ~((a[0] << 8) | a[1])

    def _op_ClearDeviceErrors(self, a, t):
        if a[0] or a[1]:
            self._fail("ClearDeviceErrors takes 0x0000 (DS 13.6.2)")
        self.op_errors = 0

    def _op_SetDIO3AsTCXOCtrl(self, a, t):
        if a[0] > 7:
            self._fail("SetDIO3AsTCXOCtrl tcxoVoltage code %d (DS Table 13-35: 0..7)" % a[0])
        if not self.tcxo_mv:
            self._fail(
                "SetDIO3AsTCXOCtrl on a board whose SX1262 has a crystal, not a TCXO on DIO3"
            )
        mv = TCXO_MV[a[0]]
        if mv > self.tcxo_mv:
            self._fail(
                "SetDIO3AsTCXOCtrl at %d mV: this board's TCXO is rated %d mV (DIO3 would "
                "overdrive it)" % (mv, self.tcxo_mv)
            )
        self._need_standby("SetDIO3AsTCXOCtrl")
        self.tcxo_code = a[0]
        self.tcxo_delay_us = ((a[1] << 16) | (a[2] << 8) | a[3]) * 15.625

    def _op_SetDIO2AsRfSwitchCtrl(self, a, t):
        if a[0] > 1:
            self._fail("SetDIO2AsRfSwitchCtrl(%d): 0 or 1 (DS 13.3.5)" % a[0])
        self.dio2_switch = bool(a[0])

    def _op_Calibrate(self, a, t):
        if self.mode != STDBY_RC:
            self._fail("Calibrate in %s mode (DS 13.1.12: STDBY_RC only)" % MODE_NAMES[self.mode])
        if a[0] & 0x80:
            self._fail("Calibrate(0x%02x): bit 7 is RFU (DS Table 13-19)" % a[0])
        self.busy_until = t + _BUSY_CALIBRATE_US

    def _op_CalibrateImage(self, a, t):
        self._need_standby("CalibrateImage")
        if a[0] > a[1]:
            self._fail(
                "CalibrateImage(0x%02x, 0x%02x): freq1 above freq2 (DS 13.1.13)" % (a[0], a[1])
            )
        self.busy_until = t + _BUSY_CALIBRATE_US

    def _op_WriteRegister(self, a, t):
        addr = (a[0] << 8) | a[1]
        for i, v in enumerate(a[2:]):
            if addr + i not in self.regs:
                self._fail("WriteRegister 0x%04x: a register the sim does not model" % (addr + i))
            self.regs[addr + i] = v
        if 0x08AC in range(addr, addr + len(a) - 2) and self.regs[0x08AC] not in (0x94, 0x96):
            self._fail(
                "RX gain register 0x08AC = 0x%02x (DS 9.6: 0x94 or 0x96)" % self.regs[0x08AC]
            )

    def _op_WriteBuffer(self, a, t):
        if self.mode in (TX, RX, SLEEP):
            self._fail(
                "WriteBuffer in %s mode (DS 13.2.3: fill the buffer in standby)"
                % MODE_NAMES[self.mode]
            )
        off = a[0]
        for i, v in enumerate(a[1:]):
            self.buffer[(off + i) & 0xFF] = v

    def _op_SetTx(self, a, t):
        self._need_configured("SetTx")
        if self.rf_switch_dio2 and not self.dio2_switch:
            self._fail(
                "SetTx with the antenna switch not driven: this board switches it from DIO2 "
                "(SetDIO2AsRfSwitchCtrl(1), DS 13.3.5)"
            )
        if self.pa is None or self.power is None:
            self._fail("SetTx before SetPaConfig and SetTxParams (DS 14.3: TX set-up)")
        if a[0] or a[1] or a[2]:
            self._fail("SetTx with a timeout: not modelled (the driver passes 0)")
        self._start_xosc(t)
        if self._xosc_failed:
            return
        self._leave(t)
        self.mode = TX
        preamble, implicit, length, crc, iq = self.packet
        payload = bytes(self.buffer[(self.tx_base + i) & 0xFF] for i in range(length))
        self._tx_end = self.port.transmit(self, t, self.params(), payload)

    def _op_SetRx(self, a, t):
        self._need_configured("SetRx")
        self._start_xosc(t)
        if self._xosc_failed:
            return
        self._leave(t)
        self.mode = RX
        timeout = (a[0] << 16) | (a[1] << 8) | a[2]
        p = self.params()
        self.port.listen(self, t, p)
        self._listening = True
        self._rx_continuous = timeout == 0xFFFFFF
        if 0 < timeout < 0xFFFFFF:  # DS 13.1.5: in units of 15.625 us
            self._rx_timeout = t + int(timeout * 15.625)

    def _need_configured(self, name):
        self._need_lora(name)
        if self.modulation is None or self.packet is None or self.freq_hz is None:
            self._fail(
                "%s before SetRfFrequency, SetModulationParams and SetPacketParams (DS 14.2/14.3)"
                % name
            )
        self._need_standby(name)

    def params(self):
        sf, bw, cr, ldro = self.modulation
        preamble, implicit, length, crc, iq = self.packet
        bw_khz = BW_KHZ[bw]
        t_sym_us = (1 << sf) * 1000 / bw_khz
        if t_sym_us >= 16380 and not ldro:
            # DS 6.1.1.4: LowDataRateOptimize "mandated" for SF11 and SF12 at 125 kHz
            self._fail("SF%d at %g kHz without LowDataRateOptimize (DS 6.1.1.4)" % (sf, bw_khz))
        sync = self.regs[0x0740], self.regs[0x0741]
        return {
            "freq_khz": round(self.freq_hz / 1000),
            "sf": sf,
            "bw": bw_khz,
            "coding_rate": cr + 4,
            "preamble_len": preamble,
            "implicit_header": implicit,
            "crc_en": crc,
            # 0xY4Z4 on the SX126x is the SX127x's 0xYZ (Semtech's translation)
            "syncword": (sync[0] & 0xF0) | (sync[1] >> 4),
            "invert_iq": iq,
            "power_dbm": self.output_dbm(),
        }

    def output_dbm(self):
        """DS 13.1.14.1 Table 13-21: the optimal paDutyCycle/hpMax pairs give 22, 20, 17 or 14
        dBm with power 22; other settings give the power asked for."""
        optimal = {(4, 7): 22, (3, 5): 20, (2, 3): 17, (2, 2): 14}
        top = optimal.get(self.pa)
        if top is not None:
            return top - (22 - self.power)
        return self.power

    def _leave(self, t):
        if self.mode == TX and self._tx_end is not None:
            self._fail(
                "TX stopped at %d us before its end at %d us: the sim's air cannot take a frame "
                "back" % (t, self._tx_end)
            )
        self._stop_air(t)

    def _stop_air(self, t):
        if self._listening and self.port is not None:
            self.port.stop(self, t)
        self._listening = False
        self._rx_timeout = None

    # --- events -------------------------------------------------------------------------------

    def _raise_irq(self, bits):
        self.irq |= bits & self.irq_mask  # DS 13.3.1: masked IRQs are not flagged

    def next_event_us(self):
        times = [x for x in (self._tx_end, self._rx_timeout) if x is not None]
        return min(times) if times else None

    def run_until(self, t_us):
        if self._tx_end is not None and self._tx_end <= t_us:
            self.now_us = self._tx_end
            self._tx_end = None
            self._raise_irq(IRQ_TX_DONE)
            self.mode = STDBY_RC  # DS 13.1.4: after TX the chip falls back to STDBY_RC
        if self._rx_timeout is not None and self._rx_timeout <= t_us:
            t = self._rx_timeout
            locked = self.port.locked(self, t) if self.port is not None else None
            if locked is not None and locked >= t:
                # the timer stops once a frame is detected (DS 13.1.5): it will finish
                self._rx_timeout = locked + _AFTER_FRAME_US
                self.port.stop(self, t)
                return
            self.now_us = t
            self._stop_air(t)
            self._raise_irq(IRQ_TIMEOUT)
            self.mode = STDBY_RC

    def deliver(self, payload, rssi_dbm, snr_db, crc_ok, meta, t_us):
        if self.mode != RX:
            return False
        p = self.params()
        if meta.get("syncword", p["syncword"]) != p["syncword"]:
            return False
        if meta.get("invert_iq", False) != p["invert_iq"]:
            return False
        self.now_us = t_us
        for i, b in enumerate(payload):
            self.buffer[(self.rx_base + i) & 0xFF] = b
        self.rx_len = len(payload)
        self.rx_start = self.rx_base
        # DS 13.5.3: RssiPkt = -2 x dBm, SnrPkt = 4 x dB (signed), SignalRssiPkt = -2 x dBm
        rssi = max(0, min(255, round(-2 * rssi_dbm)))
        snr = max(-128, min(127, round(snr_db * 4))) & 0xFF
        self.pkt_status = (rssi, snr, rssi)
        self._raise_irq(IRQ_RX_DONE | IRQ_HEADER_VALID | (0 if crc_ok else IRQ_CRC_ERR))
        if not self._rx_continuous:
            self._stop_air(t_us)
            self.mode = STDBY_RC
        return True

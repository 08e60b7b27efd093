# Hand-written minimal typing stubs of micropython-lib's `lora` package (lora, lora-sync,
# lora-sx126x, lora-sx127x), written from its micropython/lora/README.md and the constructor
# signatures in lora/sx126x.py and lora/sx127x.py. Only what citynode uses; not the package.
# The real package is installed on a board with mip (boards/README.md, MIP_PACKAGES).

from typing import Any, Protocol

from machine import SPI, Pin

class ConfigError(ValueError): ...

class RxPacket(bytearray):
    ticks_ms: int
    snr: int  # dB * 4
    rssi: int  # dBm
    valid_crc: bool
    crc_error: bool

class AntennaSwitch(Protocol):
    def tx(self, tx_arg: bool) -> None: ...
    def rx(self) -> None: ...
    def idle(self) -> None: ...

class _SyncModem:
    crc_errors: int
    rx_crc_error: bool
    def configure(self, lora_cfg: dict[str, Any]) -> None: ...
    def send(self, packet: bytes | bytearray | memoryview, tx_at_ms: int | None = None) -> int: ...
    def recv(
        self,
        timeout_ms: int | None = None,
        rx_length: int = 0xFF,
        rx_packet: RxPacket | None = None,
    ) -> RxPacket | None: ...
    def get_time_on_air_us(self, payload_len: int) -> int: ...
    def standby(self) -> None: ...
    def sleep(self) -> None: ...
    def is_idle(self) -> bool: ...

class SX1261(_SyncModem):
    def __init__(
        self,
        spi: SPI,
        cs: Pin,
        busy: Pin,
        dio1: Pin | None = None,
        dio2_rf_sw: bool = True,
        dio3_tcxo_millivolts: int | None = None,
        dio3_tcxo_start_time_us: int = 1000,
        reset: Pin | None = None,
        lora_cfg: dict[str, Any] | None = None,
        ant_sw: AntennaSwitch | None = None,
    ) -> None: ...

class SX1262(SX1261): ...

class SX1276(_SyncModem):
    def __init__(
        self,
        spi: SPI,
        cs: Pin,
        dio0: Pin | None = None,
        dio1: Pin | None = None,
        reset: Pin | None = None,
        lora_cfg: dict[str, Any] | None = None,
        ant_sw: AntennaSwitch | None = None,
    ) -> None: ...

class SX1277(SX1276): ...
class SX1278(SX1276): ...
class SX1279(SX1276): ...

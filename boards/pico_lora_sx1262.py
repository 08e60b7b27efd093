# Raspberry Pi Pico (RP2040) + Waveshare Pico-LoRa-SX1262 (868 MHz) with a BME280 on I2C0;
# uplink over LoRa only (no Wi-Fi on the plain Pico). Wiring only; sources in boards/README.md.

from boards.hw import RealBoard


class Board(RealBoard):
    NAME = "pico_lora_sx1262"
    ARCH = "armv6m"
    MIP_PACKAGES = ("lora-sx126x", "lora-sync")
    I2C_ID = 0  # GP4 SDA, GP5 SCL: not used by the LoRa module
    I2C_SDA = 4
    I2C_SCL = 5
    RADIO = "sx1262"
    SPI_ID = 1  # GP10/GP11/GP12 are SPI1 SCK/TX/RX on the RP2040
    SPI_SCK = 10
    SPI_MOSI = 11
    SPI_MISO = 12
    LORA_CS = 3
    LORA_RESET = 15
    LORA_BUSY = 2
    LORA_DIO1 = 20
    LORA_TCXO_MV = 1800  # TCXO on DIO3 at 1.8 V; DIO2 switches the antenna
    # PM sensor (SDS011, PMS5003) UART: UART1 on GP8/GP9, not used by the Waveshare SX1262 module
    PM_UART_ID = 1
    PM_UART_TX = 8
    PM_UART_RX = 9

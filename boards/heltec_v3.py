# Heltec WiFi LoRa 32 V3 (ESP32-S3FN8 + SX1262, 868 MHz) with a BME280 on the second I2C
# header pins; uplink over LoRa, optionally Wi-Fi. Wiring only; sources in boards/README.md.

from boards.hw import ESP32_RTC_KEEPS, RealBoard


class Board(RealBoard):
    NAME = "heltec_v3"
    ARCH = "xtensawin"
    DEEP_SLEEP = True
    RTC_KEEPS = ESP32_RTC_KEEPS
    MIP_PACKAGES = ("lora-sx126x", "lora-sync")
    WIFI = True
    # The OLED bus (SDA 17, SCL 18) is powered through Vext (GPIO36, active low); the BME280
    # goes on the pins Heltec names SDA/SCL (41/42), powered from 3V3, so Vext can stay off.
    I2C_ID = 1
    I2C_SDA = 41
    I2C_SCL = 42
    RADIO = "sx1262"
    SPI_ID = 1
    SPI_SCK = 9
    SPI_MOSI = 10
    SPI_MISO = 11
    LORA_CS = 8
    LORA_RESET = 12
    LORA_BUSY = 13
    LORA_DIO1 = 14
    LORA_TCXO_MV = 1800  # TCXO powered from DIO3 at 1.8 V; DIO2 switches the antenna
    # PM sensor (SDS011, PMS5003) UART: UART1 on GPIO48/47, free on header J3 (the pair Heltec V3
    # projects wire serial GPS to)
    PM_UART_ID = 1
    PM_UART_TX = 48
    PM_UART_RX = 47

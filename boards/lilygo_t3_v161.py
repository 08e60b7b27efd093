# LILYGO T3 v1.6.1 (ESP32-PICO-D4 + SX1276, 868 MHz) with a BME280 on the OLED's I2C bus;
# uplink over LoRa, optionally Wi-Fi. Wiring only; sources in boards/README.md.

from boards.hw import ESP32_RTC_KEEPS, RealBoard


class Board(RealBoard):
    NAME = "lilygo_t3_v161"
    ARCH = "xtensawin"
    DEEP_SLEEP = True
    RTC_KEEPS = ESP32_RTC_KEEPS
    MIP_PACKAGES = ("lora-sx127x", "lora-sync")
    WIFI = True
    I2C_ID = 0  # shared with the SSD1306 OLED at 0x3C; the BME280 answers at 0x76/0x77
    I2C_SDA = 21
    I2C_SCL = 22
    RADIO = "sx1276"
    SPI_ID = 1
    SPI_SCK = 5
    SPI_MOSI = 27
    SPI_MISO = 19
    LORA_CS = 18
    LORA_RESET = 23  # 14 on the T3 v1.3; 23 from v1.6
    LORA_DIO0 = 26
    LORA_DIO1 = 33  # on the TCXO variant GPIO33 enables the TCXO instead: not supported here
    LORA_TX_ANT = "PA_BOOST"  # only the SX1276's PA_BOOST output is routed to the antenna
    # PM sensor (SDS011, PMS5003) UART: RX on input-only GPIO36 (Meshtastic's tlora_v2_1_16 GPS
    # RX); TX on free GPIO4 (its GPS TX, 39, is input-only: it cannot send the sensor commands)
    PM_UART_ID = 2
    PM_UART_TX = 4
    PM_UART_RX = 36

# Espressif ESP32-DevKitC (ESP32-WROOM-32) with a BME280 breakout on I2C; uplink over Wi-Fi.
# Wiring only: everything else is boards/hw.py. Pins and their sources: boards/README.md.

from boards.hw import ESP32_RTC_KEEPS, RealBoard


class Board(RealBoard):
    NAME = "esp32_devkitc"
    ARCH = "xtensawin"
    DEEP_SLEEP = True
    RTC_KEEPS = ESP32_RTC_KEEPS
    MIP_PACKAGES = ()
    WIFI = True
    WIFI_REQUIRED = True
    # BME280 on the pins Arduino-ESP32 calls SDA/SCL (variants/esp32/pins_arduino.h); the
    # ESP32 routes I2C to any GPIO, these are the ones breakout tutorials wire.
    I2C_ID = 0
    I2C_SDA = 21
    I2C_SCL = 22
    # PM sensor (SDS011, PMS5003) UART: UART2 on the pins Arduino-ESP32 names TX2/RX2 (GPIO17/16),
    # free on the DevKitC
    PM_UART_ID = 2
    PM_UART_TX = 17
    PM_UART_RX = 16

# Espressif ESP32-DevKitC (ESP32-WROOM-32) with a BME280 breakout on I2C; uplink over Wi-Fi.
# Wiring only: everything else is boards/hw.py. Pins and their sources: boards/README.md.

from boards.hw import RealBoard


class Board(RealBoard):
    NAME = "esp32_devkitc"
    ARCH = "xtensawin"
    DEEP_SLEEP = True
    MIP_PACKAGES = ()
    WIFI = True
    WIFI_REQUIRED = True
    # BME280 on the pins Arduino-ESP32 calls SDA/SCL (variants/esp32/pins_arduino.h); the
    # ESP32 routes I2C to any GPIO, these are the ones breakout tutorials wire.
    I2C_ID = 0
    I2C_SDA = 21
    I2C_SCL = 22

# Raspberry Pi Pico W (RP2040 + CYW43439) with a BME280 breakout on I2C0; uplink over Wi-Fi.
# Wiring only: everything else is boards/hw.py. Pins and their sources: boards/README.md.

from boards.hw import RealBoard


class Board(RealBoard):
    NAME = "pico_w"
    ARCH = "armv6m"
    MIP_PACKAGES = ()
    WIFI = True
    WIFI_REQUIRED = True
    I2C_ID = 0  # the Pico SDK's default I2C: GP4 (pin 6) SDA, GP5 (pin 7) SCL
    I2C_SDA = 4
    I2C_SCL = 5

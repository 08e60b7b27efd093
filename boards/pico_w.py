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
    # PM sensor (SDS011, PMS5003) UART: UART1 on GP8 (TX) / GP9 (RX): GP0/1 (UART0) left for a
    # debug console, GP4/5 are the I2C
    PM_UART_ID = 1
    PM_UART_TX = 8
    PM_UART_RX = 9

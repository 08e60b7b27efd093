# The citynode firmware: what is copied onto a board. One version for both roles (node and
# gateway); the node reports it in its boot line and status frames, `citynode flash` checks it.
FW_VERSION = "0.2.0"

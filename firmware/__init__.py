# The citynode firmware: what is copied onto a board. One version for both roles (node and
# gateway); the node reports it in its boot line and status frames, `citynode flash` checks it.
FW_VERSION = "0.2.0"


def forget(*names):
    """Drop firmware.<name> modules that are done, so that their code can leave the heap (a
    64 KB board needs it); a later import loads them again."""
    import sys

    for name in names:
        sys.modules.pop(__name__ + "." + name, None)
        globals().pop(name, None)

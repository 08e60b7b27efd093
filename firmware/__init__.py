# The citynode firmware: what is copied onto a board. One version for both roles (node and
# gateway); the node reports it in its boot line and status frames, `citynode flash` checks it.
FW_VERSION = "0.2.0"


def unload(*names):
    """Drop the modules firmware.<name> that are done, so that their code leaves the heap at the
    next collection (a node runs in 66 KB: firmware/README.md); a later import loads them again.
    The one way firmware code unloads a module. No collection here: the popped module is still
    on this frame's stack, which the GC scans; at boot the caller collects right after."""
    import sys

    for name in names:
        sys.modules.pop(__name__ + "." + name, None)
        globals().pop(name, None)

# Sizes of the .mpy files a board gets (host_tools.build: protocols/, firmware/, boards/), compiled
# with mpy-cross for the ESP32/ESP32-S3 (xtensawin) and the RP2040 (armv6m); a markdown table.
#
#     .venv/bin/python bench/mpy_sizes.py [--json]

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host_tools import build  # noqa: E402

ARCHES = ("xtensawin", "armv6m")


def sizes():
    """{relative .mpy path: {arch: bytes}}"""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ARCHES:
            for rel, size in build.build(Path(tmp) / arch, arch=arch).items():
                out.setdefault(rel, {})[arch] = size
    return out


def main(argv):
    table = sizes()
    if "--json" in argv:
        print(json.dumps(table, indent=1, sort_keys=True))
        return 0
    print("| file | %s |" % " | ".join(ARCHES))
    print("|---|" + "---:|" * len(ARCHES))
    for rel in sorted(table):
        print("| %s | %s |" % (rel, " | ".join(str(table[rel][a]) for a in ARCHES)))
    totals = [sum(v[a] for v in table.values()) for a in ARCHES]
    print("| **all** | %s |" % " | ".join(str(t) for t in totals))
    # What one real board carries: everything but the simulated board and the other boards.
    boards = sorted(r for r in table if r.startswith("boards/") and not _shared(r))
    for board in boards:
        files = [r for r in table if not r.startswith("boards/") or _shared(r) or r == board]
        files = [r for r in files if not r.startswith("boards/sim")]
        print(
            "| **on %s** | %s |"
            % (board[7:-4], " | ".join(str(sum(table[r][a] for r in files)) for a in ARCHES))
        )
    return 0


def _shared(rel):
    return rel in ("boards/__init__.mpy", "boards/hw.mpy") or rel.startswith("boards/sim")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

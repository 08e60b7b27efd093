# `citynode sim-board`: a simulated board on a pseudo-terminal (host_tools/sim/simboard.py) that
# mpremote and `citynode flash` talk to like a USB board; prints the port's path first.

from host_tools import flash
from host_tools.commands import CliError
from host_tools.sim import simboard


def add_arguments(p):
    p.add_argument(
        "--image",
        default="sim-board.img",
        metavar="PATH",
        help="the board's flash: a littlefs image file, created (%d KiB) if missing, kept "
        "across resets and runs (default ./sim-board.img)" % (simboard.IMAGE_SIZE // 1024),
    )
    p.add_argument(
        "--heap",
        metavar="SIZE",
        help="free heap when main.py starts, as -X heapsize= takes it (default %s, the fleet "
        "simulator's node heap; %s for a board with a LoRa radio, whose driver and chip model "
        "run on it); the simulation's own ~%d KB come on top"
        % (
            simboard.DEFAULT_HEAP,
            simboard.default_heap("heltec_v3"),
            simboard.SIM_OVERHEAD // 1024,
        ),
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="break the flashed sim node's sensor driver SECONDS after it boots, once a run: "
        "hang-at (it hangs: the watchdog resets the node), crash-at (it raises: the node "
        "saves its log and resets); may be given for both",
    )
    p.add_argument(
        "--board",
        default="sim",
        metavar="NAME",
        help="the board it simulates (default sim): `citynode flash --board NAME` takes it for "
        "that board (its packages and config) and gives it the build the simulator runs",
    )
    p.add_argument(
        "--trace",
        metavar="FILE",
        help="append every byte that crosses the serial line, both ways, to FILE (debugging)",
    )


def _check_heap(text):
    try:
        size = simboard.parse_size(text)
    except ValueError as e:
        raise CliError("--heap: %s" % e) from None
    if size < 16 * 1024:
        raise CliError("--heap: %s is too small to boot MicroPython (at least 16K)" % text)


def _check_board(name):
    names = flash.board_names()
    if name not in names:
        raise CliError("--board: unknown board %r; known boards: %s" % (name, ", ".join(names)))


def run(args):
    _check_board(args.board)
    if args.heap is None:
        args.heap = simboard.default_heap(args.board)
    _check_heap(args.heap)
    try:
        faults = simboard.parse_faults(args.fault)
    except ValueError as e:
        raise CliError("--fault: %s" % e) from None
    trace = None
    if args.trace:
        try:
            trace = open(args.trace, "ab")
        except OSError as e:
            raise CliError("--trace %s: %s" % (args.trace, e.strerror)) from None
    board = simboard.SimBoard(
        args.image, heap=args.heap, trace=trace, faults=faults, board=args.board
    )
    try:
        simboard.run_until_signal(board)
    except simboard.SimBoardError as e:
        raise CliError(str(e)) from None
    finally:
        if trace is not None:
            trace.close()
    return 0

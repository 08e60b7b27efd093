# `citynode demo`: a simulated fleet end to end (the work is in host_tools/demo.py).

from host_tools.commands import CliError

HELP = "simulate a fleet of nodes end to end"


def add_arguments(p):
    p.add_argument("--nodes", type=int, default=3, metavar="N", help="simulated nodes (3)")
    p.add_argument("--hours", type=float, default=24.0, metavar="H", help="simulated hours (24)")
    p.add_argument("--trace", metavar="CSV", help="sensor trace to replay")
    p.add_argument("--batch", type=int, default=10, metavar="N", help="readings per frame (10)")
    p.add_argument("--db", default="./citynode.db", metavar="PATH", help="SQLite file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument(
        "--interval", type=int, default=60, metavar="S", help="sampling interval, s (60)"
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (0)")
    p.add_argument(
        "--link",
        choices=("udp", "lora"),
        default="udp",
        help="udp: nodes on Wi-Fi; lora: raw LoRa through simulated gateway nodes",
    )
    p.add_argument(
        "--sf",
        type=int,
        default=7,
        choices=range(7, 13),
        metavar="SF",
        help="LoRa spreading factor 7..12 (7)",
    )
    p.add_argument("--gateways", type=int, default=1, metavar="N", help="LoRa gateways (1)")
    p.add_argument(
        "--airtime-budget",
        type=float,
        metavar="S",
        help="LoRa: airtime budget per node per day, s (public networks: 30)",
    )
    p.add_argument(
        "--heap", help="each node's MicroPython heap (default 80K, see host_tools/fleet.py)"
    )
    p.add_argument(
        "--idle",
        choices=("light", "deep"),
        default="light",
        help="how nodes sleep between samples: light (default) or deep (ESP32; one run a wake)",
    )
    p.add_argument("--workdir", metavar="DIR", help="keep node filesystems and console logs here")


def run(args):
    from host_tools import demo
    from host_tools.fleet import FleetError

    try:
        return demo.main(args)
    except (demo.DemoError, FleetError) as e:
        raise CliError(str(e)) from None

# The `citynode` command: one table of commands, one module each (host_tools/commands/), one
# error type (CliError) printed as `citynode: message` with exit status 2. Also `python -m
# host_tools.cli`. Command modules are imported only when used, so `--help` stays fast.

import argparse
import importlib
import os
import sys

from host_tools.commands import CliError
from host_tools.keys import KeyFileError
from host_tools.sinks import SinkError

# name -> (module in host_tools.commands, one-line help). Each module has add_arguments(parser)
# and run(args) -> exit status.
COMMANDS = {
    "demo": ("demo", "simulate a fleet of nodes end to end"),
    "decode": ("decode", "decode hex frames to JSON readings"),
    "receive": ("receive", "receive frames, verify, store durably, acknowledge"),
    "keys": ("keys", "manage node keys: add, list, rotate, revoke, export"),
    "monitor": ("monitor", "show a node's serial log: colours, filters, decoded frames"),
    "sim-board": ("sim_board", "run a simulated board on a pseudo-terminal (port printed first)"),
    "flash": ("flash", "provision boards over USB: firmware, packages, config, key; confirm boot"),
}


def build_parser(argv=None):
    parser = argparse.ArgumentParser(prog="citynode", description="citynode host tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in (argv or []) if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if wanted in (None, name):
            module = importlib.import_module("host_tools.commands." + module_name)
            module.add_arguments(p)
            p.set_defaults(handler=module.run)
    return parser


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    args = build_parser(argv).parse_args(argv)
    try:
        return args.handler(args) or 0
    except (CliError, KeyFileError, SinkError) as e:
        print("citynode: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (`citynode decode ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())

# The `citynode` command: one table of commands, one module each (host_tools/commands/), one
# error type (CliError) printed as `citynode: message` with exit status 2. Also `python -m
# host_tools.cli`. Command modules are imported only when used, so `--help` stays fast.

import argparse
import importlib
import os
import sys

from host_tools.commands import CliError
from host_tools.keys import KeyFileError
from host_tools.receive.sinks import SinkError

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


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line, `citynode: <command>: <what>`, exit status 2
    (argparse's own prints the usage, then the error on a line of its own). Subcommands'
    parsers are of this class too (add_subparsers makes them of its parser's class)."""

    def error(self, message):
        command = self.prog.split(None, 1)[1:]  # "citynode keys add" -> ["keys add"]
        where = command[0] + ": " if command else ""
        message = " ".join(message.split())  # one line, whatever a type's message holds
        self.exit(2, "citynode: %s%s (see %s --help)\n" % (where, message, self.prog))

    # Words no parser knows are reported by the outermost one; they are named here by the
    # innermost parser that was left with them (`citynode keys add 3 --x` -> "keys add: ...").
    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and getattr(namespace, "_left_with", None) is None:
            namespace._left_with = self
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        owner = vars(namespace).pop("_left_with", None) or self
        if extras:
            owner.error("unrecognized arguments: %s" % " ".join(extras))
        return namespace


class _Version(argparse.Action):
    """--version: citynode's one version, FW_VERSION in firmware/__init__.py (the package's
    version is read from it too: pyproject.toml). Looked up only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw):
        super().__init__(option_strings, dest, nargs=0, default=default, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from host_tools.flash import firmware_version

        print("citynode %s" % firmware_version())  # on stdout, as argparse's own version
        parser.exit()


def build_parser(argv=None):
    parser = ArgumentParser(prog="citynode", description="citynode host tools")
    parser.add_argument(
        "--version", action=_Version, help="print the version (host tools and firmware) and exit"
    )
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

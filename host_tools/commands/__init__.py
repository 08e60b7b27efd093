# Shared by the `citynode` commands: the one error type the CLI prints without a traceback.


class CliError(Exception):
    """Anything the user can fix; cli.main() prints it as `citynode: message` and exits 2."""

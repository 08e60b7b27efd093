# The house's lines (../shared/docs/ARCHITECTURE.md "Lines not to cross"), checked on the imports
# every module states: the production path never imports the simulator, protocols/ imports
# nothing of ours, firmware/ and boards/ never import the host's code.

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Commands whose whole job is the simulator (README "Demo", "A simulated board").
SIM_COMMANDS = {"host_tools/commands/demo.py", "host_tools/commands/sim_board.py"}


def imports(path):
    """Every module a file imports, at any depth (lazy imports inside functions too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update("%s.%s" % (node.module, alias.name) for alias in node.names)
    return found


def files(folder):
    return sorted((ROOT / folder).rglob("*.py"))


def rel(path):
    return path.relative_to(ROOT).as_posix()


def offending(paths, *prefixes):
    """{file: [modules it imports under one of the prefixes]} (a prefix is whole dotted names)."""
    bad = {}
    for path in paths:
        hits = sorted(
            m for m in imports(path) for p in prefixes if m == p or m.startswith(p + ".")
        )
        if hits:
            bad[str(path)] = hits
    return bad


def test_the_production_host_code_never_imports_the_simulator():
    production = [
        p
        for p in files("host_tools")
        if not rel(p).startswith("host_tools/sim/") and rel(p) not in SIM_COMMANDS
    ]
    assert len(production) > 20  # receive/, commands/, flash, keys, monitor, ...
    assert offending(production, "host_tools.sim", "boards.sim") == {}


def test_protocols_imports_nothing_of_ours():
    assert offending(files("protocols"), "host_tools", "firmware", "boards") == {}


def test_firmware_and_boards_never_import_the_host():
    assert offending(files("firmware") + files("boards"), "host_tools") == {}


def test_real_boards_and_firmware_never_import_the_simulated_board():
    real = [p for p in files("boards") if not rel(p).startswith("boards/sim/")]
    assert offending(files("firmware") + real, "boards.sim") == {}


@pytest.mark.parametrize("prefix", ["host_tools.sim", "boards.sim"])
def test_the_check_sees_an_import_of_the_simulator(tmp_path, prefix):
    """The checks above fail for the imports they forbid, eager or lazy."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from %s import thing\n" % prefix)
    assert offending([module], prefix)
    module.write_text("import %s.x as y\n" % prefix)
    assert offending([module], prefix)

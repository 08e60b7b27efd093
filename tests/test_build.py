# Every file that goes onto a board compiles with mpy-cross, for the unix port and for the
# ESP32 (xtensawin) and RP2040 (armv6m) targets.
import pytest

from host_tools import build


@pytest.mark.parametrize("arch", ["xtensawin", "armv6m"])
def test_board_sources_compile_for_real_targets(tmp_path, arch):
    sizes = build.build(tmp_path, arch=arch)
    assert "protocols/frame.mpy" in sizes
    assert all(size > 0 for size in sizes.values())


def test_codec_imports_on_micropython_with_64k_heap(run_mp):
    out = run_mp("from protocols import frame; import gc; gc.collect(); print(gc.mem_free())")
    assert int(out) > 20000


def test_a_build_made_with_other_options_is_made_again(tmp_path):
    # The sources did not change, how they are compiled did (tracebacks name modules since
    # 2026-12-03): every .mpy is made again, not only those older than their source.
    build.build(tmp_path)
    mpy = tmp_path / "firmware" / "journal.mpy"
    assert b"firmware.journal" in mpy.read_bytes()  # the source name tracebacks show
    mpy.write_bytes(b"stale")
    build.build(tmp_path)
    assert mpy.read_bytes() == b"stale"  # same options, source not newer: kept
    (tmp_path / ".options").write_text("mpy-cross -s <path>\n")
    build.build(tmp_path)
    assert b"firmware.journal" in mpy.read_bytes()
    assert (tmp_path / ".options").read_text() == build.OPTIONS + " -march=\n"


def test_tracebacks_name_the_module():
    assert build.module_name("firmware/journal.py") == "firmware.journal"
    assert build.module_name("firmware/__init__.py") == "firmware"
    assert build.module_name("boards/sim/board.py") == "boards.sim.board"

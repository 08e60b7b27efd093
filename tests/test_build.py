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

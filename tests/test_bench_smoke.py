"""Smoke test for bench/frame_size.py: its core runs on a slice of each real trace, every
frame decodes back to its input, and the figures are finite. CI-sized; no timing asserted."""

import math
import sys
from pathlib import Path

import pytest
from conftest import shared_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import frame_size  # noqa: E402

from host_tools.sim.weather import read_trace  # noqa: E402


@pytest.mark.parametrize("filename", [name for _, name in frame_size.TRACES])
def test_frame_size_core_on_a_slice_of_each_trace(filename):
    rows = read_trace(shared_trace(filename))[:300]
    run = frame_size.run_trace(rows)  # raises CodecMismatch if a frame does not round-trip
    for setting, results in run["results"].items():
        assert [r["size"] for r in results] == list(frame_size.BATCHES), setting
        for r in results:
            assert r["frames"] == len(rows) // r["size"]
            assert r["verified"] == r["frames"]
            assert math.isfinite(r["b_per_reading"]) and r["b_per_reading"] > 0
            assert all(math.isfinite(ms) and ms > 0 for ms in r["ms_per_reading"].values())
    one_typical = run["results"]["typical"][0]
    one_worst = run["results"]["worst"][0]
    # 5-byte varints for node id and seq cost 5 bytes more than 2 + 3 (SPEC.md "Sizes")
    assert one_worst["bytes"] - one_typical["bytes"] == 5 * one_typical["frames"]
    assert run["peers"]["lpp"] == 11.0
    assert math.isfinite(run["peers"]["json"])
    assert all(math.isfinite(b) and b >= 0 for b in run["entropy_bits"])


def test_a_broken_codec_is_caught(monkeypatch):
    rows = read_trace(shared_trace("jena_outdoor_10min.csv"))[:20]
    real = frame_size.decode_data

    def off_by_one(frame, signer):
        got = real(frame, signer)
        return got._replace(readings=[(r[0] + 1,) + tuple(r[1:]) for r in got.readings])

    monkeypatch.setattr(frame_size, "decode_data", off_by_one)
    with pytest.raises(frame_size.CodecMismatch):
        frame_size.measure(rows, 10, *frame_size.SETTINGS["typical"])

"""benchmarks/gpu/trace_store_kernel.py's reading of a traced launch (the trace itself needs a GPU's
timer: tests/test_triton_attention.py checks it there): the summary of known rows and the timeline plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from script_loader import load_script


def load_trace_script():
    return load_script("benchmarks/gpu/trace_store_kernel.py")


def known_rows() -> torch.Tensor:
    """Two owners x two regions x one split, times in ns: owner 1's region 0 program merges last."""
    # begin, work end, arrival, merge end, SM, region, owner, split
    return torch.tensor([
        [1_000, 5_000, 5_500, 0, 0, 0, 0, 0],
        [1_000, 9_000, 9_400, 11_400, 1, 1, 0, 0],
        [2_000, 7_000, 7_200, 0, 0, 1, 1, 0],
        [3_000, 8_000, 8_500, 12_500, 2, 0, 1, 0],
    ], dtype=torch.int64)


def test_summary_of_known_rows() -> None:
    s = load_trace_script().summarise(known_rows())
    assert s["programs"] == 4 and s["mergers"] == 2 and s["max_programs_per_sm"] == 2
    assert s["start_max"] == pytest.approx(2.0) and s["last_work_end"] == pytest.approx(8.0)
    assert s["span"] == pytest.approx(11.5)  # the last merge's end, from the first start
    assert s["merge_max"] == pytest.approx(4.0) and s["merge_p50"] == pytest.approx(2.0)  # lower median
    assert s["region0_work_max"] == pytest.approx(5.0) and s["region1_work_max"] == pytest.approx(8.0)
    assert s["region1_end_max"] == pytest.approx(8.0) and "region2_work_max" not in s
    # the regions are those the rows hold: one more where a tier is read through two slots
    extra = torch.tensor([[1_000, 4_000, 4_100, 0, 3, 2, 0, 0]], dtype=torch.int64)
    assert load_trace_script().summarise(torch.cat([known_rows(), extra]))["region2_work_max"] == pytest.approx(3.0)


def test_plot_draws_each_shape(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "trace.json"
    shape = dict(batch=1, context=131072, tiers=[[128, 128], [16, 16]], ms_graph={"plain": 0.02, "traced": 0.021},
                 last_call=known_rows().tolist())
    path.write_text(json.dumps(dict(device="test", args={}, shapes=[shape, shape])))
    png = Path(load_trace_script().plot(str(path)))
    assert png == tmp_path / "trace.png" and png.stat().st_size > 10_000

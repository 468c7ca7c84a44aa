"""`mdkv report`: tables with paired gaps to full, plots, from a results JSONL."""

from __future__ import annotations

import argparse
import json

import pytest

from mdkv_compile.eval import report as Rep


def _rec(method: str, budget: float, task: str, length: int, variant: str, score: float, depth=None) -> dict:
    full = 1000
    return {"model": "m", "method": method, "budget": budget, "budget_kind": "fraction", "task": task,
            "length": length, "variant": variant, "depth": depth, "seed": 0, "protocol": "query-agnostic",
            "prompt_style": "continuation", "score": score, "stored_bytes": int(full * min(budget, 1.0)) + 10,
            "full_bytes": full, "seconds": 1.0}  # fmt: skip


@pytest.fixture()
def results(tmp_path):
    recs = []
    for L in (512, 1024):
        for d in (0.0, 0.5, 1.0):
            v = f"d{d:.2f}"
            recs.append(_rec("full", 1.0, "niah", L, v, 1.0, d))
            recs.append(_rec("snapkv", 0.1, "niah", L, v, 0.0 if d == 0.5 else 1.0, d))
            recs.append(_rec("snapkv", 0.5, "niah", L, v, 1.0, d))
            recs.append(_rec("mixeddimkv", 0.1, "niah", L, v, 1.0, d) | {"dim_fractions": {"0": 0.75, "8": 0.25}})
        recs.append(_rec("full", 1.0, "vt", L, "s0", 0.8))
        recs.append(_rec("snapkv", 0.1, "vt", L, "s0", 0.4))
        recs.append(_rec("full", 1.0, "ppl", L, "s0", 20.0))
        recs.append(_rec("snapkv", 0.1, "ppl", L, "s0", 30.0))
        recs.append(_rec("full", 1.0, "kl", L, "s0", 0.0))
        recs.append(_rec("snapkv", 0.1, "kl", L, "s0", 0.125 if L == 512 else 0.25))
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return tmp_path


def test_tables_and_gaps(results) -> None:
    md = Rep.make_report(results, plots=False)
    text = md.read_text()
    # niah family: snapkv at 0.1 scores 4/6 = 66.7 against full's 100 -> gap -33.3 points
    assert "| snapkv | 66.7 (-33.3) | 100.0 (+0.0) |" in text
    assert "| full (budget 1) | 100.0 | 100.0 |" in text
    # ruler family (vt): 40 vs 80
    assert "| snapkv | 40.0 (-40.0) | - |" in text
    # ppl: ratio to full
    assert "| snapkv | 30.00 (x1.50) | - |" in text
    # kl: its own family, four decimals, no gap (full is 0 by definition)
    assert "### kl (kl)" in text and "| snapkv | 0.1875 | - |" in text
    assert "### Measured cache size" in text and "| snapkv | 0.1 | 0.1100 |" in text
    assert "| 0: 75%, 8: 25% |" in text  # mixeddimkv's dims shares (records below)


def test_plots_and_cli(results, tmp_path) -> None:
    p = argparse.ArgumentParser()
    Rep.add_arguments(p)
    out = tmp_path / "rep"
    assert Rep.run(p.parse_args([str(results / "results.jsonl"), "--out", str(out)])) == 0
    names = {f.name for f in out.iterdir()}
    assert {"report.md", "score_vs_budget_niah.png", "score_vs_budget_ppl.png", "score_vs_budget_kl.png"} <= names
    assert {"niah_heatmap_snapkv_0.1.png", "niah_heatmap_mixeddimkv_0.1.png", "niah_heatmap_full_1.png"} <= names
    assert all((out / n).stat().st_size > 1000 for n in names if n.endswith(".png"))
    assert "![niah_heatmap_snapkv_0.1](niah_heatmap_snapkv_0.1.png)" in (out / "report.md").read_text()


def test_empty_results_is_a_clear_error(tmp_path) -> None:
    p = argparse.ArgumentParser()
    Rep.add_arguments(p)
    assert Rep.run(p.parse_args([str(tmp_path)])) == 2
    with pytest.raises(ValueError, match="no results"):
        Rep.make_report(tmp_path)

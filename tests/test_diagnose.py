"""`mdkv diagnose` (mdkv_compile/eval/diagnose.py): its record covers every compressed layer, KV
head, basis kind and tier; its errors are the quantities its docstring names (checked against
direct computations); the dense reconstruction it uses for keys-only / values-only stores agrees
with the packed store; the loss-model summaries do their arithmetic; bad input is one usage line.
Tiny random models here; the real SmolLM2 run at the end is marked slow."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mdkv_compile.cache import MixedDimCache, model_dims
from mdkv_compile.core.attention import causal_mask, dense_attention
from mdkv_compile.core.bases import oblique_basis, save_calibrated, second_moment_basis
from mdkv_compile.eval import diagnose as D
from mdkv_compile.hf.calibrate import calibrate, calibration_moments
from mdkv_compile.testing import tiny_model

CONTEXT, CONT = 200, 24


class _IdTokenizer:
    """Text -> ids for `calibrate`: one id per character (the tiny models' vocabulary is 256)."""

    def __call__(self, text: str, return_tensors: str | None = None):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 256 for c in text]]))


def _numbers(tree: Any) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _numbers(v)]
    if isinstance(tree, list):
        return [x for v in tree for x in _numbers(v)]
    return [] if tree is None else [float(tree)]


def check_record(result: dict[str, Any], layers: list[int], n_kv: int, head_dim: int) -> None:
    """What every diagnose record must hold, whatever the model."""
    assert set(result["kinds"]) == set(D.KINDS)
    assert head_dim in result["key_dims"] and all(0 < r <= head_dim for r in result["key_dims"])
    for sample in result["samples"]:
        assert [layer["layer"] for layer in sample["layers"]] == layers
        n = sample["context_tokens"]
        for layer in sample["layers"]:
            assert [h["head"] for h in layer["heads"]] == list(range(n_kv))
            for h in layer["heads"]:
                assert set(h["key_logit_error"]) == set(D.KINDS) == set(h["value_error"])
                for kind in D.KINDS:
                    assert set(h["key_logit_error"][kind]) == {str(r) for r in result["key_dims"]}
                    assert set(h["value_error"][kind]) == {str(r) for r in result["value_dims"]}
                    values = _numbers(h["key_logit_error"][kind]) + _numbers(h["value_error"][kind])
                    assert values and all(math.isfinite(x) and x >= 0 for x in values), (kind, values)
                    # whole keys in the basis: the calibrated and query-whitened bases are complete
                    assert h["key_logit_error"][kind][str(head_dim)]["median"] < 1e-3
                for method in D.METHODS:
                    a = h["allocations"][method]
                    assert sum(a["entries"].values()) == n
                    assert set(a["predicted_by_importance"]) == set(D.IMPORTANCES)
                    assert a["predicted_by_importance"]["window"] == pytest.approx(a["predicted"], rel=1e-4, abs=1e-6)
                    numbers = _numbers(a)
                    assert all(math.isfinite(x) and x >= -1e-6 for x in numbers), (method, numbers)
                mixed = h["allocations"]["mixeddimkv"]
                reduced = sum(c for label, c in mixed["entries"].items() if label not in ("0", str(head_dim)))
                if reduced == 0:  # nothing reduced: every counterfactual is the store itself
                    assert mixed["measured_reduced_whole"] == pytest.approx(mixed["measured"], abs=1e-5)
    summary = result["summary"]
    for method in D.METHODS:
        tiers = summary["tiers"][method]
        assert sum(tiers["stored_shares"].values()) == pytest.approx(1.0, rel=1e-4)
        assert sum(tiers["element_shares"].values()) == pytest.approx(1.0, rel=1e-4)
        assert 0.0 <= tiers["evicted_share"] < 1.0
    assert set(summary["loss_model"]["by_importance"]) == set(D.IMPORTANCES)
    assert [row["layer"] for row in summary["per_layer"]] == layers


# --- tiny models ---------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request, tmp_path_factory):
    """A tiny model, its calibrated bases, one diagnosed sample of random ids and the outputs."""
    torch.manual_seed(0)
    model = tiny_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    path = calibrate(model, _IdTokenizer(), ["a calibration text, not the sample " * 12], folder / "basis.safetensors")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (CONTEXT + CONT,), generator=gen).tolist()
    samples = [D.Sample(0, ids[:CONTEXT], ids[CONTEXT:])]
    calibration = [torch.randint(0, 256, (1, 160), generator=gen)]
    result = D.diagnose(model, samples, calibration, path, budget=0.3, model_name=f"tiny-{request.param}")
    paths = D.write_outputs(result, folder / "out")
    return SimpleNamespace(model=model, path=path, samples=samples, calibration=calibration, result=result,
                           paths=paths)


def test_record_covers_every_layer_head_kind_and_tier(tiny) -> None:
    _, _, n_kv, d = model_dims(tiny.model.config)
    layers = D.compressed_layers(tiny.model)
    if tiny.model.config.model_type.startswith("gemma"):
        assert layers == [1, 2]  # layer 0 slides: never compressed
    check_record(tiny.result, layers, n_kv, d)


def test_outputs_are_written_and_read_back(tiny) -> None:
    json_path, md_path, png_path = tiny.paths
    back = json.loads(json_path.read_text())
    assert back["summary"]["tiers"]["mixeddimkv"]["stored_shares"]
    text = md_path.read_text()
    for heading in ("## Key logit error", "## Value error", "## Predicted loss vs measured", "## Loss model check",
                    "stored prompt entries per tier"):
        assert heading in text
    assert png_path.name == f"diagnose_{tiny.result['model']}.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 10_000


def _layer(tiny) -> tuple[D.Captured, int, int]:
    n = len(tiny.samples[0].context)
    captured = D.capture_layers(tiny.model, tiny.samples[0].context + tiny.samples[0].continuation)
    i = D.compressed_layers(tiny.model)[-1]
    return captured[i], n, i


def test_key_logit_error_is_the_rms_over_the_continuation_queries(tiny) -> None:
    cap, n, i = _layer(tiny)
    n_kv, d = cap.key.shape[0], cap.key.shape[-1]
    moments = calibration_moments(tiny.model, tiny.calibration)[i]
    metric = D.o_proj_metric(tiny.model, i, n_kv, d)
    assert metric is not None
    from mdkv_compile.core.bases import load_calibrated

    kinds = D.basis_kinds(cap, n, load_calibrated(tiny.path)[i], moments, metric)
    weights = torch.rand(n_kv, n)
    reducible = torch.ones(n, dtype=torch.bool)
    chosen = torch.full((n_kv, n), d)
    for kind, (kb, _) in kinds.items():
        a, b = kb
        assert torch.allclose(a @ b.transpose(-1, -2), torch.eye(d).expand(n_kv, d, d), atol=1e-4), kind
        got = D.key_errors(cap, n, kb, (d // 4,), weights, reducible, chosen)[str(d // 4)]
        for h in range(n_kv):
            q = cap.query[h * cap.group : (h + 1) * cap.group, n:].reshape(-1, d)
            k = cap.key[h, :n]
            k_hat = (k @ b[h, :, : d // 4]) @ a[h, :, : d // 4].T
            err = (cap.scale * (q @ (k - k_hat).T)).square().mean(0).sqrt()
            assert got["median"][h] == pytest.approx(float(err.median()), rel=1e-4, abs=1e-6)
            assert got["weighted"][h] == pytest.approx(float((err * weights[h]).sum() / weights[h].sum()), rel=1e-4)
            assert got["tier"][h] is None  # no token at d/4 in `chosen`


def _logit_mse(moments: dict[str, torch.Tensor], synthesis: torch.Tensor, analysis: torch.Tensor,
               r: int) -> torch.Tensor:
    """[H]: tr(M_q E S_k E^T), E = I - A_r B_r^T: the mean squared logit error over the moments' queries and keys."""
    d = synthesis.shape[-1]
    e = torch.eye(d, dtype=torch.float64) - synthesis[..., :r].double() @ analysis[..., :r].double().transpose(-1, -2)
    return torch.einsum("hij,hjk,hlk,hil->h", moments["query"], e, moments["key"], e)


def test_query_whitened_keys_beat_pca_in_the_queries_metric() -> None:
    # On the statistics it is fitted to, the oblique basis's mean squared logit error
    # tr(M_q (I - P_r) S_k (I - P_r)^T) is the least of any nested projection, PCA's included.
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(2)
    moments = calibration_moments(model, [torch.randint(0, 256, (1, 128), generator=gen)])
    for m in moments.values():
        a, b = oblique_basis(m["key"], m["query"], D.WHITEN_EPS)
        pca = second_moment_basis(m["key"]).double()
        d = a.shape[-1]
        for r in range(1, d):
            oblique, plain = _logit_mse(m, a, b, r), _logit_mse(m, pca, pca, r)
            assert bool((oblique <= plain * (1 + 1e-5) + 1e-9).all()), r


def test_dense_reconstruction_matches_the_packed_store(tiny) -> None:
    # The keys-only / values-only counterfactuals are computed by exact attention over reconstructed
    # vectors; with mixeddimkv's own choice that must be what its packed store serves.
    cap, n, i = _layer(tiny)
    cfg = D.policy_configs(0.3, "calibrated", str(tiny.path))
    layers = {m: MixedDimCache(tiny.model.config, c).layers[i] for m, c in cfg.items()}
    total = cap.key.shape[1]
    reference = dense_attention(cap.query[None, :, n:], cap.key[None], cap.value[None],
                                causal_mask(total - n, total, cap.key.device)[None, None], cap.scale, cap.softcap)[0]
    out, _, choice = D.allocation(cap, n, layers, reference, D.continuation_attention(cap, n))
    d = cap.key.shape[-1]
    assert bool(((choice.key_dim > 0) & (choice.key_dim < d)).any()), "no reduced tier: the check would be empty"
    dense = D.reconstructed_error(cap, n, choice.key_dim, choice.value_dim, choice.basis_k, choice.basis_v, reference)
    assert dense.tolist() == pytest.approx(out["mixeddimkv"]["measured"], rel=1e-3, abs=1e-5)
    whole = torch.where(choice.key_dim > 0, d, 0)
    kept_whole = D.reconstructed_error(cap, n, whole, whole, choice.basis_k, choice.basis_v, reference)
    assert kept_whole.tolist() == pytest.approx(out["mixeddimkv"]["measured_reduced_whole"], abs=1e-6)
    everything = torch.full_like(whole, d)
    exact = D.reconstructed_error(cap, n, everything, everything, choice.basis_k, choice.basis_v, reference)
    assert float(exact.max()) < 1e-4


def test_loss_model_summaries_do_their_arithmetic() -> None:
    def alloc(pred: float, meas: float, **extra: float) -> dict[str, Any]:
        return {"predicted": pred, "measured": meas, "predicted_by_importance": dict.fromkeys(D.IMPORTANCES, pred),
                **extra}

    heads = []
    for j in range(6):  # head 0: the same allocation's numbers for both methods, left out of the gains
        mixed = alloc(1.0, 0.5 - 0.01 * j, reduced_importance=2.0, predicted_reduced=0.5, predicted_keys_only=0.2,
                      predicted_values_only=0.3, measured_reduced_whole=0.4 - 0.01 * j,
                      measured_reduced_evicted=0.6 - 0.01 * j, measured_keys_only=0.45 - 0.01 * j,
                      measured_values_only=0.42 - 0.01 * j)
        heads.append((j % 2, {"allocations": {"mixeddimkv": mixed, "snapkv": alloc(1.0 + 0.1 * j, 0.5 + 0.02 * j)}}))
    check = D.loss_model_check(heads)
    gain = check["gain"]
    assert gain["heads"] == 5 and gain["pearson"] == pytest.approx(1.0)
    assert gain["sign_agreement"] == pytest.approx(1.0) and gain["better_predicted"] == pytest.approx(1.0)
    assert gain["mean_predicted"] == pytest.approx(0.25) and gain["mean_measured"] == pytest.approx(0.075)
    cost = check["reduction_cost"]
    assert cost["predicted"] == pytest.approx(0.25) and cost["predicted_keys_only"] == pytest.approx(0.1)
    assert cost["measured"] == pytest.approx(0.5) and cost["measured_keys_only"] == pytest.approx(0.25)
    assert cost["measured_values_only"] == pytest.approx(0.1)
    # one head where mixeddimkv is predicted better but measured worse
    heads[1][1]["allocations"]["snapkv"]["measured"] = 0.3
    gain = D.loss_model_check(heads)["gain"]
    assert gain["sign_agreement"] == pytest.approx(0.8) and gain["better_measured"] == pytest.approx(0.8)
    assert [row["layer"] for row in check["reduction_cost_per_layer"]] == [0, 1]


def test_calibrated_file_of_another_model_is_refused_by_name(tmp_path: Path) -> None:
    wrong = tmp_path / "other.safetensors"
    save_calibrated(wrong, [torch.eye(8).expand(2, 8, 8)] * 2, [torch.eye(8).expand(2, 8, 8)] * 2, [0, 1])
    with pytest.raises(ValueError, match="another model"):
        D.read_calibrated(wrong, [0, 1], 2, 16)
    with pytest.raises(ValueError, match="no layer 2"):
        D.read_calibrated(wrong, [1, 2], 2, 8)
    assert sorted(D.read_calibrated(wrong, [0, 1], 2, 8)) == [0, 1]
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a tensor file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        D.read_calibrated(junk, [0], 2, 8)


# --- command line --------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "names"), [
    (["--length", "100"], "--length 100"),
    (["--length", "abc"], "--length"),
    (["--budget", "0"], "--budget"),
    (["--budget", "nan"], "--budget"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", ","], "--seeds"),
    (["--cont", "0"], "--cont"),
    (["--calibration-tokens", "8"], "--calibration-tokens"),
    (["--basis", "svd"], "--basis"),
    (["--device", "cuda:7"], "cuda"),
    (["--calibrated-basis", "{missing}"], "--calibrated-basis"),
    (["--model", "/no/such/model"], "no such folder"),
    (["--out", "{file}"], "is a file"),
])
def test_bad_arguments_are_one_usage_line_before_any_model_loads(
    args: list[str], names: str, tmp_path: Path, capsys: pytest.CaptureFixture, no_model_loads: None,
) -> None:
    from mdkv_compile.cli import main

    (tmp_path / "a_file").write_text("x")
    fill = {"{missing}": str(tmp_path / "missing"), "{file}": str(tmp_path / "a_file")}
    args = [fill.get(a, a) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    if args[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(["diagnose", *args]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    assert names in err, err
    assert not (tmp_path / "out").exists()


# --- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_run(tmp_path_factory):
    from mdkv_compile.cli import main

    out = tmp_path_factory.mktemp("diagnose") / "smollm2"
    status = main(["diagnose", "--model", "smollm2", "--length", "256", "--cont", "16", "--seeds", "0",
                   "--budget", "0.25", "--calibration-chunks", "1", "--calibration-tokens", "256", "--out", str(out)])
    assert status == 0
    return out


@pytest.mark.slow
def test_smollm2_diagnose_end_to_end(smollm2_run: Path) -> None:
    result = json.loads((smollm2_run / "diagnose.json").read_text())
    assert result["model"] == "smollm2" and result["o_proj"]
    check_record(result, list(range(30)), 3, 64)
    # the default tiers (32, 32), (16, 8), (8, 8), and whole keys in the basis (the completeness check)
    assert result["key_dims"] == [8, 16, 32, 64] and result["value_dims"] == [8, 32]
    summary = result["summary"]
    # at budget 0.25 mixeddimkv stores reduced tiers, and a key at more dims has a smaller logit error
    assert sum(v for k, v in summary["tiers"]["mixeddimkv"]["stored_shares"].items() if k != "64") > 0.05
    for kind in D.KINDS:
        medians = [summary["key_logit_error"][kind][str(r)]["median"] for r in (8, 16, 32, 64)]
        assert medians == sorted(medians, reverse=True) and medians[-1] < 1e-3, (kind, medians)
        errors = [summary["value_error"][kind][str(r)]["mean"] for r in (8, 32)]
        assert errors == sorted(errors, reverse=True) and 0 < errors[-1] < 1, (kind, errors)
    corr = summary["correlation"]["mixeddimkv"]["pearson_heads"]
    assert corr is not None and -1 <= corr <= 1
    assert (smollm2_run / "diagnose_smollm2.png").stat().st_size > 10_000
    assert "# mdkv diagnose: smollm2" in (smollm2_run / "diagnose.md").read_text()

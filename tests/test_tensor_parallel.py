"""MixedDimKV under transformers tensor parallelism: 2 gloo ranks on CPU, a tiny random Llama.

The model is loaded with `from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))`
(DTensor TP: each rank computes half of the attention heads) in two spawned processes, and every
method is compared with a single-process run in this process: greedy tokens, the stored key and
value dims of every prompt token of the rank's KV heads (pooled budgets are exact across ranks),
and each rank's `cache.stored_bytes()` against its share of the single-process store.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import mdkv_compile as mdkv
from mdkv_compile.cache import MixedDimCache, MixedDimLayer
from mdkv_compile.config import METHODS
from mdkv_compile.core.bases import save_calibrated
from mdkv_compile.core.sharding import HeadShard, shard_store_bytes
from mdkv_compile.methods import RECORDS
from mdkv_compile.testing import random_llama

WORLD = 2
N_LAYERS, N_HEADS, N_KV, HEAD_DIM = 2, 8, 4, 16
PROMPT, NEW_TOKENS = 160, 6

# (name, MixedDimKVConfig kwargs, batch rows): every method, plus the pooled and byte budgets,
# a calibrated basis and a left-padded batch, where the cross-rank logic matters.
CASES: list[tuple[str, dict, int]] = [(m, {"method": m}, 1) for m in METHODS] + [
    ("mixeddimkv-layer", {"method": "mixeddimkv", "pool": "layer"}, 1),
    ("mixeddimkv-energy-layer", {"method": "mixeddimkv", "pool": "layer", "loss": "energy"}, 1),
    ("mixeddimkv-calibrated", {"method": "mixeddimkv", "basis": "calibrated"}, 1),
    ("headkv-bytes", {"method": "headkv", "budget": None, "budget_bytes": 12_000}, 1),
    ("ada-snapkv-batch", {"method": "ada-snapkv"}, 2),
    ("mixeddimkv-batch", {"method": "mixeddimkv"}, 2),
]


def _config(kwargs: dict, files: dict[str, str]) -> mdkv.MixedDimKVConfig:
    base = {"budget": 0.25, "window": 8, "min_compress_tokens": 0}  # the short test prompts are compressed
    base.update(kwargs)
    if RECORDS[base["method"]].needs_head_scores:
        base["head_scores"] = files["heads"]
    if base.get("basis") == "calibrated":
        base["basis_path"] = files["basis"]
    return mdkv.MixedDimKVConfig(**base)


def _inputs(rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 256, (rows, PROMPT), generator=gen)
    mask = torch.ones_like(ids)
    if rows > 1:
        mask[1, :40] = 0  # left padding: the second row is 40 tokens shorter
        ids[1, :40] = 0
    return ids, mask


def _run(model: torch.nn.Module, files: dict[str, str]) -> dict[str, dict]:
    """Every case on `model`: tokens, bytes, and the per-layer stored dims of the prompt."""
    out = {}
    for name, kwargs, rows in CASES:
        cfg = _config(kwargs, files)
        mdkv.patch(model, cfg)
        cache = MixedDimCache(model.config, cfg, record_selection=True)
        ids, mask = _inputs(rows)
        with torch.no_grad():
            tokens = model.generate(
                ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False,
                pad_token_id=0,
            )
        layers = [layer for layer in cache.layers if isinstance(layer, MixedDimLayer)]
        out[name] = {
            "tokens": tokens[:, PROMPT:].tolist(),
            "stored": cache.stored_bytes(),
            "full": cache.full_bytes(),
            "selection": [layer.last_selection.clone() for layer in layers],
            "value_selection": [layer.last_value_selection.clone() for layer in layers],
            "layers": layers,
        }
    mdkv.unpatch(model)
    return out


def _worker(rank: int, port: int, model_dir: str, files: dict[str, str], out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = transformers.LlamaForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32,
            distributed_config=transformers.DistributedConfig(tp_plan="auto"),
        ).eval()
        results = _run(model, files)
        for res in results.values():
            res.pop("layers")
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected_rank_bytes(layers: list[MixedDimLayer], shard: HeadShard) -> int:
    """What rank `shard.rank` should store for the single-process selection of `layers`."""
    total = 0
    for layer in layers:
        store = layer.store
        own_basis = store.basis_k is not None and not store.basis_shared
        total += shard_store_bytes(
            layer.last_selection, store.tier_dims, store.head_dim, layer.keys.element_size(),
            basis_rows=store.basis_k.shape[0] if own_basis else 0,
            basis_widths=(0, 0) if store.basis_k is None else (store.basis_k.shape[-1], store.basis_v.shape[-1]),
            has_basis_index=store.basis_index is not None, shard=shard,
            value_dims=store.value_dims, chosen_value_dim=layer.last_value_selection,
        )
        total += 2 * layer.keys.numel() * layer.keys.element_size() // shard.world  # tokens after the prompt
    return total


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, list[dict]]:
    tmp = tmp_path_factory.mktemp("tp")
    model = random_llama(
        vocab_size=256, hidden_size=N_HEADS * HEAD_DIM, intermediate_size=256, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV, head_dim=HEAD_DIM, max_position_embeddings=1024,
    )
    model.save_pretrained(tmp / "model")
    gen = torch.Generator().manual_seed(2)
    heads = tmp / "heads.json"
    heads.write_text(json.dumps({"scores": torch.rand(N_LAYERS, N_HEADS, generator=gen).tolist()}))
    bases = [torch.linalg.qr(torch.randn(N_KV, HEAD_DIM, HEAD_DIM, generator=gen)).Q for _ in range(2 * N_LAYERS)]
    save_calibrated(tmp / "basis.safetensors", bases[:N_LAYERS], bases[N_LAYERS:])
    files = {"heads": str(heads), "basis": str(tmp / "basis.safetensors")}

    mp.start_processes(
        _worker, args=(_free_port(), str(tmp / "model"), files, str(tmp)), nprocs=WORLD, start_method="spawn"
    )
    single = _run(model, files)
    ranks = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return single, ranks


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_tp_matches_single_process(runs, name: str) -> None:
    single, ranks = runs
    ref = single[name]
    for rank, by_case in enumerate(ranks):
        res = by_case[name]
        shard = HeadShard(rank=rank, world=WORLD, total_heads=N_KV)
        assert res["tokens"] == ref["tokens"], f"rank {rank}: greedy tokens differ"
        for kind in ("selection", "value_selection"):
            for layer_idx, (got, want) in enumerate(zip(res[kind], ref[kind], strict=True)):
                torch.testing.assert_close(got, want[:, shard.heads], msg=f"rank {rank} layer {layer_idx}: {kind}")
        assert res["stored"] == _expected_rank_bytes(ref["layers"], shard), f"rank {rank}: stored bytes"
        assert res["full"] * WORLD == ref["full"]
    # Bytes split across ranks up to the per-rank CSR offsets (int32, B*H/W + 1 per non-uniform tier).
    slack = 4 * (WORLD - 1) * 8 * N_LAYERS
    assert abs(sum(r[name]["stored"] for r in ranks) - ref["stored"]) <= slack


def test_example_runs_under_torchrun() -> None:
    """examples/tp_generate.py as documented: torchrun, 2 ranks, each reports its own store."""
    root = Path(__file__).resolve().parent.parent
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
        str(root / "examples" / "tp_generate.py"), "--method", "ada-snapkv", "--prompt-tokens", "96",
        "--new-tokens", "4",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 KV heads per rank" in proc.stdout
    assert "rank 0: stored" in proc.stdout and "rank 1: stored" in proc.stdout


def test_shard_store_bytes_of_decoupled_tiers() -> None:
    """What a rank's `pack` allocates for its heads of a single-process selection with decoupled tiers
    (a tier shares its key dims with the full tier, so tokens are told apart by their value dims)."""
    from mdkv_compile.core.packing import pack

    gen = torch.Generator().manual_seed(3)
    bsz, heads, n, d = 2, 4, 30, 16
    tiers = ((16, 16), (16, 8), (4, 2), (2, 4))
    shard = HeadShard(rank=1, world=2, total_heads=heads)
    key, value = (torch.randn(bsz, heads, n, d, generator=gen) for _ in range(2))
    pick = torch.tensor([(0, 0), *tiers])[torch.randint(0, len(tiers) + 1, (bsz, heads, n), generator=gen)]
    basis_k = torch.randn(bsz * heads, d, 16, generator=gen)
    basis_v = torch.randn(bsz * heads, d, 8, generator=gen)
    local = shard.heads
    own = torch.arange(bsz * heads).view(bsz, heads)[:, local].reshape(-1)
    coef_k, coef_v = (torch.randn(bsz, shard.local_heads, n, r, generator=gen) for r in (16, 8))
    store = pack(
        key[:, local], value[:, local], pick[:, local, :, 0], tuple(rk for rk, _ in tiers), coef_k, coef_v,
        basis_k[own], basis_v[own], value_dims=tuple(rv for _, rv in tiers), chosen_value_dim=pick[:, local, :, 1],
    )
    expected = shard_store_bytes(
        pick[..., 0], store.tier_dims, d, 4, basis_rows=bsz * heads, basis_widths=(16, 8), has_basis_index=False,
        shard=shard, value_dims=store.value_dims, chosen_value_dim=pick[..., 1],
    )
    assert expected == store.stored_bytes()

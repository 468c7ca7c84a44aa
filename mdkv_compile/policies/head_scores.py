"""HeadKV head-importance scores (`mdkv profile-heads` JSON) turned into per-KV-head budget shares."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_head_shares(path: str | Path, num_layers: int, num_kv_heads: int, temp: float = 1.0) -> torch.Tensor:
    """[L, H_kv] shares summing to 1 over the whole model.

    The file holds query-head scores `scores[L][Hq]` (HeadKV's layout) or KV-head scores
    `scores[L][H_kv]`; query heads are averaged over their GQA group, since one cache serves it.
    As HeadKV: normalise, raise to `temp`, normalise again.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"head score file {path} does not exist; create it with `mdkv profile-heads`") from None
    scores = torch.tensor(data["scores"], dtype=torch.float64)
    if scores.dim() != 2 or scores.shape[0] != num_layers or scores.shape[1] % num_kv_heads:
        raise ValueError(
            f"head scores in {path} have shape {tuple(scores.shape)}; this model needs [{num_layers}, "
            f"a multiple of {num_kv_heads}] (layers x query or KV heads)"
        )
    if bool((scores < 0).any()) or not bool(torch.isfinite(scores).all()):
        raise ValueError(f"head scores in {path} must be finite and non-negative")
    per_kv = scores.view(num_layers, num_kv_heads, -1).mean(-1)
    total = per_kv.sum()
    if total <= 0:
        per_kv = torch.ones_like(per_kv)
        total = per_kv.sum()
    shares = (per_kv / total) ** temp
    return (shares / shares.sum()).float()

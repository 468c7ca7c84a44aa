"""Compression kernels (kernels/compression.py) against their PyTorch references: window importance
(core.scoring.window_importance) and the attention loss's logit errors (core.losses.logit_errors),
run by Triton's CPU interpreter where there is no GPU; and a policy run with the kernels forced on
against the same policy on the references."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from triton_harness import interpreter_guard, kernel_device

DEVICE = kernel_device()  # skips the module where the kernels cannot run

from mdkv_compile.config import MixedDimKVConfig  # noqa: E402
from mdkv_compile.core.losses import logit_errors as logit_errors_torch  # noqa: E402
from mdkv_compile.core.scoring import window_importance as window_importance_torch  # noqa: E402
from mdkv_compile.kernels import compression  # noqa: E402
from mdkv_compile.kernels.compression import (  # noqa: E402
    logit_errors,
    logit_errors_triton,
    window_importance,
    window_importance_triton,
)
from mdkv_compile.policies import POLICIES, LayerContext  # noqa: E402
from mdkv_compile.policies.base import pack_selection  # noqa: E402

STALE, _needs_interpreter, test_module_in_fresh_process = interpreter_guard(
    __file__, lambda: [compression._score_columns]
)


def scoring_case(seed: int, bsz: int, n_kv: int, group: int, n_tokens: int, d: int, dtype: torch.dtype,
                 pad: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh random q / k (a scale of 2 so the softmax is peaked, not flat) and left padding `pad[b]` per row."""
    gen = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(bsz, n_kv * group, n_tokens, d, generator=gen)).to(dtype).to(DEVICE)
    k = (2 * torch.randn(bsz, n_kv, n_tokens, d, generator=gen)).to(dtype).to(DEVICE)
    valid = torch.arange(n_tokens)[None, :] >= torch.tensor(pad)[:, None]
    return q, k, valid.to(DEVICE)


# (B, H_kv, G, N, d, window, pool, softcap, left padding per row)
SCORING_CASES = [
    (2, 2, 4, 150, 32, 8, 7, None, (0, 37)),  # GQA, padding, the default odd pool
    (1, 2, 1, 64, 16, 16, 1, None, (5,)),  # no GQA, no pool
    (2, 1, 2, 40, 32, 64, 3, None, (0, 11)),  # window larger than N: every prompt query is a window row
    (2, 2, 2, 96, 32, 8, 4, 5.0, (0, 3)),  # even pool kernel, a softcap small enough to bend the logits
    (2, 1, 3, 70, 24, 12, 5, None, (64, 70)),  # padding inside the window (rows that see nothing), a padded-out row
    (1, 1, 2, 300, 64, 32, 7, 30.0, (0,)),  # several key splits and blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", SCORING_CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_window_importance_matches_reference(case: tuple, dtype: torch.dtype) -> None:
    bsz, n_kv, group, n_tokens, d, window, pool, softcap, pad = case
    q, k, valid = scoring_case(len(SCORING_CASES) + n_tokens, bsz, n_kv, group, n_tokens, d, dtype, pad)
    out = torch.full((bsz, n_kv, n_tokens), float("nan"), device=DEVICE)  # poisoned: every element must be written
    got = window_importance_triton(q, k, valid, window, pool, None, softcap, out=out)
    want = window_importance_torch(q, k, valid, window, pool, None, softcap)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-7)
    assert (got[~valid[:, None, :].expand_as(got)] == 0).all()
    assert got.amax() > 1e-3  # a real signal, not zeros matching zeros


def test_window_importance_row_without_visible_keys_is_zero_and_counts_in_the_mean() -> None:
    """Window rows at padding positions see no key: they add 0 and still divide the mean (the reference's
    nan_to_num); a fully padded sequence scores 0 everywhere."""
    q, k, valid = scoring_case(7, 2, 1, 2, 20, 16, torch.float32, (16, 20))
    got = window_importance_triton(q, k, valid, 8, 1)
    torch.testing.assert_close(got, window_importance_torch(q, k, valid, 8, 1), rtol=2e-5, atol=2e-7)
    assert (got[1] == 0).all()
    # row 0: 4 valid tokens; each of the 4 window rows that see a key spreads probability 1 over them,
    # the 4 padded window rows spread nothing, per query head: the sum is 4 / 8 of the G * W rows
    torch.testing.assert_close(got[0].sum(), torch.tensor(0.5, device=DEVICE), rtol=1e-5, atol=0)


def test_window_importance_op_dispatches_to_the_kernel() -> None:
    q, k, valid = scoring_case(3, 2, 2, 2, 50, 16, torch.bfloat16, (0, 9))
    got = window_importance(q, k, valid, 8, 7, 0.3, 20.0)
    torch.testing.assert_close(got, window_importance_torch(q, k, valid, 8, 7, 0.3, 20.0), rtol=2e-5, atol=2e-7)
    # mismatched dtypes (bf16 queries, the float32 copy of the keys a policy holds) compute in float32
    got32 = window_importance_triton(q, k.float(), valid, 8, 7, 0.3, 20.0)
    torch.testing.assert_close(got32, window_importance_torch(q, k.float(), valid, 8, 7, 0.3, 20.0),
                               rtol=2e-5, atol=2e-7)


@pytest.mark.parametrize(("n_rows", "n_tokens", "d", "dims"), [(8, 70, 32, (4, 8, 16)), (80, 33, 64, (8, 40))])
def test_logit_errors_match_reference(n_rows: int, n_tokens: int, d: int, dims: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(n_rows)
    q = torch.randn(2, 3, n_rows, d, generator=gen).to(DEVICE)
    kc = (torch.randn(2, 3, n_tokens, d, generator=gen) * torch.linspace(3, 0.1, d)).to(DEVICE)
    out = torch.full((2, 3, n_tokens, len(dims)), float("nan"), device=DEVICE)
    got = logit_errors_triton(q, kc, dims, 0.2, exact=True, out=out)
    want = logit_errors_torch(q, kc, dims, 0.2)
    assert got.data_ptr() == out.data_ptr()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # each tier's own tail (a kernel applying one tier's mask to all would fail here)
    assert all(not torch.allclose(got[..., j], got[..., j + 1]) for j in range(len(dims) - 1))
    torch.testing.assert_close(logit_errors(q, kc, dims, 0.2), want, rtol=1e-5, atol=1e-6)


def test_logit_errors_reject_a_tier_outside_the_head() -> None:
    q, kc = torch.zeros(1, 1, 4, 16, device=DEVICE), torch.zeros(1, 1, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="do not fit"):
        logit_errors_triton(q, kc, (8, 16), 1.0)


@dataclasses.dataclass
class KernelContext(LayerContext):
    """A layer context whose policies take the kernel path on any device (the real path runs it on CUDA)."""

    def uses_kernels(self) -> bool:
        return True


def policy_case(method: str, dtype: torch.dtype) -> LayerContext:
    gen = torch.Generator().manual_seed(11)
    bsz, n_kv, group, n_tokens, d = 2, 2, 2, 320, 32  # long enough that a basis pays for itself
    q = torch.randn(bsz, n_kv * group, n_tokens, d, generator=gen)
    # low-rank keys and values with a tail, so the reduced tiers are worth their basis
    k = torch.randn(bsz, n_kv, n_tokens, 3, generator=gen) @ torch.randn(3, d, generator=gen)
    v = torch.randn(bsz, n_kv, n_tokens, 3, generator=gen) @ torch.randn(3, d, generator=gen)
    k = k + 0.05 * torch.randn(bsz, n_kv, n_tokens, d, generator=gen) * torch.linspace(2, 0.1, d)
    v = v + 0.05 * torch.randn(bsz, n_kv, n_tokens, d, generator=gen) * torch.linspace(2, 0.1, d)
    valid = torch.arange(n_tokens)[None, :] >= torch.tensor([0, 13])[:, None]
    cfg = MixedDimKVConfig(budget=0.25, method=method, window=8)
    return LayerContext(query=q.to(dtype), key=k.to(dtype), value=v.to(dtype), valid=valid, layer_idx=0,
                        num_layers=1, cfg=cfg, dims=cfg.resolve_dims(d))


# On CPU the forced kernel path runs the interpreted kernels beside the reference on the same
# tensors; on a GPU machine this module runs compiled kernels on CUDA (the tests above), and a CPU
# "kernel path" there would just be the reference again.
@pytest.mark.skipif(DEVICE != "cpu", reason="compares the interpreted kernel path with the reference on CPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["snapkv", "mixeddimkv"])
def test_policy_with_kernels_selects_and_stores_as_reference(method: str, dtype: torch.dtype) -> None:
    ref_ctx = policy_case(method, dtype)
    ker_ctx = KernelContext(**{f.name: getattr(ref_ctx, f.name) for f in dataclasses.fields(LayerContext)})
    assert not ref_ctx.uses_kernels()  # CPU tensors: the reference
    # the kernel path was taken and agrees to rounding, so the selections below compare two computations
    imp_ref, imp_ker = ref_ctx.importance(), ker_ctx.importance()
    assert not torch.equal(imp_ref, imp_ker)
    torch.testing.assert_close(imp_ker, imp_ref, rtol=2e-5, atol=2e-7)
    ref, ker = POLICIES[method](ref_ctx), POLICIES[method](ker_ctx)
    assert torch.equal(ker.chosen_dim, ref.chosen_dim)
    assert ker.tier_dims == ref.tier_dims
    if method == "mixeddimkv":
        assert len(ref.tier_dims) > 1  # reduced tiers used: the logit-error kernel mattered
    stores = [pack_selection(ctx.key, ctx.value, s) for ctx, s in ((ref_ctx, ref), (ker_ctx, ker))]
    assert stores[0].stored_bytes() == stores[1].stored_bytes()
    for a, b in zip(stores[0].keys + stores[0].values, stores[1].keys + stores[1].values, strict=True):
        assert torch.equal(a, b)

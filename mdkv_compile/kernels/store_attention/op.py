"""The registered torch ops over the packed store, ``mdkv::packed_decode_attention`` and
``mdkv::packed_chunk_attention`` (``register_kernel_op``: the kernels of launch.py where they can run,
the function body, over the reference, elsewhere), and ``packed_store_attention``, attention over a
core ``PackedStore`` through a ``StorePlan``. Compiled and exported graphs name the ops by their
schemas, the signatures below: the tiers as ``Tensor[]`` (full tier first, then at most
``MAX_REDUCED_TIERS`` reduced ones; a tier's key and value widths are its tensors' widths), the bases
as optional tensors."""

from __future__ import annotations

from torch import Tensor

from mdkv_compile.core.packing import PackedStore
from mdkv_compile.kernels._triton import register_kernel_op
from mdkv_compile.kernels.store_attention.launch import packed_chunk_attention_triton, packed_decode_attention_triton
from mdkv_compile.kernels.store_attention.plan import StorePlan
from mdkv_compile.kernels.store_attention.reference import packed_attention_torch


@register_kernel_op("mdkv::packed_decode_attention", packed_decode_attention_triton)
def packed_decode_attention(
    q: Tensor,
    tier_keys: list[Tensor],
    tier_values: list[Tensor],
    tier_offsets: list[Tensor],
    basis_k: Tensor | None,
    basis_v: Tensor | None,
    k_new: Tensor,
    v_new: Tensor,
    n_new: int,
    scale: float,
    softcap: float | None = None,
    n_decoded: Tensor | None = None,
    arrival_counts: Tensor | None = None,
) -> Tensor:
    """Decode attention over a packed store plus the full-dimension decoded region.

    q: ``[B, Hq, 1, d]``; ``tier_keys[t]``: ``[M_t, rk_t]``, ``tier_values[t]``: ``[M_t, rv_t]`` (``t = 0``
    the full tier, ``rk_0 = rv_0 = d``, stored unrotated; ``t > 0`` coefficients in the owner's bases,
    ``1 <= rk_t, rv_t <= d`` independently), ``tier_offsets[t]``: ``[B * H_kv + 1]`` int32 CSR offsets by
    owner ``o = b * H_kv + h``; ``basis_k``: ``[B * H_kv, d, rk_max]``, ``basis_v``: ``[B * H_kv, d, rv_max]``
    (at least the widest reduced key / value; ``None`` with no reduced tier); ``k_new``/``v_new``:
    ``[B, H_kv, n_cap, d]`` of which the first ``n_new`` positions are attended. Returns
    ``[B, Hq, 1, d]`` in q's dtype. An owner with no token at all gets a zero output.
    ``n_decoded``: int64 ``[1]`` on q's device holding the number of decoded tokens; when given, the
    kernel reads the count there (CUDA-graph replay) and ``n_new`` only sizes the work split.
    ``arrival_counts``: int32 on q's device, at least ``B * H_kv`` zeros, for the kernel's merge: every
    launch leaves them at zero, so a caller that keeps them (a cache, across its steps) saves the memset
    of a fresh buffer per call (None: a fresh one). Unused by the PyTorch path.
    """
    if n_decoded is not None:  # the reference path needs the count on the host
        n_new = int(n_decoded.reshape(-1)[0])
    return packed_attention_torch(q, tier_keys, tier_values, tier_offsets, basis_k, basis_v, k_new, v_new, n_new,
                                  scale, softcap)


@register_kernel_op("mdkv::packed_chunk_attention", packed_chunk_attention_triton)
def packed_chunk_attention(
    q: Tensor,
    tier_keys: list[Tensor],
    tier_values: list[Tensor],
    tier_offsets: list[Tensor],
    basis_k: Tensor | None,
    basis_v: Tensor | None,
    k_new: Tensor,
    v_new: Tensor,
    n_new: int,
    scale: float,
    softcap: float | None = None,
) -> Tensor:
    """Chunked prefill over a packed store: ``q`` ``[B, Hq, L, d]`` are the last ``L`` of the ``n_new``
    tokens in ``k_new``/``v_new`` (already written there), causal among the new tokens; every stored
    token is visible. Other arguments as ``packed_decode_attention``; returns ``[B, Hq, L, d]``.
    Checked against float64 under the interpreter and on an H100; timings in docs/notes/kernel_notes.md."""
    return packed_attention_torch(q, tier_keys, tier_values, tier_offsets, basis_k, basis_v, k_new, v_new, n_new,
                                  scale, softcap)


def packed_store_attention(
    q: Tensor,
    store: PackedStore,
    k_new: Tensor | None,
    v_new: Tensor | None,
    n_new: int | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    n_decoded: Tensor | None = None,
    plan: StorePlan | None = None,
    arrival_counts: Tensor | None = None,
) -> Tensor:
    """Attention over a core ``PackedStore`` plus new tokens: ``packed_decode_attention`` for one query
    token, ``packed_chunk_attention`` for ``L > 1`` (the queries are the last ``L`` of the ``n_new``
    new tokens, causal among them). Same result as
    ``mdkv_compile.core.attention.attend_packed(q, store, k_new[:, :, :n_new], v_new[:, :, :n_new])``
    (every stored token visible, new tokens causally). ``plan``: the store's ``StorePlan.for_store``
    made once (a caller decoding many steps over one store saves the per-step work);
    ``n_decoded``: the decoded-token count on the device, ``arrival_counts`` a kept count buffer (decode
    only, see ``packed_decode_attention``)."""
    tiers = (StorePlan.for_store(store) if plan is None else plan).tiers
    B, _, L, d = q.shape
    scale = d**-0.5 if scale is None else scale
    if L > 1:
        if k_new is None or v_new is None or n_decoded is not None:
            # the chunk kernel takes the count from the host and its queries are among the new tokens
            raise ValueError("packed_store_attention: a chunk (L > 1) needs its new tokens and a host count n_new")
        n_new = k_new.shape[2] if n_new is None else n_new
        return packed_chunk_attention(q, *tiers, k_new, v_new, n_new, scale, softcap)
    if k_new is None or v_new is None:
        k_new = v_new = q.new_zeros(B, store.kv_heads, 1, d)
        n_new, n_decoded = 0, None
    n_new = k_new.shape[2] if n_new is None else n_new
    return packed_decode_attention(q, *tiers, k_new, v_new, n_new, scale, softcap, n_decoded, arrival_counts)

"""Attention over the packed store (docs/packed_store.md) in Triton: decode and chunked prefill.

Modules: jit.py (the ``@triton.jit`` kernels), plan.py (``Tuning``, ``StorePlan``: what the kernels need
from one store, worked out once on the host, and each launch's work split), launch.py (running the
kernels; the direct entry points ``*_triton``), reference.py (``packed_attention_torch``, the pure-torch
version), op.py (the registered ops and ``packed_store_attention``).

Decode, one query token per sequence. A small product and two launches:

0. ``q_rot = q @ basis_k[o]`` for every owner (``torch.matmul``, ``[owners, G, rk_max]``): the query is
   rotated once, never a key.
1. ``_packed_decode_split``: grid ``(B * H_kv, S, 1 + T_red)``. Program ``(o, s, t)`` serves owner ``o``
   (one KV head of one sequence) for *all* query heads of its GQA group (rows of a ``[GP, d]`` tile,
   ``GP`` the group padded to 16 so ``tl.dot`` can use the tensor cores), the ``s``-th of ``S`` equal
   slices of one region: ``t = 0`` the full tier plus the decoded region ``k_new[:, :, :n_new]``
   (both full width, merged in-program), ``t >= 1`` reduced tier ``t``, attended in its own
   coefficient space: its keys hold ``rk_t`` coordinates (``q_rot[:, :rk_t]``, ``rk_t`` up to ``d``), its
   values ``rv_t`` (either may be the wider). Each program writes one online-softmax partial
   ``(m, l, acc)``; for a reduced tier ``acc`` is in value coefficient space, ``[G, rv_t]``.
2. ``_packed_decode_merge``: grid ``(B * H_kv, G)``, one query head per program. Log-sum-exp merge of
   the ``S x (1 + T_red)`` partials (no atomics, deterministic), reading splits in chunks; the value
   coefficients of all reduced tiers are summed in one ``[rv_max]`` vector (zero-padded) and rotated
   back once with ``basis_v[o]`` (``[d, rv_max]``), then normalised and written.

Precision: inputs bf16 / fp16 / fp32; every dot product accumulates in fp32 (``ieee`` for fp32 inputs,
so fp32 results match a float64 reference to ~1e-6); probabilities and ``q_rot`` are rounded to the
input dtype before their products, as in FlashAttention.

The op ``mdkv::packed_decode_attention`` is a ``torch.library.triton_op`` (Inductor sees both kernels
through ``wrap_triton``: verified on an H200, docs/notes/kernel_notes.md) taking the tiers as ``Tensor[]``
lists: the full tier first, then at most ``MAX_REDUCED_TIERS`` reduced ones (any order; each tier's key
and value widths are its tensors' widths, so the schema needs no dims). On a CPU
tensor (and no ``TRITON_INTERPRET=1``) it runs ``packed_attention_torch``, a vectorised
pure-torch version that is also traceable. Versions and measurements: docs/notes/kernel_notes.md.

Chunked prefill (``mdkv::packed_chunk_attention``, ``packed_chunk_attention``): the same two kernels
generalised to ``L`` query tokens per sequence (the last ``L`` of the new tokens, causal among them),
the ``G * L`` query rows of an owner cut into blocks of ``BLOCK_M`` rows on grid axis 2. Checked
against float64 references under Triton's interpreter and compiled on an H200 (tests pass there); timing:
``mdkv bench --chunks`` (docs/notes/kernel_notes.md). ``MixedDimLayer.attend`` runs it for chunks on CUDA.

Launch parameters (split count policy, rows per block, warps, stages): ``Tuning``; every caller gets
``DEFAULT_TUNING``, the ``*_triton`` entry points take ``tuning=`` so ``mdkv bench --sweep`` can vary them.
"""

from mdkv_compile.kernels.store_attention.jit import MAX_REDUCED_TIERS
from mdkv_compile.kernels.store_attention.launch import packed_chunk_attention_triton, packed_decode_attention_triton
from mdkv_compile.kernels.store_attention.op import (
    packed_chunk_attention,
    packed_decode_attention,
    packed_store_attention,
)
from mdkv_compile.kernels.store_attention.plan import DEFAULT_TUNING, StorePlan, Tuning, WorkSplit, num_splits
from mdkv_compile.kernels.store_attention.reference import packed_attention_torch

__all__ = [
    "DEFAULT_TUNING",
    "MAX_REDUCED_TIERS",
    "StorePlan",
    "Tuning",
    "WorkSplit",
    "num_splits",
    "packed_attention_torch",
    "packed_chunk_attention",
    "packed_chunk_attention_triton",
    "packed_decode_attention",
    "packed_decode_attention_triton",
    "packed_store_attention",
]

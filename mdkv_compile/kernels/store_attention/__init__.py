"""Attention over the packed store (docs/packed_store.md) in Triton: decode and chunked prefill.

Modules: jit.py (the ``@triton.jit`` kernels), plan.py (``Tuning``, ``StorePlan``: what the kernels need
from one store, worked out once on the host, and each launch's work split), launch.py (running the
kernels; the direct entry points ``*_triton``), reference.py (``packed_attention_torch``, the pure-torch
version), op.py (the registered ops and ``packed_store_attention``), resources.py (a variant compiled
for an NVIDIA GPU on any machine: registers, spills, shared memory).

One kernel, one launch, for decode and chunked prefill (decode is the chunk of one query token):

``_packed_attention``, a 1-D grid over (row block, split, owner, region), row blocks fastest. Program
``(mb, s, o, t)`` serves owner ``o`` (one KV head of one sequence) for one block of ``BLOCK_M`` of its
``G * L`` query rows (row ``r = g * L + l``; decode: the ``G`` query heads padded to 16 so ``tl.dot`` can
use the tensor cores), the ``s``-th of ``S`` equal slices of one region: ``t = 0`` the full tier plus
the new tokens ``k_new[:, :, :n_new]`` (both full width, merged in-program; new tokens causal among the
chunk's queries), ``t >= 1`` reduced tier ``t``, attended in its own coefficient space: the query is
rotated in the program (``q @ basis_k[o][:, :rk_t]``), its keys hold ``rk_t`` coordinates, its values
``rv_t`` (either may be the wider). Each program writes one online-softmax partial ``(m, l, acc)``; for a
reduced tier ``acc`` is in value coefficient space, ``[rows, rv_t]``. Then it counts itself in its
``(owner, row block)``'s arrival count (an ``acq_rel`` atomic); the last of the ``S x (1 + T_red)``
programs to arrive merges them all in a fixed order (deterministic): log-sum-exp weights, the value
coefficients of all reduced tiers summed in one ``[rows, rv_max]`` tile, normalised, rotated back once
with ``basis_v[o]`` and written, and sets the count back to zero. The merge holds only the rows that
exist (a decode step's ``G``, not the 16 of its block). So the counts are either a fresh buffer zeroed
by a memset before the launch, or one the caller keeps (``arrival_counts=``), which needs no memset.

Row blocks fastest: the row blocks of a chunk read the same slice of the store side by side, once from
DRAM and the rest from L2. Regions last slot first: the narrow tiers' programs, the longest, start first.
A kernel slot may read part of a tier's rows: ``Tuning.split_longest_tier`` reads the tier of the most
rows through two slots (one region more), where a slot is free.

Precision: inputs bf16 / fp16 / fp32; every dot product accumulates in fp32 (``ieee`` for fp32 inputs,
so fp32 results match a float64 reference to ~1e-6); probabilities and ``q_rot`` are rounded to the
input dtype before their products, as in FlashAttention. The merge's rotation back takes TF32 products
for 16-bit inputs (~5e-4 relative, under the output's own rounding; exact fp32 there spills).

The op ``mdkv::packed_decode_attention`` is a ``torch.library.triton_op`` (Inductor sees the kernel
through ``wrap_triton``: verified on an H100, docs/notes/kernel_notes.md) taking the tiers as ``Tensor[]``
lists: the full tier first, then at most ``MAX_REDUCED_TIERS`` reduced ones (any order; each tier's key
and value widths are its tensors' widths, so the schema needs no dims). On a CPU
tensor (and no ``TRITON_INTERPRET=1``) it runs ``packed_attention_torch``, a vectorised
pure-torch version that is also traceable. Versions and measurements: docs/notes/kernel_notes.md.

Chunked prefill (``mdkv::packed_chunk_attention``, ``packed_chunk_attention``): the same kernel with
``L`` query tokens per sequence (the last ``L`` of the new tokens). ``MixedDimLayer.attend`` runs it for
chunks on CUDA.

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

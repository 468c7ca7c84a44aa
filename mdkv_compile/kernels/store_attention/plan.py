"""Host-side planning of the store-attention kernels, apart from running them (FlashInfer's plan/run
split). `StorePlan` holds what the kernels need from one packed store, worked out once: the op's tier
arguments (contiguous, int32 offsets, per-owner bases), their checks, the reduced-tier slots and their
constexprs, block sizes. For each launch it cuts the work into row blocks and splits (`WorkSplit`) and
sizes the workspace, from shapes only: no device sync, and no kernel launch here (launch.py).

`Tuning` holds the launch parameters; `num_splits` is the split-count policy. Decode is the chunk of one
query token: one work split for both."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from mdkv_compile.core.packing import PackedStore
from mdkv_compile.kernels._triton import next_pow2, sm_count, split_count
from mdkv_compile.kernels.store_attention.jit import MAX_REDUCED_TIERS


@dataclasses.dataclass(frozen=True)
class Tuning:
    """Launch parameters of the kernel (values: docs/notes/kernel_notes.md). The defaults
    are what every caller gets; a benchmark passes its own instance (``tuning=``) to sweep them."""

    # split-K target: enough programs in flight to cover memory latency. The H200 sweep
    # (benchmarks/results/issue5_sweep_h200.json) found the best split counts 8 / 2 / 1 at
    # 128K x 8 / 32K x 32 / 8K x 64 (4 regions); 15 programs per SM gives exactly those (4 gave 3 / 1 / 1).
    programs_per_sm: int = 15
    # the same target for chunks, whose row blocks already multiply the programs: each split adds a
    # partial per region that the merging program reads (BLOCK_M x d fp32 for the full region), so
    # fewer splits win there (H100, chunks after 32K at batch 8: 16 tokens 0.069 / 0.096 ms at 2 / 4
    # splits, 64 tokens 0.096 / 0.142 / 0.203 at 1 / 2 / 4, 256 tokens 0.368 / 0.490 / 0.697;
    # docs/notes/kernel_notes.md, "Call 7"). 6 gives 2 / 1 / 1 there (4 or 5 regions); 15 gave 4 / 2 / 1.
    chunk_programs_per_sm: int = 6
    min_rows_per_split: int = 64  # below this a split's fixed cost (q, bases, partial writes) dominates
    # At batch 1 the per-SM target asks for ~60 splits of 128K; fewer are faster there, and each split is
    # one more partial for the merging program to read (H100, 128K x 1: 8 / 12 / 16 splits = 23.0 /
    # 27.9 / 28.8 us, docs/notes/kernel_notes.md): at most 8.
    max_splits: int = 8
    # If set, the split cap is this many programs per owner over all its regions instead (at least 1 per
    # region): with one region (an evicted cache in the packed layout) 8 splits x 8 KV heads at batch 1
    # are 64 programs for 132 SMs (H100, 128K x 1: 2.3x evicted SDPA, docs/notes/kernel_notes.md "Call 4").
    # Off until timed.
    owner_programs: int | None = None
    splits: int | None = None  # a fixed split count (sweeps); None: the policy of `num_splits`
    num_warps: int = 4
    num_stages: int = 3  # sweep on H200 (docs/notes/kernel_notes.md): 3 beat 2 at B=64, tied at B=1
    block_n_full: int = 32  # rows per block, full tier and decoded region (sweep: 32 beat 64 at all 3 shapes)
    block_n_reduced_max: int = 128  # rows per block of a chunk's reduced tier (~16 KiB of keys, at most this)
    # the same cap for decode launches, whose blocks hold 16 query rows where a chunk's hold 64. Larger
    # narrow-tier blocks for decode were slower on an H100 (128K x 8 / x 1: 0.119 / 0.022 ms at 128 rows,
    # 0.136 / 0.025 at 256, 0.266 / 0.057 at 512: they spill under the 168-register cap, and uncapped 256
    # takes 245 registers, two programs per SM; docs/notes/kernel_notes.md, "Call 7")
    decode_block_n_reduced_max: int = 128
    chunk_block_m: int = 64  # chunked prefill: query rows (G * L) per program
    chunk_num_warps: int = 4  # warps of a chunk's programs (decode: num_warps)
    # launch the region slots last first: with tiers sorted widest first, the narrow tiers' programs
    # (the most rows per byte, the longest) start first and shorter ones fill the tail
    reverse_regions: bool = True
    # splits whose partials the merging program loads at once. The merge of whole blocks: 4 measured
    # slower at 128K x 8 on an H100 (0.129 against 0.121 ms); the merge of the rows that exist in its
    # while loop: 4 within 1 us of 1 (docs/notes/kernel_notes.md, calls 3 and 9); chunks: 4 spill
    merge_unroll: int = 1
    chunk_merge_unroll: int = 1
    # the merge's loop over splits as range() on the GPU (an scf.for; the interpreter always takes the
    # while loop). Through the scf.while loop Triton changes the layout of every weight in every split
    # step (six shared-memory round trips with a barrier each, sm_90 TTGIR); through the scf.for none.
    # Off until timed beside the while loop (docs/notes/kernel_notes.md, "Call 11")
    merge_for_loop: bool = False
    # the merge holds only the rows that exist (WorkSplit.merge_rows), not the padded block: 4 of 16 for a
    # decode step with 4 query heads per KV head. False: the whole block (to time one beside the other)
    narrow_merge: bool = True
    # a cap on registers per thread (Triton's maxnreg) of decode launches, None: the compiler's choice.
    # Uncapped, the policy's decoupled tiers take 230 (two programs of 4 warps per SM); at 168 (three)
    # they do not spill, and on an H100 128K x 8 / x 1 took 0.1284 / 0.0237 ms against 0.1300 / 0.0251
    # (docs/notes/kernel_notes.md, "Call 4"). Not for chunks: their variants already spill uncapped.
    decode_max_registers: int | None = 168
    # read the reduced tier of the most rows as two regions (a second slot over the second half of every
    # owner's rows) where a slot is free. With equal bytes per tier the narrowest tier holds the most
    # rows and its programs work longest (H100, 128K x 1: 15.4 us against the full tier's 11.5,
    # docs/notes/kernel_notes.md "Call 9"); the merge starts after the last of them.
    split_longest_tier: bool = False


DEFAULT_TUNING = Tuning()


def _reduced_rows(block_width: int, cap: int) -> int:
    """Rows per block of a reduced tier whose wider padded side (keys or values) is `block_width`:
    larger blocks for narrow tiers, ~16 KiB of the wider side per block (bf16), at least 64 rows, at
    most `cap`."""
    return int(min(cap, max(64, 8192 // block_width)))


def num_splits(n_owners: int, n_regions: int, avg_rows: int, n_sm: int, tuning: Tuning = DEFAULT_TUNING,
               chunk: bool = False) -> int:
    """Splits per (owner, region) from shapes only (no device sync, no recompiles: S is a runtime
    argument). avg_rows: rows per owner over all regions; n_owners: owners x row blocks; chunk: the
    target is ``tuning.chunk_programs_per_sm``."""
    if tuning.splits is not None:
        return max(1, int(tuning.splits))
    cap = tuning.max_splits if tuning.owner_programs is None else max(1, tuning.owner_programs // n_regions)
    per_sm = tuning.chunk_programs_per_sm if chunk else tuning.programs_per_sm
    return split_count(n_owners * n_regions, avg_rows // n_regions, tuning.min_rows_per_split, per_sm, cap, n_sm)


def chunk_block_rows(rows: int, tuning: Tuning) -> int:
    """Query rows per program of a chunk with `rows` (G * L) rows per owner: at most
    ``tuning.chunk_block_m``, and two row blocks per owner or more (H100: 16 tokens x G = 4 in blocks of
    32 rows took 0.090 ms against 0.128 in one block of 64, docs/notes/kernel_notes.md), 16 at least."""
    return max(16, min(tuning.chunk_block_m, next_pow2(rows) // 2))


@dataclasses.dataclass(frozen=True)
class WorkSplit:
    """One launch's cut of the work: every owner's query rows in `row_blocks` blocks of `block_rows`
    (grid axis 2, with the regions) and every region in `splits` slices (grid axis 1)."""

    owners: int  # B * H_kv
    rows: int  # query rows per owner: G for decode, G * L for a chunk (row r = g * L + l)
    block_rows: int  # rows per program (BLOCK_M): decode the group padded to 16 for tl.dot, chunk chunk_block_m
    row_blocks: int  # 1 for decode, NMB for a chunk
    splits: int  # S
    chunk: bool = False  # launched as a chunk (Tuning's chunk_* fields), not as a decode step

    @property
    def merge_rows(self) -> int:
        """Rows the merging program holds (MERGE_M): the block's, or fewer where the block is padded (a
        decode step's G query heads in 16 rows), rounded up to a power of 2."""
        return min(self.block_rows, next_pow2(self.rows))

    @property
    def rows_padded(self) -> int:
        """Row stride of the (m, l) partials, M_P = NMB * BLOCK_M."""
        return self.row_blocks * self.block_rows


@dataclasses.dataclass(frozen=True, eq=False)
class StorePlan:
    """What the kernels need from one packed store. Made once per store with `for_store` (the cache
    keeps it for every step over the store), or with `from_tiers` from the op's tier arguments: the
    op's schema takes tensors, so inside the op the plan is worked out again from their shapes (host
    arithmetic only; tensors that a plan already prepared are not copied again)."""

    # the op's store arguments (`tiers`): the full tier first (d wide keys and values), then the reduced
    # tiers in any order, each with its own key width rk_t and value width rv_t (1..d)
    tier_keys: list[Tensor]  # [M_t, rk_t] contiguous
    tier_values: list[Tensor]  # [M_t, rv_t] contiguous
    tier_offsets: list[Tensor]  # [owners + 1] int32 CSR offsets by owner o = b * H_kv + h
    basis_k: Tensor | None  # [owners, d, >= rk_max], contiguous with a reduced tier; unused without one
    basis_v: Tensor | None  # [owners, d, >= rv_max]
    tuning: Tuning
    head_dim: int
    n_reduced: int  # the kernel's reduced slots (NUM_RED): the reduced tiers, one more for a tier split in two
    stored_rows: int  # rows over every tier and owner: sizes the splits
    rv_max: int  # the widest reduced value (0 without a reduced tier): the columns of basis_v the merge reads
    rv_max_padded: int  # the merge's coefficient tile: rv_max padded to a power of 2 >= 16
    block_d: int
    block_n: int  # rows per block, full tier and decoded region
    # the kernel's tier slots: keys, values, offsets of the full tier, then of MAX_REDUCED_TIERS
    # reduced slots (unused slots repeat the full tier and are not compiled: NUM_RED is a constexpr)
    tier_pointers: tuple[Tensor, ...]
    # R1..R4 / RV1..RV4 (key / value widths), BR1..BR4 / BRV1..BRV4 (padded to powers of 2 >= 16),
    # PART1..PART4 of PARTS1..PARTS4 (the part of every owner's rows a slot reads)
    tier_constexprs: dict[str, int]

    @classmethod
    def from_tiers(
        cls,
        tier_keys: list[Tensor],
        tier_values: list[Tensor],
        tier_offsets: list[Tensor],
        basis_k: Tensor | None,
        basis_v: Tensor | None,
        tuning: Tuning | None = None,
    ) -> StorePlan:
        tuning = tuning or DEFAULT_TUNING
        n_red = len(tier_keys) - 1
        if not 0 <= n_red <= MAX_REDUCED_TIERS:
            raise ValueError(f"{n_red} reduced tiers; the kernel takes at most {MAX_REDUCED_TIERS}")
        d = int(tier_keys[0].shape[-1])
        if int(tier_values[0].shape[-1]) != d:
            raise ValueError(f"the full tier's values are {int(tier_values[0].shape[-1])} wide, its keys {d}")
        key_dims = [int(k.shape[1]) for k in tier_keys[1:]]
        value_dims = [int(v.shape[1]) for v in tier_values[1:]]
        if not all(0 < r <= d for r in key_dims + value_dims):
            raise ValueError(f"reduced tiers of key widths {key_dims} and value widths {value_dims}: "
                             f"each must be 1..{d}")
        keys = [k.contiguous() for k in tier_keys]
        vals = [v.contiguous() for v in tier_values]
        offs = [o.to(torch.int32).contiguous() for o in tier_offsets]
        if n_red:
            assert basis_k is not None and basis_v is not None
            if basis_k.shape[-1] < max(key_dims) or basis_v.shape[-1] < max(value_dims):
                raise ValueError(f"bases of {basis_k.shape[-1]} / {basis_v.shape[-1]} columns for tiers of key widths "
                                 f"{key_dims} and value widths {value_dims}")
            basis_k, basis_v = basis_k.contiguous(), basis_v.contiguous()
        block_d = max(16, next_pow2(d))
        block_n = tuning.block_n_full if block_d <= 128 else min(tuning.block_n_full, 32)
        # the kernel's reduced slots: tier t of `slot_tiers` read as part `slot_parts` (index, count) of
        # every owner's rows; the longest tier in two parts where asked and a slot is free
        slot_tiers, slot_parts = list(range(1, n_red + 1)), [(0, 1)] * n_red
        if tuning.split_longest_tier and 0 < n_red < MAX_REDUCED_TIERS:
            longest = max(slot_tiers, key=lambda t: int(keys[t].shape[0]))
            slot_parts[longest - 1] = (0, 2)
            slot_tiers.append(longest)
            slot_parts.append((1, 2))
        n_slots = len(slot_tiers)
        pad = MAX_REDUCED_TIERS - n_slots
        slot_dims = [key_dims[t - 1] for t in slot_tiers] + [16] * pad
        slot_value_dims = [value_dims[t - 1] for t in slot_tiers] + [16] * pad
        slot_parts += [(0, 1)] * pad
        slot_blocks = [max(16, next_pow2(r)) for r in slot_dims]
        slot_value_blocks = [max(16, next_pow2(r)) for r in slot_value_dims]
        pointers = [keys[0], vals[0], offs[0]]
        for t in slot_tiers + [0] * pad:
            pointers += [keys[t], vals[t], offs[t]]
        constexprs = {}
        for t in range(MAX_REDUCED_TIERS):
            constexprs.update({f"R{t + 1}": slot_dims[t], f"BR{t + 1}": slot_blocks[t],
                               f"RV{t + 1}": slot_value_dims[t], f"BRV{t + 1}": slot_value_blocks[t],
                               f"PART{t + 1}": slot_parts[t][0], f"PARTS{t + 1}": slot_parts[t][1]})
        rv_max = max(value_dims) if n_red else 0
        return cls(
            tier_keys=keys, tier_values=vals, tier_offsets=offs, basis_k=basis_k, basis_v=basis_v, tuning=tuning,
            head_dim=d, n_reduced=n_slots, stored_rows=sum(int(k.shape[0]) for k in keys),
            rv_max=rv_max, rv_max_padded=next_pow2(max(rv_max, 16)), block_d=block_d, block_n=block_n,
            tier_pointers=tuple(pointers), tier_constexprs=constexprs,
        )

    @classmethod
    def for_store(cls, store: PackedStore, tuning: Tuning | None = None) -> StorePlan:
        """The plan of a core ``PackedStore``.

        Bridges the two places where the core store is more general than docs/packed_store.md: a tier
        with a uniform count per owner may carry ``offsets[t] = None`` (materialised here as
        ``arange * n``), and bases may be shared rows selected by ``basis_index`` (gathered per owner
        here: a copy of ``owners * d * (rk_max + rv_max)`` values; a kernel that indexes basis rows directly
        would avoid it). A store without a full tier gets an empty one.
        """
        owners = store.owners
        d = store.head_dim
        keys, vals, offs = list(store.keys), list(store.values), []
        for t in range(len(keys)):
            off = store.offsets[t]
            if off is None:
                n = keys[t].shape[0] // max(owners, 1)
                off = torch.arange(owners + 1, device=keys[t].device, dtype=torch.int32) * n
            offs.append(off.to(torch.int32))
        if store.tiers[0] != (d, d):
            ref = keys[0]
            keys.insert(0, ref.new_empty(0, d))
            vals.insert(0, ref.new_empty(0, d))
            offs.insert(0, torch.zeros(owners + 1, dtype=torch.int32, device=ref.device))
        return cls.from_tiers(keys, vals, offs, store.owner_basis("k"), store.owner_basis("v"), tuning)

    def reduced_block_rows(self, split: WorkSplit) -> dict[str, int]:
        """BN1..BN4, rows per block of each reduced-tier slot in one launch (`_reduced_rows`, capped by
        the tuning's chunk or decode cap)."""
        cx, tuning = self.tier_constexprs, self.tuning
        cap = tuning.block_n_reduced_max if split.chunk else tuning.decode_block_n_reduced_max
        return {f"BN{t}": _reduced_rows(max(cx[f"BR{t}"], cx[f"BRV{t}"]), cap) for t in range(1, MAX_REDUCED_TIERS + 1)}

    @property
    def tiers(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], Tensor | None, Tensor | None]:
        """The op's store arguments, in the schema's order."""
        return self.tier_keys, self.tier_values, self.tier_offsets, self.basis_k, self.basis_v

    @property
    def bases(self) -> tuple[Tensor, int, int, Tensor, int, int]:
        """basis_k and basis_v, each with its owner and row strides: the query's rotation and the merge's
        rotation back (any tensor and zero strides without a reduced tier: the kernel then reads neither)."""
        if not self.n_reduced:
            return self.tier_keys[0], 0, 0, self.tier_keys[0], 0, 0
        assert self.basis_k is not None and self.basis_v is not None
        bk, bv = self.basis_k, self.basis_v
        return bk, bk.stride(0), bk.stride(1), bv, bv.stride(0), bv.stride(1)

    def decode_split(self, owners: int, group: int, n_new: int, device: torch.device) -> WorkSplit:
        """One query token: an owner's G query heads are one row block, padded to 16 rows."""
        splits = self._splits(owners, 1, n_new, device, chunk=False)
        return WorkSplit(owners, group, max(16, next_pow2(group)), 1, splits)

    def chunk_split(self, owners: int, rows: int, n_new: int, device: torch.device) -> WorkSplit:
        """L query tokens: an owner's G * L query rows in blocks of BLOCK_M (`chunk_block_rows`)."""
        block_m = chunk_block_rows(rows, self.tuning)
        row_blocks = -(-rows // block_m)
        return WorkSplit(owners, rows, block_m, row_blocks, self._splits(owners, row_blocks, n_new, device, chunk=True),
                         chunk=True)

    def _splits(self, owners: int, row_blocks: int, n_new: int, device: torch.device, chunk: bool) -> int:
        avg_rows = self.stored_rows // max(owners, 1) + n_new
        return num_splits(owners * row_blocks, self.n_reduced + 1, avg_rows, sm_count(device), self.tuning, chunk)

    def workspace_sizes(self, split: WorkSplit) -> tuple[int, int, int]:
        """fp32 elements of the split partials: (m, l) per padded row and region, the full region's
        acc per row, the reduced tiers' value coefficients per row, rv_max_padded each (at least 1 element
        in all). Plus one int32 arrival count per (owner, row block), not counted here."""
        per_split = split.owners * split.splits
        return (
            per_split * (self.n_reduced + 1) * 2 * split.rows_padded,
            per_split * split.rows * self.head_dim,
            max(1, per_split * self.n_reduced * split.rows * self.rv_max_padded),
        )

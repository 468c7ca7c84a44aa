"""`MixedDimCache`: a transformers `Cache` whose full-attention layers hold the packed store.

Flow per layer: at prefill, `update()` hands the prompt's keys and values to the attention
function (registered by `mdkv.patch`), which computes exact attention and then compresses them
with the layer's own window queries (`MixedDimLayer.compress`). Afterwards every new token (one
at a time, or a chunk such as a question prefilled after the context) is appended at full
dimension and attends over store + new tokens. Sliding-window layers (Gemma) keep transformers'
own bounded sliding cache.

A cache's `update()` never sees queries, so the layer is handed to the attention function
through `current_layer()`: transformers calls `cache.update(...)` immediately before the
attention function of the same layer.

Decoded tokens go to one of two regions: by default a tensor that grows by concatenation; with
`MixedDimCache(..., max_new_tokens=n)` a region of fixed capacity written in place, whose count
lives on the device, so a decode step has static shapes and addresses and can be captured as a
CUDA graph (`mdkv_compile.hf.cuda_graphs.GraphedDecoder`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicSlidingWindowLayer

from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.core.attention import attend_packed, causal_or_mask, dense_attention, is_causal_mask
from mdkv_compile.core.bases import load_calibrated
from mdkv_compile.core.packing import PackedStore
from mdkv_compile.core.sharding import HeadShard, check_local_heads
from mdkv_compile.kernels._triton import use_triton
from mdkv_compile.kernels.store_attention import StorePlan, packed_store_attention
from mdkv_compile.methods import RECORDS
from mdkv_compile.policies import LayerContext, select
from mdkv_compile.policies.base import pack_selection
from mdkv_compile.policies.head_scores import load_head_shares

_STATE = threading.local()


def _writable(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Buffers made during an inference-mode prefill can only be written in inference mode."""
    return torch.inference_mode() if t.is_inference() else contextlib.nullcontext()


def current_layer(layer_idx: int) -> MixedDimLayer | None:
    """The MixedDimLayer just updated for `layer_idx` (consumed: a second call returns None)."""
    layer = getattr(_STATE, "layer", None)
    if layer is None or getattr(_STATE, "layer_idx", None) != layer_idx:
        return None
    _STATE.layer = None
    return layer


def model_dims(config) -> tuple[int, int, int, int]:
    """(num_layers, num_attention_heads, num_key_value_heads, head_dim) of a decoder config."""
    text = config.get_text_config(decoder=True)
    n_heads = text.num_attention_heads
    n_kv = getattr(text, "num_key_value_heads", None) or n_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
    return text.num_hidden_layers, n_heads, n_kv, head_dim


def _tp_size(config: Any) -> int:
    dcfg = getattr(config, "distributed_config", None)
    if dcfg is None:
        return 1
    size = dcfg.get("tp_size") if isinstance(dcfg, dict) else getattr(dcfg, "tp_size", None)
    return int(size or 1)


def head_shard(config: Any, total_heads: int) -> HeadShard | None:
    """The KV-head slice of this rank when the model is tensor-parallel, else None."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    tp = _tp_size(config)
    if tp == 1:
        return None  # data parallel or a replicated model: every rank holds every head
    world = dist.get_world_size()
    if tp != world:
        # TP x FSDP/PP meshes: the TP group is a sub-group the config does not name.
        raise NotImplementedError(
            f"MixedDimCache supports tensor parallelism over the whole world only (tp_size={tp}, world size={world})"
        )
    if total_heads % tp:
        raise ValueError(f"{total_heads} KV heads cannot be split over {tp} tensor-parallel ranks")
    return HeadShard(rank=dist.get_rank(), world=world, total_heads=total_heads)


def valid_tokens(mask: torch.Tensor | None, bsz: int, n_tokens: int, device: torch.device) -> torch.Tensor:
    """[B, N] bool: real (non-padding) prompt tokens, read off the last query row of the mask."""
    if mask is None:
        return torch.ones(bsz, n_tokens, dtype=torch.bool, device=device)
    row = mask[:, 0, -1, :n_tokens]
    if row.dtype != torch.bool:
        row = row > torch.finfo(row.dtype).min / 2
    return row.expand(bsz, n_tokens)


class MixedDimLayer(CacheLayerMixin):
    """One full-attention layer: the packed prompt store plus a full-dimension region of new tokens."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        cfg: MixedDimKVConfig,
        layer_idx: int,
        num_layers: int,
        dims: tuple[int, ...],
        head_shares: torch.Tensor | None = None,
        calibrated: tuple[torch.Tensor, torch.Tensor] | None = None,
        shard: HeadShard | None = None,
        max_new_tokens: int | None = None,
        record_selection: bool = False,
    ) -> None:
        super().__init__()
        self.cfg, self.layer_idx, self.num_layers, self.dims = cfg, layer_idx, num_layers, dims
        self.head_shares, self.calibrated = head_shares, calibrated
        # Tensor parallelism: this rank's slice of the KV heads (None: the whole layer).
        self.shard = shard
        self.store: PackedStore | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.n_prompt = 0  # prompt positions (padding included) covered by the store
        # What the policy chose: entries per tier (`selection_dims`, 0 = dropped) in `selection_counts`
        # ([tiers + 1] int64, on the device: no sync); with `record_selection`, also the key and the
        # value dims of every prompt entry, `last_selection` and `last_value_selection` [B, H, N] int64:
        # 16 bytes per entry beside the store (at 128K tokens that is half a 0.0625 store), so they are
        # kept only on request.
        self.record_selection = record_selection
        self.last_selection: torch.Tensor | None = None
        self.last_value_selection: torch.Tensor | None = None
        self.selection_dims: tuple[int | str, ...] = ()
        self.selection_counts: torch.Tensor | None = None
        # Decoded tokens: `n_new` of them (host count). With a fixed region (`max_new_tokens`), the
        # device count `n_decoded` ([1] int64) is what kernels read and what in-place writes advance.
        self.max_new_tokens = max_new_tokens
        # With a fixed region a decode step has static shapes and addresses: transformers may then
        # compile it (`generate(..., compile_config=...)`, and on its own on CUDA); the bookkeeping
        # runs outside the graph (`MixedDimCache.update`).
        self.is_compileable = max_new_tokens is not None
        self.n_new = 0
        self.n_decoded: torch.Tensor | None = None
        self._kernel_plan: StorePlan | None = None  # the store's kernel plan, made once
        # the decode kernel's arrival counts ([B * H_kv] int32, where the kernels can run), kept across
        # steps: the kernel leaves them at zero, so a step (and a captured graph) needs no memset of a
        # fresh buffer
        self.arrival_counts: torch.Tensor | None = None

    # --- CacheLayerMixin -------------------------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros(key_states.shape[0], key_states.shape[1], 0, key_states.shape[-1])
        self.values = value_states.new_zeros(self.keys.shape)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.store is None:
            if self.pending is not None:
                raise RuntimeError(
                    f"MixedDimCache layer {self.layer_idx} got a second update before compressing the first: "
                    "the model's attention is not MixedDimKV's. Call mdkv.patch(model, cfg) first."
                )
            self.pending = (key_states, value_states)
            return key_states, value_states
        # After compression, `keys`/`values` hold only the tokens appended at full dimension.
        n_add = key_states.shape[-2]
        if self.max_new_tokens is None:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        else:
            if self.n_new + n_add > self.max_new_tokens:
                raise RuntimeError(
                    f"MixedDimCache layer {self.layer_idx}: {self.n_new} + {n_add} decoded tokens exceed "
                    f"max_new_tokens={self.max_new_tokens}; make the cache with a larger max_new_tokens"
                )
            # Slots from the device count, advanced in place: no host value enters the step, so a
            # captured graph writes the right slot on every replay.
            with _writable(self.n_decoded):
                slots = self.n_decoded + torch.arange(n_add, device=self.n_decoded.device)
                self.keys.index_copy_(2, slots, key_states)
                self.values.index_copy_(2, slots, value_states)
                self.n_decoded.add_(n_add)
        self.n_new += n_add
        return self.keys, self.values

    def new_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoded tokens' keys and values, [B, H, n_new, d]."""
        return self.keys[:, :, : self.n_new], self.values[:, :, : self.n_new]

    def set_decoded(self, n_new: int) -> None:
        """Set the count of decoded tokens (host and device): used to rewind after the warm-up runs
        of a CUDA-graph capture. Tokens past `n_new` are ignored and later overwritten."""
        if self.max_new_tokens is None or self.store is None:
            raise RuntimeError("set_decoded needs a compressed layer with a fixed region (max_new_tokens)")
        if not 0 <= n_new <= self.max_new_tokens:
            raise ValueError(f"set_decoded({n_new}): outside 0..max_new_tokens={self.max_new_tokens}")
        self.n_new = n_new
        with _writable(self.n_decoded):
            self.n_decoded.fill_(n_new)

    def get_seq_length(self) -> int:
        if self.store is None:
            return 0 if self.pending is None else self.pending[0].shape[-2]
        return self.n_prompt + self.n_new

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.store, self.pending, self.n_prompt, self.n_new = None, None, 0, 0
        self.n_decoded, self._kernel_plan, self.arrival_counts = None, None, None
        self.is_initialized = False

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("MixedDimCache does not support beam search, cropping or batch re-indexing")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported

    # --- MixedDimKV ------------------------------------------------------------------------------

    def attend(
        self,
        query: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float | None,
        softcap: float | None,
    ) -> torch.Tensor:
        """Attention of `query` [B, Hq, L, d] for this layer; compresses the prompt on first use."""
        if self.store is None:
            key, value = self.pending
            if query.shape[2] == key.shape[2] and not torch.compiler.is_compiling():
                # (traced by Dynamo, as under mdkv.patch + compile, the check would break the graph)
                mask = causal_or_mask(mask)
            out = dense_attention(query, key, value, mask, scale, softcap)
            self.compress(query, key, value, mask, scale, softcap)
            return out
        if self._use_kernel(query, mask):
            return self._attend_kernel(query, scale, softcap)
        keys, values = self.new_tokens()
        return attend_packed(query, self.store, keys, values, self._new_mask(mask), scale, softcap)

    def _attend_kernel(self, query: torch.Tensor, scale: float | None, softcap: float | None) -> torch.Tensor:
        """The Triton kernels over store + new tokens (what `attend` runs when `_use_kernel` says so):
        the decode kernel for one query token, the chunk kernel for a chunk of L > 1."""
        store = self.store
        if self._kernel_plan is None and (store.basis_k is None or store.owner_basis("k") is store.basis_k):
            # Reused every step, when it references the store's own tensors; bases that are
            # gathered per owner (shared rows) are gathered per call instead, since a kept copy
            # would hold memory that stored_bytes does not count.
            self._kernel_plan = StorePlan.for_store(store)
        if query.shape[2] > 1:
            # a chunk: the kernel takes the host count, exact here (update() advanced it; chunks are
            # never captured into a graph, see _use_kernel) for a growing and a fixed region alike
            return packed_store_attention(query, store, self.keys, self.values, self.n_new, scale, softcap,
                                          plan=self._kernel_plan)
        # fixed region: the kernel reads the count on the device (n_decoded is None otherwise) and
        # the capacity only sizes its work split; a growing region is all valid. The kept arrival
        # counts are left out where Inductor traces this call: the op does not declare the kernel's
        # writes to them (it leaves them as it found them), so Inductor would clone them before every
        # launch, a copy in place of the memset.
        counts = None if torch.compiler.is_compiling() else self.arrival_counts
        return packed_store_attention(query, store, self.keys, self.values, self.max_new_tokens, scale, softcap,
                                      n_decoded=self.n_decoded, plan=self._kernel_plan, arrival_counts=counts)

    def _new_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """[B, 1|H, L, n_new] bool: which decoded tokens each query sees (None: all, causally)."""
        new_mask = None if mask is None else mask[..., self.n_prompt : self.n_prompt + self.n_new]
        if new_mask is not None and new_mask.dtype != torch.bool:
            new_mask = new_mask > torch.finfo(new_mask.dtype).min / 2
        return new_mask

    def _use_kernel(self, query: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """The Triton kernels serve steps on CUDA after compression (`cfg.kernel == "auto"`) where
        each query sees every new token up to itself and none after (`_sees_new_causally`)."""
        if self.cfg.kernel != "auto" or not query.is_cuda or self.n_new == 0:
            return False
        if torch.cuda.is_current_stream_capturing():
            # Capturing a graph: transformers builds a mask from host lengths frozen at capture
            # (and checking it would synchronise). Decoded tokens are never padding (padding was
            # dropped at compression), so every one is visible: the decode kernel needs no mask.
            # Chunks are not served: the chunk kernel takes the host count, which a replay would not
            # advance (the PyTorch path slices by it too).
            return query.shape[2] == 1
        return self._sees_new_causally(query.shape[2], mask)

    def _sees_new_causally(self, n_queries: int, mask: torch.Tensor | None) -> bool:
        """Whether the model's mask lets the L queries (the last L new tokens) see exactly the new
        tokens up to their own positions: what both kernels compute. For L = 1 that is every new
        token. A mask that hides one (or shows a later one) goes to the PyTorch path. Syncs."""
        if not 1 <= n_queries <= self.n_new:
            return False
        new_mask = self._new_mask(mask)
        if new_mask is None:  # attend_packed's convention: no mask is causal
            return True
        if new_mask.dim() != 4 or new_mask.shape[-2:] != (n_queries, self.n_new):
            return False
        return is_causal_mask(new_mask)

    def context(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float | None,
        softcap: float | None,
    ) -> LayerContext:
        """What this layer's policy sees of a prompt (`compress` selects on it; `mdkv diagnose` runs
        the policy on captured prompts through it)."""
        bsz, n_heads, n_tokens, _ = key.shape
        if self.shard is not None:
            check_local_heads(self.shard, n_heads, self.layer_idx)
        return LayerContext(
            query=query, key=key, value=value,
            valid=valid_tokens(mask, bsz, n_tokens, key.device),
            layer_idx=self.layer_idx, num_layers=self.num_layers, cfg=self.cfg, dims=self.dims,
            scale=scale, softcap=softcap,
            head_shares=None if self.head_shares is None else self.head_shares.to(key.device),
            calibrated=self.calibrated, shard=self.shard, all_valid=mask is None,
        )

    @torch.no_grad()
    def compress(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float | None,
        softcap: float | None,
    ) -> None:
        bsz, n_heads, n_tokens, _ = key.shape
        ctx = self.context(query, key, value, mask, scale, softcap)
        for hook in KV_HOOKS:
            hook(ctx)
        sel = select(ctx)
        self.store = pack_selection(key, value, sel)
        tiers = ((0, 0), *self.store.tiers)
        chosen_value = sel.chosen_dim if sel.chosen_value_dim is None else sel.chosen_value_dim
        self.selection_dims = tuple(tier_label(r, rv) for r, rv in tiers)
        self.selection_counts = torch.stack(
            [((sel.chosen_dim == r) & (chosen_value == rv)).sum() for r, rv in tiers]
        )
        self.last_selection = sel.chosen_dim if self.record_selection else None
        self.last_value_selection = chosen_value if self.record_selection else None
        self.n_prompt = n_tokens
        self.pending = None
        if use_triton(key):
            self.arrival_counts = torch.zeros(bsz * n_heads, dtype=torch.int32, device=key.device)
        if self.max_new_tokens is not None:
            shape = (bsz, n_heads, self.max_new_tokens, key.shape[-1])
            self.keys, self.values = key.new_zeros(shape), value.new_zeros(shape)
            self.n_decoded = torch.zeros(1, dtype=torch.long, device=key.device)

    def selection_summary(self) -> dict[int | str, int]:
        """{tier: prompt entries stored in it} (0 = dropped); a tier is named by its dim when its
        keys and values keep as many dims, else "key dims/value dims". Empty before compression. Syncs."""
        if self.selection_counts is None:
            return {}
        return dict(zip(self.selection_dims, self.selection_counts.tolist(), strict=True))

    def stored_bytes(self) -> int:
        new = self.keys.numel() * self.keys.element_size() * 2 if self.is_initialized else 0
        if self.store is None:
            pending = 0 if self.pending is None else sum(t.numel() * t.element_size() for t in self.pending)
            return pending + new
        return self.store.stored_bytes() + new

    def full_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        bsz, n_kv, _, head_dim = self.keys.shape
        return 2 * bsz * n_kv * self.get_seq_length() * head_dim * self.keys.element_size()

    def prompt_stored_bytes(self) -> int:
        """The compressed prompt alone (store, bases, bookkeeping): what the budget bounds."""
        return 0 if self.store is None else self.store.stored_bytes()

    def prompt_full_bytes(self) -> int:
        """A plain cache of the prompt alone (padding included, as in `full_bytes`)."""
        if self.store is None:
            return 0
        return 2 * self.store.owners * self.n_prompt * self.store.head_dim * self.keys.element_size()


def tier_label(key_dim: int, value_dim: int) -> int | str:
    """A tier's name in selection summaries: its dim when keys and values keep as many, else
    "key dims/value dims" (0 = dropped)."""
    return key_dim if key_dim == value_dim else f"{key_dim}/{value_dim}"


# Callbacks run with the LayerContext of every prompt a MixedDimLayer compresses, before its policy
# (post-RoPE queries, keys and values, as attention sees them; `mdkv_compile.hf.calibrate.capture_contexts`).
KV_HOOKS: list[Callable[[LayerContext], None]] = []


class MixedDimCache(Cache):
    """A transformers Cache that compresses the prompt's KV with MixedDimKV (or any policy)."""

    def __init__(
        self,
        config,
        cfg: MixedDimKVConfig | None = None,
        max_new_tokens: int | None = None,
        record_selection: bool = False,
    ) -> None:
        """`max_new_tokens`: give the decoded tokens a fixed region of that many slots per layer,
        written in place (static shapes: CUDA graphs); None grows it by concatenation.
        `record_selection`: keep every prompt entry's chosen key and value dims
        (`MixedDimLayer.last_selection`, `last_value_selection`)."""
        cfg = MixedDimKVConfig() if cfg is None else cfg
        if not isinstance(cfg, MixedDimKVConfig):
            raise TypeError(f"MixedDimCache(config, cfg): cfg must be a MixedDimKVConfig, not {type(cfg).__name__}")
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a positive int (slots) or None")
        num_layers, _, n_kv, head_dim = model_dims(config)
        dims = cfg.resolve_dims(head_dim)
        text = config.get_text_config(decoder=True)
        shares = None
        if RECORDS[cfg.method].needs_head_scores:
            shares = load_head_shares(cfg.head_scores, num_layers, n_kv, cfg.head_temp)
        calibrated = load_calibrated(cfg.basis_path) if cfg.basis == "calibrated" else {}
        # Under tensor parallelism each rank keeps its KV heads' slice of the per-head inputs.
        shard = head_shard(config, n_kv)
        if shard is not None:
            shares = None if shares is None else shares[:, shard.heads].contiguous()
            calibrated = {i: (kb[shard.heads], vb[shard.heads]) for i, (kb, vb) in calibrated.items()}
        layer_types = getattr(text, "layer_types", None) or ["full_attention"] * num_layers
        layers: list[CacheLayerMixin] = []
        for i, kind in enumerate(layer_types[:num_layers]):
            if kind in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(sliding_window=text.sliding_window))
                continue
            if cfg.basis == "calibrated" and i not in calibrated:
                raise ValueError(f"calibrated basis {cfg.basis_path} has no layer {i}; it was made for another model")
            layers.append(
                MixedDimLayer(
                    cfg, i, num_layers, dims, None if shares is None else shares[i], calibrated.get(i), shard,
                    max_new_tokens, record_selection,
                )
            )
        super().__init__(layers=layers)
        self.cfg, self.shard = cfg, shard

    # Host counts, the pending prompt and the layer handed to the attention function are Python
    # state a compiled graph must neither freeze into guards nor replay without: under Dynamo the
    # update runs outside the graph, as the patched attention does (hf/patch.py).
    @torch.compiler.disable
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        _STATE.layer = layer if isinstance(layer, MixedDimLayer) else None
        _STATE.layer_idx = layer_idx
        return out

    def set_decoded(self, n_total: int) -> None:
        """Set every compressed layer's length to `n_total` tokens (prompt + decoded); fixed-region
        caches only (see `MixedDimLayer.set_decoded`)."""
        for layer in self.layers:
            if not isinstance(layer, MixedDimLayer):
                raise RuntimeError(f"set_decoded: layer {type(layer).__name__} is not a compressed layer")
            layer.set_decoded(n_total - layer.n_prompt)

    def stored_bytes(self) -> int:
        """Bytes of every tensor this cache allocated: stores, prompt bases, bookkeeping, new tokens."""
        return sum(_layer_bytes(layer, stored=True) for layer in self.layers)

    def full_bytes(self) -> int:
        """Bytes a plain cache would hold for the same tokens."""
        return sum(_layer_bytes(layer, stored=False) for layer in self.layers)

    # The budget is a share of the prompt's cache; tokens decoded after compression are stored whole
    # on top of it by every method, and `stored_bytes` / `full_bytes` count them. These two compare
    # like with like: the compressed layers' prompt stores against a plain cache of their prompt.
    def prompt_stored_bytes(self) -> int:
        """Bytes of the compressed prompt stores (bases and bookkeeping included), without decoded tokens."""
        return sum(layer.prompt_stored_bytes() for layer in self.layers if isinstance(layer, MixedDimLayer))

    def prompt_full_bytes(self) -> int:
        """Bytes a plain cache would hold for the prompt in the compressed layers."""
        return sum(layer.prompt_full_bytes() for layer in self.layers if isinstance(layer, MixedDimLayer))

    def shared_bytes(self) -> int:
        """Calibrated bases: stored once per model, not per prompt (like weights)."""
        return sum(
            layer.store.shared_bytes() for layer in self.layers if isinstance(layer, MixedDimLayer) and layer.store
        )


def _layer_bytes(layer: CacheLayerMixin, stored: bool) -> int:
    if isinstance(layer, MixedDimLayer):
        return layer.stored_bytes() if stored else layer.full_bytes()
    # Sliding-window layers are what a plain cache holds too: same bytes either way.
    if not layer.is_initialized:
        return 0
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()

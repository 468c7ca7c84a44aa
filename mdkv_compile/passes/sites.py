"""torch.library custom ops (namespace `mdkv`) for compiled graphs.

Two stateful ops serve the `mixeddimkv` backend (backends/torch_compile.py), one per cache kind:

    mdkv::site_attention(q, k_past, v_past, k_new, v_new, mask, scale, site, past_is_placeholder) -> out
        concat caches (DynamicCache, tuple pasts): the past length comes from k_past's shape
    mdkv::site_attention_buffer(q, k_new, v_new, positions, mask, scale, site, fixed_region) -> out
        static KV buffers written in place at `positions` (read on the host)

Both keep a `MixedDimLayer` per site key in this process (`_advance_site`; see
docs/compile_pass.md, "State"); `compiled_cache_bytes()` sums their bytes, `reset_sites()` drops them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import threading

import torch

from mdkv_compile.cache import MixedDimLayer
from mdkv_compile.config import MixedDimKVConfig

# --- the backend's stateful site op --------------------------------------------------------------

_SITES: dict[str, MixedDimLayer] = {}
_SITE_CONFIGS: dict[str, tuple[MixedDimKVConfig, int, int]] = {}
# A number per site state, new at every prompt: a captured decode graph is valid for one state only.
_GENERATIONS: dict[str, int] = {}
_NEXT_GENERATION = itertools.count(1)
_LOCK = threading.Lock()


def register_site(site: str, cfg: MixedDimKVConfig, layer_idx: int, num_layers: int) -> None:
    """Declare a site key (done by the backend at compile time). A recompile mid-sequence (the
    decode graph is compiled after the prefill ran) must keep the site's state; the key holds
    the config's hash, so a new config is a new key."""
    with _LOCK:
        _SITE_CONFIGS[site] = (cfg, layer_idx, num_layers)


def site_generations(sites: list[str]) -> tuple[int | None, ...]:
    """The state number of each site (None: no prompt yet). It changes at every new prompt of a
    site and at `reset_sites()`, which is when a CUDA graph captured over the old state is stale."""
    return tuple(_GENERATIONS.get(site) for site in sites)


def site_key_prefix(cfg: MixedDimKVConfig) -> str:
    """The part of every site key that names the config (`sha1(config)[:8] + ":"`)."""
    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:8] + ":"


def site_layer(site: str) -> MixedDimLayer | None:
    """The `MixedDimLayer` holding a site's current compressed state (None before its prefill)."""
    return _SITES.get(site)


def site_layers(
    cfg: MixedDimKVConfig | dict | None = None, model: torch.nn.Module | None = None
) -> dict[str, MixedDimLayer]:
    """Every site's `MixedDimLayer` (site key -> layer) that has run a prefill, restricted to the
    sites compiled under `cfg` (a config or the backend's `options` dict) and to the attention
    modules of `model` (matched by module path, e.g. `model.layers.0.self_attn`) when given.
    Site keys name a config and a module path, not a model object: two models of the same
    architecture compiled with the same config share their sites (docs/compile_pass.md)."""
    if isinstance(cfg, dict):  # the backend's options: config fields, and perhaps the compile mode
        cfg = MixedDimKVConfig.from_options({k: v for k, v in cfg.items() if k != "mode"})
    prefix = "" if cfg is None else site_key_prefix(cfg)
    paths = None
    if model is not None:
        paths = {name for name, _ in getattr(model, "_orig_mod", model).named_modules() if name}
    with _LOCK:
        return {
            key: layer
            for key, layer in _SITES.items()
            if key.startswith(prefix) and (paths is None or key.split(":", 1)[1] in paths)
        }


def compiled_cache_bytes(cfg: MixedDimKVConfig | dict | None = None, model: torch.nn.Module | None = None) -> int:
    """Bytes of the compressed KV state the `mixeddimkv` backend keeps for the current sequence:
    `MixedDimLayer.stored_bytes()` summed over `site_layers(cfg, model)`. This is a compiled
    model's real KV cache: the model's own cache only holds shape placeholders
    (docs/compile_pass.md, "State")."""
    return sum(layer.stored_bytes() for layer in site_layers(cfg, model).values())


def compiled_full_bytes(cfg: MixedDimKVConfig | dict | None = None, model: torch.nn.Module | None = None) -> int:
    """Bytes a plain KV cache would hold for the same sites and tokens (`full_bytes()` summed)."""
    return sum(layer.full_bytes() for layer in site_layers(cfg, model).values())


def reset_sites() -> None:
    """Drop every site's compressed state (the next call of each site is a prefill again)."""
    with _LOCK:
        _SITES.clear()
        _GENERATIONS.clear()


def _past_length(past: torch.Tensor) -> int:
    """Tokens in a concat cache's past part: [B, H, S, d], or the legacy empty 1-D tensor that
    `torch.cat` skips (HF DynamicLayer's first step)."""
    if past.dim() == 4:
        return past.shape[-2]
    if past.dim() == 1 and past.shape[0] == 0:
        return 0
    raise RuntimeError(f"mdkv site: past keys of shape {tuple(past.shape)} are neither [B, H, S, d] nor empty")


def _advance_site(
    site: str, start: int, key_new: torch.Tensor, value_new: torch.Tensor, where: str, max_new_tokens: int | None = None
):
    """The site's `MixedDimLayer` after this call's new tokens, written at position `start`, are in
    it. `start == 0` is a prompt: a fresh state holding them pending (the next `attend` is exact
    attention over them, then compresses), with a fixed decode region of `max_new_tokens` slots
    when given. `start > 0` continues the state, which must cover exactly `start` tokens (else
    RuntimeError: nothing is changed). `where` describes the call for the error messages (e.g.
    "the model's cache holds 45 tokens")."""
    cfg, layer_idx, num_layers = _SITE_CONFIGS[site]
    if start == 0:
        layer = MixedDimLayer(
            cfg, layer_idx, num_layers, cfg.resolve_dims(key_new.shape[-1]), max_new_tokens=max_new_tokens
        )
        layer.lazy_initialization(key_new, value_new)
        layer.pending = (key_new, value_new)
        _SITES[site] = layer
        _GENERATIONS[site] = next(_NEXT_GENERATION)
        return layer
    layer = _SITES.get(site)
    if layer is None:
        raise RuntimeError(
            f"mdkv site {site}: {where} but no compressed prompt (the cache was filled outside the compiled "
            "model, or reset_sites() ran mid-sequence)"
        )
    if layer.get_seq_length() != start:
        raise RuntimeError(
            f"mdkv site {site}: {where} but the compressed state covers {layer.get_seq_length()} (a cache "
            "from another sequence or another run, or calls out of order)"
        )
    layer.update(key_new, value_new)
    return layer


@torch.library.custom_op("mdkv::site_attention", mutates_args=())
def site_attention(
    query: torch.Tensor,
    key_past: torch.Tensor,
    value_past: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    site: str,
    past_is_placeholder: bool,
) -> torch.Tensor:
    """Attention of one rewritten site over its cache `cat([past, new], -2)`. Of `key_past` /
    `value_past` only the shape is read (the past length S): the keys themselves are the site's
    compressed state. S == 0 is a prompt: exact attention over `key_new`/`value_new`, then the
    prompt is compressed with the site's queries into a fresh state. S > 0 is a decode step: the
    state must cover exactly S tokens, the new tokens are appended and attend over store + new
    tokens. Exactly `MixedDimLayer.attend` of the eager path, so compiled and eager tokens agree.

    `past_is_placeholder`: the graph returns zero-stride placeholders instead of the concatenated
    cache, so a past with a real sequence stride was not made by this backend (it came from an
    uncompiled run or another cache) and is refused rather than silently ignored."""
    past = _past_length(key_past)
    if _past_length(value_past) != past:
        raise RuntimeError(f"mdkv site {site}: past keys hold {past} tokens, past values {_past_length(value_past)}")
    if past_is_placeholder and past > 1 and (key_past.stride(-2) != 0 or value_past.stride(-2) != 0):
        raise RuntimeError(
            f"mdkv site {site}: the past keys/values hold real data (sequence stride "
            f"{key_past.stride(-2)}), not the placeholders this backend returns: a cache filled by an "
            "uncompiled model (or another cache) cannot be continued by the compiled one"
        )
    layer = _advance_site(site, past, key_new, value_new, f"the model's cache holds {past} tokens")
    with torch.no_grad():
        return layer.attend(query, mask, scale, None).contiguous()


@site_attention.register_fake
def _(query, key_past, value_past, key_new, value_new, mask, scale, site, past_is_placeholder):
    return query.new_empty(query.shape)  # contiguous, as the real op returns


@torch.library.custom_op("mdkv::site_attention_buffer", mutates_args=())
def site_attention_buffer(
    query: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    site: str,
    fixed_region: bool = False,
) -> torch.Tensor:
    """Attention of one rewritten site whose cache is a static KV buffer written in place
    (gpt-fast / torchtune / HF StaticCache: `k_cache.index_copy_(2, pos, k)`, `k_cache[:, :, pos] = k`).
    `key_new` / `value_new` are the values written, `positions` the write positions (1-D), `mask`
    the model's mask over the whole buffer ([B, 1|H, L, S_max], True = attend; its columns are
    absolute positions). The buffer itself is not an argument: the op never reads it.

    The positions are read on the host (a device sync on GPU; the op is eager Python anyway) and
    must be L consecutive positions `start .. start+L-1`. `start == 0` is a prompt: exact attention
    over the new tokens, then compression with the site's queries into a fresh state. `start > 0`
    is a decode step or chunk: the state must cover exactly `start` tokens, the new tokens are
    appended and attend over store + new tokens. The mask is cut to its first `start + L`
    columns, the shape a concat cache's mask has, then everything is `MixedDimLayer.attend`.
    With `fixed_region` (sites compiled for CUDA graphs) the decoded tokens go to a fixed region of
    `S_max - L` slots (the buffer's positions after the prompt), written at a device count; while
    a graph is captured the op reads nothing on the host (`_capture_decode_step`)."""
    n_new = key_new.shape[-2]
    if query.is_cuda and torch.cuda.is_current_stream_capturing():  # (a CPU build cannot even ask)
        return _capture_decode_step(query, key_new, value_new, positions, scale, site)
    pos = positions.reshape(-1).tolist()
    start = int(pos[0]) if pos else 0
    if pos != list(range(start, start + n_new)):
        shown = pos if len(pos) <= 8 else [*pos[:4], "...", *pos[-2:]]
        raise RuntimeError(
            f"mdkv site {site}: the KV buffer write positions {shown} are not {n_new} consecutive positions "
            "(the backend supports writes of consecutive positions only)"
        )
    # A fixed region takes the buffer's positions after the prompt (the mask spans the buffer).
    region = None
    if fixed_region and start == 0 and mask is not None and mask.shape[-1] > n_new:
        region = mask.shape[-1] - n_new
    if mask is not None:
        if mask.shape[-1] < start + n_new:
            raise RuntimeError(
                f"mdkv site {site}: the mask covers {mask.shape[-1]} key positions, fewer than the "
                f"{start + n_new} written so far"
            )
        mask = mask[..., : start + n_new]
    layer = _advance_site(
        site, start, key_new, value_new, f"the model writes its KV buffer at position {start}", region
    )
    with torch.no_grad():
        return layer.attend(query, mask, scale, None).contiguous()


def _capture_decode_step(
    query: torch.Tensor,
    key_new: torch.Tensor,
    value_new: torch.Tensor,
    positions: torch.Tensor,
    scale: float | None,
    site: str,
) -> torch.Tensor:
    """A buffer site's decode step while a CUDA graph is captured (backends/site_graphs.py): no host
    read. The new token goes to the fixed region at the device count and attends through the
    decode kernel, which reads that count; a replay repeats exactly this. The mask was checked by
    the eager warm-up call of the same state (the capturer runs one first). A replay cannot raise,
    so layer 0's site checks the write position on the device: a step at any other position than
    the state's next one (a new one-token prompt, a rewound sequence) gives NaN outputs rather than
    silently continuing the old state."""
    layer = _SITES.get(site)
    if layer is None or getattr(layer, "max_new_tokens", None) is None or layer.store is None:
        raise RuntimeError(
            f"mdkv site {site}: captured into a CUDA graph without a compressed prompt and a fixed decode "
            "region (compile with mode='reduce-overhead' and run the prompt first)"
        )
    if query.shape[-2] != 1 or layer.cfg.kernel != "auto":
        # the PyTorch path slices the region by the host count, which a replay would not advance
        raise RuntimeError(
            f"mdkv site {site}: only one-token steps through the decode kernel (kernel='auto') can be captured"
        )
    expected = layer.n_decoded + layer.n_prompt  # the position of this step's token, before the write
    layer.update(key_new, value_new)
    with torch.no_grad():
        out = layer.attend(query, None, scale, None).contiguous()
        if layer.layer_idx == 0:
            wrong = positions.reshape(-1)[:1] != expected
            out = out.masked_fill(wrong, float("nan"))
        return out


@site_attention_buffer.register_fake
def _(query, key_new, value_new, positions, mask, scale, site, fixed_region=False):
    return query.new_empty(query.shape)  # contiguous, as the real op returns

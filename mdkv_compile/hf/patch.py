"""Hugging Face transformers integration: `patch(model, cfg)` and `unpatch(model)`.

`patch` registers MixedDimKV as an attention implementation (with transformers' SDPA mask
function under the same name: without one, transformers would silently pass no mask and padding
would be ignored), switches the model to it, and makes `generate()` and plain forward calls
create a `MixedDimCache` when none is given. Architectures whose attention does not go through
transformers' attention registry raise NotImplementedError naming them.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from mdkv_compile.cache import MixedDimCache, current_layer, model_dims
from mdkv_compile.config import MixedDimKVConfig
from mdkv_compile.core.attention import dense_attention

ATTN_NAME = "mixeddimkv"
_STATE_ATTR = "_mdkv_patch"


def mixeddimkv_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function. Returns [B, L, Hq, d] as the interface wants."""
    if dropout and module.training:
        raise NotImplementedError("MixedDimKV attention is for inference; dropout > 0 in training mode")
    layer = current_layer(getattr(module, "layer_idx", -1))
    if layer is None:
        # Not a MixedDimCache layer (sliding window, a DynamicCache, no cache): exact attention.
        out = dense_attention(query, key, value, attention_mask, scaling, softcap)
    elif torch.compiler.is_compiling():
        # Under torch.compile: compression is data-dependent Python (policies, packing), so it runs
        # outside the graph, one break per layer, rather than being traced (dozens of breaks and
        # recompiles); the cache keeps carrying the compressed state, so memory is saved.
        out = _attend_outside_graph(layer, query, attention_mask, scaling, softcap)
    else:
        out = layer.attend(query, attention_mask, scaling, softcap)
    return out.transpose(1, 2).contiguous(), None


@torch._dynamo.disable
def _attend_outside_graph(layer, query, mask, scaling, softcap) -> torch.Tensor:
    return layer.attend(query, mask, scaling, softcap)


@functools.cache
def _register() -> None:
    AttentionInterface.register(ATTN_NAME, mixeddimkv_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def check_supported(model: torch.nn.Module) -> None:
    name = type(model).__name__
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if not hasattr(model, "config") or can_set is None:
        raise NotImplementedError(f"{name} is not a transformers PreTrainedModel; use the compile backend")
    if not can_set():
        raise NotImplementedError(
            f"{name} ({model.config.model_type}) does not route attention through transformers' attention "
            "registry, so mdkv.patch cannot reach it; use torch.compile(model, backend='mixeddimkv')"
        )
    text = model.config.get_text_config(decoder=True)
    # Some causal LM configs carry a stale `is_decoder = False` (GPTNeoXConfig): then the attention
    # modules' own `is_causal` flags decide (BERT's LM head with is_decoder False stays rejected).
    if getattr(text, "is_encoder_decoder", False) or not (
        getattr(text, "is_decoder", True) or _attention_is_causal(model)
    ):
        raise NotImplementedError(f"{name}: only decoder-only causal LMs are supported")


def _attention_is_causal(model: torch.nn.Module) -> bool:
    """Every attention module that declares `is_causal` declares it True (and there is one)."""
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return bool(flags) and all(flags)


def patch(model: torch.nn.Module, cfg: MixedDimKVConfig | None = None) -> torch.nn.Module:
    """Make `model.generate()` (and forward calls without a cache) compress the KV cache.
    Patching again replaces the config. Returns the model. A model this cannot reach raises
    NotImplementedError; compiling it with the mixeddimkv backend is the caller's choice.

    Everything is checked before the model is touched, and a failure while patching undoes what
    was done, so a failed patch leaves the model as it was."""
    cfg = MixedDimKVConfig() if cfg is None else cfg
    if not isinstance(cfg, MixedDimKVConfig):
        raise TypeError(
            f"mdkv.patch(model, cfg): cfg must be a MixedDimKVConfig, not {type(cfg).__name__} "
            f"({cfg!r}); build one with MixedDimKVConfig(...) or MixedDimKVConfig.from_options(dict)"
        )
    check_supported(model)
    _, _, _, head_dim = model_dims(model.config)
    cfg.resolve_dims(head_dim)  # a dims that does not fit fails here, not mid-generation
    # Fail now on a missing head-score or basis file rather than at the first generate().
    MixedDimCache(model.config, cfg)
    _register()
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        state = {"orig_impl": model.config._attn_implementation}
        try:
            model.set_attn_implementation(ATTN_NAME)
            state["hook"] = model.register_forward_pre_hook(_inject_cache, with_kwargs=True)
            if callable(getattr(type(model), "generate", None)):  # a base model (no LM head) has none
                model.generate = _PatchedGenerate(model)
            setattr(model, _STATE_ATTR, state)
        except BaseException:
            _restore(model, state)
            raise
    state["cfg"] = cfg
    return model


class _PatchedGenerate:
    """The `generate` of a patched model: the class's own `generate`, given a MixedDimCache when the
    caller passes no cache. An object holding the model rather than a closure, so that
    `copy.deepcopy(model)` (which copies this instance attribute with the model) gives a copy whose
    `generate` runs the copy, and `unpatch` of one leaves the other patched."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.__doc__ = type(model).generate.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        if kwargs.get("past_key_values") is None:
            asked = kwargs.get("cache_implementation") or getattr(kwargs.get("generation_config"),
                                                                  "cache_implementation", None)
            if asked is not None:
                raise ValueError(
                    f"generate(cache_implementation={asked!r}) asks for another cache, but this model is patched "
                    "by mdkv.patch, whose generate() uses a MixedDimCache; drop the argument, or mdkv.unpatch the "
                    "model to use transformers' caches"
                )
            if getattr(model.generation_config, "cache_implementation", None) is not None:
                # the checkpoint's default cache gives way to the compressed one the patch is for
                kwargs["cache_implementation"] = None
            kwargs["past_key_values"] = MixedDimCache(model.config, getattr(model, _STATE_ATTR)["cfg"])
        return type(model).generate(model, *args, **kwargs)


def _inject_cache(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if kwargs.get("past_key_values") is None and kwargs.get("use_cache", module.config.use_cache) is not False:
        kwargs["past_key_values"] = MixedDimCache(module.config, getattr(module, _STATE_ATTR)["cfg"])
        return args, kwargs
    return None


def _restore(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Undo what `patch` did (as far as it got): the hook, `generate`, the attention implementation."""
    if "hook" in state:
        state["hook"].remove()
    if isinstance(vars(model).get("generate"), _PatchedGenerate):
        del model.generate  # the instance attribute; the class method shows through again
    if model.config._attn_implementation != state["orig_impl"]:
        model.set_attn_implementation(state["orig_impl"])
    vars(model).pop(_STATE_ATTR, None)


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restore the model as it was before `patch`."""
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        _restore(model, state)
    return model


def patched_config(model: torch.nn.Module) -> MixedDimKVConfig | None:
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else state["cfg"]

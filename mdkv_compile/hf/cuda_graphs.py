"""Decode steps of a transformers causal LM replayed as one CUDA graph.

An eager decode step of a 32-layer model is hundreds of kernel launches and Python calls; at
batch 8 that costs more than reading a compressed cache (docs/notes/gpu_notes.md). `GraphedDecoder`
captures the step once and replays it, so a step costs what its kernels cost:

    cache = mdkv.MixedDimCache(model.config, cfg, max_new_tokens=256)   # fixed decode region
    decoder, logits = GraphedDecoder.from_prompt(model, cache, prompt_ids)  # prefill, inference mode
    token = logits.argmax(-1, keepdim=True)
    for _ in range(n):
        token = decoder.step(token).argmax(-1, keepdim=True)

A prefill run outside `torch.inference_mode()` / `torch.no_grad()` keeps the autograd graph of the
whole prompt alive for as long as its output lives (measured on the H200, Llama-3-8B shape with 8
layers, batch 4 x 16K: 106 GiB against 11): `from_prompt` runs it in inference mode, and `step`
runs in inference mode too.

It needs a cache whose decode step has fixed shapes and addresses and keeps its lengths on the
device: a `MixedDimCache` made with `max_new_tokens` (after its prefill), or transformers'
`StaticCache` (the full-cache reference). The step's inputs are copied into fixed buffers; the
captured graph reads them, so replay `n` computes what an eager call would.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any

import torch

from mdkv_compile.cache import MixedDimCache, MixedDimLayer


@functools.cache
def _warmup_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every capture: cuBLAS keeps a workspace per stream (32 MiB on
    an H200, never released), so a new stream per decoder would leak that much each time."""
    return torch.cuda.Stream(device=device)


def _check_cache(cache) -> None:
    from transformers import StaticCache

    if isinstance(cache, StaticCache):
        return
    if not isinstance(cache, MixedDimCache):
        raise TypeError(f"GraphedDecoder needs a MixedDimCache or a StaticCache, not {type(cache).__name__}")
    for i, layer in enumerate(cache.layers):
        if not isinstance(layer, MixedDimLayer):
            raise ValueError(f"GraphedDecoder: layer {i} ({type(layer).__name__}) grows by concatenation")
        if layer.max_new_tokens is None:
            raise ValueError("GraphedDecoder: make the cache with MixedDimCache(..., max_new_tokens=n)")
        if layer.store is None:
            raise ValueError("GraphedDecoder: run the prefill (a forward over the prompt) before decoding")


class GraphedDecoder:
    """One-token decode steps of `model` over `cache`, captured on the first `step` and replayed."""

    def __init__(self, model: torch.nn.Module, cache, warmup: int = 2) -> None:
        _check_cache(cache)
        self.model, self.cache, self.warmup = model, cache, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        # tokens in the cache, kept on the host (the device keeps its own count); read once here
        self.length = int(cache.get_seq_length())

    @classmethod
    def from_prompt(
        cls, model: torch.nn.Module, cache, input_ids: torch.Tensor, warmup: int = 2, **kwargs
    ) -> tuple[GraphedDecoder, torch.Tensor]:
        """Prefill `input_ids` [B, N] into `cache` under `torch.inference_mode()` (`kwargs` go to the
        model, e.g. `attention_mask`), then make the decoder. Returns it and the next-token logits [B, V]."""
        with torch.inference_mode():
            out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1, **kwargs)
        return cls(model, cache, warmup), out.logits[:, -1]

    @property
    def captured_shape(self) -> torch.Size | None:
        """The shape of the token ids the step was captured for (None before the first step): a replay
        takes no other."""
        return None if self._ids is None else self._ids.shape

    def _rewind(self, length: int) -> None:
        """Undo the warm-up runs: set the cache's length back to `length`."""
        if isinstance(self.cache, MixedDimCache):
            self.cache.set_decoded(length)
        else:
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(length)

    def _forward(self) -> torch.Tensor:
        out = self.model(
            input_ids=self._ids, position_ids=self._positions, past_key_values=self.cache,
            use_cache=True, logits_to_keep=1,
        )
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Decode `tokens` ([B, 1] token ids on the model's device) at `positions` ([B, 1], e.g. what
        `generate()` computes from a padded batch's mask; default: the cache's length for every row).
        Returns the next-token logits [B, vocab]: a buffer the next step overwrites (clone it to keep it)."""
        if tokens.dim() != 2 or tokens.shape[1] != 1:
            raise ValueError(f"GraphedDecoder.step takes [batch, 1] token ids, got {tuple(tokens.shape)}")
        if positions is not None and positions.shape != tokens.shape:
            raise ValueError(f"GraphedDecoder.step: positions {tuple(positions.shape)} for tokens "
                             f"{tuple(tokens.shape)}")
        length = self.length
        if isinstance(self.cache, MixedDimCache):
            if self.cache.get_seq_length() != length:
                # positions are kept here, not read back: a step run outside the decoder would be
                # silently mis-positioned
                raise RuntimeError(
                    f"GraphedDecoder: the cache holds {self.cache.get_seq_length()} tokens but the decoder counted "
                    f"{length}; do not mix graphed steps with other forward calls on the same cache"
                )
            if any(layer.n_new >= layer.max_new_tokens for layer in self.cache.layers):
                raise RuntimeError(
                    "GraphedDecoder: the decode region is full; make the cache with a larger max_new_tokens"
                )
        with torch.inference_mode():
            if self.graph is None:
                self._capture(tokens, length, positions)
            else:
                if tokens.shape != self._ids.shape:
                    raise ValueError(f"batch changed from {self._ids.shape[0]} to {tokens.shape[0]} after capture")
                self._ids.copy_(tokens)
                if positions is None:
                    self._positions.fill_(length)
                else:
                    self._positions.copy_(positions)
                self.graph.replay()
        if isinstance(self.cache, MixedDimCache):
            # the replay advanced the device counts; the host counts follow
            for layer in self.cache.layers:
                layer.n_new += 1
        self.length += 1
        return self.logits

    def _capture(self, tokens: torch.Tensor, length: int, positions: torch.Tensor | None) -> None:
        if tokens.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError(
                f"GraphedDecoder needs CUDA (it captures the step as a CUDA graph); the tokens are on "
                f"{tokens.device}. On a CPU decode with plain forward calls (mdkv_compile.testing.decode_n_tokens)"
            )
        self._ids = tokens.clone()
        self._positions = (torch.full((tokens.shape[0], 1), length, dtype=torch.long, device=tokens.device)
                           if positions is None else positions.to(torch.long).clone())
        stream = _warmup_stream(tokens.device)
        stream.wait_stream(torch.cuda.current_stream(tokens.device))
        with torch.cuda.stream(stream):  # warm-up off the capture stream, as CUDA graphs require
            for _ in range(self.warmup):
                self._forward()
                self._rewind(length)
        torch.cuda.current_stream(tokens.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        self._rewind(length)  # capture ran the Python (host counts moved) but no kernel
        self.graph.replay()


def replayable(cache: Any, input_ids: Any) -> bool:
    """Whether a forward call over `input_ids` and `cache` is a decode step a `GraphedDecoder` can
    replay: one token per sequence on a CUDA device, over a prefilled fixed-region MixedDimCache with a
    free slot in every layer."""
    return (isinstance(input_ids, torch.Tensor) and input_ids.is_cuda and input_ids.dim() == 2
            and input_ids.shape[1] == 1 and isinstance(cache, MixedDimCache) and bool(cache.layers)
            and all(isinstance(layer, MixedDimLayer) and layer.max_new_tokens is not None and layer.store is not None
                    and layer.n_new < layer.max_new_tokens for layer in cache.layers))


class GenerateSteps:
    """The decode-step callable `generate()` takes from `model.get_compiled_call(...)`, for a patched
    model: one-token steps over a fixed-region MixedDimCache replayed from a CUDA graph (one
    `GraphedDecoder` per cache, captured on its first step), every other call `fallback` (transformers'
    own compiled call). The step's `position_ids` go into the graph (a padded batch's positions come
    from its mask); its attention mask does not: the store recorded the prompt's padding at prefill,
    and a decoded token is always valid in `generate()`."""

    # the keyword arguments of transformers' decode-step call that a replay honours
    _ARGS = frozenset({"input_ids", "position_ids", "cache_position", "past_key_values", "attention_mask",
                       "use_cache", "return_dict", "logits_to_keep"})

    def __init__(self, model: torch.nn.Module, fallback: Callable[..., Any]) -> None:
        self.model, self.fallback = model, fallback
        self.decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> GraphedDecoder

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ids, cache = kwargs.get("input_ids"), kwargs.get("past_key_values")
        positions, keep = kwargs.get("position_ids"), kwargs.get("logits_to_keep", 1)
        if (args or not set(kwargs) <= self._ARGS or not (isinstance(keep, int) and keep in (0, 1))
                or kwargs.get("use_cache") is False or not replayable(cache, ids)
                or (positions is not None and positions.shape != ids.shape)):
            return self.fallback(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        decoder = self.decoders.get(cache)
        if (decoder is None or decoder.length != cache.get_seq_length()
                or decoder.captured_shape not in (None, ids.shape)):
            decoder = self.decoders[cache] = GraphedDecoder(self.model, cache)
        logits = decoder.step(ids, positions)
        return CausalLMOutputWithPast(logits=logits[:, None], past_key_values=cache)


def compile_regions(model: torch.nn.Module) -> int:
    """Compile the model's MLP and RMSNorm modules with Inductor, in place (`Module.compile`), and
    return how many. Regional compilation: attention and the cache stay eager Python (their state
    lives in Python objects), while the elementwise chains around them (norm: 6 kernels -> 1, gated
    MLP activation: 2 -> 1) are fused; under a `GraphedDecoder` this removes kernels from every
    replayed step. Identical layers share one compiled graph."""
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name.endswith("MLP") or name.endswith("RMSNorm"):
            module.compile()
            count += 1
    return count


__all__ = ["GenerateSteps", "GraphedDecoder", "compile_regions", "replayable"]

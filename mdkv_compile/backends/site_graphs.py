"""CUDA graphs for the `mixeddimkv` backend's decode graphs (`mode="reduce-overhead"`).

Inductor's own CUDA graphs (cudagraph trees) replay a graph without running any Python, so they
cannot know that a rewritten site's compressed state was replaced by a new prompt: a replay would
keep reading and writing the old sequence's tensors. This wrapper does the capture itself and
keys every captured graph on the state numbers of its sites (`passes.sites.site_generations`):

* call 1 with a new state (or new shapes): eager, the warm-up (Triton autotuning, lazy inits; the
  site op checks the positions there);
* call 2: capture (the site op takes its device-only path, `passes.sites._capture_decode_step`), then
  one replay, which performs this call;
* later calls: copy the inputs into the captured ones, replay. The last replayed capture is tried
  first, by object identity of its static tensors (`_Capture.takes`): a signature of every
  argument, hundreds of parameters, cost more Python per step than the replay itself.

Only graphs whose every rewritten site is a static-KV-buffer decode step (one query token) are
wrapped: their step writes the new token at a device count and the decode kernel reads that
count, so a replay is the same step. Prompt graphs and concat-cache graphs run without CUDA graphs
(their site op keeps host state). Static inputs (parameters, module buffers, tensors marked with
`torch._dynamo.mark_static_address`, any input the graph writes in place, and zero-stride inputs
such as the placeholders the backend leaves in transformers' StaticCache) are read where they are:
if one moves, the graph is captured again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mdkv_compile.passes.graph_writes import writes_into
from mdkv_compile.passes.sites import site_generations, site_layer

log = logging.getLogger(__name__)

# What the wrappers did in this process (benchmarks and GPU checks read it): eager warm-up calls,
# captures, replays.
STATS = {"warmups": 0, "captures": 0, "replays": 0}


def _signature(args: Sequence[Any]) -> tuple:
    """What a capture is specific to besides addresses: shapes, strides, dtypes and plain values."""
    return tuple(
        (tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args
    )


def _layers(sites: Sequence[str]) -> list:
    return [site_layer(site) for site in sites]


@dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph
    inputs: list[Any]  # what the graph reads: the caller's static tensors, copies of the others
    static: list[int]  # positions of the static tensors
    outputs: list[Any]
    generations: tuple[int | None, ...]
    # Per output: a view of a static input (the caller's own tensor, handed out as it is) or graph
    # memory, which the next replay overwrites (handed out as a copy). Static inputs do not move
    # while the capture is used, so this is decided once.
    owned: list[bool]
    layers: list  # the sites' MixedDimLayers of this state (fixed while `generations` holds)
    dynamic: list[int]  # positions of every other argument
    dynamic_signature: tuple  # `_signature` of those arguments at capture (the caller's, not the copies)
    # Addresses of the static tensors at capture: what the graph reads and writes. Kept apart from
    # the tensors, whose storage may be swapped under the same object (`set_`).
    static_ptrs: list[int]

    def takes(self, args: Sequence[Any]) -> bool:
        """Whether `args` are this capture's call: the very same static tensor objects (parameters,
        KV buffers), still at their captured addresses, and other arguments of the same signature.
        Per decode step this replaces `_signature` over every argument (a hundred parameters and
        buffers at 8 Llama layers: 0.28 ms of Python per step on an H100's host). A static tensor
        resized in place keeps its identity and address and is not caught here; nothing in a
        transformers decode step does that to a parameter or a cache buffer."""
        inputs = self.inputs
        return (
            len(args) == len(inputs)
            and all(args[i] is inputs[i] for i in self.static)
            and self.static_in_place(args)
            and _signature([args[i] for i in self.dynamic]) == self.dynamic_signature
        )

    def static_in_place(self, args: Sequence[Any]) -> bool:
        """Whether the static arguments of `args` sit at the addresses this capture reads and writes."""
        return all(args[i].data_ptr() == ptr for i, ptr in zip(self.static, self.static_ptrs, strict=True))


class SiteGraphs:
    """An Inductor-compiled decode graph (`compile_fx` output) replayed as CUDA graphs."""

    def __init__(self, compiled: Callable[..., Any], sites: Sequence[str], written: set[int]) -> None:
        self.compiled, self.sites, self.written = compiled, list(sites), written
        self._captures: dict[tuple, _Capture] = {}
        self._warm: dict[tuple, tuple[int | None, ...]] = {}  # signature -> state of its eager warm-up
        self._last: _Capture | None = None  # the capture of the last replay: the next step's, as a rule

    def __call__(self, *args: Any) -> Any:
        last = self._last
        if last is not None and not torch.cuda.is_current_stream_capturing() and last.takes(args) and (
            last.generations == site_generations(self.sites)
        ):
            return self._replay(last, args)  # a decode step like the last one: no full signature
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not tensors or not all(t.is_cuda for t in tensors) or torch.cuda.is_current_stream_capturing():
            return self.compiled(*args)
        signature = _signature(args)
        generations = site_generations(self.sites)
        capture = self._captures.get(signature)
        if capture is not None and capture.generations == generations and capture.static_in_place(args):
            return self._replay(capture, args)
        if self._warm.get(signature) != generations or None in generations:
            # captures of older states (any shape) are stale: drop them and the memory they hold
            self._captures = {sig: c for sig, c in self._captures.items() if c.generations == generations}
            self._last = None
            out = self.compiled(*args)
            STATS["warmups"] += 1
            # the state after the call: a one-token prompt makes a new state, whose first decode
            # step must then be a warm-up again
            self._warm[signature] = site_generations(self.sites)
            return out
        capture = self._capture(args, generations)
        self._captures[signature] = capture
        return self._replay(capture, args, copy_inputs=False)

    def _is_static(self, index: int, arg: Any) -> bool:
        # A zero-stride input (the backend's cache placeholders: one position of storage expanded to
        # the cache's shape) is read where it is: a copy would be dense, the whole cache's size.
        overlapping = any(stride == 0 and size > 1 for size, stride in zip(arg.shape, arg.stride(), strict=True))
        return index in self.written or overlapping or isinstance(arg, torch.nn.Parameter) or (
            getattr(arg, "_dynamo_static_input_type", None) is not None
        )

    def _capture(self, args: list[Any], generations: tuple[int | None, ...]) -> _Capture:
        static = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and self._is_static(i, a)]
        inputs = [
            a.clone(memory_format=torch.preserve_format) if isinstance(a, torch.Tensor) and i not in static else a
            for i, a in enumerate(args)
        ]
        layers = _layers(self.sites)
        decoded = [layer.n_new for layer in layers]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.compiled(*inputs)
        # The capture ran the sites' Python (host counts moved) but no kernel: the replay does the step.
        for layer, n in zip(layers, decoded, strict=True):
            layer.n_new = n
        STATS["captures"] += 1
        log.info("mixeddimkv: captured a CUDA graph of a decode step over %d sites", len(self.sites))
        storages = {args[i].untyped_storage().data_ptr() for i in static}
        owned = [isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in storages for o in outputs]
        dynamic = [i for i in range(len(args)) if i not in static]
        return _Capture(graph, inputs, static, list(outputs), generations, owned, layers, dynamic,
                        _signature([args[i] for i in dynamic]), [args[i].data_ptr() for i in static])

    def _replay(self, capture: _Capture, args: Sequence[Any], copy_inputs: bool = True) -> list[Any]:
        if copy_inputs:
            for i in capture.dynamic:
                arg, mine = args[i], capture.inputs[i]
                if isinstance(arg, torch.Tensor) and arg is not mine:
                    mine.copy_(arg)
        capture.graph.replay()
        STATS["replays"] += 1
        self._last = capture
        for layer in capture.layers:
            layer.n_new += 1  # the replay advanced the device count; the host count follows
        return [
            o.clone() if isinstance(o, torch.Tensor) and not owned else o
            for o, owned in zip(capture.outputs, capture.owned, strict=True)
        ]


def written_inputs(gm: torch.fx.GraphModule) -> set[int]:
    """Positions (among the graph's inputs) of the inputs the graph writes in place, directly or
    through a view: the model's KV buffers. Their address is part of a capture."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {i for i, node in enumerate(placeholders) if writes_into(node)}


__all__ = ["STATS", "SiteGraphs", "written_inputs"]

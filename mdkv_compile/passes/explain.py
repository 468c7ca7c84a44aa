"""`mdkv.explain(model, *args)`: which attention sites the compile pass would rewrite, and why not.

Runs Dynamo with a backend that only records each graph (no Inductor), then runs the attention
finder on every graph. Also the `mdkv explain` subcommand.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mdkv_compile.assets import check_model_source, load_model
from mdkv_compile.passes.find_attention import AttentionSite, find_attention_sites
from mdkv_compile.testing import EXPLAIN_ARCHS, build_tiny_model
from mdkv_compile.usage import UsageError, as_usage_error, command, positive_int

__all__ = ["ExplainReport", "SiteReport", "add_arguments", "explain", "run"]


@dataclass
class SiteReport:
    """One attention site as the public API reports it."""

    location: str  # e.g. "model.layers.0.self_attn"
    kind: str  # "sdpa" | "manual"
    status: str  # "rewritten" | "skipped"
    reason: str  # "" when rewritten
    is_causal: bool
    group_size: int
    kv_cache: str  # "none" | "concat" | "buffer"
    graph_index: int  # which captured graph (graph breaks split a model into several)
    site: AttentionSite = field(repr=False)


@dataclass
class ExplainReport:
    sites: list[SiteReport]
    graph_breaks: int
    graphs: int
    break_reasons: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "rewritten"]

    @property
    def skipped(self) -> list[SiteReport]:
        return [s for s in self.sites if s.status == "skipped"]

    def __str__(self) -> str:
        head = ("#", "location", "kind", "status", "causal", "gqa", "cache", "reason")
        rows = [
            (
                str(i),
                s.location,
                s.kind,
                s.status,
                "yes" if s.is_causal else "no",
                str(s.group_size),
                s.kv_cache,
                s.reason or "-",
            )
            for i, s in enumerate(self.sites)
        ]
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head) - 1)]
        fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]  # noqa: E731
        lines = [fmt(head), fmt(tuple("-" * len(h) for h in head)), *(fmt(r) for r in rows)]
        lines.append(
            f"{len(self.rewritten)} of {len(self.sites)} attention sites rewritten; "
            f"{self.graphs} graph(s), {self.graph_breaks} graph break(s)"
        )
        lines.extend(f"  break: {r}" for r in self.break_reasons)
        return "\n".join(lines)


def capture_graphs(
    fn: Callable[..., Any], *args: Any, dynamic: bool | None = None, **kwargs: Any
) -> tuple[list[tuple[torch.fx.GraphModule, list[Any]]], int, list[str]]:
    """Run `fn` under Dynamo with a recording backend; (graphs with example inputs, breaks, reasons).

    `dynamic` is torch.compile's flag (True: symbolic sizes, as after a recompile on a new length)."""
    from torch._dynamo.utils import counters

    graphs: list[tuple[torch.fx.GraphModule, list[Any]]] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            torch.compile(fn, backend=record, dynamic=dynamic)(*args, **kwargs)
        breaks = counters["graph_break"]
        reasons = [str(r) for r in breaks]
        n_breaks = sum(breaks.values())
    finally:
        torch._dynamo.reset()
    return graphs, n_breaks, reasons


def explain(model: Callable[..., Any], *example_args: Any, **example_kwargs: Any) -> ExplainReport:
    """Trace `model(*example_args, **example_kwargs)` with Dynamo and report every attention site.

    A site is "rewritten" when the compile pass would replace it (proven causal self-attention),
    "skipped" otherwise, with the reason.
    """
    graphs, n_breaks, reasons = capture_graphs(model, *example_args, **example_kwargs)
    root = model if isinstance(model, torch.nn.Module) else None
    sites: list[SiteReport] = []
    for gi, (gm, ex) in enumerate(graphs):
        for s in find_attention_sites(gm, ex, root=root):
            sites.append(
                SiteReport(
                    location=s.layer,
                    kind=s.kind,
                    status="rewritten" if s.rewritable else "skipped",
                    reason=s.reason,
                    is_causal=s.is_causal,
                    group_size=s.group_size,
                    kv_cache=s.kv_cache,
                    graph_index=gi,
                    site=s,
                )
            )
    return ExplainReport(sites=sites, graph_breaks=n_breaks, graphs=len(graphs), break_reasons=reasons)


def example_inputs_for(model: torch.nn.Module, seq_len: int = 8) -> dict[str, Any]:
    """Random token ids for an HF model; encoder-decoders also get decoder ids (half as many)."""
    vocab = int(getattr(model.config, "vocab_size", 128))
    ids = torch.randint(3, vocab, (1, seq_len))
    if getattr(model.config, "is_encoder_decoder", False):
        return {"input_ids": ids, "decoder_input_ids": ids[:, : max(1, seq_len // 2)], "use_cache": False}
    return {"input_ids": ids}


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="'smollm2' (the bundled GGUF), a local model directory (from_pretrained) or a tiny arch name: "
        + ", ".join(EXPLAIN_ARCHS),
    )
    parser.add_argument(
        "--arch", choices=EXPLAIN_ARCHS, default=None, help="build a tiny random model of this architecture (offline)"
    )
    parser.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa", help="HF models")
    parser.add_argument("--seq-len", type=positive_int, default=8)
    parser.add_argument("--decode", action="store_true", help="also explain one decode step with a filled DynamicCache")


def _load(args: argparse.Namespace) -> torch.nn.Module:
    name = args.arch or args.model
    if name is None:
        raise UsageError("give --model PATH|smollm2 or --arch NAME")
    if name in EXPLAIN_ARCHS:
        return build_tiny_model(name, args.attn_implementation)
    try:
        check_model_source(name)
    except FileNotFoundError as e:
        raise as_usage_error(e) from None
    if name.lower() == "smollm2":
        # load_model's object is shared by the process: trace a copy with the asked attention
        model = copy.deepcopy(load_model("smollm2")[0])
        model.set_attn_implementation(args.attn_implementation)
        return model
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = AutoConfig.from_pretrained(name)
    loader = AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        return loader.from_pretrained(name, attn_implementation=args.attn_implementation).eval()
    except ValueError:  # encoders such as BERT have no causal-LM head
        return AutoModel.from_pretrained(name, attn_implementation=args.attn_implementation).eval()


@command("mdkv explain")
def run(args: argparse.Namespace) -> int:
    model = _load(args)
    inputs = example_inputs_for(model, args.seq_len)
    t0 = time.perf_counter()
    report = explain(model, **inputs)
    print(f"== prefill ({args.seq_len} tokens), traced in {time.perf_counter() - t0:.1f}s")
    print(report)
    if args.decode and not getattr(model.config, "is_encoder_decoder", False):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
        step = explain(
            model, input_ids=inputs["input_ids"][:, -1:], past_key_values=out.past_key_values, use_cache=True
        )
        print("\n== decode step (1 token, cached past)")
        print(step)
    return 0

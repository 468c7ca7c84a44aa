"""kvpress presses on the project's `kl` samples, run in kvpress's own venv (benchmarks/kvpress/setup.sh).

Started by benchmarks/kvpress_kl.py, which writes the samples (context and continuation token ids,
made by the project's `kl` task) and reads back what this writes. It does not import mdkv_compile:
kvpress pins transformers<5.3, the project 5.17.

Every cell repeats the project's two-forward structure (mdkv_compile/eval/runner.py,
continuation_logits): the context is prefilled under `with press(model):` into a DynamicCache (the
press compresses it at the end of each layer's attention; the prefill's last logit predicts the
first continuation token), then continuation[:-1] is fed as one chunk with explicit position ids
(the compressed cache is shorter than the tokens seen, as in kvpress's pipeline). Metric: mean
KL(full || press) over the continuation's next-token distributions and top-1 agreement, the full
cache being the same two forwards through a plain DynamicCache with the same attention
implementation as the press.

Phases:
  reference  full-cache logits per sample (sdpa, and eager when an eager press is asked for) saved to
             --work as full_<impl>_s<seed>.pt; sanity: a press at compression ratio 0 gives KL ~0
  presses    every press x budget x sample, one JSONL line per cell (resumable: done cells are skipped)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import kvpress  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from kvpress import (  # noqa: E402
    AdaKVPress,
    CriticalAdaKVPress,
    CriticalKVPress,
    CURPress,
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    LagKVPress,
    ObservedAttentionPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

transformers.utils.logging.disable_progress_bar()

# name -> (factory of a press at a compression ratio, attention implementation it needs)
PRESSES: dict[str, tuple[Callable[[float], Any], str]] = {
    "SnapKVPress": (lambda r: SnapKVPress(compression_ratio=r), "sdpa"),
    "SnapKVPress(window_size=32)": (lambda r: SnapKVPress(compression_ratio=r, window_size=32), "sdpa"),
    "StreamingLLMPress": (lambda r: StreamingLLMPress(compression_ratio=r), "sdpa"),
    "ExpectedAttentionPress": (lambda r: ExpectedAttentionPress(compression_ratio=r), "sdpa"),
    "TOVAPress": (lambda r: TOVAPress(compression_ratio=r), "sdpa"),
    "AdaKVPress(SnapKVPress)": (lambda r: AdaKVPress(SnapKVPress(compression_ratio=r)), "sdpa"),
    "AdaKVPress(ExpectedAttentionPress)": (
        lambda r: AdaKVPress(ExpectedAttentionPress(compression_ratio=r)), "sdpa"),
    "ObservedAttentionPress": (lambda r: ObservedAttentionPress(compression_ratio=r), "eager"),
    "KnormPress": (lambda r: KnormPress(compression_ratio=r), "sdpa"),
    "PyramidKVPress": (lambda r: PyramidKVPress(compression_ratio=r), "sdpa"),
    "KeyDiffPress": (lambda r: KeyDiffPress(compression_ratio=r), "sdpa"),
    "LagKVPress": (lambda r: LagKVPress(compression_ratio=r), "sdpa"),
    "CURPress": (lambda r: CURPress(compression_ratio=r), "sdpa"),
    "CriticalKVPress(SnapKVPress)": (lambda r: CriticalKVPress(SnapKVPress(compression_ratio=r)), "sdpa"),
    "CriticalAdaKVPress(SnapKVPress)": (lambda r: CriticalAdaKVPress(SnapKVPress(compression_ratio=r)), "sdpa"),
    "RandomPress": (lambda r: RandomPress(compression_ratio=r, seed=0), "sdpa"),
}
DEFAULT_PRESSES = (
    "SnapKVPress", "SnapKVPress(window_size=32)", "StreamingLLMPress", "ExpectedAttentionPress", "TOVAPress",
    "AdaKVPress(SnapKVPress)", "ObservedAttentionPress", "KnormPress",
)  # fmt: skip


def load(gguf_dir: str, gguf_file: str, impl: str, cache: dict[str, Any]) -> Any:
    if impl not in cache:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32, attn_implementation=impl
        )
        cache[impl] = model.eval()
        print(f"loaded {gguf_file} ({impl}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return cache[impl]


@torch.no_grad()
def continuation_logits(model: Any, ctx: list[int], cont: list[int], press: Any = None) -> tuple[torch.Tensor, dict]:
    """Logits [T, V] predicting each continuation token after the (compressed) context, and what the
    cache kept: the two forwards of the project's runner, with the press active in the first only."""
    cache = DynamicCache()
    x = torch.tensor([ctx])
    pos = torch.arange(len(ctx)).unsqueeze(0)
    layers = model.model.layers
    for layer in layers:  # AdaKV's head-wise masks live on the attention modules
        layer.self_attn.masked_key_indices = None
    t0 = time.perf_counter()
    if press is None:
        first = model(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    else:
        with press(model):
            first = model(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    lengths = [cache.get_seq_length(i) for i in range(len(layers))]
    n_kv = model.config.num_key_value_heads
    stored = sum(lengths) * n_kv
    masked = 0
    for layer in layers:
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        if idx is not None:
            masked += int(idx[0].numel())
    kept = (stored - masked) / (len(ctx) * n_kv * len(layers))
    logits = [first.logits[0, -1:].float()]
    if len(cont) > 1:
        y = torch.tensor([cont[:-1]])
        pos = torch.arange(len(ctx), len(ctx) + len(cont) - 1).unsqueeze(0)
        out = model(input_ids=y, position_ids=pos, past_key_values=cache, use_cache=True)
        logits.append(out.logits[0].float())
    for layer in layers:
        layer.self_attn.masked_key_indices = None
    info = {"kept_fraction": kept, "prefill_s": t1 - t0, "decode_s": time.perf_counter() - t1}
    return torch.cat(logits, 0), info


def kl_and_top1(ref_logp: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    logp = logits.log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    agree = (ref_logp.argmax(-1) == logp.argmax(-1)).float()
    return kl.mean().item(), agree.mean().item()


def impls_of(names: list[str]) -> list[str]:
    return sorted({PRESSES[n][1] for n in names} | {"sdpa"}, key=lambda s: s != "sdpa")


def reference_phase(args: argparse.Namespace, data: dict, models: dict) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"versions": versions(), "samples": []}
    for impl in impls_of(args.presses):
        model = load(data["gguf_dir"], data["gguf_file"], impl, models)
        for s in data["samples"]:
            if (work / f"full_{impl}_s{s['seed']}.pt").is_file():  # samples.json never changes under --work
                continue
            t0 = time.perf_counter()
            logits, info = continuation_logits(model, s["context_ids"], s["continuation_ids"])
            torch.save(logits, work / f"full_{impl}_s{s['seed']}.pt")
            print(f"full ({impl}) seed {s['seed']}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    # sanity: ratio 0 (nothing evicted) must give the full cache's distribution
    s = data["samples"][0]
    model = load(data["gguf_dir"], data["gguf_file"], "sdpa", models)
    ref = torch.load(work / f"full_sdpa_s{s['seed']}.pt").log_softmax(-1)
    for name in ("SnapKVPress", "AdaKVPress(SnapKVPress)"):
        logits, info = continuation_logits(model, s["context_ids"], s["continuation_ids"], PRESSES[name][0](0.0))
        kl, top1 = kl_and_top1(ref, logits)
        report.setdefault("ratio0", []).append({"press": name, "seed": s["seed"], "kl": kl, "top1": top1,
                                               "kept_fraction": info["kept_fraction"]})
        print(f"sanity: {name} at ratio 0: KL {kl:.2e}, top-1 {top1:.4f}", file=sys.stderr, flush=True)
        if kl > 1e-6 or info["kept_fraction"] != 1.0:
            print(f"FAILED sanity check: {name} at ratio 0 gives KL {kl:.3g}", file=sys.stderr)
            return 1
    if "eager" in models:  # how far eager attention is from sdpa on the full cache
        diffs = []
        for s in data["samples"]:
            a = torch.load(work / f"full_sdpa_s{s['seed']}.pt")
            b = torch.load(work / f"full_eager_s{s['seed']}.pt")
            diffs.append((a - b).abs().max().item())
        report["eager_vs_sdpa_max_abs_logit_diff"] = max(diffs)
    (work / "reference.json").write_text(json.dumps(report, indent=1))
    return 0


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {"kvpress": version("kvpress"), "transformers": transformers.__version__, "torch": torch.__version__}


def presses_phase(args: argparse.Namespace, data: dict, models: dict) -> int:
    out = Path(args.out)
    done = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            try:
                r = json.loads(line)
                done.add((r["press"], f"{r['budget']:g}", r["seed"]))
            except (json.JSONDecodeError, KeyError):
                continue
    cells = [(n, b, s) for n in args.presses for b in args.budgets for s in data["samples"]
             if (n, f"{b:g}", s["seed"]) not in done]
    refs: dict[tuple[str, int], torch.Tensor] = {}
    failed = 0
    t_start = time.perf_counter()
    with out.open("a") as sink:
        for i, (name, budget, s) in enumerate(cells):
            factory, impl = PRESSES[name]
            model = load(data["gguf_dir"], data["gguf_file"], impl, models)
            key = (impl, s["seed"])
            if key not in refs:
                refs[key] = torch.load(Path(args.work) / f"full_{impl}_s{s['seed']}.pt").log_softmax(-1)
            ratio = round(1.0 - budget, 10)
            t0 = time.perf_counter()
            try:
                logits, info = continuation_logits(model, s["context_ids"], s["continuation_ids"], factory(ratio))
            except Exception as e:  # noqa: BLE001 - one failing press must not stop the others
                failed += 1
                print(f"FAILED {name} @ {budget:g} seed {s['seed']}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            kl, top1 = kl_and_top1(refs[key], logits)
            rec = {
                "side": "kvpress", "press": name, "budget": budget, "compression_ratio": ratio,
                "seed": s["seed"], "kl": kl, "top1_agreement": top1, "attn_implementation": impl,
                "context_tokens": len(s["context_ids"]), "continuation_tokens": len(s["continuation_ids"]),
                "seconds": time.perf_counter() - t0, **info, **versions(),
            }  # fmt: skip
            sink.write(json.dumps(rec) + "\n")
            sink.flush()
            elapsed = time.perf_counter() - t_start
            print(
                f"[kvpress {i + 1}/{len(cells)}] {name} @ {budget:g} seed {s['seed']}: KL {kl:.4f} top-1 {top1:.3f} "
                f"kept {info['kept_fraction']:.4f} ({rec['seconds']:.1f} s, {elapsed / 60:.1f} min)",
                file=sys.stderr, flush=True,
            )  # fmt: skip
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=("reference", "presses"))
    p.add_argument("--samples", required=True, help="JSON written by benchmarks/kvpress_kl.py")
    p.add_argument("--work", required=True, help="folder of the full-cache logits")
    p.add_argument("--out", help="JSONL of the press cells (presses phase)")
    p.add_argument("--presses", default=",".join(DEFAULT_PRESSES), help=f"comma list of {', '.join(PRESSES)}")
    p.add_argument("--budgets", default="0.02,0.05,0.1", help="fractions of the tokens kept (ratio = 1 - budget)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    args.presses = [n.strip() for n in args.presses.split(",") if n.strip()]
    unknown = [n for n in args.presses if n not in PRESSES]
    if unknown:
        p.error(f"unknown press(es) {unknown}; known: {', '.join(PRESSES)}")
    args.budgets = [float(b) for b in args.budgets.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    data = json.loads(Path(args.samples).read_text())
    models: dict[str, Any] = {}
    print(f"kvpress {versions()['kvpress']} ({kvpress.__file__}), transformers {transformers.__version__}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr, flush=True)
    if args.phase == "reference":
        return reference_phase(args, data, models)
    if not args.out:
        p.error("the presses phase needs --out")
    return presses_phase(args, data, models)


if __name__ == "__main__":
    sys.exit(main())

"""Minimal reproduction of the crash of issue 14: `mode="reduce-overhead"` with
`cache_implementation="static"` died with a segmentation fault (exit 139) on an H200 right after
Inductor logged "skipping cudagraphs due to mutated inputs (24 instances)".

    python benchmarks/repro_reduce_overhead_static.py --out repro.json      # CUDA; about 2-4 minutes
    python benchmarks/repro_reduce_overhead_static.py --out repro.json --quick   # tiny shapes (CPU: no crash)

Each case runs in its own process (a segfault ends only that case: its exit status is recorded, with
whether Inductor's "skipping cudagraphs due to mutated inputs" line appeared and the end of its output):

    upstream        pytorch/pytorch#192748's own reproducer: a buffer allocated inside a reduce-overhead
                    region, passed back in and written in place on later calls
    inductor        unpatched Llama, torch.compile(mode="reduce-overhead") (Inductor) + generate(static):
                    transformers' StaticCache allocates its buffers inside the first compiled call and
                    every later graph writes them (index_copy_, cumulative_length.add_)
    mixeddimkv-old  the backend as it routed before the fix: the decode step's mask is a graph input
                    that the finder could not trust without the model, so no site was rewritten and the
                    graph went to Inductor's own reduce-overhead (the state of the crash)
    mixeddimkv      the backend now: the decode step's sites are rewritten and captured by
                    backends/site_graphs.py; Inductor's CUDA graphs are never turned on

Prediction (the cause): Inductor's CUDA graphs over graphs that write a cache the compiled region
allocated (#192748); the first three cases crash or skip CUDA graphs with the "mutated inputs"
line, the last one neither (its tokens are compared with the backend's default mode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SKIP_LINE = "skipping cudagraphs due to mutated inputs"
CASES = ("upstream", "inductor", "mixeddimkv-old", "mixeddimkv")


def _model(quick: bool):
    from mdkv_compile.testing import random_llama

    cuda = torch.cuda.is_available()
    config = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16) if quick else dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rope_theta=500000.0)
    return random_llama(attn_implementation="sdpa", dtype=torch.bfloat16 if cuda else torch.float32,
                        device="cuda" if cuda else "cpu", num_hidden_layers=2 if quick else 8,
                        bos_token_id=None, eos_token_id=None, pad_token_id=0, **config)


def _generate(model, quick: bool, **kwargs) -> list[list[int]]:
    batch, length = (2, 48) if quick else (4, 4096)
    ids = torch.randint(1, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids.to(model.device), max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)
    return out[:, length:].tolist()


def _old_backend(gm, example_inputs, *, mode=None, options=None):
    """The routing before the fix: the finder without the module (a mask input stays unproven, so
    the decode step has no rewritten site), the StaticCache's buffers kept and written, and
    Inductor's own reduce-overhead for site-free graphs."""
    from unittest import mock

    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from mdkv_compile.backends import torch_compile
    from mdkv_compile.backends.site_graphs import SiteGraphs, written_inputs
    from mdkv_compile.config import MixedDimKVConfig

    options = dict(options or {})
    mode = options.pop("mode", mode)
    cfg = MixedDimKVConfig.from_options(options)
    with mock.patch.object(torch_compile, "_own_buffer", lambda buf: False):
        report = torch_compile.rewrite_graph(gm, example_inputs, cfg, fixed_region=mode == "reduce-overhead")
    if report.rewritten:
        if report.one_token == report.rewritten and cfg.kernel == "auto":
            return SiteGraphs(compile_fx(gm, list(example_inputs)), report.rewritten, written_inputs(gm))
        return compile_fx(gm, list(example_inputs))
    with torch._inductor.config.patch(list_mode_options(mode)):
        return compile_fx(gm, list(example_inputs))


def case(name: str, quick: bool) -> dict:
    if name == "upstream":
        import torch.nn as nn

        class M(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = nn.Linear(64, 64)

            def forward(self, x, state=None):
                if state is None:  # first allocated inside the compiled region
                    state = torch.zeros_like(x)
                state.copy_(state + self.lin(x))  # then written in place on later calls
                return x + state, state

        device = "cuda" if torch.cuda.is_available() else "cpu"
        c = torch.compile(M().to(device).eval(), mode="reduce-overhead")
        with torch.no_grad():
            out, state = c(torch.randn(1, 64, device=device))
            for _ in range(5):
                out, state = c(torch.randn(1, 64, device=device), state)
        return dict(finished=True)
    model = _model(quick)
    options = {"budget": 0.0625, "mode": "reduce-overhead"}
    if name == "inductor":
        model.compile(mode="reduce-overhead")
        return dict(finished=True, tokens=_generate(model, quick, cache_implementation="static"))
    if name == "mixeddimkv-old":
        from torch._dynamo.backends.registry import register_backend

        register_backend(name="mixeddimkv_old")(_old_backend)
        model.compile(backend="mixeddimkv_old", options=options)
        return dict(finished=True, tokens=_generate(model, quick, cache_implementation="static"))
    from mdkv_compile.backends import site_graphs
    from mdkv_compile.backends.torch_compile import ensure_registered
    from mdkv_compile.passes.sites import reset_sites

    ensure_registered()
    model.compile(backend="mixeddimkv", options=options)
    graphed = _generate(model, quick, cache_implementation="static")
    stats = dict(site_graphs.STATS)
    torch._dynamo.reset()
    reset_sites()
    model.compile(backend="mixeddimkv", options={"budget": 0.0625})
    plain = _generate(model, quick, cache_implementation="static")
    same = [[a == b for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(graphed, plain, strict=True)]
    return dict(finished=True, site_graphs=stats, tokens_equal_to_default_mode=all(map(all, same)),
                token_agreement=sum(map(sum, same)) / sum(map(len, same)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print("MDKV-RESULT " + json.dumps(case(args.case, args.quick)), flush=True)
        return 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TORCH_LOGS": os.environ.get("TORCH_LOGS", "perf_hints")}  # where Inductor says why it skips
    rows = []
    for name in args.cases.split(","):
        print(f"{time.strftime('%H:%M:%S')} case {name}", flush=True)
        start = time.perf_counter()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name] + (["--quick"] if args.quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        text = proc.stdout + proc.stderr
        code = proc.returncode
        row = dict(case=name, returncode=code, wall_s=time.perf_counter() - start,
                   crashed=code < 0, signal=-code if code < 0 else None, skipping_line=SKIP_LINE in text,
                   skipping_lines=[ln.strip()[-200:] for ln in text.splitlines() if "skipping cudagraphs" in ln][:5])
        result = [line for line in proc.stdout.splitlines() if line.startswith("MDKV-RESULT ")]
        row.update(json.loads(result[-1].split(" ", 1)[1]) if result else dict(output_tail=text.splitlines()[-25:]))
        row.pop("tokens", None)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "output_tail"}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(dict(
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                torch=torch.__version__, cases=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

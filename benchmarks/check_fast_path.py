"""GPU check of issue 14: every path of the issue's table in one run, one process per path.

    python benchmarks/check_fast_path.py --out fast_path.json            # H100/H200: about 5-6 minutes
    python benchmarks/check_fast_path.py --out big.json --big            # 32 layers, batch 8 x 32K prompts
    python benchmarks/check_fast_path.py --out quick.json --quick        # tiny shapes: checks the script (CPU too)
    python benchmarks/check_fast_path.py --out big.json --big --baseline-prefill-chunk 4096 --timed-only   # H100

Model: a Llama-3-8B-shaped Llama with random bf16 weights (`mdkv_compile.testing.random_llama`), 8
layers (32 with `--big`), batch 4 x 16K-token prompts (8 x 32K), 32 greedy new tokens, budget 0.0625.

Paths (`--paths`, comma-separated; `--all` adds the ones marked extra):

    plain              transformers' generate(), DynamicCache, eager (the uncompressed reference)
    hf-static-compile  cache_implementation="static" + model.compile() (Inductor)
    patch              mdkv.patch + generate(), eager (the MixedDimKV reference tokens)
    mdkv-default       model.compile(backend="mixeddimkv", options) + generate()
    mdkv-static        ... + generate(cache_implementation="static")
    mdkv-mixedcache    mdkv.patch + model.compile(backend="mixeddimkv")
                       + generate(past_key_values=MixedDimCache(max_new_tokens))
    ro-default, ro-static, ro-mixedcache
                       the same three with options["mode"] = "reduce-overhead"
    graphed            mdkv.patch + MixedDimCache(max_new_tokens) + GraphedDecoder (the README recipe)
    floor              (extra) `graphed` over the first 16 tokens of each prompt: what every decode step of
                       this model and batch pays with no KV to speak of (weights, launches). A path at
                       5x plain generate() must be faster than this.
    hf-compile-config  mdkv.patch + MixedDimCache(max_new_tokens) + generate(compile_config=CompileConfig()):
                       transformers compiles the decode step (Inductor, reduce-overhead)
    torch-compile      (extra) torch.compile(model, backend="mixeddimkv", options).generate()

Per path, in its own process (a crash, e.g. a segfault, costs that row only: its exit status and the
end of its output are recorded): build the model; generate twice at the main shape (the first call
compiles; the second is where transformers' reused static cache brings its own recompile); then a
timed call at the same shape: ms per decode step (a LogitsProcessor takes a synchronised timestamp
after each new token: the differences are the decode steps, prefill excluded; median of the steps
after the first two, which capture CUDA graphs on the reduce-overhead paths), peak GiB of that
generate (torch.cuda.max_memory_allocated), GiB allocated after it (weights + what stays: the
compressed state), the compressed state's bytes; then two more generate() calls with other batch
sizes and prompt lengths (not with `--timed-only`). Graphs compiled (Dynamo's unique_graphs), graph
breaks, the backend's CUDA-graph warm-ups / captures / replays and Inductor's CUDA-graph skips are
counted per call.
Tokens of every call are compared with the reference path's (the eager MixedDimKV tokens for the
compressed paths, plain generate()'s for the others): equal, or the first divergence with both
paths' top-2 logit margins there (bf16 near-ties flip).

Processes run `--jobs` at a time (3 on a GPU): compiling overlaps, but a timed call runs alone: the
other workers are stopped (SIGSTOP to their process groups) for its length and then continued.
JSON is rewritten after every path (`--out`), with the issue's targets evaluated at the end.

`--baseline-prefill-chunk N`: the uncompressed baselines (`plain`, `hf-static-compile`) prefill their
prompts N tokens at a time (transformers' `prefill_chunk_size`). At 32 layers and batch 8 x 32K their
one-pass prefill does not fit an H100 (plain generate() asks for 7 GiB more at 75.9 GiB; the compiled
static cache's prefill allocates a 16 GiB mask); chunked, it holds an N-row slice of that. Their
decode steps, the ms per step the targets compare, are the same steps over a cache of the same shape;
their peak memory is then that of the chunked prefill, not of plain generate()'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from mdkv_compile.usage import positive_int

ROOT = Path(__file__).resolve().parents[1]
READY, GO, TIMED = "MDKV-READY", "GO", "MDKV-TIMED"


@dataclasses.dataclass(frozen=True)
class PathSpec:
    help: str
    compressed: bool  # compared with the eager MixedDimKV tokens (else with plain generate())
    cuda_only: bool = False
    extra: bool = False
    compare: bool = True  # tokens compared with the reference's (not for a path over other prompts)


PATHS = {
    "plain": PathSpec("transformers generate(), DynamicCache, eager", False),
    "hf-static-compile": PathSpec("cache_implementation='static' + model.compile() (Inductor)", False),
    "patch": PathSpec("mdkv.patch + generate(), eager", True),
    "mdkv-default": PathSpec("model.compile(backend='mixeddimkv') + generate(), default cache", True),
    "mdkv-static": PathSpec("model.compile(backend='mixeddimkv') + generate(cache_implementation='static')", True),
    "mdkv-mixedcache": PathSpec(
        "mdkv.patch + model.compile(backend='mixeddimkv') + MixedDimCache(max_new_tokens)", True
    ),
    "ro-default": PathSpec("mixeddimkv, mode reduce-overhead, default cache", True),
    "ro-static": PathSpec("mixeddimkv, mode reduce-overhead, cache_implementation='static'", True),
    "ro-mixedcache": PathSpec("mixeddimkv, mode reduce-overhead, mdkv.patch + MixedDimCache(max_new_tokens)", True),
    "graphed": PathSpec("mdkv.patch + MixedDimCache(max_new_tokens) + GraphedDecoder", True, cuda_only=True),
    "floor": PathSpec("GraphedDecoder over 16-token prompts: a decode step's weights and launches", True,
                      cuda_only=True, extra=True, compare=False),
    "hf-compile-config": PathSpec("mdkv.patch + MixedDimCache(max_new_tokens) + generate(compile_config=...)", True),
    "torch-compile": PathSpec("torch.compile(model, backend='mixeddimkv').generate()", True, extra=True),
}

FLOOR_PROMPT = 16  # tokens of the floor path's prompts

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
)
TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, max_position_embeddings=1024,
)


def shapes(args: argparse.Namespace) -> dict[str, Any]:
    """Model config and the (batch, prompt) of each call: main shape first, then the two others."""
    if args.quick:
        # no batch of 1: Dynamo specialises sizes 0 and 1, which would cost the third call a recompile
        return dict(config={**TINY, "num_hidden_layers": 2}, calls=[(2, 48), (3, 40), (4, 36)], new_tokens=6)
    if args.big:
        return dict(config={**LLAMA3_8B, "num_hidden_layers": 32}, calls=[(8, 32768), (4, 24576), (6, 16384)],
                    new_tokens=args.new_tokens)
    return dict(config={**LLAMA3_8B, "num_hidden_layers": 8}, calls=[(4, 16384), (2, 12288), (3, 8192)],
                new_tokens=args.new_tokens)


# --- worker: one path in this process -------------------------------------------------------------


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompt(batch: int, length: int, vocab: int, device: str, call: int) -> torch.Tensor:
    """The same prompt in every process: made on the host from a fixed seed."""
    gen = torch.Generator().manual_seed(1000 + call)
    return torch.randint(1, vocab, (batch, length), generator=gen).to(device)


def _counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    from mdkv_compile.backends import site_graphs

    return dict(
        graphs=counters["stats"]["unique_graphs"], breaks=sum(counters["graph_break"].values()),
        inductor_cudagraph_skips=counters["inductor"]["cudagraph_skips"], **site_graphs.STATS,
    )


class Runner:
    """What a path runs for one prompt: greedy new tokens [B, T], top-2 logits per step [T, B, 2],
    prefill seconds and the seconds of each decode step."""

    def __init__(self, name: str, model: torch.nn.Module, budget: float, new_tokens: int,
                 baseline_prefill_chunk: int | None = None) -> None:
        import mdkv_compile as mdkv

        self.name, self.model, self.new_tokens = name, model, new_tokens
        self.cfg = mdkv.MixedDimKVConfig(budget=budget)
        options = {"budget": budget}
        self.cache = None  # the MixedDimCache of the last call, kept to measure it
        self.kwargs: dict[str, Any] = {}
        if name in ("patch", "mdkv-mixedcache", "ro-mixedcache", "graphed", "floor", "hf-compile-config"):
            mdkv.patch(model, self.cfg)
        if name.startswith("ro-"):
            options["mode"] = "reduce-overhead"
        if name == "hf-static-compile":
            model.compile()
        elif name.startswith(("mdkv-", "ro-")):
            model.compile(backend="mixeddimkv", options=options)
        elif name == "torch-compile":
            self.model = torch.compile(model, backend="mixeddimkv", options=options)
        if name.endswith("-static") or name == "hf-static-compile":
            self.kwargs["cache_implementation"] = "static"
        if baseline_prefill_chunk and not PATHS[name].compressed:
            self.kwargs["prefill_chunk_size"] = baseline_prefill_chunk
        if name == "hf-compile-config":
            from transformers import CompileConfig

            config = CompileConfig()  # transformers' default: Inductor, reduce-overhead
            if not torch.cuda.is_available():
                config._compile_all_devices = True
            self.kwargs["compile_config"] = config

    def _fixed_cache(self):
        from mdkv_compile.cache import MixedDimCache

        self.cache = None  # the last call's cache goes before the new one is made
        gc.collect()
        self.cache = MixedDimCache(self.model.config, self.cfg, max_new_tokens=self.new_tokens)
        return self.cache

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, list[float]]:
        if self.name == "graphed":
            return self._graphed(ids)
        if self.name == "floor":
            return self._graphed(ids[:, :FLOOR_PROMPT])
        from transformers import LogitsProcessor, LogitsProcessorList

        kwargs = dict(self.kwargs)
        if self.name.endswith("mixedcache") or self.name == "hf-compile-config":
            kwargs["past_key_values"] = self._fixed_cache()
        stamps: list[float] = []
        tops: list[torch.Tensor] = []

        class Stamp(LogitsProcessor):
            """A method, not a plain function: transformers takes `inspect.signature(p.__call__)` of
            every processor at every step, 0.12 ms for a function's `__call__` wrapper (by string
            parsing) against 0.01 ms for a method, which would be charged to the step."""

            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                tops.append(scores.float().topk(2, dim=-1).values)
                _sync()
                stamps.append(time.perf_counter())
                return scores

        _sync()
        start = time.perf_counter()
        out = self.model.generate(ids, max_new_tokens=self.new_tokens, do_sample=False, pad_token_id=0,
                                  logits_processor=LogitsProcessorList([Stamp()]), **kwargs)
        new = out[:, ids.shape[1]:].cpu()
        del out
        steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        return new, torch.stack(tops).cpu(), stamps[0] - start, steps

    def _graphed(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, list[float]]:
        from mdkv_compile.hf.cuda_graphs import GraphedDecoder

        _sync()
        start = time.perf_counter()
        decoder, logits = GraphedDecoder.from_prompt(self.model, self._fixed_cache(), ids)
        tokens, tops, steps = [], [logits.float().topk(2, dim=-1).values], []
        _sync()
        prefill = time.perf_counter() - start
        for _ in range(self.new_tokens - 1):
            tokens.append(logits.argmax(-1, keepdim=True))
            t0 = time.perf_counter()
            logits = decoder.step(tokens[-1])
            tops.append(logits.float().topk(2, dim=-1).values)
            _sync()
            steps.append(time.perf_counter() - t0)
        tokens.append(logits.argmax(-1, keepdim=True))
        return torch.cat(tokens, 1).cpu(), torch.stack(tops).cpu(), prefill, steps


def _state_bytes(runner: Runner) -> int | None:
    """Bytes of the compressed state this path keeps: the backend's sites, or its MixedDimCache."""
    from mdkv_compile.passes.sites import compiled_cache_bytes

    if runner.cache is not None:
        return runner.cache.stored_bytes()
    held = compiled_cache_bytes()
    return held if runner.name.startswith(("mdkv-", "ro-", "torch-compile")) else None


def _gib(n: int | None) -> float | None:
    return None if n is None else n / 2**30


def worker(args: argparse.Namespace) -> None:
    """Run one path and write its row (JSON) to args.row_out."""
    from mdkv_compile.backends.torch_compile import ensure_registered
    from mdkv_compile.testing import random_llama

    ensure_registered()  # also installs the hook that gives torch.compile's wrapper its generate()
    shape = shapes(args)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    row: dict[str, Any] = dict(path=args.worker, calls=[])
    out = Path(args.row_out)

    def save() -> None:
        out.write_text(json.dumps(row))

    config = {**shape["config"], "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0}
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    model = random_llama(attn_implementation="sdpa", dtype=dtype, device=device, **config)
    if cuda:
        row["weights_gib"] = _gib(torch.cuda.memory_allocated())
    runner = Runner(args.worker, model, args.budget, shape["new_tokens"], args.baseline_prefill_chunk)
    row["generate_kwargs"] = {k: v if isinstance(v, (int, float, str)) else type(v).__name__
                              for k, v in runner.kwargs.items()}
    vocab = config["vocab_size"]

    def call(index: int, batch: int, length: int, timed: bool = False) -> dict[str, Any]:
        before = _counts()
        start = time.perf_counter()
        tokens, tops, prefill_s, steps = runner(_prompt(batch, length, vocab, device, index))
        after = _counts()
        rec = dict(batch=batch, prompt=length, wall_s=time.perf_counter() - start, prefill_s=prefill_s,
                   tokens=tokens.tolist(), top2=tops.tolist(),
                   **{k: after[k] - before[k] for k in after})
        if timed or args.quick:
            rec["ms_first_steps"] = [1e3 * s for s in steps[:3]]
            rec["ms_per_step_median"] = 1e3 * statistics.median(steps[2:] or steps)
        return rec

    (b, n), *others = shape["calls"]
    print(f"[{args.worker}] first call (compiles)", flush=True)
    row["first_call"] = call(0, b, n)
    row["second_call"] = call(0, b, n)  # transformers' reused static cache recompiles here
    save()
    print(READY, flush=True)
    if sys.stdin.readline().strip() != GO:
        return
    from mdkv_compile.passes.sites import reset_sites

    reset_sites()  # the last call's compressed state goes first, as plain generate() keeps nothing
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if args.memory_history and cuda:
        torch.cuda.memory._record_memory_history(max_entries=200000)
    timed = call(0, b, n, timed=True)
    if args.memory_history and cuda:
        Path(args.memory_history).mkdir(parents=True, exist_ok=True)
        snapshot = Path(args.memory_history) / f"{args.worker}.memory.pickle"
        torch.cuda.memory._dump_snapshot(str(snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
        row["memory_snapshot"] = str(snapshot)
    if cuda:
        timed["peak_gib"] = _gib(torch.cuda.max_memory_allocated())
        gc.collect()
        timed["allocated_after_gib"] = _gib(torch.cuda.memory_allocated())
    timed["state_gib"] = _gib(_state_bytes(runner))
    row["timed"] = timed
    save()
    print(TIMED, flush=True)
    for index, (b2, n2) in enumerate([] if args.timed_only else others, start=1):
        print(f"[{args.worker}] call with batch {b2} x {n2}", flush=True)
        row["calls"].append(call(index, b2, n2))
        save()
    row["ok"] = True
    save()


# --- parent: one process per path, timed calls alone ------------------------------------------------


class Worker:
    def __init__(self, name: str, args: argparse.Namespace, tmp: Path) -> None:
        self.name, self.row_out = name, tmp / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--row-out", str(self.row_out),
               "--budget", str(args.budget), "--new-tokens", str(args.new_tokens)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--big"] if args.big else []
        cmd += ["--timed-only"] if args.timed_only else []
        cmd += ["--dtype", args.dtype] if args.dtype else []
        if args.baseline_prefill_chunk:
            cmd += ["--baseline-prefill-chunk", str(args.baseline_prefill_chunk)]
        cmd += ["--memory-history", str(args.memory_history)] if args.memory_history else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env, start_new_session=True)
        self.tail: list[str] = []
        self.ready = threading.Event()
        self.timed = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line == READY:
                self.ready.set()
            elif line == TIMED:
                self.timed.set()
            else:
                self.tail = (self.tail + [line])[-40:]
                if line.startswith(f"[{self.name}]"):
                    print(f"{time.strftime('%H:%M:%S')} {line}", flush=True)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def send(self, text: str) -> None:
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass

    def row(self) -> dict[str, Any]:
        row = json.loads(self.row_out.read_text()) if self.row_out.exists() else dict(path=self.name)
        row["wall_s"] = time.perf_counter() - self.start
        row["returncode"] = self.proc.returncode
        if self.proc.returncode:
            code = self.proc.returncode
            row["error"] = f"signal {-code} ({signal.Signals(-code).name})" if code < 0 else f"exit status {code}"
            row["output_tail"] = self.tail[-25:]
        return row


def run_all(args: argparse.Namespace, names: list[str]) -> dict[str, dict]:
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="check_fast_path."))
    pending, running, rows = list(names), [], {}
    deadline_s = args.path_timeout
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            print(f"{time.strftime('%H:%M:%S')} start {name}: {PATHS[name].help}", flush=True)
            running.append(Worker(name, args, tmp))
        for w in list(running):
            if w.ready.is_set() and w.proc.poll() is None:
                w.ready.clear()
                others = [o for o in running if o is not w]
                for o in others:
                    o.signal(signal.SIGSTOP)
                if others:
                    time.sleep(args.settle)  # the stopped workers' queued GPU work drains
                w.send(GO)
                until = time.perf_counter() + args.timed_timeout
                while not w.timed.wait(0.5) and w.proc.poll() is None and time.perf_counter() < until:
                    pass
                for o in others:
                    o.signal(signal.SIGCONT)
                print(f"{time.strftime('%H:%M:%S')} {w.name}: timed call done", flush=True)
            elif w.proc.poll() is None and time.perf_counter() - w.start > deadline_s:
                w.signal(signal.SIGCONT)
                w.signal(signal.SIGKILL)
                w.proc.wait()
            if w.proc.poll() is not None:
                w.thread.join(timeout=5)
                running.remove(w)
                rows[w.name] = w.row()
                status = rows[w.name].get("error") or "ok"
                wall = rows[w.name]["wall_s"]
                print(f"{time.strftime('%H:%M:%S')} end {w.name} ({wall:.0f} s): {status}", flush=True)
                write_result(args, rows)
        time.sleep(0.2)
    return rows


def divergence(tokens: list, top2: list, ref_tokens: list, ref_top2: list) -> dict[str, Any]:
    """Tokens [B, T] of a call against the reference's: equal, or where they first differ (the step,
    the row) with both paths' top-2 logit margins there (near ties flip under bf16 rounding)."""
    a, b = torch.tensor(tokens), torch.tensor(ref_tokens)
    if a.shape != b.shape:
        return dict(tokens_equal=False, why=f"shapes {tuple(a.shape)} vs {tuple(b.shape)}")
    same = a == b
    if bool(same.all()):
        return dict(tokens_equal=True)
    row, step = (~same).nonzero()[0].tolist()
    mine, ref = torch.tensor(top2)[step, row], torch.tensor(ref_top2)[step, row]
    return dict(tokens_equal=False, token_agreement=float(same.float().mean()), first_diff_step=step,
                first_diff_row=row, ref_top2_margin=float(ref[0] - ref[1]), own_top2_margin=float(mine[0] - mine[1]))


def summarise(rows: dict[str, dict]) -> dict[str, Any]:
    """Token comparisons (raw tokens dropped), speed and memory ratios, the issue's targets."""
    out: dict[str, Any] = {}
    for name, row in rows.items():
        ref_name = "patch" if PATHS[name].compressed else "plain"
        ref = rows.get(ref_name, {})
        res = {k: v for k, v in row.items() if k not in ("first_call", "second_call", "timed", "calls")}
        mine_calls = [row.get("first_call"), row.get("timed"), *row.get("calls", [])]
        ref_calls = [ref.get("first_call"), ref.get("timed"), *ref.get("calls", [])]
        res["reference"] = ref_name
        res["calls"] = []
        for label, mine, theirs in zip(("first", "timed", "shape 2", "shape 3"), mine_calls, ref_calls, strict=False):
            if mine is None:
                continue
            entry = {k: v for k, v in mine.items() if k not in ("tokens", "top2")}
            entry["call"] = label
            if theirs is not None and name != ref_name and PATHS[name].compare:
                entry.update(divergence(mine["tokens"], mine["top2"], theirs["tokens"], theirs["top2"]))
            res["calls"].append(entry)
        second = row.get("second_call")
        if second:
            res["second_call_graphs"] = second.get("graphs")
        out[name] = res

    def ms(name: str) -> float | None:
        return (rows.get(name, {}).get("timed") or {}).get("ms_per_step_median")

    def peak(name: str) -> float | None:
        return (rows.get(name, {}).get("timed") or {}).get("peak_gib")

    targets = {}
    for name in ("ro-default", "ro-static", "ro-mixedcache"):
        if ms(name) is None:
            continue
        t = dict(ms_per_step=ms(name))
        if ms("graphed"):
            t["vs_graphed"] = ms(name) / ms("graphed")
            t["at_most_1.15x_graphed"] = t["vs_graphed"] <= 1.15
        if ms("hf-static-compile"):
            t["speedup_vs_hf_static_compile"] = ms("hf-static-compile") / ms(name)
            t["at_least_2.5x_vs_hf_static_compile"] = t["speedup_vs_hf_static_compile"] >= 2.5
        if ms("plain"):
            t["speedup_vs_plain"] = ms("plain") / ms(name)
            t["at_least_5x_vs_plain"] = t["speedup_vs_plain"] >= 5
            if ms("floor"):  # no decode step of this model and batch is faster than the floor path's
                t["floor_ms_per_step"] = ms("floor")
                t["5x_plain_reachable"] = ms("plain") / 5 >= ms("floor")
        if peak(name) is not None and peak("plain") is not None:
            t["peak_gib"], t["plain_peak_gib"] = peak(name), peak("plain")
            t["peak_at_most_plain"] = peak(name) <= peak("plain")
        targets[name] = t
    return dict(paths=out, targets=targets)


def write_result(args: argparse.Namespace, rows: dict[str, dict]) -> None:
    result = dict(
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        torch=torch.__version__,
        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"},
        shapes=shapes(args), **summarise(rows),
    )
    import transformers

    result["transformers"] = transformers.__version__
    Path(args.out).write_text(json.dumps(result, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON written after every path")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (checks the script; runs on the CPU)")
    parser.add_argument("--big", action="store_true", help="32 layers, batch 8 x 32K prompts (one process at a time)")
    parser.add_argument("--paths", default=None, help="comma-separated subset (default: all but the extra ones)")
    parser.add_argument("--all", action="store_true", help="also the extra paths")
    parser.add_argument("--budget", type=float, default=0.0625)
    parser.add_argument("--new-tokens", type=int, default=32)
    # With random weights a long prompt's attention is almost uniform: the window scores at the
    # budget's cut differ by less than bf16's resolution, so the compiled and eager prefills keep
    # different tokens in bf16 (docs/notes/gpu_notes.md section 8). float32 checks the tokens.
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="model weights (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--baseline-prefill-chunk", type=positive_int, default=None, metavar="N",
                        help="plain and hf-static-compile prefill N prompt tokens at a time (transformers' "
                        "prefill_chunk_size): the 32-layer baselines then fit an H100; decode steps unchanged")
    parser.add_argument("--timed-only", action="store_true",
                        help="end each path after its timed call (no calls at the other batch sizes and lengths)")
    parser.add_argument("--jobs", type=int, default=None, help="processes at once (default: 3 on a GPU, 1 otherwise)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds between stopping the others and a timed call")
    parser.add_argument("--path-timeout", type=float, default=1200.0, help="seconds before a path's process is killed")
    parser.add_argument("--timed-timeout", type=float, default=300.0)
    parser.add_argument("--memory-history", type=Path, default=None, metavar="DIR",
                        help="record the timed call's allocations: DIR/<path>.memory.pickle, a torch.cuda.memory "
                        "snapshot for https://pytorch.org/memory_viz (what makes up the peak)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        try:
            worker(args)
        except Exception:
            traceback.print_exc()
            return 1
        return 0
    if args.out is None:
        parser.error("--out is required")
    if args.paths:
        names = args.paths.split(",")
        unknown = [n for n in names if n not in PATHS]
        if unknown:
            parser.error(f"unknown paths {unknown}; choose from {', '.join(PATHS)}")
    else:
        names = [n for n, spec in PATHS.items() if args.all or not spec.extra]
    if not torch.cuda.is_available():
        skipped = [n for n in names if PATHS[n].cuda_only]
        if skipped:
            print(f"no CUDA: skipping {', '.join(skipped)}", flush=True)
        names = [n for n in names if not PATHS[n].cuda_only]
    # the references run first, so their tokens are there for the comparisons as soon as possible
    names.sort(key=lambda n: (n not in ("patch", "plain"),))
    if args.jobs is None:
        args.jobs = 3 if torch.cuda.is_available() and not args.big else 1
    start = time.perf_counter()
    rows = run_all(args, names)
    write_result(args, rows)
    took = time.perf_counter() - start
    print(f"{time.strftime('%H:%M:%S')} all paths done in {took:.0f} s; JSON: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

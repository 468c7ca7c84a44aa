"""`mdkv generate`: one prompt through a model whose KV cache is compressed, as a user would run it.

    mdkv generate --prompt "What is the capital of France?"
    mdkv generate --model path/to/hf_model --method snapkv --budget 0.05 --prompt-file long.txt
    mdkv generate --onnx exports/smollm2 --prompt-file long.txt      # decode steps on ONNX Runtime

Prints the generated text, then the KV bytes the cache holds (measured from its tensors: the
compressed prompt, bookkeeping and the generated tokens) against a full cache of the same tokens,
the same for the prompt alone (what the budget bounds: generated tokens are stored whole), and
the wall time of prefill + decode. The prompt goes through the tokenizer's chat template when
it has one (`--no-chat-template`: as it is). With `--onnx` the export fixes the model, method and
budget; decoding runs `--max-new-tokens` steps (no stop at end of turn, like the export's runner)
and the text is cut at the first end-of-turn token.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mdkv_compile.assets import check_model_source, load_model
from mdkv_compile.cache import MixedDimCache
from mdkv_compile.config import DEFAULT_BUDGET, METHODS, MixedDimKVConfig
from mdkv_compile.hf.patch import patch
from mdkv_compile.usage import (
    UsageError,
    as_usage_error,
    check,
    command,
    device,
    existing_file,
    fraction,
    positive_int,
)

DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="'smollm2' (the bundled GGUF, default) or a Hugging Face "
                        "model folder or name")
    parser.add_argument("--method", choices=METHODS, default=None, help="compression method (default mixeddimkv)")
    parser.add_argument("--budget", type=fraction, default=None,
                        help=f"fraction of the full KV cache to keep (default {DEFAULT_BUDGET})")
    parser.add_argument("--head-scores", default=None, help="head-score JSON (headkv, mixeddimkv-h)")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", help="a UTF-8 text file holding the prompt")
    parser.add_argument("--no-chat-template", action="store_true", help="tokenize the prompt as it is")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64)
    parser.add_argument("--onnx", default=None, metavar="DIR",
                        help="decode with this ONNX export (`mdkv export onnx`); it fixes model, method and budget")
    parser.add_argument("--device", type=device, default="cpu")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        text = args.prompt
    else:
        path = existing_file(args.prompt_file, "--prompt-file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"--prompt-file {args.prompt_file}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    check(bool(text.strip()), "the prompt is empty")
    return text


def checked_config(args: argparse.Namespace) -> MixedDimKVConfig | None:
    """The config of a PyTorch run (None with --onnx, whose export fixes it), checked before any
    model is loaded."""
    if args.onnx is not None:
        given = [f"--{n}" for n in ("model", "method", "budget", "head_scores") if getattr(args, n) is not None]
        check(not given, f"--onnx {args.onnx} fixes the model, method and budget; drop {', '.join(given)}")
        check((Path(args.onnx) / "manifest.json").is_file(),
              f"--onnx {args.onnx}: no manifest.json there (not an `mdkv export onnx` folder)")
        return None
    if args.head_scores is not None:
        existing_file(args.head_scores, "--head-scores")
    try:
        check_model_source(args.model or "smollm2")
        return MixedDimKVConfig(budget=args.budget or DEFAULT_BUDGET, method=args.method or "mixeddimkv",
                                head_scores=args.head_scores)
    except (ValueError, FileNotFoundError) as e:
        raise as_usage_error(e) from None


def encode(tokenizer: Any, text: str, chat_template: bool) -> torch.Tensor:
    """[1, N] token ids of the prompt, through the chat template when asked and there is one."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                             return_dict=True)["input_ids"]
    return tokenizer(text, return_tensors="pt").input_ids


def _end_of_turn_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list | tuple) else [eos]) | {tokenizer.eos_token_id}
    return {int(i) for i in ids if i is not None}


@dataclass
class Generated:
    new_tokens: torch.Tensor  # [T] the generated ids (up to the end of turn)
    stored_bytes: int  # measured from the cache's tensors
    full_bytes: int  # a plain cache of the same tokens
    seconds: float  # prefill + decode
    tokenizer: Any
    what: str  # model, method, budget
    # the compressed prompt alone and a plain cache of it: what the budget bounds (PyTorch runs)
    prompt_bytes: tuple[int, int] | None = None


def generate_torch(args: argparse.Namespace, cfg: MixedDimKVConfig, text: str) -> Generated:
    """The patched PyTorch model's greedy generation."""
    name = args.model or "smollm2"
    model, tokenizer = load_model(name, dtype=getattr(torch, args.dtype), device=args.device)
    model = copy.deepcopy(model)  # load_model's object is shared by the process: patch a copy
    try:
        patch(model, cfg)
    except (NotImplementedError, ValueError, FileNotFoundError) as e:
        raise as_usage_error(e) from None
    ids = encode(tokenizer, text, not args.no_chat_template).to(args.device)
    cache = MixedDimCache(model.config, cfg)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, past_key_values=cache,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    seconds = time.perf_counter() - start
    return Generated(out[0, ids.shape[1] :], cache.stored_bytes(), cache.full_bytes(), seconds, tokenizer,
                     f"{name}: {cfg.method} at budget {cfg.budget}",
                     (cache.prompt_stored_bytes(), cache.prompt_full_bytes()))


def _export_tokenizer(folder: str, manifest: dict[str, Any]) -> Any:
    source = manifest["prefill"]["model"]
    if source.lower() == "smollm2":
        return load_model("smollm2", dtype=getattr(torch, manifest["dtype"]))[1]
    from transformers import AutoTokenizer

    saved = Path(folder) / source
    try:
        return AutoTokenizer.from_pretrained(saved if saved.is_dir() else source)
    except (OSError, ValueError) as e:
        raise UsageError(f"--onnx {folder}: no tokenizer for its prefill model {source} ({e})") from None


def generate_onnx(args: argparse.Namespace, text: str) -> Generated:
    """The export's runner: prefill in PyTorch, every decode step on ONNX Runtime."""
    from mdkv_compile.backends.onnx.export import ExportError
    from mdkv_compile.backends.onnx.runtime import OnnxGenerator

    try:
        runner = OnnxGenerator(args.onnx)
    except (ExportError, FileNotFoundError) as e:
        raise as_usage_error(e) from None
    tokenizer = _export_tokenizer(args.onnx, runner.manifest)
    ids = encode(tokenizer, text, not args.no_chat_template)
    start = time.perf_counter()
    try:
        out = runner.generate(ids, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True)
    except ValueError as e:  # a prompt or length the export was not made for
        raise as_usage_error(e) from None
    seconds = time.perf_counter() - start
    new = out.sequences[0, ids.shape[1] :]
    stops = _end_of_turn_ids(runner.model, tokenizer)
    cut = next((i for i, t in enumerate(new.tolist()) if t in stops), len(new))
    m = runner.manifest
    return Generated(new[:cut], out.stored_bytes, out.full_bytes, seconds, tokenizer,
                     f"ONNX export {args.onnx}: {m['method']} at budget {m['budget']}")


@command("mdkv generate")
def run(args: argparse.Namespace) -> int:
    cfg = checked_config(args)
    text = read_prompt(args)
    result = generate_onnx(args, text) if cfg is None else generate_torch(args, cfg, text)
    stored, full = result.stored_bytes, result.full_bytes
    print(result.tokenizer.decode(result.new_tokens, skip_special_tokens=True).strip())
    print(f"--- {result.what}; {len(result.new_tokens)} new tokens in {result.seconds:.2f} s (prefill + decode)")
    print(f"--- KV cache: {stored / 2**20:.3f} MiB stored, {full / 2**20:.3f} MiB full (ratio {stored / full:.4f})")
    if result.prompt_bytes is not None:  # the budget bounds the prompt; generated tokens are stored whole
        p_stored, p_full = result.prompt_bytes
        print(f"--- prompt alone: {p_stored / 2**20:.3f} MiB stored, {p_full / 2**20:.3f} MiB full "
              f"(ratio {p_stored / max(p_full, 1):.4f})")
    return 0

"""`mdkv export onnx|trt`: export a MixedDimKV decode step for deployment.

    mdkv export onnx --model smollm2 --budget 0.1 --out exports/smollm2
    mdkv export trt  --model smollm2 --budget 0.1 --out exports/smollm2   # needs TensorRT

`--model` is `smollm2` (the cached SmolLM2 asset) or a Hugging Face path/name. `trt` writes the
ONNX export first and then builds a TensorRT engine from it with our plugin registered; where
TensorRT is not installed it fails before doing anything, naming TensorRT.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from mdkv_compile.assets import check_model_source, load_model
from mdkv_compile.backends.onnx.export import ExportError, add_to_export, check_out_dir, export_onnx
from mdkv_compile.backends.tensorrt import TensorRTUnavailable, build_engine, require_tensorrt
from mdkv_compile.config import METHODS, MixedDimKVConfig
from mdkv_compile.hf.patch import patch
from mdkv_compile.usage import (
    as_usage_error,
    command,
    csv,
    existing_file,
    fraction,
    non_negative_int,
    positive_int,
    writable_file,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=("onnx", "trt"), help="onnx: ONNX files; trt: also a TensorRT engine")
    parser.add_argument("--model", default="smollm2", help="'smollm2' or a Hugging Face model path/name")
    parser.add_argument("--budget", type=fraction, default=0.0625, help="fraction of the full KV cache to keep")
    parser.add_argument("--method", default="mixeddimkv", choices=METHODS)
    parser.add_argument("--dims", type=csv(non_negative_int), default=None,
                        help="comma list of candidate dims (default: the method's)")
    parser.add_argument("--head-scores", default=None, help="head-score JSON (headkv, mixeddimkv-h)")
    parser.add_argument("--out", required=True,
                        help="output folder: new, empty, or an earlier export (with --overwrite)")
    parser.add_argument("--batch", type=positive_int, default=1)
    parser.add_argument("--max-prompt-tokens", type=positive_int, default=512)
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, help="capacity of the new-token region")
    parser.add_argument("--capacity", type=positive_int, default=None,
                        help="store units per KV head (default: 2x budget)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    parser.add_argument("--engine", default=None, help="trt: engine path (default OUT/decode.engine)")


def _checked_config(args: argparse.Namespace) -> MixedDimKVConfig:
    """The config, and every argument a model is not needed for, checked before one is loaded."""
    if args.target == "trt":
        try:
            require_tensorrt()
        except TensorRTUnavailable as e:
            raise as_usage_error(e) from None
    if args.head_scores is not None:
        existing_file(args.head_scores, "--head-scores")
    try:
        cfg = MixedDimKVConfig(budget=args.budget, method=args.method,
                               dims=None if args.dims is None else tuple(args.dims), head_scores=args.head_scores)
        check_out_dir(args.out, args.overwrite)
        check_model_source(args.model)
    except (ValueError, FileNotFoundError) as e:  # ExportError is a ValueError
        raise as_usage_error(e) from None
    if args.engine is not None:
        writable_file(args.engine, "--engine")
    return cfg


@command("mdkv export")
def run(args: argparse.Namespace) -> int:
    cfg = _checked_config(args)
    is_path = Path(args.model).exists()
    # load_model caches one object per process: copy before patching.
    model = copy.deepcopy(load_model(args.model, dtype=getattr(torch, args.dtype))[0])
    source = str(Path(args.model).resolve()) if is_path else args.model
    try:
        patch(model, cfg)
        out = export_onnx(
            model, cfg, args.out, batch=args.batch, max_prompt_tokens=args.max_prompt_tokens,
            max_new_tokens=args.max_new_tokens, capacity=args.capacity, prefill_source=source,
            overwrite=args.overwrite,
        )
    except (ExportError, NotImplementedError, ValueError) as e:
        raise as_usage_error(e) from None
    print(f"wrote {out}/decode.onnx and {out}/manifest.json")
    if args.target == "trt":
        engine = Path(args.engine) if args.engine else out / "decode.engine"
        build_engine(out / "decode.onnx", engine)
        if engine.resolve().is_relative_to(out):
            add_to_export(out, "engine", engine)  # part of the export: a later --overwrite may replace it
        print(f"wrote {engine}")
    return 0

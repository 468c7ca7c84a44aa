"""TensorRT plugin for the `mdkv::MixedDimKVAttention` node of `mdkv export onnx`.

What is here:

* `register_plugin()`: the QDP definitions against the documented `tensorrt.plugin` API
  (TensorRT >= 10.9): `@trtp.register("mdkv::MixedDimKVAttention")` (output = query's shape and
  dtype), `@trtp.autotune` (fp32/fp16 combinations), `@trtp.aot_impl` handing TensorRT the PTX of
  the single-launch kernel of `mdkv_compile.kernels.static_decode` (`compile_ptx`), shape-derived
  scalars passed as `trtp.SymInt32` after the tensor inputs (the kernel's argument order is inputs,
  scalars, output, constexprs, as QDP requires).
* `build_engine(onnx_path, engine_path)`: parses the export with the plugin registered
  (`ENABLE_PLUGIN_OVERRIDE` where the parser has it, so the node maps to the plugin and not to its
  local function) and serializes an engine.

What has NEVER run: everything that imports `tensorrt` (`register_plugin`, `build_engine`, the
AOT launch inside an engine): TensorRT cannot be installed where this was written (the kernel
itself is checked in tests/test_onnx_export.py). Open points for the first TensorRT machine are
in docs/export.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from mdkv_compile.kernels.static_decode import compile_ptx

PLUGIN_ID = "mdkv::MixedDimKVAttention"

class TensorRTUnavailable(RuntimeError):
    """TensorRT (the `tensorrt` Python package) is not installed here."""


def require_tensorrt() -> Any:
    """The `tensorrt` module, or TensorRTUnavailable saying what is missing."""
    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTUnavailable(
            "TensorRT is not installed (no `tensorrt` Python package): building an engine needs TensorRT >= 10.9 "
            "on an NVIDIA GPU machine (pip install tensorrt). The ONNX export (mdkv export onnx) works without it."
        )
    import tensorrt

    return tensorrt


_REGISTERED = False


def register_plugin() -> None:
    """Register the QDP plugin `mdkv::MixedDimKVAttention` with TensorRT (idempotent).
    NEVER RUN: no TensorRT where this was written."""
    global _REGISTERED
    if _REGISTERED:
        return
    trt = require_tensorrt()
    import numpy as np
    import numpy.typing as npt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def _desc(
        query: trtp.TensorDesc, keys: trtp.TensorDesc, values: trtp.TensorDesc, counts: trtp.TensorDesc,
        key_new: trtp.TensorDesc, value_new: trtp.TensorDesc, n_new: trtp.TensorDesc,
        basis_k: trtp.TensorDesc, basis_v: trtp.TensorDesc,
        tier_dims: npt.NDArray[np.int32], value_dims: npt.NDArray[np.int32], kv_heads: int, scale: float,
        softcap: float,
    ) -> trtp.TensorDesc:
        return query.like()

    @trtp.autotune(PLUGIN_ID)
    def _autotune(query, keys, values, counts, key_new, value_new, n_new, basis_k, basis_v, outputs):
        combo = trtp.AutoTuneCombination()
        combo.pos([0, 1, 2, 4, 5, 7, 8, 9], "FP32|FP16")  # activations, cache, bases, output alike
        combo.pos(3, "INT32")
        combo.pos(6, "INT64")
        return [combo]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(
        query: trtp.TensorDesc, keys: trtp.TensorDesc, values: trtp.TensorDesc, counts: trtp.TensorDesc,
        key_new: trtp.TensorDesc, value_new: trtp.TensorDesc, n_new: trtp.TensorDesc,
        basis_k: trtp.TensorDesc, basis_v: trtp.TensorDesc,
        tier_dims: npt.NDArray[np.int32], value_dims: npt.NDArray[np.int32], kv_heads: int, scale: float,
        softcap: float,
        outputs: tuple[trtp.TensorDesc], tactic: int,
    ):
        dims, vdims = tuple(int(x) for x in tier_dims), tuple(int(x) for x in value_dims)
        dtype = "fp32" if query.dtype == trt.float32 else "fp16"
        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0)
        name, ptx, threads, shared = compile_ptx(dims, kv_heads, scale, softcap, dtype, major * 10 + minor, vdims)
        q = query.shape_expr
        launch = trtp.KernelLaunchParams()
        launch.grid_x = q[0] * q[1]  # one program per query head of each row
        launch.block_x = threads
        launch.shared_mem = shared
        # Shape-derived scalars go after the tensor inputs and before the output (QDP's order).
        extra = trtp.SymIntExprs.from_tuple(
            [trtp.SymInt32(keys.shape_expr[1]), trtp.SymInt32(key_new.shape_expr[2]), trtp.SymInt32(q[1])]
        )
        return name.encode(), ptx.encode(), launch, extra

    _REGISTERED = True


def build_engine(onnx_path: str | Path, engine_path: str | Path, workspace_gib: float = 4.0) -> Path:
    """Parse an export with the plugin registered and write a serialized engine.
    NEVER RUN: no TensorRT where this was written."""
    trt = require_tensorrt()
    register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # Without this flag (TensorRT >= 10.15) the parser may prefer the node's local function.
    if hasattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE"):
        parser.set_flag(trt.OnnxParserFlag.ENABLE_PLUGIN_OVERRIDE)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(engine))
    return engine_path

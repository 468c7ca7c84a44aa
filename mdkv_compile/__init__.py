"""mdkv-compile: MixedDimKV KV-cache compression for PyTorch and Hugging Face transformers.

    import mdkv_compile as mdkv
    cfg = mdkv.MixedDimKVConfig(budget=0.0625)
    mdkv.patch(model, cfg)            # model.generate() now compresses its KV cache
"""

from __future__ import annotations

import importlib
from typing import Any

from mdkv_compile.config import METHODS, MixedDimKVConfig

__version__ = "0.1.0"

# Public names imported on first use: keeps `import mdkv_compile` light (no transformers, onnx or
# triton import until needed).
_LAZY = {
    "MixedDimCache": "mdkv_compile.cache",
    "GraphedDecoder": "mdkv_compile.hf.cuda_graphs",
    "patch": "mdkv_compile.hf.patch",
    "unpatch": "mdkv_compile.hf.patch",
    "explain": "mdkv_compile.passes.explain",
    "export_onnx": "mdkv_compile.backends.onnx.export",
    "OnnxGenerator": "mdkv_compile.backends.onnx.runtime",
    "compiled_cache_bytes": "mdkv_compile.backends.torch_compile",
    "reset_sites": "mdkv_compile.backends.torch_compile",
}

__all__ = ["METHODS", "MixedDimKVConfig", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mdkv_compile' has no attribute {name!r}")

"""TensorRT plugin for the `mdkv::MixedDimKVAttention` node (work in progress)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


class TensorRTUnavailable(RuntimeError):
    """TensorRT (the `tensorrt` Python package) is not installed here."""


def require_tensorrt():
    if importlib.util.find_spec("tensorrt") is None:
        raise TensorRTUnavailable(
            "TensorRT is not installed (no `tensorrt` Python package): building an engine needs TensorRT >= 10.9 "
            "on an NVIDIA GPU machine (pip install tensorrt). The ONNX export (mdkv export onnx) works without it."
        )
    import tensorrt

    return tensorrt


def build_engine(onnx_path: str | Path, engine_path: str | Path) -> Path:
    require_tensorrt()
    raise NotImplementedError

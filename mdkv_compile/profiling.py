"""Where a CUDA computation waits for the host: used by benchmarks/profile_compress.py and the
compression tests to keep the prefill path free of host synchronisations."""

from __future__ import annotations

import warnings
from collections.abc import Callable


def host_sync_sites(fn: Callable[[], object]) -> list[tuple[str, int]]:
    """Run `fn` under torch.cuda's sync debug mode; return the (file, line) of the Python frame of
    every host synchronisation it made, in order. The mode is a prototype in PyTorch: it misses
    some synchronising operations, so an empty list is evidence, not proof."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message).lower()]

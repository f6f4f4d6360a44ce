#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install the package into it.
#
#   scripts/bootstrap.sh          runtime install with the [serve] extra (`zimage generate` and `zimage serve`)
#   scripts/bootstrap.sh --dev    plus the test/bench tools (pytest, hypothesis, ruff, cmake, ...)
#   scripts/bootstrap.sh --lib    the library alone (no server libraries: `zimage generate` only)
#
# Environment: ZIMAGE_VENV (default .venv), PYTHON (default python3).
#
# torch: on a machine whose python3 already has a CUDA build of torch, the venv is created with
# --system-site-packages and that torch/triton are kept (never replaced by the CPU lock). Otherwise the lock
# pins the CPU build torch==2.13.0+cpu, so a fresh CPU machine never pulls several GB of CUDA wheels; where
# pip's configured indexes do not carry it, add PyTorch's CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZIMAGE_VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS="[serve]"
[[ "${1:-}" == "--dev" ]] && EXTRAS="[dev]"
[[ "${1:-}" == "--lib" ]] && EXTRAS=""
LOCK=requirements/lock-cpu.txt

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "bootstrap: keeping the CUDA build of torch found in $PY"
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv --system-site-packages "$VENV"
    CONSTRAINTS="$VENV/constraints.txt"
    grep -viE '^(torch|triton|numpy|nvidia-|cuda-)' "$LOCK" > "$CONSTRAINTS"
else
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
    CONSTRAINTS="$LOCK"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first and alone, from the lock: the CPU build on a CPU machine.
"$VENV/bin/python" -c 'import torch' >/dev/null 2>&1 || "${PIP[@]}" install -c "$CONSTRAINTS" torch
"${PIP[@]}" install -c "$CONSTRAINTS" -e ".$EXTRAS"
"$VENV/bin/python" -c 'import torch, zimage_core; print("bootstrap: ok, torch", torch.__version__, "cuda", torch.cuda.is_available())'

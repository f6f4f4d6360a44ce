#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install the package into it.
#
#   scripts/bootstrap.sh          runtime install with the [serve] extra (`zimage generate` and `zimage serve`)
#   scripts/bootstrap.sh --dev    plus the test/bench tools (pytest, hypothesis, ruff, cmake, ...)
#   scripts/bootstrap.sh --lib    the library alone (no server libraries: `zimage generate` only)
#   scripts/bootstrap.sh --current [--dev]
#                                 the "current" set instead (requirements/lock-current.txt: the newest torch, triton,
#                                 diffusers, transformers and Hugging Face's kernels; PyPI's CUDA torch, 5.6 GB
#                                 installed) into .venv-current; see docs/install.md
#
# Environment: ZIMAGE_VENV (default .venv, .venv-current with --current), PYTHON (default python3).
#
# torch: on a machine whose python3 already has a CUDA build of torch, the venv is created with
# --system-site-packages and that torch/triton are kept (never replaced by the CPU lock). Otherwise the lock
# pins the CPU build torch==2.13.0+cpu, so a fresh CPU machine never pulls several GB of CUDA wheels; where
# pip's configured indexes do not carry it, add PyTorch's CPU index:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS="[serve]"
CURRENT=0
for arg in "$@"; do
    case "$arg" in
        --dev) EXTRAS="[dev]" ;;
        --lib) EXTRAS="" ;;
        --current) CURRENT=1 ;;
        *) echo "bootstrap: unknown option $arg (allowed: --dev, --lib, --current)" >&2; exit 2 ;;
    esac
done
LOCK=requirements/lock-cpu.txt

if [[ $CURRENT == 1 ]]; then
    # The lock is the only constraint (PIP_CONSTRAINT replaces a machine-wide one such as a torch cap, which would
    # make the set unresolvable); the venv never borrows the system's torch.
    VENV=${ZIMAGE_VENV:-.venv-current}
    LOCK=requirements/lock-current.txt
    [[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
    PIP=(env PIP_CONSTRAINT="$PWD/$LOCK" "$VENV/bin/python" -m pip --disable-pip-version-check -q)
    "${PIP[@]}" install torch triton kernels
    "${PIP[@]}" install -e ".$EXTRAS"
    "$VENV/bin/python" -c 'import torch, triton, transformers, zimage_core
print("bootstrap: ok (current set), torch", torch.__version__, "triton", triton.__version__, "transformers",
      transformers.__version__)'
    exit 0
fi
VENV=${ZIMAGE_VENV:-.venv}

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

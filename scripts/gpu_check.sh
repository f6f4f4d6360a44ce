#!/usr/bin/env bash
# One call that checks everything the project claims about a GPU, in under 10 minutes on an H100/H200:
# the GPU test tier, `python -m zimage_bench kernels` at Z-Image's shapes and `python -m zimage_bench throughput` at the real
# transformer dims (random weights, 1024², CFG). At most 8 files, into $OUT when set, else zimage_bench/results/<date>-<device>/.
#
#   scripts/gpu_check.sh            on the GPU machine
#   scripts/gpu_check.sh --dry-run  the same control flow on CPU at tiny shapes (run by the CPU test tier)
#
# Interpreter: $PYTHON, else the project's .venv if it exists, else python3. Installs nothing from the network
# (missing packages come from local wheels in .whl/, see docs/kernels.md, "GPU check"). Details: scripts/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/gpu_check.py --python "$PY" "$@"

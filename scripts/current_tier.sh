#!/usr/bin/env bash
# The `current` CTest tier: install the current dependency set (requirements/lock-current.txt: the newest torch,
# triton, diffusers, transformers and Hugging Face's kernels; refresh with scripts/lock_current.sh) into its own venv,
# .venv-current, and run against it the interpreter kernel tests, parity against diffusers, the drop-in, the
# compiled-code checks (triton 3.9's assembler), the official clients against the server, and the wheel in a clean
# venv used from outside the checkout (tests/test_wheel.py). See docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
ZIMAGE_VENV=.venv-current scripts/bootstrap.sh --current --dev
echo "current tier: set installed in $(( $(date +%s) - t0 )) s"
rc=0
.venv-current/bin/python scripts/run_tier.py current "$@" || rc=$?
echo "current tier: $(( $(date +%s) - t0 )) s in all"
exit $rc

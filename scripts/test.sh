#!/usr/bin/env bash
# Install into a fresh-or-existing .venv (with dev tools) and run every test tier through CTest:
# cpu, interpret (Triton on CPU), gpu (skipped without CUDA) and lint.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
PY="$PWD/${ZIMAGE_VENV:-.venv}/bin/python"
CMAKE=$("$PY" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null || command -v cmake)
CTEST="$(dirname "$CMAKE")/ctest"
"$CMAKE" -S . -B build -DPython3_EXECUTABLE="$PY" > build.log 2>&1 || { cat build.log; exit 1; }
"$CTEST" --test-dir build --output-on-failure -V "$@"

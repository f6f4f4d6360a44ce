#!/usr/bin/env bash
# Install into a fresh-or-existing .venv (with dev tools) and run every test tier through CTest:
# cpu, interpret (Triton on CPU), gpu (skipped without CUDA), fuzz, lint and current (the current dependency set in
# its own .venv-current, scripts/current_tier.sh; `scripts/test.sh -LE current` leaves it out). Extra arguments go to
# ctest.
#
# The server-operations tests also need (installed here; once installed they are required, so they fail
# rather than skip):
#   - Debian's chromium + chromium-driver for the playground browser test (apt-get, when run as root or with sudo);
#   - the [ray] extra (Ray Serve) for the 2-replica test.
# ZIMAGE_SKIP_BROWSER=1 / ZIMAGE_SKIP_RAY=1 skip those installs (the tests then skip and say why).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --dev
PY="$PWD/${ZIMAGE_VENV:-.venv}/bin/python"

if [[ "${ZIMAGE_SKIP_BROWSER:-}" != "1" ]]; then
    if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
        SUDO=""; [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && SUDO="sudo -n"
        if [[ $(id -u) -eq 0 || -n "$SUDO" ]]; then
            echo "test.sh: installing Debian's chromium and chromium-driver (browser test)"
            { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
                chromium chromium-driver >/dev/null; } || echo "test.sh: apt-get could not install chromium"
        fi
    fi
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        export ZIMAGE_REQUIRE_BROWSER=1
    else
        echo "test.sh: no chromium/chromedriver: the browser test will be skipped"
    fi
fi
if [[ "${ZIMAGE_SKIP_RAY:-}" != "1" ]]; then
    "$PY" -c 'import ray.serve' >/dev/null 2>&1 || {
        echo "test.sh: installing the [ray] extra (Ray Serve, ~80 s)"
        "$PY" -m pip --disable-pip-version-check -q install -c requirements/lock-cpu.txt -e ".[ray]" ||
            echo "test.sh: pip could not install the [ray] extra"
    }
    if "$PY" -c 'import ray.serve' >/dev/null 2>&1; then
        export ZIMAGE_REQUIRE_RAY=1
    else
        echo "test.sh: no Ray Serve: the Ray test will be skipped"
    fi
fi

CMAKE=$("$PY" -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))' 2>/dev/null || command -v cmake)
CTEST="$(dirname "$CMAKE")/ctest"
"$CMAKE" -S . -B build -DPython3_EXECUTABLE="$PY" > build.log 2>&1 || { cat build.log; exit 1; }
rc=0
"$CTEST" --test-dir build --output-on-failure -V "$@" || rc=$?
# artifacts the tests keep (the playground's screenshot from the browser test)
[[ -d build/artifacts ]] && find build/artifacts -type f -printf "test artifact: %p\n"
exit $rc

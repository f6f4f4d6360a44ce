#!/usr/bin/env bash
# Refresh requirements/lock-current.txt, the "current" dependency set: the newest torch, triton, diffusers,
# transformers and Hugging Face's `kernels` (which current transformers needs) that the package index serves today,
# plus everything `pip install -e ".[dev]"` brings, resolved in a fresh venv and frozen. The CI tier `current`
# (scripts/current_tier.sh) installs exactly this set; commit the new lock after that tier passes with it.
#
#   scripts/lock_current.sh    (needs the package index; PyPI's torch is the CUDA build, 5.6 GB installed; measured
#                              198 s with a warm pip cache)
#
# Step 1 installs the five newest releases with no constraint; step 2 installs our package with those five pinned,
# so it fails (and says which bound) when pyproject.toml's bounds do not admit today's newest release. A machine-wide
# pip constraint (e.g. /etc/xdg/pip's torch cap) would hide the newest release: PIP_CONSTRAINT=/dev/null turns it off
# for these two commands only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" -m venv "$WORK/venv"
PIP=(env PIP_CONSTRAINT=/dev/null "$WORK/venv/bin/python" -m pip --disable-pip-version-check -q)
TOP=(torch triton diffusers transformers kernels)
"${PIP[@]}" install --upgrade "${TOP[@]}"
"$WORK/venv/bin/python" -m pip freeze | grep -iE "^($(IFS='|'; echo "${TOP[*]}"))==" > "$WORK/top.txt"
echo "lock_current: newest today: $(tr '\n' ' ' < "$WORK/top.txt")"
"${PIP[@]}" install -c "$WORK/top.txt" -e ".[dev]"
{
    echo "# The 'current' set: newest torch/triton/diffusers/transformers/kernels on $(date -u +%Y-%m-%d), Python"
    echo "# $("$WORK/venv/bin/python" -c 'import platform; print(platform.python_version(), platform.machine())')."
    echo "# PyPI's torch wheel is the CUDA build (it runs on CPU). Regenerate: scripts/lock_current.sh"
    "$WORK/venv/bin/python" -m pip freeze --exclude-editable | grep -v '^-e '
} > requirements/lock-current.txt
echo "lock_current: wrote requirements/lock-current.txt ($(grep -vc '^#' requirements/lock-current.txt) packages)"

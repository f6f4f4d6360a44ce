#!/usr/bin/env python3
"""Run one test tier with pytest: ``cpu`` (unmarked tests), ``interpret`` (Triton on CPU), ``gpu``, ``fuzz`` (the
long fuzz campaign, tests/test_fuzz.py), ``attack`` (the server attack suite and soak) or ``current`` (the
current dependency set, run by scripts/current_tier.sh).

Exit code 77 means "this tier cannot run on this machine" (the gpu tier without CUDA); CMakeLists.txt maps it to
a skipped CTest test. Extra arguments go to pytest.
"""

import os
import subprocess
import sys

TIERS = {
    "cpu": "not interpret and not gpu and not fuzz and not attack and not current",
    "interpret": "interpret",
    "gpu": "gpu",
    "fuzz": "fuzz",
    "attack": "attack",  # the server attack suite (tests/test_attack.py, tests/test_attack_soak.py)
    "current": None,  # two runs, see CURRENT
}
# The ``current`` tier (scripts/current_tier.sh, in the venv of requirements/lock-current.txt): the interpreter kernel
# tests, then parity against diffusers, the drop-in, the compiled-code checks, the official clients against the server
# and the wheel installed into a clean venv (tests/test_wheel.py).
CURRENT_FILES = [
    "tests/test_model_parity.py",
    "tests/test_pipeline_parity.py",
    "tests/test_scheduler_parity.py",
    "tests/test_diffusers_parity.py",
    "tests/test_diffusers_dropin.py",
    "tests/test_aot_compile.py",
    "tests/test_server.py",
    "tests/test_server_sdk.py",
    "tests/test_packaging.py",
    "tests/test_gpu_check.py::test_environment_records_the_versions_and_tritons_assembler",
    "tests/test_wheel.py",
]
CURRENT = [
    ("interpret", ["-m", "interpret"], {"TRITON_INTERPRET": "1"}),
    ("current", ["-m", "not interpret and not gpu and not fuzz and not attack", *CURRENT_FILES], {}),
]


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in TIERS:
        print(f"usage: run_tier.py {{{','.join(TIERS)}}} [pytest args]", file=sys.stderr)
        return 2
    tier = sys.argv[1]
    env = dict(os.environ)
    if tier == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("gpu tier: no CUDA device on this machine; skipped")
            return 77
    elif tier == "interpret":
        env["TRITON_INTERPRET"] = "1"
    if tier == "current":
        rc = 0
        for _, args, extra in CURRENT:
            cmd = [sys.executable, "-m", "pytest", *args, *sys.argv[2:]]
            print("+", " ".join(cmd), flush=True)
            rc = subprocess.call(cmd, env={**env, **extra}) or rc
        return rc
    cmd = [sys.executable, "-m", "pytest", "-m", TIERS[tier], *sys.argv[2:]]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())

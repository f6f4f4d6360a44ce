#!/usr/bin/env python3
"""Run one test tier with pytest: ``cpu`` (unmarked tests), ``interpret`` (Triton on CPU), ``gpu``, ``fuzz`` (the
long fuzz campaign, tests/test_fuzz.py) or ``attack`` (the server attack suite and soak).

Exit code 77 means "this tier cannot run on this machine" (the gpu tier without CUDA); CMakeLists.txt maps it to
a skipped CTest test. Extra arguments go to pytest.
"""

import os
import subprocess
import sys

TIERS = {
    "cpu": "not interpret and not gpu and not fuzz and not attack",
    "interpret": "interpret",
    "gpu": "gpu",
    "fuzz": "fuzz",
}
TIERS["attack"] = "attack"  # the server attack suite (tests/test_attack.py, tests/test_attack_soak.py)


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
    cmd = [sys.executable, "-m", "pytest", "-m", TIERS[tier], *sys.argv[2:]]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())

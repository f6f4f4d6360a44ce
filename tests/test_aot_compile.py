"""The GPU kernels compile for sm_90a on this CPU-only host (triton's bundled ptxas): scripts/aot_compile.py --quick.

This is the only check CI has of the code the interpreter does not run (TMA descriptors, wgmma, warp specialization,
libdevice calls, the no-FMA-contraction option of the bit-faithful kernels). It compiles; it does not execute.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_kernels_compile_for_sm90(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = tmp_path / "aot.jsonl"
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "aot_compile.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    kernels = {r["kernel"] for r in rows}
    assert {"_attn_fwd_tma_kernel", "_attn_fwd_kernel", "_qk_norm_rope_kernel", "_swiglu_kernel"} <= kernels
    tma = [r for r in rows if r["kernel"] == "_attn_fwd_tma_kernel"]
    assert all(r["tma"] and r["wgmma"] for r in tma)
    # triton >= 3.5 forms producer/consumer warp groups for the WARP_SPECIALIZE config (setmaxnreg in the PTX).
    assert any(r["warp_specialized"] for r in tma if r["config"]["WARP_SPECIALIZE"])
    assert not any(r["half_fma"] for r in rows if r["config"].get("enable_fp_fusion") is False)

#!/usr/bin/env python3
"""Compile every GPU kernel config ahead of time for a CUDA arch, on any host (no GPU needed), and check the facts.

    TRITON_INTERPRET=0 python scripts/aot_compile.py [--arch 90] [--quick] [--json out.jsonl]

Triton lowers to PTX and the bundled ``ptxas`` Triton selects for the target assembles a cubin without a device, so this
checks what the interpreter cannot: that the kernels compile for sm_90a (TMA descriptors, wgmma, warp specialization).
Each op's own launcher is called at Z-Image's shapes with shape-only tensors and its launch is compiled through Triton's
JIT binder, so the binaries carry the same specialization (divisibility-by-16 hints on pointers, strides and sizes) as
the ones the JIT builds at run time (``zimage_kernels/compiled.py``). It does not run anything: compiling is not a
correctness or speed result.

Reported per (kernel, config): registers, spills, shared memory and SASS facts (global access widths, HGMMA,
setmaxnreg, MUFU, SHFL). Exit status 1 if a config fails to compile or breaks a guarantee of ``compiled.check``:
spills or local memory, shared memory over the limit, a contracted bf16 multiply-add in a bit-faithful kernel, a
global access narrower than 16 bytes in an elementwise kernel, no wgmma in the Hopper attention kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_compile.py compiles real GPU code: run it with TRITON_INTERPRET=0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402

from zimage_kernels import compiled  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="one warp-specialized and one plain attention config (CI)")
    ap.add_argument("--json", help="also write one JSON line per config here")
    args = ap.parse_args(argv)
    tools = compiled.nvidia_tools(args.arch)
    print(
        f"triton {triton.__version__}, target {tools['gpu_name']}, Z-Image shapes (JIT specialization); "
        f"assembler chosen by Triton for the target: {tools['ptxas']} (CUDA {tools['ptxas_version']})"
    )
    rows = compiled.inspect_all(args.arch, args.quick)
    print(compiled.table(rows))
    bad = [(r, compiled.check(r)) for r in rows]
    bad = [(r, problems) for r, problems in bad if problems]
    for r, problems in bad:
        print(f"FAIL {r['kernel']} [{r['case']}] {r.get('config', '')}: {'; '.join(problems)}")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps({**r, "problems": compiled.check(r)}) + "\n")
    print(f"{len(rows)} configs, {len(bad)} breaking a compiled-code guarantee")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

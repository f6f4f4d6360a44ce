#!/usr/bin/env python3
"""Compile every GPU kernel config ahead of time for a CUDA arch, on any host (no GPU needed).

    TRITON_INTERPRET=0 python scripts/aot_compile.py [--arch 90] [--quick] [--json out.jsonl]

Triton lowers to PTX and its bundled ``ptxas`` assembles a cubin without a device, so this checks what the interpreter
cannot: that the kernels compile for sm_90a (TMA descriptors, wgmma, warp specialization), with how many registers,
spills and bytes of shared memory. It does not run anything: compiling is not a correctness or speed result.

Reported per (kernel, config): registers, spill bytes, shared memory, and whether the PTX uses wgmma, TMA
(``cp.async.bulk.tensor``) and warp specialization (``setmaxnreg``, emitted when producer/consumer warp groups are
formed), and for the bit-faithful elementwise kernels that no bf16/fp16 multiply-add was contracted. Exit status 1 if a
config fails to compile, spills, exceeds the shared-memory limit or contracts a rounding away.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("aot_compile.py compiles real GPU code: run it with TRITON_INTERPRET=0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import attention, gated_residual, layer_norm_modulate, qk_norm_rope, rms_norm_modulate, swiglu  # noqa: E402
from kernels._triton import next_pow2, row_block  # noqa: E402

SMEM_LIMIT = {90: 232448, 100: 232448}  # bytes of dynamic shared memory per block (227 KiB on H100/H200/B200)
POINTER_ARGS = {
    "Out",
    "Q",
    "K",
    "V",
    "KV_LENS",
    "X",
    "Y",
    "W",
    "Scale",
    "Gate",
    "A",
    "B",
    "QOut",
    "KOut",
    "QW",
    "KW",
    "Freqs",
}
FLOAT_ARGS = {"qk_scale", "eps", "inv_c", "inv_d"}


def _jit(fn):
    """The JITFunction under autotune / heuristics wrappers."""
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def compile_one(kernel, constexprs: dict, ptr_types: dict, num_warps: int, num_stages: int, arch: int, **options):
    fn = _jit(kernel)
    names = [p.name for p in fn.params]
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in POINTER_ARGS:
            sig[p.name] = ptr_types.get(p.name, ptr_types["*"])
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned, as at run time
        elif p.name in FLOAT_ARGS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
            if p.name.startswith("s_"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # strides of real shapes are multiples of 16
    missing = [n for n in names if sig[n] == "constexpr" and n not in constexprs]
    assert not missing, f"{fn.__name__}: constexprs missing {missing}"
    src = ASTSource(
        fn=fn, signature=sig, constexprs={k: constexprs[k] for k in names if sig[k] == "constexpr"}, attrs=attrs
    )
    t0 = time.perf_counter()
    row = {"kernel": fn.__name__, "config": {**constexprs, "num_warps": num_warps, "num_stages": num_stages, **options}}
    try:
        compiled = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "num_stages": num_stages, **options},
        )
    except Exception as e:  # noqa: BLE001 - report every failure, keep going
        return {**row, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    ptx = compiled.asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.ptx").write_text(ptx)
        gpu = f"sm_{arch}a"
        res = subprocess.run(
            [str(ptxas), "-v", f"--gpu-name={gpu}", str(Path(d) / "k.ptx"), "-o", str(Path(d) / "k.cubin")]
            + ([] if options.get("enable_fp_fusion", True) else ["--fmad=false"]),
            capture_output=True,
            text=True,
        )
    log = res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {
        **row,
        "ok": res.returncode == 0,
        "seconds": round(time.perf_counter() - t0, 1),
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spills.group(1)) if spills else None,
        "shared_bytes": compiled.metadata.shared,
        "wgmma": "wgmma" in ptx,
        "tma": "cp.async.bulk.tensor" in ptx,
        "warp_specialized": "setmaxnreg" in ptx,
        # contracted bf16/fp16 multiply-adds would skip an eager rounding (the faithful kernels must have none)
        "half_fma": bool(re.search(r"\bfma\.rn\.(bf16|f16)", ptx)),
    }


def cases(quick: bool):
    """(kernel, constexprs, pointer dtypes, num_warps, num_stages) at Z-Image's shapes, bf16."""
    bf16 = {"*": "*bf16", "KV_LENS": "*i32"}
    tma_cfgs = attention._tma_configs(False)
    plain_cfgs = attention._plain_configs(False)
    if quick:  # one WS and one non-WS TMA config, one pointer config
        tma_cfgs = [c for c in tma_cfgs if c.kwargs["WARP_SPECIALIZE"]][:1] + [
            c for c in tma_cfgs if not c.kwargs["WARP_SPECIALIZE"]
        ][:1]
        plain_cfgs = plain_cfgs[:1]
    for d in (128,) if quick else (128, 64):
        for c in tma_cfgs:
            for has_lens in (True,) if quick else (True, False):
                const = {"HEAD_DIM": d, "HAS_KV_LENS": has_lens, "EVEN_KV": not has_lens, **c.kwargs}
                yield attention._attn_fwd_tma_kernel, const, bf16, c.num_warps, c.num_stages, {}
        for c in plain_cfgs:
            const = {"HEAD_DIM": d, "HEAD_DIM_PAD": d, "HAS_KV_LENS": True, "INPUT_PRECISION": None, **c.kwargs}
            yield attention._attn_fwd_kernel, const, bf16, c.num_warps, c.num_stages, {}
    C, F, H, D = 3840, 10240, 30, 128
    exact = {"enable_fp_fusion": False}  # as the launchers of the bit-faithful kernels
    br, w = row_block(4608, next_pow2(C))
    rows = {"BLOCK_R": br, "BLOCK_C": next_pow2(C)}
    yield rms_norm_modulate._rms_norm_modulate_kernel, {**rows, "HAS_SCALE": True}, bf16, w, 1, exact
    yield gated_residual._gated_residual_kernel, {**rows, "HAS_GATE": True}, bf16, w, 1, exact
    yield layer_norm_modulate._layer_norm_modulate_kernel, rows, bf16, w, 1, exact
    bf = min(swiglu.MAX_BLOCK_F, next_pow2(F))
    br, w = row_block(4608, bf)
    yield swiglu._swiglu_kernel, {"BLOCK_R": br, "BLOCK_F": bf}, bf16, w, 1, exact
    bh, bp = next_pow2(H), next_pow2(D // 2)
    bt, w = row_block(4608, bh * bp * 2)
    const = {"HALF_D": D // 2, "BLOCK_T": bt, "BLOCK_H": bh, "BLOCK_P": bp, "HAS_ROPE": True}
    yield qk_norm_rope._qk_norm_rope_kernel, const, {**bf16, "Freqs": "*fp32"}, w, 1, exact


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    ap.add_argument("--quick", action="store_true", help="a representative subset (CI)")
    ap.add_argument("--json", help="also write one JSON line per config here")
    args = ap.parse_args(argv)
    rows, bad = [], 0
    print(f"triton {triton.__version__}, target sm_{args.arch}a")
    for kernel, const, ptrs, warps, stages, options in cases(args.quick):
        r = compile_one(kernel, const, ptrs, warps, stages, args.arch, **options)
        rows.append(r)
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items() if k not in ("HEAD_DIM_PAD", "INPUT_PRECISION"))
        if not r["ok"]:
            bad += 1
            print(f"FAIL {r['kernel']:<28} {cfg}\n     {r.get('error', 'ptxas failed')}")
            continue
        over = r["shared_bytes"] > SMEM_LIMIT.get(args.arch, 232448)
        contracted = r["half_fma"] and options.get("enable_fp_fusion", True) is False
        if r["spill_bytes"] or over or contracted:
            bad += 1
        flags = " ".join(n for n in ("wgmma", "tma", "warp_specialized", "half_fma") if r[n])
        status = "WARN" if r["spill_bytes"] or over or contracted else "ok  "
        print(
            f"{status} {r['kernel']:<28} regs={r['registers']:<3} "
            f"spill={r['spill_bytes']}B smem={r['shared_bytes'] / 1024:.0f}KiB{' (OVER LIMIT)' if over else ''} "
            f"[{flags}] {r['seconds']}s  {cfg}"
        )
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"{len(rows)} configs, {bad} failed/spilling/over the shared-memory limit")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

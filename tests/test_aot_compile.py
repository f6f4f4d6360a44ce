"""Compiled-code guarantees for sm_90a, checked on this CPU-only host with Triton's bundled ptxas / cuobjdump.

scripts/aot_compile.py --quick compiles every op at Z-Image's shapes with the specialization the JIT applies at run
time (zimage_kernels/compiled.py records each launcher's real arguments and passes them through Triton's JIT binder).
This
is the only check CI has of the code the interpreter does not run (TMA descriptors, wgmma, warp specialization,
libdevice calls, the no-FMA-contraction option of the bit-faithful kernels). It compiles; it does not execute.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = {
    "_rms_norm_modulate_kernel",
    "_gated_residual_kernel",
    "_layer_norm_modulate_kernel",
    "_swiglu_kernel",
    "_qk_norm_rope_kernel",
    "_attn_fwd_tma_kernel",
    "_attn_fwd_kernel",
    "_attn_fa3_kernel",
}
FP8_KERNELS = {"_rms_norm_modulate_fp8_kernel", "_swiglu_fp8_kernel", "_quantize_rows_kernel", "_fp8_gemm_kernel"}
KERNELS |= FP8_KERNELS


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "aot.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "aot_compile.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=1200,
    )
    assert out.exists(), res.stdout[-4000:] + res.stderr[-4000:]
    return res, [json.loads(line) for line in out.read_text().splitlines()]


def test_every_kernel_compiles_for_sm90a_and_keeps_every_guarantee(rows):
    res, rows = rows
    assert {r["kernel"] for r in rows} == KERNELS
    broken = {f"{r['kernel']} {r.get('config')}": r["problems"] for r in rows if r["problems"]}
    assert not broken, broken
    assert res.returncode == 0, res.stdout[-4000:]
    for r in rows:
        assert r["spill_bytes"] == 0 and r["local_memory"] == 0 and r["shared_bytes"] <= 232448, r


def test_elementwise_kernels_use_16_byte_vectors_only(rows):
    _, rows = rows
    for r in rows:
        if r["kernel"] in KERNELS - {"_attn_fwd_tma_kernel", "_attn_fwd_kernel", "_attn_fa3_kernel"} - FP8_KERNELS:
            widths = r["global_access_bits"]
            assert widths and set(widths) <= {"ldg128", "stg128"}, (r["kernel"], widths)
            assert not r["half_fma"], r["kernel"]  # bit-faithful kernels: no contracted bf16 multiply-add


def test_review_fixes_hold_in_the_compiled_code(rows):
    """qk_norm_rope on a flat tile: was 192 SHFL, 32-bit accesses; gated_residual: was 34 MUFU (tanh per row)."""
    _, rows = rows
    by = {r["kernel"]: r for r in rows}
    assert by["_qk_norm_rope_kernel"]["shfl"] <= 64, by["_qk_norm_rope_kernel"]
    assert by["_gated_residual_kernel"]["mufu"] <= 4, by["_gated_residual_kernel"]


def test_hopper_attention_uses_wgmma_tma_and_warp_specialization(rows):
    _, rows = rows
    tma = [r for r in rows if r["kernel"] == "_attn_fwd_tma_kernel"]
    assert tma and all(r["hgmma"] and r["ptx_wgmma"] and r["tma"] for r in tma)
    ws = [r for r in tma if "WARP_SPECIALIZE=True" in r["config"]]
    assert ws and all(r["setmaxnreg"] for r in ws)  # producer/consumer register split
    assert all(r["hgmma"] for r in rows if r["kernel"] == "_attn_fwd_kernel")  # tl.dot lowers to wgmma on sm_90a


def test_fa3_gluon_attention_compiles_to_async_wgmma_tma_and_a_register_split(rows):
    """zimage_kernels/attention_fa3.py: two consumer warpgroups + a load warp (padded to a warpgroup): 384 threads,
    async
    wgmma (HGMMA in SASS, wgmma.wait_group in PTX), TMA loads and stores, setmaxnreg for the partitions."""
    _, rows = rows
    (r,) = [r for r in rows if r["kernel"] == "_attn_fa3_kernel"]
    assert r["hgmma"] >= 32 and r["ptx_wgmma"] and r["tma"] >= 3 and r["setmaxnreg"] >= 2, r
    assert r["ptx_wgmma_overlap"], r  # waits for QK while PV is still in flight (wgmma.wait_group 1)
    assert r["spill_bytes"] == 0 and r["local_memory"] == 0 and r["stack_bytes"] == 0, r
    assert r["shared_bytes"] <= 232448, r


def test_fp8_kernels_compile_to_wide_accesses_and_e4m3_wgmma(rows):
    """The e4m3 producers read bf16 16 bytes at a time and store the codes 16 bytes at a time (plus one 4-byte
    scale per row); the FP8 GEMM loads its tiles with 16-byte cp.async and its tl.dot is wgmma on e4m3 operands
    (QGMMA in SASS); no spills anywhere."""
    _, rows = rows
    by = {r["kernel"]: r for r in rows}
    for k in FP8_KERNELS - {"_fp8_gemm_kernel"}:
        widths = by[k]["global_access_bits"]
        assert set(widths) == {"ldg128", "stg128", "stg32"} and widths["stg32"] == 1, (k, widths)
    g = by["_fp8_gemm_kernel"]
    assert g["qgmma"] > 0 and g["ptx_wgmma_e4m3"] and g["hgmma"] == 0, g
    assert g["cp_async_128"] > 0, g  # operand tiles: 16-byte global->shared copies (the LDGs are the scales)
    assert all(by[k]["spill_bytes"] == 0 and by[k]["local_memory"] == 0 for k in FP8_KERNELS)


def test_sass_parser_on_a_hand_written_listing():
    from zimage_kernels.compiled import sass_facts

    sass = """
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;              /* 0x000000040204781 */
        /*0020*/                   LDG.E.U16 R8, desc[UR4][R6.64] ;              /* 0x000000040608781 */
        /*0030*/                   LDG.E R9, desc[UR4][R6.64+0x4] ;              /* 0x000000040609781 */
        /*0040*/                   MUFU.RSQ R10, R9 ;                             /* 0x000000000910308 */
        /*0050*/                   SHFL.BFLY PT, R11, R10, 0x1, 0x1f ;            /* 0x0c201f000b0b7589 */
        /*0060*/                   STG.E.64 desc[UR4][R2.64], R4 ;               /* 0x000000040200798 */
        /*0070*/                   STL [R1], R4 ;                                 /* 0x000000040100738 */
        /*0080*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ; /* 0x0000000818187df0 */
    """
    f = sass_facts(sass)
    assert f["instructions"] == 8
    assert f["global_access_bits"] == {"ldg128": 1, "ldg16": 1, "ldg32": 1, "stg64": 1}
    assert (f["mufu"], f["shfl"], f["local_memory"], f["hgmma"]) == (1, 1, 1, 1)


# PTX ISA version -> the first CUDA release whose ptxas accepts it (NVIDIA's PTX ISA release notes): 8.0-8.5 came with
# CUDA 12.0-12.5, 8.6 with 12.7, 8.7 with 12.8, 8.8 with 12.9; 9.x with 13.x.
def _cuda_for_ptx(ptx: str) -> tuple[int, int]:
    major, minor = map(int, ptx.split("."))
    if major == 8:
        return (12, minor) if minor <= 5 else (12, minor + 1)
    assert major == 9, ptx
    return (13, minor)


def test_checker_assembles_with_a_ptxas_that_accepts_this_tritons_ptx(rows):
    """The issue's failure on triton 3.9: PTX .version 9.4 handed to the CUDA 12.9 ptxas (accepts up to 8.8)."""
    _, rows = rows
    for r in rows:
        need = _cuda_for_ptx(r["ptx_version"])
        have = tuple(map(int, r["ptxas_version"].split(".")))
        assert have >= need, (r["kernel"], r["ptx_version"], r["ptxas_version"])


def test_checker_follows_tritons_choice_of_assembler(tmp_path):
    """Triton's overrides (TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH) reach the checker: it asks Triton."""
    fake = tmp_path / "fake-ptxas"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 77.7, V77.7.1'\n")
    fake.chmod(0o755)
    probe = "from zimage_kernels import compiled; t = compiled.nvidia_tools(90); print(t['ptxas'], t['ptxas_version'])"
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    env.update(TRITON_PTXAS_PATH=str(fake), TRITON_PTXAS_BLACKWELL_PATH=str(fake))
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split() == [str(fake), "77.7"], res.stdout


def test_gluon_seam_picks_the_first_name_this_triton_has():
    import types

    from zimage_kernels import _gluon

    new, old = object(), object()
    assert _gluon._pick(types.SimpleNamespace(async_load=new, async_copy_global_to_shared=old), "async_load",
                        "async_copy_global_to_shared") == ("async_load", new)  # fmt: skip
    assert _gluon._pick(types.SimpleNamespace(async_copy_global_to_shared=old), "async_load",
                        "async_copy_global_to_shared") == ("async_copy_global_to_shared", old)  # fmt: skip
    with pytest.raises(ImportError, match="async_load"):
        _gluon._pick(types.SimpleNamespace(__name__="tma"), "async_load")
    # on the installed Triton (3.8 in the lock, 3.9 in the current set) the kernel uses the builtins named async_*
    assert (_gluon.TMA_LOAD_NAME, _gluon.TMA_STORE_NAME) == ("async_load", "async_store")

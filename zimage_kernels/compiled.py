"""What the kernels compile to for a GPU, read on any host (no GPU): registers, spills, shared memory, SASS facts.

Triton lowers to PTX, and the ``ptxas`` / ``cuobjdump`` bundled with Triton's CUDA backend assemble and disassemble it
without a device. The assembler is the one Triton itself picks for the target (``get_ptxas(arch)`` of its NVIDIA
backend: triton 3.8 uses the CUDA 12.x ``ptxas`` for sm_90 and ``ptxas-blackwell`` from sm_100, triton 3.9
``ptxas-blackwell`` (CUDA 13.x) from sm_90), run through the backend's own ``make_cubin`` so that the flags are Triton's
too; the facts are read from that run's ``ptxas -v`` log and from the cubin it returns. The point of this module is to
compile **the same specialization the JIT applies at run time**: each op's own launcher is called at Z-Image's shapes
with ``meta`` tensors (shapes and strides, no data) while the kernel launch is recorded instead of executed, and the
recorded arguments go through Triton's own JIT binder (``create_function_from_signature`` + ``JITFunction._pack_args``),
which decides the divisibility-by-16 attributes of pointers and integers exactly as a launch does. Autotuned kernels are
compiled once per curated config, with their ``triton.heuristics`` applied as at run time.

Facts read per (kernel, config):

- from ``ptxas -v``: registers per thread, spill bytes, stack frame bytes;
- from the compiled metadata: shared memory per block;
- from the SASS (``cuobjdump -sass``): the widths of global loads/stores (``LDG.E.128`` is a 16-byte vector),
  local-memory traffic (``LDL``/``STL``), ``HGMMA`` (wgmma, async tensor cores), ``USETMAXREG`` (setmaxnreg, warp
  specialization's register split), ``MUFU`` (transcendentals) and ``SHFL`` (warp shuffles), total instructions.

``check(row)`` turns the project's guarantees into failures (used by ``scripts/aot_compile.py`` and the CPU test
tier): 0 spills and no local memory, shared memory within the sm_90 limit, 16-byte global accesses only for the
elementwise kernels, wgmma for every Hopper attention kernel, setmaxnreg for the warp-specialized ones (the Gluon
FA3 kernel of ``attention_fa3.py`` compiles through the same binder, from its Gluon AST source).
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

SMEM_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 / sm_100 (227 KiB)
# Z-Image's real dims: CFG batch of 2, 4096 image tokens + a 512-token caption, width 3840, 30 heads of 128, FFN 10240.
B, N, C, H, D, F = 2, 4096 + 512, 3840, 30, 128, 10240
ELEMENTWISE = (
    "_rms_norm_modulate_kernel",
    "_gated_residual_kernel",
    "_layer_norm_modulate_kernel",
    "_swiglu_kernel",
    "_qk_norm_rope_kernel",
)
FP8_QUANT = ("_rms_norm_modulate_fp8_kernel", "_swiglu_fp8_kernel", "_quantize_rows_kernel")  # e4m3 producers
FP8_GEMM = "_fp8_gemm_kernel"


@functools.cache
def nvidia_tools(arch: int = 90) -> dict:
    """The assembler and disassembler Triton itself uses for ``arch`` (compute capability x10), with its name for
    the target: whatever this Triton's NVIDIA backend selects (``get_ptxas``, ``TRITON_PTXAS_PATH`` /
    ``TRITON_PTXAS_BLACKWELL_PATH`` overrides included), never a binary chosen here."""
    from triton import knobs
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch)
    version = re.search(r"release (\d+\.\d+)", subprocess.run([ptxas.path, "--version"], capture_output=True,
                                                                text=True).stdout)  # fmt: skip
    return {
        "ptxas": ptxas.path,
        "ptxas_version": version.group(1) if version else None,
        "cuobjdump": knobs.nvidia.cuobjdump.path,
        "gpu_name": nv.sm_arch_from_capability(arch),
    }


@dataclass
class Launch:
    """One recorded launch: the (possibly autotuned) kernel object, its positional args and keyword args."""

    kernel: object
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel, sink: list):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.kernel, args, kwargs))

        return launch

    @property
    def fn(self):  # ``kernel.fn[grid](...)`` (a fixed config) records the inner kernel
        return _Recorder(self.kernel.fn, self.sink)


@contextlib.contextmanager
def recording(*modules):
    """Within the block, the kernels of ``modules`` are recorded instead of launched, and the launchers accept
    ``meta`` tensors (device checks and device contexts are bypassed)."""
    sink: list[Launch] = []
    saved = []
    for mod in modules:
        for name, obj in vars(mod).items():
            if isinstance(obj, (triton.runtime.jit.JITFunction, triton.runtime.Autotuner, triton.runtime.Heuristics)):
                if name.endswith("_kernel"):
                    saved.append((mod, name, obj))
                    setattr(mod, name, _Recorder(obj, sink))
        for name, repl in (
            ("supported_device", lambda t: True),
            ("launcher_device", lambda t: contextlib.nullcontext()),
            ("ensure_allocator", lambda: None),
        ):
            if hasattr(mod, name):
                saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, repl)
    try:
        yield sink
    finally:
        for mod, name, obj in reversed(saved):
            setattr(mod, name, obj)


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def zimage_launches(quick: bool = False) -> list[tuple[str, Launch]]:
    """(case name, launch) of every op at Z-Image's shapes in bf16, recorded from the ops' own launchers."""
    from . import attention, attention_fa3, gated_residual, layer_norm_modulate, qk_norm_rope, rms_norm_modulate, swiglu

    mods = (attention, attention_fa3, gated_residual, layer_norm_modulate, qk_norm_rope, rms_norm_modulate, swiglu)
    out = []
    x, y = _meta(B, N, C), _meta(B, N, C)
    w = _meta(C)
    mod = _meta(B, 1, 4 * C).chunk(4, dim=2)  # adaLN output [B, 1, 4C] split in 4, as the model passes them
    qkv = [_meta(B, N, C).unflatten(-1, (H, D)) for _ in range(3)]  # to_q/to_k/to_v outputs viewed as heads
    freqs = torch.empty(B, N, D // 2, dtype=torch.complex64, device="meta")
    lens = torch.empty(B, dtype=torch.int32, device="meta")
    from . import fp8_triton
    from .fp8 import E4M3, Fp8Act

    mods += (fp8_triton,)
    act = Fp8Act(_meta(B * N, C, dtype=E4M3), _meta(B * N, 1, dtype=torch.float32))
    w_ffn = (_meta(F, C, dtype=E4M3), _meta(F, dtype=torch.float32))
    with recording(*mods) as sink:
        calls = [
            ("rms_norm_modulate", lambda: rms_norm_modulate._launch(x, w, mod[0], 1e-5)),
            ("gated_residual", lambda: gated_residual._launch(x, y, w, mod[1], 1e-5)),
            ("layer_norm_modulate", lambda: layer_norm_modulate._launch(x, mod[0], 1e-6)),
            ("swiglu", lambda: swiglu._launch(_meta(B * N, F), _meta(B * N, F))),
            ("qk_norm_rope", lambda: qk_norm_rope._launch(qkv[0], qkv[1], _meta(D), _meta(D), freqs, 1e-5)),
            ("attention tma kv_lens", lambda: attention._launch(*qkv, lens, path="tma")),
            ("attention plain kv_lens", lambda: attention._launch(*qkv, lens, path="plain")),
            ("attention fa3 kv_lens", lambda: attention_fa3._launch(*qkv, lens)),
            ("rms_norm_modulate_fp8", lambda: fp8_triton.rms_norm_modulate_fp8(x, w, mod[0], 1e-5)),
            ("swiglu_fp8", lambda: fp8_triton.swiglu_fp8(_meta(B * N, F), _meta(B * N, F))),
            ("quantize_rows (attention out)", lambda: fp8_triton.quantize_rows(_meta(B, N, C))),
            ("fp8_gemm w1 (e4m3)", lambda: fp8_triton.fp8_gemm(act, *w_ffn, None, torch.bfloat16)),
        ]
        if not quick:
            calls.append(("attention tma even", lambda: attention._launch(*qkv, None, path="tma")))
            calls.append(("attention tma lse", lambda: attention._launch(*qkv, lens, path="tma", lse=True)))
            calls.append(("attention fa3 lse", lambda: attention_fa3._launch(*qkv, lens, lse=True)))
        for name, call in calls:
            before = len(sink)
            call()
            out += [(name, launch) for launch in sink[before:]]
    return out


def _unwrap(kernel):
    """(JITFunction, configs or [None], heuristics {name: fn}) under autotune / heuristics wrappers."""
    configs, heur = [None], {}
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        if isinstance(kernel, triton.runtime.Autotuner):
            configs = list(kernel.configs)
        elif isinstance(kernel, triton.runtime.Heuristics):
            heur.update(kernel.values)
        kernel = kernel.fn
    return kernel, configs, heur


def compile_launch(launch: Launch, arch: int = 90, config=None):
    """Compile a recorded launch (with ``config`` for an autotuned kernel) through the JIT's own specialization.
    Returns (jit function, kwargs used, CompiledKernel, the backend's compile options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit, _, heur = _unwrap(launch.kernel)
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if heur:
        named = {p.name: a for p, a in zip(jit.params, launch.args)} | kwargs
        for name, fn in heur.items():
            kwargs[name] = fn(named)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, spec, opts)
    src_cls = ASTSource
    if jit.is_gluon():  # Gluon kernels compile from their own AST source (TTGIR, layouts explicit)
        from triton.experimental.gluon._runtime import GluonASTSource as src_cls
    src = src_cls(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=target, options=options.__dict__)
    return jit, kwargs, compiled, backend.parse_options(options.__dict__)


_LDST = re.compile(r"\b(LDG|STG)\.E(?:\.[A-Z0-9_]+)*")


def sass_facts(sass: str) -> dict:
    """Counts read off a SASS listing (instruction lines only)."""
    instrs = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+([^;]+);", sass)]
    widths: Counter = Counter()
    for ins in instrs:
        m = _LDST.search(ins)
        if m:
            parts = m.group(0).split(".")
            bits = next((int(p) for p in parts[2:] if p in ("64", "128")), None)
            if bits is None:
                narrow = {"U16": 16, "S16": 16, "U8": 8, "S8": 8}
                bits = next((narrow[p] for p in parts if p in narrow), 32)
            widths[f"{parts[0].lower()}{bits}"] += 1

    def count(pattern):
        return sum(1 for ins in instrs if re.search(pattern, ins))

    return {
        "instructions": len(instrs),
        "global_access_bits": dict(sorted(widths.items())),
        "local_memory": count(r"\b(LDL|STL)\b"),
        "hgmma": count(r"\bHGMMA\b"),
        "qgmma": count(r"\bQGMMA\b"),  # wgmma with fp8 (e4m3/e5m2) operands
        "cp_async_128": count(r"\bLDGSTS\.E(?:\.[A-Z]+)*\.128\b"),  # 16-byte global->shared asynchronous copies
        "setmaxnreg": count(r"\bUSETMAXREG\b"),
        "mufu": count(r"\bMUFU\b"),
        "shfl": count(r"\bSHFL\b"),
        "tma": count(r"\bUTMALDG\b|\bUBLKCP\b|\bUTMASTG\b"),
    }


def ptxas_run(ptx: str, options, arch: int = 90) -> tuple[bool, str, bytes]:
    """Assemble ``ptx`` exactly as Triton does for ``arch``: its backend's ``make_cubin`` (its ptxas, its flags, its
    ``--gpu-name``), with the ``ptxas -v`` log captured. Returns (ok, log, cubin)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", arch, 32))
    out = io.StringIO()
    saved = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # make_cubin prints the -v log of a successful run
    try:
        with contextlib.redirect_stdout(out):
            cubin = backend.make_cubin(ptx, {}, options, arch)
        return True, out.getvalue(), cubin
    except Exception as e:  # noqa: BLE001 - PTXASError carries ptxas' stderr and the repro command
        return False, str(e), b""
    finally:
        knobs.nvidia.dump_ptxas_log = saved


def facts(compiled, options, arch: int = 90) -> dict:
    """ptxas -v and SASS facts of one CompiledKernel compiled with ``options`` (as returned by ``compile_launch``)."""
    ptx = compiled.asm["ptx"]
    ok, log, cubin = ptxas_run(ptx, options, arch)
    sass = ""
    if ok:
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "k.cubin"
            path.write_bytes(cubin)
            cmd = [nvidia_tools(arch)["cuobjdump"], "-sass", str(path)]
            sass = subprocess.run(cmd, capture_output=True, text=True).stdout

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    ptx_version = re.search(r"^\.version (\d+\.\d+)", ptx, re.MULTILINE)
    return {
        "ptx_version": ptx_version.group(1) if ptx_version else None,
        "ptxas_version": nvidia_tools(arch)["ptxas_version"],
        "ptxas_ok": ok,
        "ptxas_error": None if ok else log[-400:],
        "registers": num(r"Used (\d+) registers"),
        "spill_bytes": (num(r"(\d+) bytes spill stores") or 0) + (num(r"(\d+) bytes spill loads") or 0),
        "stack_bytes": num(r"(\d+) bytes stack frame"),
        "shared_bytes": compiled.metadata.shared,
        "ptx_wgmma": "wgmma" in ptx,
        "ptx_wgmma_e4m3": bool(re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", ptx)),
        "ptx_setmaxnreg": "setmaxnreg" in ptx,
        # a wgmma wait that leaves a group in flight: compute overlapped with a running GEMM (FA3's softmax/PV overlap)
        "ptx_wgmma_overlap": bool(re.search(r"wgmma\.wait_group\.sync\.aligned\s+[1-9]", ptx)),
        # contracted bf16/fp16 multiply-adds skip an eager rounding: the bit-faithful kernels must have none
        "half_fma": bool(re.search(r"\bfma\.rn\.(bf16|f16)", ptx)),
        **sass_facts(sass),
    }


def config_label(kwargs: dict) -> str:
    keep = ("BLOCK_M", "BLOCK_N", "WARP_SPECIALIZE", "EVEN_KV", "BLOCK_R", "BLOCK_C", "BLOCK_F", "BLOCK_T", "num_warps")
    keep += ("num_stages", "BM", "BN", "NSTAGE")
    return ",".join(f"{k}={kwargs[k]}" for k in keep if k in kwargs)


def inspect_all(arch: int = 90, quick: bool = False) -> list[dict]:
    """One row of facts per (op case, kernel, config) at Z-Image's shapes."""
    rows = []
    for case, launch in zimage_launches(quick):
        jit, configs, _ = _unwrap(launch.kernel)
        if quick and configs != [None]:  # one warp-specialized and one plain config of each autotuned kernel
            ws = [c for c in configs if c.kwargs.get("WARP_SPECIALIZE")][:1]
            configs = ws + [c for c in configs if not c.kwargs.get("WARP_SPECIALIZE")][:1]
        for cfg in configs:
            t0 = time.perf_counter()
            row = {"case": case, "kernel": jit.__name__}
            try:
                _, kwargs, compiled, options = compile_launch(launch, arch, cfg)
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                rows.append({**row, "ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
                continue
            row["config"] = config_label(kwargs)
            row.update(facts(compiled, options, arch))
            row["ok"] = row["ptxas_ok"]
            row["fp_fusion"] = options.enable_fp_fusion
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
    return rows


def check(row: dict) -> list[str]:
    """The compiled-code guarantees one row breaks (empty: all hold)."""
    if not row.get("ok"):
        return [f"does not compile: {row.get('error') or row.get('ptxas_error')}"]
    bad = []
    if row["spill_bytes"]:
        bad.append(f"spills {row['spill_bytes']} bytes")
    if row["local_memory"]:
        bad.append(f"{row['local_memory']} local-memory instructions (LDL/STL)")
    if row["shared_bytes"] > SMEM_LIMIT:
        bad.append(f"shared memory {row['shared_bytes']} > {SMEM_LIMIT}")
    if not row["fp_fusion"] and row["half_fma"]:
        bad.append("contracted a bf16/fp16 multiply-add (skips an eager rounding)")
    if row["kernel"] in ELEMENTWISE:
        narrow = {k: v for k, v in row["global_access_bits"].items() if not k.endswith("128")}
        if narrow:
            bad.append(f"global accesses narrower than 16 bytes: {narrow}")
    if row["kernel"] in FP8_QUANT:  # bf16 inputs read 16 bytes at a time; e4m3 codes stored 8+ bytes at a time
        narrow = {k: v for k, v in row["global_access_bits"].items() if k.startswith("ldg") and not k.endswith("128")}
        if narrow:
            bad.append(f"global loads narrower than 16 bytes: {narrow}")
    if row["kernel"] == FP8_GEMM and not (row["qgmma"] and row["ptx_wgmma_e4m3"]):
        bad.append(f"FP8 GEMM without wgmma on e4m3 operands (QGMMA {row['qgmma']})")
    if row["kernel"] == FP8_GEMM and not row["cp_async_128"]:
        bad.append("FP8 GEMM tiles not loaded by 16-byte asynchronous copies (LDGSTS.128)")
    if row["kernel"] == "_attn_fwd_tma_kernel":
        if not row["hgmma"]:
            bad.append("no HGMMA (wgmma) in the Hopper attention kernel")
        if "WARP_SPECIALIZE=True" in row["config"] and not row["setmaxnreg"]:
            bad.append("warp-specialized config without setmaxnreg")
    if row["kernel"] == "_attn_fa3_kernel":  # Gluon, explicit partitions: wgmma, TMA and the register split
        if not (row["hgmma"] and row["tma"] and row["setmaxnreg"]):
            bad.append(f"FA3 kernel lacks HGMMA/TMA/setmaxnreg: {row['hgmma']}/{row['tma']}/{row['setmaxnreg']}")
    return bad


def table(rows: list[dict]) -> str:
    """Markdown table of the facts."""
    cols = "kernel case config regs spill_B smem_KiB global_accesses HGMMA setmaxnreg MUFU SHFL instrs ok".split()
    head = "| " + " | ".join(c.replace("_", " ") for c in cols) + " |"
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['kernel']} | {r['case']} | | | | | | | | | | | FAIL: {r.get('error', '')[:80]} |")
            continue
        acc = " ".join(f"{k}×{v}" for k, v in r["global_access_bits"].items())
        problems = check(r)
        lines.append(
            f"| {r['kernel']} | {r['case']} | {r['config']} | {r['registers']} | {r['spill_bytes']} | "
            f"{r['shared_bytes'] / 1024:.0f} | {acc} | {r['hgmma']} | {r['setmaxnreg']} | {r['mufu']} | {r['shfl']} | "
            f"{r['instructions']} | {'yes' if not problems else '; '.join(problems)} |"
        )
    return "\n".join(lines)

"""``python -m zimage_bench kernels``: per-op microbenchmarks of the Triton kernels against torch.

For every (op, case) the harness first checks each provider's result against the exact float64 value with the
project's tolerance rule (tests/tolerance.py: at most 2x torch's own same-dtype error plus a noise floor) and only
times providers that pass. Units: TFLOP/s for attention (4·H·D·N_q·Σ_b kv_len_b, = 4·B·H·N²·D unpadded), GB/s for the
elementwise ops (minimal bytes: every input read once, every output written once), with the measured device-copy
bandwidth as the roofline (``pct_of_copy``).

Providers: ``triton`` (the op switch's Triton function; for attention also ``triton-tma`` / ``triton-plain`` forcing
one kernel, and ``triton-fa3``, the opt-in Gluon kernel, only when named in ``--providers``), ``eager``
(``zimage_kernels.reference``), for attention every torch SDPA backend (``sdpa-flash``,
``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``; ragged batches pass SDPA a boolean key mask, as diffusers does, which
some backends reject), and with ``--compile`` the reference under ``torch.compile``.

Timing: on CUDA ``triton.testing.do_bench`` (L2 flushed before every run, median and 20/80% quantiles). On CPU
``time.perf_counter`` around synchronous calls, rows labelled ``device: cpu``; Triton runs on CPU only under the
interpreter (TRITON_INTERPRET=1), which is checked for correctness and never timed. Output: one JSON line per row (the
environment in each), a printed table, and with ``--save`` a file under ``zimage_bench/results/`` named after the
device.

Example (the issue's target shape)::

    python -m zimage_bench kernels --cases zimage --dtype bf16 --save
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import importlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from zimage_kernels import reference

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "zimage_bench" / "results"
OPT_IN_PROVIDERS = ("triton-fa3",)  # run only when --providers names them (scripts/gpu_check.py runs them apart)
OPS = ("attention", "qk_norm_rope", "rms_norm_modulate", "gated_residual", "swiglu", "layer_norm_modulate")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
ROW_KEYS = (
    "op", "case", "provider", "device", "dtype", "shape", "refcheck", "median_ms", "p20_ms", "p80_ms",
    "tflops", "gbps", "pct_of_copy", "speedup_vs_eager", "note", "repro", "env",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Work formulas
# ---------------------------------------------------------------------------------------------------------------


def attention_flops(B: int, H: int, n_q: int, n_kv: int, D: int, kv_lens=None) -> float:
    """Forward FLOPs of non-causal attention: 2 GEMMs of 2·N_q·N_kv·D each per (batch, head).

    With per-sample key lengths only the valid keys count: ``4·H·D·N_q·Σ_b kv_len_b``.
    """
    keys = B * n_kv if kv_lens is None else sum(min(max(int(n), 0), n_kv) for n in kv_lens)
    return 4.0 * H * D * n_q * keys


def op_bytes(op: str, shape: dict, esize: int) -> int:
    """Minimal global-memory traffic of one call: inputs read once, outputs written once (bytes)."""
    if op not in OPS or op == "attention":
        raise ValueError(f"no byte count for {op}")
    if op == "swiglu":
        return 3 * shape["R"] * shape["F"] * esize
    if op == "qk_norm_rope":
        B, N, H, D = shape["B"], shape["N"], shape["H"], shape["D"]
        return 4 * B * N * H * D * esize + 2 * D * esize + B * N * (D // 2) * 8  # q,k in+out; weights; complex64
    B, N, C = shape["B"], shape["N"], shape["C"]
    act = B * N * C
    if op == "rms_norm_modulate":
        return (2 * act + C + B * C) * esize
    if op == "gated_residual":
        return (3 * act + C + B * C) * esize
    assert op == "layer_norm_modulate", op
    return (2 * act + B * C) * esize


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    tag: str
    shape: dict  # attention: B, N, H, D, kv_lens (list or None); elementwise: see op_bytes

    def inputs(self, device, dtype, seed: int = 0):
        """(args, kwargs) for the op, model-like layouts (q/k/v as views of a [B, N, H·D] projection)."""
        g = torch.Generator().manual_seed(seed)

        def rn(*s, scale=1.0):
            return (torch.randn(*s, generator=g) * scale).to(dtype).to(device)

        s = self.shape
        if self.op == "attention":
            B, N, H, D = s["B"], s["N"], s["H"], s["D"]
            q, k, v = (rn(B, N, H * D).unflatten(-1, (H, D)) for _ in range(3))
            kv = None if s["kv_lens"] is None else torch.tensor(s["kv_lens"], dtype=torch.int32, device=device)
            return (q, k, v), {"kv_lens": kv}
        if self.op == "qk_norm_rope":
            B, N, H, D = s["B"], s["N"], s["H"], s["D"]
            q, k = rn(B, N, H * D, scale=3.0).unflatten(-1, (H, D)), rn(B, N, H * D).unflatten(-1, (H, D))
            angles = torch.rand(B, N, D // 2, generator=g) * 100
            freqs = torch.polar(torch.ones_like(angles), angles).to(device)
            return (q, k, rn(D, scale=0.3) + 1, rn(D, scale=0.3) + 1, freqs, 1e-5), {}
        if self.op == "swiglu":
            return (rn(s["R"], s["F"], scale=2.0), rn(s["R"], s["F"])), {}
        B, N, C = s["B"], s["N"], s["C"]
        x, w, mod = rn(B, N, C, scale=4.0), rn(C, scale=0.3) + 1, rn(B, 1, C, scale=0.5)
        if self.op == "rms_norm_modulate":
            return (x, w, mod, 1e-5), {}
        if self.op == "gated_residual":
            return (x, rn(B, N, C), w, mod, 1e-5), {}
        if self.op == "layer_norm_modulate":
            return (x, mod, 1e-6), {}
        raise ValueError(self.op)

    def work(self, esize: int) -> tuple[str, float]:
        """('flops', n) for attention, ('bytes', n) otherwise."""
        s = self.shape
        if self.op == "attention":
            return "flops", attention_flops(s["B"], s["H"], s["N"], s["N"], s["D"], s["kv_lens"])
        return "bytes", float(op_bytes(self.op, s, esize))


def cases(which: str) -> list[Case]:
    """``zimage``: 1024² image (4096 tokens) + captions, real widths (30 heads x 128, 3840, FFN 10240);
    ``small``: shapes the interpreter runs in seconds (CPU)."""
    out = []
    if which in ("zimage", "all"):
        n = 4096 + 512  # the target: B=1, N=4608, H=30, D=128
        out += [
            Case("attention", "b1-n4608", dict(B=1, N=n, H=30, D=128, kv_lens=None)),
            Case("attention", "b1-n4128", dict(B=1, N=4096 + 32, H=30, D=128, kv_lens=None)),
            Case("attention", "cfg-b2-ragged", dict(B=2, N=n, H=30, D=128, kv_lens=[n, 4096 + 160])),
            Case("qk_norm_rope", "b1-n4608", dict(B=1, N=n, H=30, D=128)),
            Case("rms_norm_modulate", "b1-n4608", dict(B=1, N=n, C=3840)),
            Case("gated_residual", "b1-n4608", dict(B=1, N=n, C=3840)),
            Case("swiglu", "b1-n4608", dict(R=n, F=10240)),
            Case("layer_norm_modulate", "b1-n4608", dict(B=1, N=n, C=3840)),
            Case("rms_norm_modulate", "cfg-b2", dict(B=2, N=n, C=3840)),
        ]
    if which in ("small", "all"):
        out += [
            Case("attention", "small-ragged", dict(B=2, N=160, H=2, D=64, kv_lens=[160, 97])),
            Case("qk_norm_rope", "small", dict(B=2, N=48, H=4, D=128)),
            Case("rms_norm_modulate", "small", dict(B=2, N=48, C=3840)),
            Case("gated_residual", "small", dict(B=2, N=48, C=3840)),
            Case("swiglu", "small", dict(R=96, F=2560)),
            Case("layer_norm_modulate", "small", dict(B=2, N=48, C=3840)),
        ]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------------------


class Unsupported(Exception):
    """A provider that cannot run this case here (missing backend, mask not supported, no CUDA for Triton)."""


def _sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    enum = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]

    def run(q, k, v, kv_lens=None):
        mask = None if kv_lens is None else reference.key_padding_mask(kv_lens, k.shape[1])
        try:
            with sdpa_kernel(enum):
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
                )
        except Exception as e:  # noqa: BLE001 - torch's own backends: whatever they reject is "unsupported here"
            raise Unsupported(str(e).splitlines()[0][:120] if str(e) else type(e).__name__) from None
        return out.transpose(1, 2)

    return run


def _flash_attn(module: str):
    """FlashAttention's ``flash_attn_func`` on [B, N, H, D] (``flash_attn``: FA2; ``flash_attn_interface``: FA3), or
    None when not importable. Ragged batches are not offered: its varlen API needs packed tokens (a copy)."""
    try:
        fn = importlib.import_module(module).flash_attn_func
    except Exception:  # noqa: BLE001 - not installed / no CUDA build: no row
        return None

    def run(q, k, v, kv_lens=None):
        if kv_lens is not None:
            raise Unsupported("flash_attn_func takes no key lengths (varlen needs packed tokens)")
        out = fn(q, k, v)
        return out[0] if isinstance(out, tuple) else out

    return run


def providers(op: str, device: torch.device, triton_ok: bool, compile_eager: bool) -> dict[str, Callable]:
    out: dict[str, Callable] = {}
    if triton_ok:
        from zimage_kernels.triton_ops import TRITON_OPS

        out["triton"] = getattr(TRITON_OPS, op)
        if op == "attention" and device.type == "cuda":
            from zimage_kernels import attention as attn

            def forced(path):
                def run(q, k, v, kv_lens=None):
                    if path == "tma" and not attn.tma_path_available(q, k, v):
                        raise Unsupported("the TMA kernel needs sm_90+, fp16/bf16, D in 32/64/128, aligned strides")
                    return attn._launch(q, k, v, kv_lens, None, path=path)

                return run

            out["triton-tma"] = forced("tma")
            out["triton-plain"] = forced("plain")

            def fa3(q, k, v, kv_lens=None):
                from zimage_kernels import attention_fa3

                if not attention_fa3.supports(q, k, v, kv_lens):
                    raise Unsupported("the FA3 Gluon kernel needs sm_90, fp16/bf16, D 64/128, [B, N, H·D] row views")
                return attention_fa3._launch(q, k, v, kv_lens)

            out["triton-fa3"] = fa3
    out["eager"] = getattr(reference, op)
    if op == "attention":
        for b in SDPA_BACKENDS:
            out[f"sdpa-{b}"] = _sdpa(b)
        if device.type == "cuda":
            for name, module in (("flash-attn-2", "flash_attn"), ("flash-attn-3", "flash_attn_interface")):
                fa = _flash_attn(module)
                if fa is not None:
                    out[name] = fa
    elif compile_eager:
        out["compiled"] = torch.compile(getattr(reference, op), fullgraph=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------------


def time_call(fn: Callable, device: torch.device, quick: bool = False) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds per call."""
    if device.type == "cuda":
        import triton.testing

        warm, rep = (10, 30) if quick else (25, 200)
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warm, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    fn()  # warm-up
    samples, budget, t_end = [], 0.05 if quick else 0.3, time.perf_counter()
    t_end += budget
    while len(samples) < 5 or (time.perf_counter() < t_end and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10)
    return statistics.median(samples), q[1], q[7]


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write), the roofline of the elementwise ops."""
    n = (256 if device.type == "cuda" else 16) * 2**20  # bytes; 256 MiB >> 50 MB L2 on H100
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    med, _, _ = time_call(lambda: dst.copy_(src), device, quick)
    return 2 * n / (med * 1e-3) / 1e9


def environment(device: torch.device, interpret: bool) -> dict:
    env = {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "interpreter": interpret,
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device=torch.cuda.get_device_name(device),
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
            driver=_driver_version(),
        )
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:  # noqa: BLE001 - optional telemetry
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            )
            return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, IndexError):
            return None


def exact_output(op: str, args, kwargs):
    """float64 value of the op, with attention done a few heads at a time on big shapes (memory)."""
    from tests.tolerance import exact  # one tolerance rule for tests and benchmarks (run from a checkout)

    if op != "attention" or args[0].shape[1] * args[0].shape[2] <= 4096:
        return exact(op, *args, **kwargs)
    q, k, v = args
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    step = max(1, 4 if q.device.type == "cuda" else 1)
    for h in range(0, q.shape[2], step):
        sl = slice(h, h + step)
        out[:, :, sl] = exact(op, q[:, :, sl], k[:, :, sl], v[:, :, sl], **kwargs)
    return out


def make_row(**fields) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise KeyError(f"unknown row fields {sorted(unknown)}")
    row.update(fields)
    return row


def run_case(case: Case, device, dtype, provs: dict, env: dict, copy_gbps: float | None, args_ns) -> list[dict]:
    from tests.tolerance import compare

    args, kwargs = case.inputs(device, dtype)
    ref64 = exact_output(case.op, args, kwargs)
    eager = getattr(reference, case.op)(*args, **kwargs)
    kind, work = case.work(torch.empty((), dtype=dtype).element_size())
    dname = {v: k for k, v in DTYPES.items()}[dtype]
    repro = f"python -m zimage_bench kernels --ops {case.op} --cases {args_ns.cases} --dtype {dname}"
    rows, eager_ms = [], None
    for name, fn in provs.items():
        base = dict(op=case.op, case=case.tag, provider=name, device=env["device"], dtype=dname,
                    shape=case.shape, repro=repro, env=env)  # fmt: skip
        try:
            out = fn(*args, **kwargs)
        except Unsupported as e:
            rows.append(make_row(**base, note=f"unsupported: {e}"))
            continue
        except Exception as e:  # noqa: BLE001 - one provider's failure must not hide the others' results
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(make_row(**base, refcheck={"passed": False, "error": error}, note=f"ERROR {error}"))
            continue
        outs = out if isinstance(out, tuple) else (out,)
        refs = ref64 if isinstance(ref64, tuple) else (ref64,)
        pts = eager if isinstance(eager, tuple) else (eager,)
        checks = [compare(o, r, p) for o, r, p in zip(outs, refs, pts)]
        refcheck = {
            "passed": all(c.passed for c in checks),
            "err": max(c.err for c in checks),
            "torch_err": max(c.torch_err for c in checks),
            "bound": min(c.bound for c in checks),
        }
        if not refcheck["passed"]:
            rows.append(make_row(**base, refcheck=refcheck, note="refcheck FAILED: not timed"))
            continue
        if name.startswith("triton") and device.type != "cuda":
            rows.append(make_row(**base, refcheck=refcheck, note="Triton interpreter on CPU: correctness only"))
            continue
        med, p20, p80 = time_call(lambda fn=fn: fn(*args, **kwargs), device, args_ns.quick)
        row = make_row(**base, refcheck=refcheck, median_ms=med, p20_ms=p20, p80_ms=p80)
        if kind == "flops":
            row["tflops"] = work / (med * 1e-3) / 1e12
        else:
            row["gbps"] = work / (med * 1e-3) / 1e9
            if copy_gbps and device.type == "cuda":  # on CPU the small cases sit in cache: no roofline meaning
                row["pct_of_copy"] = 100.0 * row["gbps"] / copy_gbps
        if name == "eager":
            eager_ms = med
        rows.append(row)
    for row in rows:
        if eager_ms and row["median_ms"]:
            row["speedup_vs_eager"] = eager_ms / row["median_ms"]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------


def format_table(rows: list[dict]) -> str:
    cols = [("op", 20), ("case", 14), ("provider", 15), ("ms", 10), ("TFLOP/s", 8), ("GB/s", 8), ("%copy", 6)]
    head = " ".join(f"{n:<{w}}" if i < 3 else f"{n:>{w}}" for i, (n, w) in enumerate(cols)) + " vs eager  check"
    lines = [head, "-" * len(head)]

    def num(v, fmt, width):
        return f"{format(v, fmt) if v is not None else '-':>{width}}"

    for r in rows:
        check = "-" if r["refcheck"] is None else ("ok" if r["refcheck"]["passed"] else "FAIL")
        speed = f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-"
        note = f"  ({r['note']})" if r["note"] else ""
        lines.append(
            f"{r['op']:<20} {r['case']:<14} {r['provider']:<15} {num(r['median_ms'], '.4f', 10)} "
            f"{num(r['tflops'], '.4g', 8)} {num(r['gbps'], '.4g', 8)} {num(r['pct_of_copy'], '.1f', 6)} "
            f"{speed:>8}  {check}{note}"
        )
    return "\n".join(lines)


def results_path(env: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", str(env["device"]).lower()).strip("-")
    day = env["timestamp"][:10]
    return RESULTS / f"kernels-{slug}-{day}.jsonl"


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m zimage_bench kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    ap.add_argument("--cases", choices=("zimage", "small", "all"), default=None,
                    help="default: zimage on CUDA, small on CPU")  # fmt: skip
    ap.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--providers", nargs="+", default=None, help="only these providers (e.g. triton eager)")
    ap.add_argument("--append", action="store_true", help="append the rows to --out instead of overwriting it")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(reference) for elementwise ops")
    ap.add_argument("--quick", action="store_true", help="shorter timing (smoke runs)")
    ap.add_argument("--out", help="write the JSON lines here")
    ap.add_argument(
        "--save", action="store_true", help="write the JSON lines to zimage_bench/results/kernels-<device>-<day>"
    )
    ap.add_argument("--compiled", action="store_true",
                    help="instead of timing: compile every kernel for sm_90a at Z-Image's shapes (no GPU needed) and "
                    "print registers / spills / shared memory / SASS facts (scripts/aot_compile.py)")  # fmt: skip
    ap.add_argument("--arch", type=int, default=90, help="with --compiled: compute capability x10")
    return ap.parse_args(argv)


def compiled_table(args) -> int:
    """``--compiled``: the facts table of scripts/aot_compile.py, run with TRITON_INTERPRET=0 (it compiles real GPU
    code, which the interpreter's kernels cannot)."""
    cmd = [sys.executable, str(REPO / "scripts" / "aot_compile.py"), "--arch", str(args.arch)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--json", args.out] if args.out else []
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    return subprocess.call(cmd, env=env, cwd=REPO)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.compiled:
        return compiled_table(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    args.cases = args.cases or ("zimage" if device.type == "cuda" else "small")
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    triton_ok = device.type == "cuda" or interpret
    if not triton_ok:
        print("note: Triton needs CUDA; on CPU set TRITON_INTERPRET=1 for a correctness-only run of the kernels")
    if device.type == "cpu" and dtype == torch.bfloat16 and triton_ok:
        triton_ok = False  # the ops would hand bf16 to the reference on the interpreter: nothing to check
        print("note: the Triton interpreter's bf16 is wrong (tl.dot, rounding); use --dtype fp32 or fp16 on CPU")
    env = environment(device, interpret)
    copy_gbps = None
    if any(op != "attention" for op in args.ops):
        copy_gbps = copy_bandwidth(device, args.quick)
    rows = [
        make_row(op="copy", case="256MiB" if device.type == "cuda" else "16MiB", provider="torch", device=env["device"],
                 dtype="uint8", gbps=copy_gbps, note="device copy bandwidth (read + write)", env=env)
    ] if copy_gbps else []  # fmt: skip
    for case in cases(args.cases):
        if case.op not in args.ops:
            continue
        provs = providers(case.op, device, triton_ok, args.compile)
        if args.providers:
            provs = {k: v for k, v in provs.items() if k in args.providers}
        else:  # opt-in rows (kernels not yet measured on a GPU): only when named in --providers
            provs = {k: v for k, v in provs.items() if k not in OPT_IN_PROVIDERS}
        rows += run_case(case, device, dtype, provs, env, copy_gbps, args)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  git {str(env['git_sha'])[:10]}"
          f"{' (dirty)' if env['git_dirty'] else ''}{'  [TRITON_INTERPRET=1]' if interpret else ''}")  # fmt: skip
    print(format_table(rows))
    lines = "".join(json.dumps(r, default=str) + "\n" for r in rows)
    for path in [args.out] + ([str(results_path(env))] if args.save else []):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with Path(path).open("a" if args.append else "w") as f:
                f.write(lines)
            print(f"wrote {len(rows)} rows to {path}")
    failed = [r for r in rows if r["refcheck"] is not None and not r["refcheck"]["passed"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

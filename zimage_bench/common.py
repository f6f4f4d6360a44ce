"""What ``parity`` and ``throughput`` share: command-line options, device/dtype/thread setup, the parity rule."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import torch

from zimage_core.config import DTYPE_NAMES

from . import metrics
from .pipelines import ALL_CONFIGS, DEFAULT_PROMPT

DTYPES = {short: getattr(torch, name) for short, name in DTYPE_NAMES.items()}
# Lossless configurations pass when the final latents' relative L2 error against diffusers is at most this. fp32:
# our core reproduces diffusers' cast points, so only summation order differs. bf16/fp16: a starting value, to be
# calibrated on a GPU run (diffusers-compile against diffusers-eager is the natural noise floor to compare with).
DEFAULT_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
DEFAULT_MIN_PSNR = 20.0  # lossy configurations (step caches) must keep decoded-image PSNR >= this (dB)


def parser(command: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m zimage_bench {command}", description=description)
    p.add_argument(
        "--model",
        default=None,
        help="'default' (embedded small model; the CPU default), 'synthetic' (real dims, random weights; the GPU "
        "default), 'synthetic-tiny' (the same path at a tiny config), or a diffusers-format folder",
    )
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated tables (cpu, gpu, full, test) and/or WxH/bN/PRESETSTEPS specs, e.g. 1024x768/b4/base50 "
        "(default: gpu on cuda, cpu on cpu)",
    )
    p.add_argument("--configs", default=None, help=f"comma-separated, from {', '.join(ALL_CONFIGS)} (or 'all')")
    p.add_argument(
        "--caches", default=None, help="cache methods[=threshold], e.g. fbcache=0.25,teacache (default: all)"
    )
    p.add_argument("--seed", type=int, default=42, help="result i uses seed + i in both pipelines")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--out", default=None, help=f"output folder (default zimage_bench/out/{command}/)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on cpu: on a shared machine multi-threaded ops spin-wait and timings "
        "scatter far more)",
    )
    p.add_argument("--tol", type=float, default=None, help="lossless pass: final-latent rel-L2 <= tol")
    p.add_argument("--min-psnr", type=float, default=DEFAULT_MIN_PSNR, help="lossy pass: image PSNR >= this (dB)")
    p.add_argument("--vae", choices=("real", "small"), default=None, help="VAE config for the synthetic models")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--inject-fault",
        type=float,
        default=0.0,
        metavar="EPS",
        help="testing the harness: multiply our transformer's output by (1 + EPS); parity must then fail",
    )
    return p


def setup(args, command: str) -> None:
    """Resolve device, dtype, thread count, output folder and tolerance on ``args`` in place."""
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
    args.torch_dtype = (
        DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.type == "cuda" else torch.float32)
    )
    args.model = args.model or ("synthetic" if args.device.type == "cuda" else "default")
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    args.out = Path(args.out or Path(__file__).resolve().parent / "out" / command)
    args.out.mkdir(parents=True, exist_ok=True)
    args.tol = args.tol if args.tol is not None else DEFAULT_TOL[args.torch_dtype]


def config_names(spec: str | None, default: list[str]) -> list[str]:
    if not spec:
        return list(default)
    if spec == "all":
        return list(ALL_CONFIGS)
    return [c.strip() for c in spec.split(",") if c.strip()]


def check_parity(latents, ref_latents, images, ref_images, *, lossy: bool, tol: float, min_psnr: float) -> dict:
    """The parity figures of one configuration against the reference, and whether it passes.

    Lossless: finite and final-latent rel-L2 <= tol. Lossy (step caches): finite and decoded-image PSNR >= min_psnr.
    """
    out = metrics.compare(latents, ref_latents)
    out["psnr_db"] = metrics.psnr(images, ref_images, data_range=1.0)
    if lossy:
        out["rule"] = f"finite and image PSNR >= {min_psnr:g} dB"
        out["passed"] = bool(out["finite"] and out["psnr_db"] >= min_psnr)
    else:
        out["rule"] = f"finite and final-latent rel-L2 <= {tol:g}"
        out["passed"] = bool(out["finite"] and out["rel_l2"] <= tol)
    if not math.isfinite(out["rel_l2"]):
        out["passed"] = False
    return out


def repro(command: str, args, shape_name: str, config: str) -> str:
    parts = ["python", "-m", "zimage_bench", command, "--model", str(args.model), "--device", args.device.type]
    parts += ["--dtype", {v: k for k, v in DTYPES.items()}[args.torch_dtype], "--shapes", shape_name]
    parts += ["--configs", config, "--seed", str(args.seed)]
    if args.prompt != DEFAULT_PROMPT:
        parts += ["--prompt", args.prompt]
    for flag in ("repeats", "warmup"):
        if getattr(args, flag, None) is not None:
            parts += [f"--{flag}", str(getattr(args, flag))]
    if args.device.type == "cpu":
        parts += ["--threads", str(torch.get_num_threads())]
    return shlex.join(parts)


def say(*a) -> None:
    print(*a, file=sys.stderr, flush=True)

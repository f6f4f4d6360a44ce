"""``python -m zimage_bench ablate``: each optimisation on and off, measured side by side in one run (gpt-fast style).

Rows: ``all on`` (every optimisation available on this device), then ``- <name>`` (all on except that one), then
``all off``. Each row reports the median denoising time per step and per image over ``--repeats`` runs, the runs
of all rows interleaved round-robin (a shared machine's slow phases hit every row), and the ratio to ``all on``.
The first run of each row is a warm-up (it compiles, autotunes) and is reported apart as ``first call s``.

Optimisations:

- ``compile``: ``ZImage.optimize()``, regional torch.compile of the transformer blocks (zimage_core/compile.py);
- ``triton``: our Triton kernels instead of the torch reference ops (CUDA only: on CPU Triton runs only under the
  test interpreter, which is not timed);
- ``tma-attention``: the Hopper TMA attention kernel instead of the pointer kernel (CUDA sm >= 90 only).

On CPU the figures are CPU ratios for the embedded small model (labelled so): they say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

OPTIMISATIONS = ("compile", "triton", "tma-attention")


def available(name: str, device: torch.device) -> str | None:
    """None if the optimisation can be toggled on ``device``, else why not."""
    if name == "compile":
        return None
    if device.type != "cuda":
        return "needs CUDA"
    if name == "tma-attention" and torch.cuda.get_device_capability(device)[0] < 9:
        return "needs sm >= 90"
    return None


@contextlib.contextmanager
def _env(name: str, value: str | None):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def run_once(pipe, on: set[str], args) -> float:
    """One generation with the optimisations in ``on``; returns the denoising seconds."""
    pipe.transformer.set_kernel_backend("triton" if "triton" in on else "torch")
    pipe.optimize("compile" in on, backend=args.compile_backend)
    path = None if "tma-attention" in on else "plain"
    with _env("ZIMAGE_ATTENTION_PATH", path):
        res = pipe.generate(
            args.prompt, width=args.size, height=args.size, steps=args.steps, seed=args.seed,
            cfg_scale=args.cfg_scale, output_type="latent",
        )  # fmt: skip
    return res.stats["timings"]["denoise_s"]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m zimage_bench ablate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="diffusers-format folder (default: the embedded small model)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=None, help="image width = height (default 1024 cuda, 128 cpu)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--cfg-scale", type=float, default=4.0, help="CFG on by default (two sequences per forward)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="a red fox in the snow, detailed photograph")
    ap.add_argument("--only", nargs="+", choices=OPTIMISATIONS, default=None, help="ablate only these")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('eager': smoke tests)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="write one JSON line per row here")
    args = ap.parse_args(argv)

    from zimage_core.pipeline import ZImage

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    args.size = args.size or (1024 if device.type == "cuda" else 128)
    pipe = ZImage.from_pretrained(args.model, device=device) if args.model else ZImage.default(device=device)
    names = [n for n in (args.only or OPTIMISATIONS)]
    skipped = {n: why for n in names if (why := available(n, device))}
    active = [n for n in names if n not in skipped]
    rows = {"all on": set(active)}
    rows.update({f"- {n}": set(active) - {n} for n in active})
    if len(active) > 1:
        rows["all off"] = set()
    times: dict[str, list[float]] = {r: [] for r in rows}
    first: dict[str, float] = {}
    for r, on in rows.items():
        t0 = time.perf_counter()
        run_once(pipe, on, args)
        first[r] = time.perf_counter() - t0
    order = list(rows)
    for i in range(args.repeats):
        for r in order[i % len(order) :] + order[: i % len(order)]:
            times[r].append(run_once(pipe, rows[r], args))
    pipe.optimize(False)

    label = "cpu (embedded small model: CPU ratios, not GPU figures)" if device.type == "cpu" else str(device)
    if device.type == "cuda":
        label = torch.cuda.get_device_name(device)
    base = statistics.median(times["all on"])
    out = []
    lines = [
        f"## ablate: {args.size}x{args.size}, {args.steps} steps, CFG {args.cfg_scale}, {label}, "
        f"torch {torch.__version__}",
        "",
        "| row | optimisations on | ms / step | ms / image (denoise) | × all on | first call s |",
        "|---|---|---|---|---|---|",
    ]
    for r, on in rows.items():
        med = statistics.median(times[r])
        row = {
            "row": r, "on": sorted(on), "device": label, "size": args.size, "steps": args.steps,
            "ms_per_step": 1000 * med / args.steps, "ms_per_image": 1000 * med, "ratio_to_all_on": med / base,
            "first_call_s": first[r], "runs_s": times[r],
        }  # fmt: skip
        out.append(row)
        lines.append(
            f"| {r} | {', '.join(sorted(on)) or '–'} | {row['ms_per_step']:.1f} | {row['ms_per_image']:.0f} | "
            f"{row['ratio_to_all_on']:.2f} | {first[r]:.1f} |"
        )
    lines += [f"- {n}: not measured here ({why})" for n, why in skipped.items()]
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

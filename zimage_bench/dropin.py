"""``python -m zimage_bench dropin``: the diffusers drop-in side by side with diffusers' own ``ZImagePipeline``.

Configurations, timed round-robin in one process on the same components and the same generators:

- ``diffusers``: ``diffusers.ZImagePipeline`` as shipped;
- ``diffusers+proc``: the same pipeline with ``zimage_core.diffusers.set_fast_attention`` on its transformer;
- ``dropin``: ``zimage_core.diffusers.ZImagePipeline`` (one changed import).

Reports the median end-to-end milliseconds per call (``output_type="latent"``: the VAE is the same code in all
three), the ratio to ``diffusers`` and the final latents' relative L2 error against ``diffusers``; a configuration
beyond the harness's lossless tolerance is reported, not timed, and the command exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .common import DEFAULT_TOL
from .env import environment
from .timing import Stats, fmt, round_robin

CONFIGS = ("diffusers", "diffusers+proc", "dropin")


def _load(name: str, folder: Path, dtype: torch.dtype, device: torch.device):
    import diffusers

    import zimage_core.diffusers as zd

    cls = zd.ZImagePipeline if name == "dropin" else diffusers.ZImagePipeline
    pipe = cls.from_pretrained(folder, dtype=dtype).to(device)
    if name == "diffusers+proc":
        zd.set_fast_attention(pipe.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m zimage_bench dropin", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="diffusers-format folder (default: the embedded default model)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    p.add_argument("--size", type=int, default=128, help="square image side in pixels")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--guidance", type=float, default=2.0, help="diffusers' guidance_scale (CFGScale − 1)")
    p.add_argument("--images", type=int, default=1, help="num_images_per_prompt")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from zimage_core.default_model import default_model_path

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else default_model_path()
    pipes = {name: _load(name, folder, dtype, device) for name in CONFIGS}
    prompt = "a large red circle in the top left on a blue background"

    def run(name):
        gens = [torch.Generator().manual_seed(42 + i) for i in range(args.images)]
        return pipes[name](
            prompt,
            height=args.size,
            width=args.size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            num_images_per_prompt=args.images,
            generator=gens,
            output_type="latent",
        ).images.float()

    outputs = {name: run(name) for name in CONFIGS}  # warm-up, and the latents for the error column
    ref = outputs["diffusers"]
    errors = {name: float((outputs[name] - ref).norm() / ref.norm()) for name in CONFIGS}
    failed = [name for name in CONFIGS if not errors[name] <= DEFAULT_TOL[dtype]]
    for name in failed:
        print(f"{name}: final latents rel L2 {errors[name]:.3g} > {DEFAULT_TOL[dtype]} against diffusers: not timed")
    timed = [name for name in CONFIGS if name not in failed]
    samples = {name: [] for name in timed}
    for name in round_robin(timed, args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run(name)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples[name].append((time.perf_counter() - start) * 1000.0)
    rows = []
    base = Stats.of(samples["diffusers"]).median
    for name in timed:
        st = Stats.of(samples[name])
        rows.append(
            {"config": name, "ms": st.to_dict(), "speedup": base / st.median, "rel_l2_vs_diffusers": errors[name]}
        )
    env = environment(device)
    print(
        f"bench dropin: {folder.name}, {args.size}x{args.size}, {args.steps} steps, guidance {args.guidance}, "
        f"{args.images} image(s), {dtype}, {device}, {args.repeats} repeats"
    )
    print(f"{'config':<16}{'median ms':>12}{'× diffusers':>13}{'rel L2':>10}")
    for r in rows:
        print(
            f"{r['config']:<16}{fmt(r['ms']['median']):>12}{fmt(r['speedup']):>13}{fmt(r['rel_l2_vs_diffusers']):>10}"
        )
    out = Path(args.out or Path(__file__).resolve().parent / "out" / "dropin")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dropin.json").write_text(json.dumps({"args": vars(args), "env": env, "rows": rows}, indent=2, default=str))
    return 1 if failed else 0

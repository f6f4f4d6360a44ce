"""``zimage``: the command line.

zimage generate "a large red circle in the top left on a blue background" -o out.png
zimage infer request.json            # prints the imageInference response JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import DTYPE_NAMES

DTYPES = {**DTYPE_NAMES, **{name: name for name in DTYPE_NAMES.values()}}  # fp32 or float32, ...


def _load(args):
    import torch

    from .pipeline import ZImage

    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if args.model:
        return ZImage.from_pretrained(args.model, device=args.device, dtype=dtype, kernel_backend=args.kernels)
    return ZImage.default(device=args.device, dtype=dtype, kernel_backend=args.kernels)


def _outpaint(text):
    vals = [int(v) for v in text.split(",")]
    if len(vals) != 4:
        raise argparse.ArgumentTypeError("--outpaint takes top,bottom,left,right")
    return dict(zip(("top", "bottom", "left", "right"), vals))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zimage", description="Z-Image text-to-image on zimage-fast")
    sub = p.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="diffusers-format Z-Image folder (default: the embedded small model)")
    common.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    common.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    common.add_argument("--kernels", choices=["auto", "torch", "triton"], help="op backend (default: auto)")

    g = sub.add_parser("generate", parents=[common], help="generate images from a prompt")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.png", help="output file; with several results: out-0.png, ...")
    g.add_argument("--negative-prompt")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--steps", type=int)
    g.add_argument("--cfg-scale", type=float, help="standard CFG scale; guidance is off when <= 1")
    g.add_argument("--seed", type=int)
    g.add_argument("--scheduler", default="Default")
    g.add_argument("-n", "--number-results", type=int, default=1)
    g.add_argument("--strength", type=float)
    g.add_argument("--seed-image", help="image file for image-to-image / inpainting / outpainting")
    g.add_argument("--mask-image", help="mask file (white = repaint)")
    g.add_argument("--mask-margin", type=int)
    g.add_argument("--outpaint", type=_outpaint, metavar="TOP,BOTTOM,LEFT,RIGHT")
    g.add_argument("--cfg-normalization", type=float)
    g.add_argument("--cfg-truncation", type=float)
    g.add_argument("--shift", type=float)
    g.add_argument("--preset", dest="preset_model", help="model id whose defaults apply (e.g. z-image-turbo)")
    g.add_argument("--cache", choices=["fb", "tea", "db"], help="step cache")
    g.add_argument("--cache-threshold", type=float)
    g.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("infer", parents=[common], help="run an imageInference request (JSON file or - for stdin)")
    i.add_argument("request")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import RequestError
    from .weights import CheckpointError

    try:
        pipe = _load(args)
        if args.command == "generate":
            return _generate(pipe, args)
        text = sys.stdin.read() if args.request == "-" else Path(args.request).read_text()
        try:
            request = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError("request", f"is not valid JSON ({e})") from None
        tasks = request if isinstance(request, list) else [request]
        out = []
        for task in tasks:
            out.extend(pipe.infer(task))
        print(json.dumps({"data": out}, indent=2))
        return 0
    except (RequestError, CheckpointError, FileNotFoundError) as e:
        print(f"zimage: error: {e}", file=sys.stderr)
        return 2


def _generate(pipe, args) -> int:
    cache = None
    if args.cache:
        from zimage_core.cache import CacheConfig

        cache = CacheConfig.for_method(args.cache, threshold=args.cache_threshold, pipe=pipe, preset=args.preset_model)
    result = pipe.generate(
        args.prompt,
        negative_prompt=args.negative_prompt,
        width=args.width,
        height=args.height,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        scheduler=args.scheduler,
        number_results=args.number_results,
        strength=args.strength,
        seed_image=args.seed_image,
        mask_image=args.mask_image,
        mask_margin=args.mask_margin,
        outpaint=args.outpaint,
        cfg_normalization=args.cfg_normalization,
        cfg_truncation=args.cfg_truncation,
        shift=args.shift,
        model=args.preset_model,
        cache=cache,
        progress=not args.quiet,
    )
    out = Path(args.output)
    paths = (
        [out]
        if len(result.images) == 1
        else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(len(result.images))]
    )
    for image, path in zip(result.images, paths):
        image.save(path)
    t = result.stats["timings"]
    for path, s in zip(paths, result.seeds):
        print(f"wrote {path} (seed {s})")
    print(
        f"{result.stats['steps']} steps, {result.stats['forwards']} transformer forwards, "
        f"{t['total_s']:.2f} s total (denoise {t['denoise_s']:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

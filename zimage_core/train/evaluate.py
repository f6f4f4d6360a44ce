"""Generate a fixed set of captions and seeds and score the images with the pixel checker.

``python -m zimage_core.train.evaluate [--model DIR] [--n 48] [--train] [--steps N --cfg-scale S ...]``
``python -m zimage_core.train.evaluate --compare-quantize fp8 [--json out.json]``: FP8 against unquantized images.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

from .checker import ATTRIBUTES, read_image
from .dataset import eval_prompts


def evaluate(pipe, prompts, attributes=ATTRIBUTES, **generate_kwargs) -> dict:
    """prompts: [(Scene, seed)]. Returns accuracy (all ``attributes`` right), per-attribute accuracy, failures."""
    per_attr = Counter()
    correct = 0
    failures = []
    t0 = time.perf_counter()
    for scene, seed in prompts:
        image = pipe.generate(scene.caption, seed=seed, **generate_kwargs).images[0]
        reading = read_image(image)
        for a in (*attributes, "size"):
            per_attr[a] += getattr(reading, a) == getattr(scene, a)
        if reading.agrees(scene, attributes):
            correct += 1
        else:
            failures.append((scene.caption, seed, reading.mismatches(scene, attributes)))
    n = len(prompts)
    return {
        "n": n,
        "accuracy": correct / n,
        "per_attribute": {a: per_attr[a] / n for a in (*attributes, "size")},
        "failures": failures,
        "seconds": time.perf_counter() - t0,
    }


def compare(base, other, prompts, attributes=ATTRIBUTES, **generate_kwargs) -> dict:
    """Images of ``other`` against ``base`` on the same (caption, seed): 8-bit PSNR of each pair and the pixel
    checker's agreement for both pipelines (e.g. an FP8-quantized pipeline against the unquantized one)."""
    import math

    import numpy as np

    rows = []
    for scene, seed in prompts:
        a = base.generate(scene.caption, seed=seed, **generate_kwargs).images[0]
        b = other.generate(scene.caption, seed=seed, **generate_kwargs).images[0]
        mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
        psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
        ok = [read_image(img).agrees(scene, attributes) for img in (a, b)]
        rows.append({"caption": scene.caption, "seed": seed, "psnr": psnr, "checker": ok})
    n = len(rows)
    return {
        "n": n,
        "psnr_mean": sum(r["psnr"] for r in rows) / n,
        "psnr_min": min(r["psnr"] for r in rows),
        "checker_base": sum(r["checker"][0] for r in rows) / n,
        "checker_other": sum(r["checker"][1] for r in rows) / n,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from ..pipeline import ZImage

    p = argparse.ArgumentParser(prog="python -m zimage_core.train.evaluate")
    p.add_argument("--model", help="pipeline folder (default: the embedded default model)")
    p.add_argument("--n", type=int, default=48)
    p.add_argument("--seed", type=int, default=0, help="which fixed draw of captions and seeds")
    p.add_argument("--train", action="store_true", help="training captions instead of held-out ones")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--shift", type=float)
    p.add_argument("--cfg-normalization", type=float)
    p.add_argument("--cfg-truncation", type=float)
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--quantize", choices=("none", "fp8"), help="evaluate the pipeline quantized (docs/fp8.md)")
    p.add_argument("--compare-quantize", choices=("fp8",), help="image PSNR and checker: quantized vs unquantized")
    p.add_argument("--json", help="with --compare-quantize: write the comparison here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    def load(quantize):
        if args.model:
            return ZImage.from_pretrained(args.model, device="cpu", dtype=torch.float32, quantize=quantize)
        return ZImage.default(device="cpu", dtype=torch.float32, quantize=quantize)

    pipe = load(args.quantize)
    kw = {
        k: v
        for k, v in dict(
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            shift=args.shift,
            cfg_normalization=args.cfg_normalization,
            cfg_truncation=args.cfg_truncation,
        ).items()
        if v is not None
    }
    if args.compare_quantize:
        import json

        res = compare(pipe, load(args.compare_quantize), eval_prompts(args.seed, args.n, heldout=not args.train), **kw)
        for r in res["rows"]:
            print(f"  {r['caption']:<70} PSNR {r['psnr']:6.2f} dB  checker {r['checker'][0]}/{r['checker'][1]}")
        print(
            f"{args.compare_quantize} vs unquantized: PSNR mean {res['psnr_mean']:.2f} dB, min {res['psnr_min']:.2f} "
            f"dB; checker agreement {res['checker_base']:.3f} unquantized, {res['checker_other']:.3f} quantized"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        return 0
    res = evaluate(pipe, eval_prompts(args.seed, args.n, heldout=not args.train), **kw)
    which = "training" if args.train else "held-out"
    print(f"{which} captions: {res['accuracy']:.1%} of {res['n']} agree ({res['seconds']:.1f} s); {kw or 'defaults'}")
    print("per attribute: " + ", ".join(f"{a} {v:.0%}" for a, v in res["per_attribute"].items()))
    if args.verbose:
        for cap, seed, why in res["failures"]:
            print(f"  {cap!r} seed {seed}: {'; '.join(why)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Generate a fixed set of captions and seeds and score the images with the pixel checker.

``python -m zimage_core.train.evaluate [--model DIR] [--n 48] [--train] [--steps N --cfg-scale S ...]``
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
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = (
        ZImage.from_pretrained(args.model, device="cpu", dtype=torch.float32)
        if args.model
        else ZImage.default(device="cpu", dtype=torch.float32)
    )
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

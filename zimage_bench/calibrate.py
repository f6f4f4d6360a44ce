"""TeaCache calibration: ``python -m zimage_bench calibrate --model PATH [--preset ID] ...``.

Runs *uncached* generations over a prompt set and, at every model evaluation after the first, records

- x: the relative L1 change of main layer 0's timestep-modulated input against the previous evaluation
  (exactly the signal TeaCache measures at inference), and
- y: the relative L1 change of the main stack's output (the hidden state after the 30 main layers, i.e. what a
  TeaCache reuse approximates) against the previous evaluation;

fits ``y ≈ poly(x)`` (``numpy.polyfit``, degree 4 by default, highest power first), reports R² (and the R² of the
identity map y = x for comparison) and stores the entry in ``zimage_core/cache/tea_coefficients.json`` under the model's
fingerprint and the preset (``--dry-run`` prints only). The run uses the preset's steps/CFG unless overridden,
because the change per step depends on the number of steps and on CFG.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from zimage_core.cache.state import relative_change
from zimage_core.hooks import StackHook
from zimage_kernels.reference import l1_sums

PROMPTS_PATH = Path(__file__).with_name("prompts.txt")


def load_prompts(spec: str | None = None, n: int | None = None, pipe=None) -> list[str]:
    """Prompts from a file (one per line); without one, the model's own (``zimage_fast.json`` "prompts": the
    trained default model lists captions it can draw), else the bundled set. The first ``n``."""
    own = list((getattr(pipe, "meta", None) or {}).get("prompts", ())) if spec is None else []
    if own:
        prompts = own
    else:
        path = Path(spec) if spec else PROMPTS_PATH
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts[:n] if n else prompts


class _RecorderState(StackHook):
    """Runs every main layer (no caching) and records (input change, output change) per evaluation."""

    def __init__(self, points: list):
        self.points = points
        self._prev_in = None
        self._prev_out = None

    def observe(self, denoise):
        return denoise

    def end_step(self, i):
        pass

    def summary(self):
        return {"method": "calibration", "points": len(self.points)}

    def around_stack(self, inner, hidden, inp, stack):
        hidden, inp = self.before_stack(hidden, inp)
        layer0 = stack.layers[0]
        scale_msa = layer0.modulation_terms(inp.adaln_input)[0]
        probe = inp.ops.rms_norm_modulate(hidden, layer0.attention_norm1.weight, scale_msa, layer0.eps)
        h = stack.run(hidden, inp)
        if self._prev_in is not None and self._prev_in.shape == probe.shape:
            x = relative_change(l1_sums(probe, self._prev_in))
            y = relative_change(l1_sums(h, self._prev_out))
            self.points.append((x, y))
        self._prev_in, self._prev_out = probe, h
        return h


class Recorder:
    """Passed to ``ZImage.generate(cache=...)``: a fresh recording state per result, points collected here."""

    def __init__(self):
        self.points: list[tuple[float, float]] = []

    def new_state(self, num_steps=None, start_step=0):
        return _RecorderState(self.points)


def fit(x, y, degree: int = 4) -> tuple[list[float], float]:
    """Least-squares polynomial (highest power first) and its R² on the same points."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) <= degree:
        raise ValueError(f"need more than {degree} points to fit a degree-{degree} polynomial, got {len(x)}")
    coeffs = np.polyfit(x, y, degree)
    return [float(c) for c in coeffs], r_squared(y, np.polyval(coeffs, x))


def r_squared(y, y_hat) -> float:
    y, y_hat = np.asarray(y, dtype=np.float64), np.asarray(y_hat, dtype=np.float64)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    ss_res = float(((y - y_hat) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
        return sha.stdout.strip()[:12] + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def calibrate(pipe, prompts, *, preset=None, steps=None, cfg_scale=None, size=None, degree=4, seed=0) -> dict:
    """Run the recording generations and return the table entry (not yet saved)."""
    from zimage_core.cache.teacache import model_fingerprint, model_kind

    preset = preset or pipe.default_model
    d = pipe.defaults(preset)
    steps = steps or d.steps
    cfg_scale = d.cfg_scale if cfg_scale is None else cfg_scale
    width = height = size or d.width
    rec = Recorder()
    for k, prompt in enumerate(prompts):
        pipe.generate(
            prompt,
            steps=steps,
            cfg_scale=cfg_scale,
            seed=seed + k,
            width=width,
            height=height,
            model=preset,
            output_type="latent",
            cache=rec,
        )
    x, y = zip(*rec.points)
    coeffs, r2 = fit(x, y, degree)
    return {
        "fingerprint": model_fingerprint(pipe.transformer),
        "model": getattr(pipe, "name", "?"),
        "model_kind": model_kind(pipe),
        "preset": preset,
        "coefficients": coeffs,
        "degree": degree,
        "r2": r2,
        "r2_identity": r_squared(y, x),
        "points": len(x),
        "prompts": len(prompts),
        "steps": steps,
        "cfg_scale": cfg_scale,
        "size": [width, height],
        "x_range": [float(min(x)), float(max(x))],
        "y_range": [float(min(y)), float(max(y))],
        "target": "rel-L1 change of the main stack output vs the previous evaluation",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_sha(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zimage_bench calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="pipeline folder (default: the embedded default model)")
    p.add_argument("--preset", help="model preset id whose steps/CFG are used and under which the entry is stored")
    p.add_argument(
        "--prompts", help="prompt file, one per line (default: the model's own, else zimage_bench/prompts.txt)"
    )
    p.add_argument("-n", "--num-prompts", type=int, default=16)
    p.add_argument("--steps", type=int)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--size", type=int, help="width = height (default: the preset's)")
    p.add_argument("--degree", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; 0 = leave torch's default)")
    p.add_argument("--table", help="coefficient table to update (default: zimage_core/cache/tea_coefficients.json)")
    p.add_argument("--dry-run", action="store_true", help="print the entry, do not store it")
    args = p.parse_args(argv)

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)

    from zimage_core.cache.teacache import save_entry
    from zimage_core.default_model import default_model_path
    from zimage_core.pipeline import ZImage

    pipe = ZImage.from_pretrained(args.model or default_model_path(), device=args.device)  # bf16 on CUDA, fp32 CPU
    prompts = load_prompts(args.prompts, args.num_prompts, pipe)
    entry = calibrate(
        pipe,
        prompts,
        preset=args.preset,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        size=args.size,
        degree=args.degree,
        seed=args.seed,
    )
    print(json.dumps(entry, indent=2))
    print(
        f"fit: {entry['points']} points, degree {entry['degree']}, R² {entry['r2']:.4f} "
        f"(identity y=x: R² {entry['r2_identity']:.4f})",
        file=sys.stderr,
    )
    if not args.dry_run:
        path = save_entry(entry, Path(args.table) if args.table else None)
        print(f"stored under fingerprint {entry['fingerprint']}, preset {entry['preset']!r} in {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m zimage_bench cache``: step-cache threshold sweeps against the uncached images and a fewer-steps baseline.

For each step count (default 30 and 50, CFG on), each prompt (seed = ``--seed`` + prompt index) is generated
uncached (the reference), then with every cache setting (FBCache / TeaCache / DBCache × thresholds, optional DBCache
Fn/Bn splits and Taylor), all in the same process and interleaved per prompt so the wall-clock ratios share the same
machine state. Then, for every cache setting, the plain sampler is run with fewer steps at the *same number of
main-layer evaluations* (k = round(evaluations / layers)) — the baseline a cache has to beat.

Per setting (one JSON line each in ``<out>/rows.jsonl``, a printed table, ``<out>/pareto.png``):
main-layer evaluations and the factor saved, computed steps, denoise and end-to-end wall-clock speedup, PSNR
(float64 on [0, 255]: no uint8 wrap-around) and SSIM (Gaussian window σ = 1.5, per RGB channel) against the uncached
images, the latent relative L2 error, and the equal-compute fewer-steps PSNR/SSIM. Every row carries the environment
(device, torch/triton versions, git sha) and the model label: ``random`` / ``trained-small`` from the folder's
``zimage_fast.json``, else ``real``. Identical images count as 100 dB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import metrics

PSNR_CAP = 100.0
TARGET_FACTOR, TARGET_PSNR, TARGET_STEPS = 2.5, 30.0, 50

DEFAULT_THRESHOLDS = {
    "fb": [0.05, 0.1, 0.2, 0.3, 0.5],
    "tea": [0.1, 0.25, 0.5, 0.8, 1.0],
    "db": [0.05, 0.1, 0.2, 0.3, 0.5],
}


# ---------------------------------------------------------------------------------------------------------------
# Metrics (images as uint8 or float arrays [H, W, 3] on the 0..255 scale; everything computed in float64)
# ---------------------------------------------------------------------------------------------------------------


def psnr(a, b, data_range: float = 255.0) -> float:
    """``zimage_bench.metrics.psnr`` on the 0..255 scale, capped at ``PSNR_CAP`` (identical images)."""
    return metrics.psnr(np.asarray(a), np.asarray(b), data_range, cap=PSNR_CAP)


def ssim(a, b, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window σ = 1.5, K1 = 0.01, K2 = 0.03), averaged over channels."""
    from scipy.ndimage import gaussian_filter

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    vals = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        f = lambda z: gaussian_filter(z, sigma, truncate=3.5)
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        vals.append(float(s.mean()))
    return float(np.mean(vals))


# ---------------------------------------------------------------------------------------------------------------
# Environment and model label
# ---------------------------------------------------------------------------------------------------------------


def environment(device) -> dict:
    """The harness's common environment dict (``zimage_bench.env``) plus a short device label."""
    from .env import device_label
    from .env import environment as bench_environment

    env = bench_environment(device)
    env["device_label"] = device_label(env)
    return env


def model_label(pipe) -> str:
    from zimage_core.cache.teacache import model_kind

    return model_kind(pipe)


# ---------------------------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------------------------


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _splits(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        if part.strip():
            fn, bn = part.split(":")
            out.append((int(fn), int(bn)))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zimage_bench cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="pipeline folder (default: the embedded default model)")
    p.add_argument(
        "--random-layers",
        type=int,
        help="instead of --model: build a random-weight pipeline with this many main layers (label 'random')",
    )
    p.add_argument("--preset", help="model preset id (defaults and TeaCache coefficients); default: the model's")
    p.add_argument(
        "--prompts",
        help="prompt file, one per line (default: the model's own prompts, else zimage_bench/prompts.txt)",
    )
    p.add_argument("-n", "--num-prompts", type=int, default=4)
    p.add_argument("--steps", type=_ints, default=[30, 50], help="comma-separated step counts")
    p.add_argument("--cfg-scale", type=float, default=5.0, help="standard CFG scale (> 1: CFG on)")
    p.add_argument("--size", type=int, default=256, help="width = height")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="fb,tea,db")
    for m, thr in DEFAULT_THRESHOLDS.items():
        p.add_argument(f"--{m}-thresholds", type=_floats, default=thr)
    p.add_argument("--max-consecutive", type=_ints, default=[3], help="comma-separated caps to sweep (API: 1-5)")
    p.add_argument("--db-skip-interval", type=int, default=5)
    p.add_argument("--db-split", type=_splits, help="DBCache Fn:Bn splits to sweep, e.g. 1:0,2:1 (default: library)")
    p.add_argument("--taylor", action="store_true", help="also sweep DBCache with order-1 Taylor extrapolation")
    p.add_argument("--device")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared CPU, 2+ threads oversubscribe and run ~50x slower); 0 = leave",
    )
    p.add_argument("--out", default="zimage_bench/out/cache", help="results folder (rows.jsonl, pareto.png)")
    p.add_argument("--no-plot", action="store_true")
    return p


def _settings(args) -> list[tuple[str, dict]]:
    """(name, CacheConfig keyword arguments) for every cache setting of the sweep."""
    out = []
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for mc in args.max_consecutive:
        for m in methods:
            thresholds = getattr(args, f"{m}_thresholds")
            if m != "db":
                out += [(m, {"threshold": t, "max_consecutive": mc}) for t in thresholds]
                continue
            for split in args.db_split or [None]:
                for taylor in [False, True] if args.taylor else [False]:
                    for t in thresholds:
                        kw = {"threshold": t, "skip_interval": args.db_skip_interval, "taylor": taylor}
                        kw["max_consecutive"] = mc
                        if split is not None:
                            kw.update(fn=split[0], bn=split[1])
                        out.append(("db", kw))
    return out


def _load(args):
    import torch

    from zimage_core.default_model import default_model_path
    from zimage_core.pipeline import ZImage

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.random_layers:
        from zimage_core.components import RANDOM_TRANSFORMER, build_random_pipeline

        folder = Path(args.out) / f"random-L{args.random_layers}"
        if not (folder / "model_index.json").exists():
            build_random_pipeline(folder, seed=0, config=RANDOM_TRANSFORMER.replace(n_layers=args.random_layers))
        path = folder
    else:
        path = Path(args.model) if args.model else default_model_path()
    return ZImage.from_pretrained(path, device=device), str(path)


def _image_array(result):
    if result.images:
        return np.asarray(result.images[0].convert("RGB"), dtype=np.float64)
    return None


def _gen(pipe, prompt, seed, steps, args, cache=None):
    return pipe.generate(
        prompt,
        steps=steps,
        cfg_scale=args.cfg_scale,
        seed=seed,
        width=args.size,
        height=args.size,
        model=args.preset,
        cache=cache,
    )


def _compare(result, ref) -> dict:
    img = _image_array(result)
    lat, ref_lat = result.latents.double(), ref["latents"]
    return {
        "psnr": psnr(img, ref["image"]),
        "ssim": ssim(img, ref["image"]),
        "latent_rel_err": float((lat - ref_lat).norm() / ref_lat.norm()),
    }


def _aggregate(per_prompt: list[dict], key: str) -> dict:
    vals = [p[key] for p in per_prompt]
    return {f"{key}_mean": float(np.mean(vals)), f"{key}_min": float(np.min(vals))}


def _fewer_steps_row(pipe, args, prompts, refs, steps, kk, base_t, common) -> dict:
    """The plain sampler with ``kk`` steps, compared with the ``steps``-step uncached references."""
    n_layers = pipe.transformer.config.n_layers
    per, t = [], {"denoise": 0.0, "total": 0.0}
    for k, prompt in enumerate(prompts):
        r = _gen(pipe, prompt, args.seed + k, kk, args)
        t["denoise"] += r.stats["timings"]["denoise_s"]
        t["total"] += r.stats["timings"]["total_s"]
        per.append(_compare(r, refs[k]))
    return {
        **common,
        "steps": steps,
        "method": "steps",
        "threshold": None,
        "sampler_steps": kk,
        "main_layer_evals": kk * n_layers,
        "main_layer_evals_uncached": steps * n_layers,
        "evals_saved_factor": steps / kk,
        "denoise_s": t["denoise"] / len(prompts),
        "total_s": t["total"] / len(prompts),
        "speedup_denoise": base_t["denoise"] / max(t["denoise"], 1e-12),
        "speedup_total": base_t["total"] / max(t["total"], 1e-12),
        **_aggregate(per, "psnr"),
        **_aggregate(per, "ssim"),
        **_aggregate(per, "latent_rel_err"),
    }


def sweep(pipe, args, log=print) -> list[dict]:
    from zimage_core.cache import CacheConfig
    from zimage_core.cache.teacache import model_fingerprint

    from .calibrate import load_prompts

    prompts = load_prompts(args.prompts, args.num_prompts, pipe)
    settings = _settings(args)
    n_layers = pipe.transformer.config.n_layers
    common = {
        "bench": "cache",
        "model_label": model_label(pipe),
        "model": args.model_path,
        "fingerprint": model_fingerprint(pipe.transformer),
        "main_layers": n_layers,
        "cfg_scale": args.cfg_scale,
        "size": args.size,
        "prompts": len(prompts),
        "env": environment(pipe.device),
    }
    _gen(pipe, prompts[0], args.seed, 2, args)  # warm-up (allocations, lazy imports, RoPE tables)
    rows = []
    for steps in args.steps:
        refs, runs = [], {i: [] for i in range(len(settings))}
        base_t = {"denoise": 0.0, "total": 0.0}
        set_t = {i: {"denoise": 0.0, "total": 0.0} for i in range(len(settings))}
        for k, prompt in enumerate(prompts):
            seed = args.seed + k
            r = _gen(pipe, prompt, seed, steps, args)
            base_t["denoise"] += r.stats["timings"]["denoise_s"]
            base_t["total"] += r.stats["timings"]["total_s"]
            refs.append({"image": _image_array(r), "latents": r.latents.double()})
            for i, (method, kw) in enumerate(settings):
                cfg = CacheConfig.for_method(method, pipe=pipe, preset=args.preset, **kw)
                rc = _gen(pipe, prompt, seed, steps, args, cache=cfg)
                set_t[i]["denoise"] += rc.stats["timings"]["denoise_s"]
                set_t[i]["total"] += rc.stats["timings"]["total_s"]
                summ = rc.stats["cache"][0]
                runs[i].append(
                    {
                        **_compare(rc, refs[k]),
                        "evals": summ["main_layer_evals"],
                        "uncached": summ["main_layer_evals_uncached"],
                        "computed": len(summ["computed_steps"]),
                        "config": summ["config"],
                    }
                )
            log(f"  steps {steps}: prompt {k + 1}/{len(prompts)} done")
        base = {
            **common,
            "steps": steps,
            "method": "none",
            "threshold": None,
            "main_layer_evals": steps * n_layers,
            "main_layer_evals_uncached": steps * n_layers,
            "evals_saved_factor": 1.0,
            "denoise_s": base_t["denoise"] / len(prompts),
            "total_s": base_t["total"] / len(prompts),
            "speedup_denoise": 1.0,
            "speedup_total": 1.0,
            "psnr_mean": PSNR_CAP,
            "ssim_mean": 1.0,
        }
        rows.append(base)

        fewer: dict[int, dict] = {}  # the equal-compute fewer-steps baseline, one run per distinct k

        def fewer_steps(kk: int, steps=steps, refs=refs, base_t=base_t, fewer=fewer) -> dict:
            if kk not in fewer:
                fewer[kk] = _fewer_steps_row(pipe, args, prompts, refs, steps, kk, base_t, common)
            return fewer[kk]

        for i, (method, _kw) in enumerate(settings):
            per = runs[i]
            evals = float(np.mean([p["evals"] for p in per]))
            uncached = float(np.mean([p["uncached"] for p in per]))
            kk = max(1, min(steps, math.floor(evals / n_layers + 0.5)))  # same main-layer evaluations
            fs = fewer_steps(kk)
            row = {
                **common,
                "steps": steps,
                "method": method,
                "threshold": per[0]["config"]["threshold"],
                "config": per[0]["config"],
                "main_layer_evals": evals,
                "main_layer_evals_uncached": uncached,
                "evals_saved_factor": uncached / evals,
                "computed_steps_mean": float(np.mean([p["computed"] for p in per])),
                "denoise_s": set_t[i]["denoise"] / len(prompts),
                "total_s": set_t[i]["total"] / len(prompts),
                "speedup_denoise": base_t["denoise"] / max(set_t[i]["denoise"], 1e-12),
                "speedup_total": base_t["total"] / max(set_t[i]["total"], 1e-12),
                **_aggregate(per, "psnr"),
                **_aggregate(per, "ssim"),
                **_aggregate(per, "latent_rel_err"),
                "fewer_steps": {
                    "sampler_steps": kk,
                    "psnr_mean": fs["psnr_mean"],
                    "ssim_mean": fs["ssim_mean"],
                    "latent_rel_err_mean": fs["latent_rel_err_mean"],
                    "evals_saved_factor": fs["evals_saved_factor"],
                },
            }
            row["beats_fewer_steps"] = row["psnr_mean"] > fs["psnr_mean"] and row["ssim_mean"] >= fs["ssim_mean"]
            row["target_met"] = (
                steps == TARGET_STEPS
                and args.cfg_scale > 1
                and row["evals_saved_factor"] >= TARGET_FACTOR
                and row["psnr_mean"] >= TARGET_PSNR
                and row["beats_fewer_steps"]
            )
            rows.append(row)
        rows += sorted(fewer.values(), key=lambda r: r["sampler_steps"])
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for r in rows:
        r["timestamp"] = stamp
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Output: table and Pareto plot
# ---------------------------------------------------------------------------------------------------------------


def setting_name(row: dict) -> str:
    m = row["method"]
    if m == "steps":
        return f"{row['sampler_steps']} steps"
    if m == "none":
        return "uncached"
    c = row.get("config", {})
    mc = f" MC{c['max_consecutive']}"
    if m == "db":
        extra = f" F{c['fn']}B{c['bn']} N{c['skip_interval']}" + (" +taylor" if c.get("taylor") else "")
        return f"db{extra}{mc} {row['threshold']:g}"
    return f"{m}{mc} {row['threshold']:g}"


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'steps':>5}  {'setting':<32} {'evals':>7} {'saved':>6} {'speedup':>7} {'PSNR':>6} {'min':>6} "
        f"{'SSIM':>6} {'lat.err':>7}  {'fewer-steps (same evals)':<26}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        fs = r.get("fewer_steps")
        fs_txt = (
            f"{fs['sampler_steps']:>3} st: {fs['psnr_mean']:5.1f} dB {fs['ssim_mean']:.3f}"
            + (" <" if r["beats_fewer_steps"] else " ≥")
            if fs
            else ""
        )
        lines.append(
            f"{r['steps']:>5}  {setting_name(r):<32} {r['main_layer_evals']:>7.1f} {r['evals_saved_factor']:>5.2f}x "
            f"{r['speedup_denoise']:>6.2f}x {r['psnr_mean']:>6.1f} {r.get('psnr_min', r['psnr_mean']):>6.1f} "
            f"{r['ssim_mean']:>6.3f} {r.get('latent_rel_err_mean', 0.0):>7.4f}  {fs_txt}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    from .report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps_list = sorted({r["steps"] for r in rows})
    fig, axes = plt.subplots(2, len(steps_list), figsize=(6 * len(steps_list), 9), squeeze=False)
    for col, steps in enumerate(steps_list):
        sub = [r for r in rows if r["steps"] == steps and r["method"] != "none"]
        groups: dict[str, list] = {}
        for r in sub:
            c = r.get("config", {})
            key = r["method"]
            if key == "db":
                key = f"db F{c['fn']}B{c['bn']}" + (" +taylor" if c.get("taylor") else "")
            if key != "steps":
                key += f" MC{c['max_consecutive']}"
            groups.setdefault(key, []).append(r)
        for row_i, xkey in enumerate(("evals_saved_factor", "speedup_denoise")):
            ax = axes[row_i][col]
            for key, rs in groups.items():
                rs = sorted(rs, key=lambda r: r["evals_saved_factor"])  # connect in compute order (timing is noisy)
                style = "--" if key == "steps" else "-"
                ax.plot(
                    [r[xkey] for r in rs],
                    [r["psnr_mean"] for r in rs],
                    style,
                    marker="o",
                    color="black" if key == "steps" else None,
                    label="fewer steps" if key == "steps" else key,
                )
            ax.axhline(TARGET_PSNR, color="grey", lw=0.8, ls=":")
            if xkey == "evals_saved_factor":
                ax.axvline(TARGET_FACTOR, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("main-layer evaluations saved (×)" if row_i == 0 else "wall-clock speedup, denoise (×)")
            ax.set_ylabel("PSNR vs uncached (dB, float)")
            ax.set_title(f"{steps} steps, CFG {rows[0]['cfg_scale']:g}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    pipe, args.model_path = _load(args)
    label = model_label(pipe)
    print(
        f"bench cache: model {args.model_path} (label: {label}, {pipe.transformer.config.n_layers} main layers), "
        f"steps {args.steps}, CFG {args.cfg_scale}, {args.size}px, {args.num_prompts} prompts",
        file=sys.stderr,
    )
    rows = sweep(pipe, args, log=lambda s: print(s, file=sys.stderr))
    with open(out / "rows.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    env = rows[0]["env"]
    git = (env.get("git_sha") or "unknown")[:12] + ("-dirty" if env.get("git_dirty") else "")
    title = (
        f"Step caches on the {label} model ({pipe.transformer.config.n_layers} main layers), "
        f"{rows[0]['prompts']} prompts, {args.size}px — {env['device_label']}, git {git}"
    )
    print(f"model: {label} ({args.model_path})  device: {env['device_label']}  torch {env['torch']}  git {git}")
    print(format_table(rows))
    for r in rows:
        if r["method"] == "steps" and r["sampler_steps"] == r["steps"]:
            print(
                f"timing noise: the {r['steps']}-step fewer-steps row re-runs the uncached sampler and measured "
                f"{r['speedup_denoise']:.2f}x (1.00x = no noise)"
            )
    met = [r for r in rows if r.get("target_met")]
    print(
        f"target (50 steps, CFG, ≥{TARGET_FACTOR}× fewer main-layer evaluations at ≥{TARGET_PSNR} dB, beating fewer "
        f"steps): {'met by ' + ', '.join(setting_name(r) for r in met) if met else 'not met'}"
    )
    if not args.no_plot:
        png = plot(rows, out / "pareto.png", title)
        print(f"wrote {out / 'rows.jsonl'} and {png} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

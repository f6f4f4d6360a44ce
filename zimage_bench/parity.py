"""``python -m zimage_bench parity``: our pipeline against diffusers' ``ZImagePipeline`` on identical components and
seeds.

For every shape and configuration: the latents after every step (relative L2 and max |Δ| against diffusers at the
same step), the final latents (max |Δ|, relative L2, cosine) and the PSNR of the float images the shared VAE decodes
from both. Exit status 1 when any configuration fails its rule (see ``zimage_bench.common.check_parity``), 0 otherwise.
"""

from __future__ import annotations

import time

from . import common, metrics, report
from .env import device_label, environment
from .pipelines import REFERENCE, decode_float, load_pair, make_configs, per_step_latents, run
from .shapes import resolve
from .timing import fmt

DEFAULT_CONFIGS = ["ours-torch", "ours-triton"]

COLUMNS = [
    ("case", lambda r: r["case"]),
    ("config", lambda r: r["config"]),
    ("status", lambda r: r["status"]),
    ("step rel-L2 (first / max / last)", lambda r: _steps(r)),
    ("final max abs", lambda r: report.num(r, "max_abs")),
    ("final rel-L2", lambda r: report.num(r, "rel_l2")),
    ("cosine", lambda r: f"{r['cosine']:.9f}" if r.get("cosine") is not None else "–"),
    ("image PSNR dB", report.psnr_text),
    ("rule", lambda r: r.get("rule", r.get("reason", ""))),
]


def _steps(r: dict) -> str:
    s = r.get("per_step_rel_l2")
    if not s:
        return "–"
    return f"{fmt(s[0], 2)} / {fmt(max(s), 2)} / {fmt(s[-1], 2)}"


def main(argv: list[str]) -> int:
    p = common.parser("parity", __doc__.splitlines()[0])
    args = p.parse_args(argv)
    common.setup(args, "parity")
    t_start = time.perf_counter()
    pair = load_pair(args.model, args.device, args.torch_dtype, vae=args.vae)
    pair.fault = args.inject_fault
    env = environment(args.device)
    shapes = resolve(args.shapes, args.device.type)
    names = [n for n in common.config_names(args.configs, DEFAULT_CONFIGS) if n != REFERENCE]
    configs = make_configs(pair, names, cache_spec=args.caches)
    ref_cfg = make_configs(pair, [REFERENCE])[0]
    common.say(
        f"parity: {pair.model} [{pair.model_kind}] on {device_label(env)}, {pair.describe()['dtype']}, "
        f"{len(shapes)} shapes × {len(configs)} configs (reference: {REFERENCE})"
    )
    base = {"command": "parity", "device": device_label(env), **pair.describe()}
    rows: list[dict] = []
    for cfg in configs:
        if not cfg.available:
            rows.append({**base, "case": "*", "config": cfg.name, "status": "skipped", "reason": cfg.skip_reason})
    for shape in shapes:
        ref = run(pair, ref_cfg, shape, seed=args.seed, prompt=args.prompt, keep_steps=True)
        ref_steps = per_step_latents(ref.recorder, shape, "diffusers")
        ref_images = decode_float(pair.ref.vae, ref.latents, pair.device)
        for cfg in (c for c in configs if c.available):
            out = run(pair, cfg, shape, seed=args.seed, prompt=args.prompt, keep_steps=True)
            order = "diffusers" if out.stats.get("batched") else cfg.kind  # a batched run is one sequence
            steps = per_step_latents(out.recorder, shape, order)
            images = decode_float(pair.ref.vae, out.latents, pair.device)
            res = common.check_parity(
                out.latents, ref.latents, images, ref_images, lossy=cfg.lossy, tol=args.tol, min_psnr=args.min_psnr
            )
            row = {
                **base,
                **shape.describe(),
                "config": cfg.name,
                "reference": REFERENCE,
                "status": "ok" if res["passed"] else "parity_failed",
                "lossy": cfg.lossy,
                **res,
                "per_step_rel_l2": [metrics.rel_l2(a, b) for a, b in zip(steps, ref_steps)],
                "per_step_max_abs": [metrics.max_abs(a, b) for a, b in zip(steps, ref_steps)],
                "seed": args.seed,
                "forwards": out.stats["forwards"],
                "reference_forwards": ref.stats["forwards"],
                **({"config_info": cfg.info} if cfg.info else {}),
                **({"cache_stats": out.stats["cache"]} if "cache" in out.stats else {}),
                "repro": common.repro("parity", args, shape.name, cfg.name),
            }
            rows.append(row)
            common.say(f"  {shape.name:<22} {cfg.name:<16} {row['status']:<14} rel-L2 {fmt(res['rel_l2'])}")

    table = report.markdown([r for r in rows if r["status"] != "skipped"], COLUMNS)
    skipped = [f"- {r['config']}: skipped — {r['reason']}" for r in rows if r["status"] == "skipped"]
    failed = [r for r in rows if r["status"] == "parity_failed"]
    sha = (env.get("git_sha") or "?")[:10]
    title = f"parity: {pair.model} [{pair.model_kind}], {base['dtype']}, {device_label(env)}, git {sha}"
    text = "\n".join([f"## {title}", "", table, "", *skipped])
    print(text)
    for r in rows:
        r["env"] = env
    report.write_jsonl(args.out / "rows.jsonl", [{"schema": report.SCHEMA, **r} for r in rows])
    (args.out / "table.md").write_text(text + "\n")
    verdict = f"FAILED: {len(failed)} of {sum(r['status'] != 'skipped' for r in rows)}" if failed else "all passed"
    print(f"\nparity {verdict}; rows: {args.out / 'rows.jsonl'} ({time.perf_counter() - t_start:.0f} s)")
    return 1 if failed else 0

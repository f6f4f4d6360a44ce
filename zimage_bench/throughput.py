"""``python -m zimage_bench throughput``: speed of every configuration, each next to its parity result from the same
run.

Per shape: the reference (diffusers eager) runs once; every other configuration's first run is its warm-up *and* its
parity check against that reference (compile happens here and is reported apart, as the first-call time). Only the
configurations that passed are timed, interleaved round-robin (the starting configuration rotates every round) so a
shared machine's slow phases hit all of them. Reported per configuration: ms per transformer forward, ms per
denoising step, end-to-end latency per request, images per second, first-call (warm-up / compile) time, peak memory,
GPU telemetry and energy per image. Exit status 1 when a configuration failed parity (it is reported, not timed).
"""

from __future__ import annotations

import statistics
import time

from . import common, report, telemetry
from .env import device_label, environment
from .pipelines import REFERENCE, decode_float, load_pair, make_configs, run
from .shapes import resolve
from .timing import Clock, Stats, fmt, peak_memory_gb, reset_peak_memory, round_robin

DEFAULT_CONFIGS = {
    "cpu": ["diffusers-eager", "ours-torch", "ours-batched", "ours-triton", "ours-cache"],
    "cuda": ["diffusers-eager", "diffusers-compile", "ours-torch", "ours-batched", "ours-triton", "ours-cache"],
}


def _mem(r: dict) -> str:
    if r.get("peak_mem_gb") is not None:
        return f"{r['peak_mem_gb']:.1f} GB"
    if report.get(r, "telemetry.rss_mb_max") is not None:
        return f"{report.get(r, 'telemetry.rss_mb_max'):.0f} MB RSS"
    return "–"


def _parity(r: dict) -> str:
    if r.get("config") == r.get("reference"):
        return "reference"
    if r.get("lossy"):
        return f"PSNR {report.psnr_text(r)}"
    return f"rel-L2 {report.num(r, 'rel_l2', 2)}" + ("" if report.psnr_text(r) != "identical" else " (identical)")


COLUMNS = [
    ("case", lambda r: r["case"]),
    ("config", lambda r: r["config"]),
    ("parity", _parity),
    ("forward ms (batch)", lambda r: f"{report.stat(r, 'forward_ms')} ({r.get('forward_batch', '–')})"),
    ("step ms", lambda r: report.stat(r, "step_ms")),
    ("e2e ms", lambda r: report.stat(r, "e2e_ms")),
    ("img/s", lambda r: report.num(r, "images_per_s")),
    ("× eager", lambda r: report.num(r, "speedup")),
    ("first call s", lambda r: report.num(r, "first_call_s")),
    ("peak mem", _mem),
    ("J/img", lambda r: report.num(r, "energy_j_per_image")),
]


def main(argv: list[str]) -> int:
    p = common.parser("throughput", __doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=None, help="timed runs per configuration and shape (cpu 5, gpu 3)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed runs per configuration and shape, the first being the parity check (compiled configs get one "
        "more)",
    )
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for diffusers-compile (default: default)")
    args = p.parse_args(argv)
    common.setup(args, "throughput")
    args.repeats = args.repeats or (3 if args.device.type == "cuda" else 5)
    args.warmup = max(args.warmup, 1)
    t_start = time.perf_counter()

    pair = load_pair(args.model, args.device, args.torch_dtype, vae=args.vae)
    pair.fault = args.inject_fault
    env = environment(args.device)
    shapes = resolve(args.shapes, args.device.type)
    names = common.config_names(args.configs, DEFAULT_CONFIGS["cuda" if args.device.type == "cuda" else "cpu"])
    configs = make_configs(pair, names, cache_spec=args.caches, compile_mode=args.compile_mode)
    ref_cfg = next((c for c in configs if c.name == REFERENCE), None) or make_configs(pair, [REFERENCE])[0]
    clock = Clock(args.device)
    label = device_label(env)
    base = {"command": "throughput", "device": label, **pair.describe()}
    common.say(
        f"throughput: {pair.model} [{pair.model_kind}] on {label}, {base['dtype']}, {len(shapes)} shapes, "
        f"configs {[c.name for c in configs]}, {args.repeats} timed repeats (interleaved), warm-up {args.warmup}"
    )

    rows: list[dict] = []
    for cfg in configs:
        if not cfg.available:
            rows.append({**base, "case": "*", "config": cfg.name, "status": "skipped", "reason": cfg.skip_reason})

    for shape in shapes:
        common.say(f"[{shape.name}]")
        # ---- warm-up + parity check (the reference first) ----
        ref = run(pair, ref_cfg, shape, seed=args.seed, prompt=args.prompt, clock=clock)
        ref_images = decode_float(pair.ref.vae, ref.latents, pair.device)
        first, checks = {}, {}
        for cfg in (c for c in configs if c.available):
            out = ref if cfg is ref_cfg else run(pair, cfg, shape, seed=args.seed, prompt=args.prompt, clock=clock)
            first[cfg.name] = out.e2e_ms
            if cfg is ref_cfg:
                checks[cfg.name] = {"passed": True, "rule": "is the reference"}
            else:
                images = decode_float(pair.ref.vae, out.latents, pair.device)
                checks[cfg.name] = common.check_parity(
                    out.latents, ref.latents, images, ref_images, lossy=cfg.lossy, tol=args.tol, min_psnr=args.min_psnr
                )
            status = "ok" if checks[cfg.name]["passed"] else "PARITY FAILED (not timed)"
            common.say(f"  check   {cfg.name:<18} first call {out.e2e_ms / 1000:.2f} s  {status}")
            if checks[cfg.name]["passed"]:
                for _ in range(args.warmup - 1 + (1 if cfg.compiled else 0)):
                    run(pair, cfg, shape, seed=args.seed, prompt=args.prompt, clock=clock)

        # ---- timed runs, interleaved ----
        timed = [c for c in configs if c.available and checks[c.name]["passed"]]
        by_name = {c.name: c for c in timed}
        acc = {
            c.name: {"e2e": [], "fwd": [], "step": [], "mem": [], "tel": [], "n_fwd": 0, "stats": None} for c in timed
        }
        for name in round_robin([c.name for c in timed], args.repeats):
            cfg = by_name[name]
            reset_peak_memory(args.device)
            tel = telemetry.for_device(args.device).start()
            out = run(pair, cfg, shape, seed=args.seed, prompt=args.prompt, clock=clock)
            a = acc[name]
            a["tel"].append(tel.stop())
            a["mem"].append(peak_memory_gb(args.device))
            a["e2e"].append(out.e2e_ms)
            a["fwd"].extend(out.recorder.forward_ms())
            a["step"].append(sum(out.recorder.step_ms()) / shape.steps)
            a["n_fwd"], a["stats"] = out.stats["forwards"], out.stats
        ref_median = statistics.median(acc[REFERENCE]["e2e"]) if REFERENCE in acc else None

        # ---- rows ----
        for cfg in (c for c in configs if c.available):
            chk = dict(checks[cfg.name])
            row = {
                **base,
                **shape.describe(),
                "config": cfg.name,
                "reference": REFERENCE,
                "lossy": cfg.lossy,
                "status": "ok" if chk.pop("passed") else "parity_failed",
                **chk,
                "seed": args.seed,
                "first_call_s": first[cfg.name] / 1000,
                **({"config_info": cfg.info} if cfg.info else {}),
                "repro": common.repro("throughput", args, shape.name, cfg.name),
            }
            if cfg.name in acc:
                a = acc[cfg.name]
                e2e = Stats.of(a["e2e"]).to_dict()
                tel = telemetry.merge(a["tel"])
                images = shape.batch * len(a["e2e"])
                row.update(
                    forward_ms=Stats.of(a["fwd"]).to_dict(),
                    forward_batch=a["stats"]["forward_batch"],
                    forwards_per_request=a["n_fwd"],
                    step_ms=Stats.of(a["step"]).to_dict(),
                    e2e_ms=e2e,
                    ms_per_image=e2e["median"] / shape.batch,
                    images_per_s=shape.batch / (e2e["median"] / 1000),
                    speedup=(ref_median / e2e["median"]) if ref_median else None,
                    telemetry=tel,
                )
                if cfg.compiled:
                    row["compile_s"] = max(first[cfg.name] - e2e["median"], 0.0) / 1000
                if a["mem"] and a["mem"][0] is not None:
                    row["peak_mem_gb"] = max(a["mem"])
                if tel.get("energy_j") is not None:
                    row["energy_j_per_image"] = tel["energy_j"] / images
                timings = a["stats"].get("timings")
                if timings:
                    row["ours_stage_s"] = dict(timings)  # encode / denoise / decode of the last timed run
                if "cache" in a["stats"]:
                    row["cache_stats"] = a["stats"]["cache"]
            rows.append(row)
            if cfg.name in acc:
                common.say(
                    f"  timed   {cfg.name:<18} e2e {report.stat(row, 'e2e_ms')} ms, "
                    f"fwd {report.stat(row, 'forward_ms')} ms, × eager {fmt(row.get('speedup'))}"
                )

    # ---- report ----
    for r in rows:
        r["env"] = env
    ok = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "parity_failed"]
    skipped = [r for r in rows if r["status"] == "skipped"]
    sha = (env.get("git_sha") or "?")[:10]
    title = f"throughput: {pair.model} [{pair.model_kind}], {base['dtype']}, {label}, git {sha}"
    lines = [f"## {title}", ""]
    if args.device.type == "cpu":
        lines += [
            f"CPU timings: {env['cpu_count']} cores, {env['torch_threads']} torch thread(s); on a shared "
            "machine compare configurations only within one run (they are interleaved).",
            "",
        ]
    lines += [report.markdown(ok, COLUMNS), ""]
    lines += [
        f"- {r['config']} on {r['case']}: PARITY FAILED ({r['rule']}; rel-L2 {fmt(r['rel_l2'])}, PSNR "
        f"{report.psnr_text(r)} dB): not timed"
        for r in failed
    ]
    lines += [f"- {r['config']}: skipped — {r['reason']}" for r in skipped]
    text = "\n".join(lines)
    print(text)
    report.write_jsonl(args.out / "rows.jsonl", [{"schema": report.SCHEMA, **r} for r in rows])
    (args.out / "table.md").write_text(text + "\n")
    if not args.no_plots:
        for fn, name in (
            (report.plot_latency_by_resolution, "latency_by_resolution.png"),
            (report.plot_speed_vs_quality, "speed_vs_quality.png"),
        ):
            path = fn(ok, args.out / name, title=title)
            if path:
                common.say(f"plot: {path}")
    verdict = f"{len(failed)} configuration(s) FAILED parity" if failed else "every timed configuration passed parity"
    print(f"\nthroughput: {verdict}; rows: {args.out / 'rows.jsonl'} ({time.perf_counter() - t_start:.0f} s)")
    return 1 if failed else 0

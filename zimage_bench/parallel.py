"""``python -m zimage_bench parallel``: per-step time and communication per world size and mode, next to a model.

Measured (this machine): one denoising step's transformer forward on a CFG batch ``[pos ‖ neg]`` through
``ParallelContext.forward``, for each parallel mode and world size, ranks started by ``zimage_core.parallel.launch``
(gloo on CPU, NCCL on GPUs), median over ``--reps`` after a warm-up; and the elements each rank hands to collectives
per step, counted by wrapping the torch.distributed calls.

Modelled (Z-Image's real shape, bf16): elements per all-to-all and per layer, bytes per rank per step, and the
step time on NVLink GPUs from FLOPs and bytes with stated assumptions (achieved TFLOP/s, GB/s per GPU, no overlap of
communication and compute). The same formulas are evaluated at the measured run's shape and printed next to the
counted elements, so the communication model is checked against the code. CPU timings do not predict GPU scaling:
gloo over loopback and a few shared cores are nothing like NVLink and tensor cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MODES = {  # name -> ParallelConfig spec
    "single": "",
    "ulysses=2": "ulysses=2",
    "ulysses=4 uneven": "ulysses=4,heads=uneven",
    "ulysses=4 pad": "ulysses=4,heads=pad",
    "ring=2": "ring=2",
    "ring=4": "ring=4",
    "cfg=2": "cfg=2",
    "ulysses=2 x cfg=2": "ulysses=2,cfg=2",
}
GPU_MODES = [
    "ulysses=2",
    "ulysses=4,heads=uneven",
    "ulysses=4,heads=pad",
    "ulysses=8,heads=pad",
    "ring=2",
    "ring=4",
    "ring=8",
    "cfg=2",
    "ulysses=2,cfg=2",
    "ulysses=4,cfg=2",
]


# ---------------------------------------------------------------------------------------------------------------
# The model: FLOPs and collective sizes of one step (main layers; refiners and the final layer run on every rank)
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    dim: int
    heads: int
    ffn: int
    layers: int
    tokens: int  # unified sequence per sample (image + caption, padded)
    batch: int  # sequences in the step's forward (2 with CFG)
    latent_elems: int  # one output latent [C, 1, h, w]
    refiner_tokens: int = 0  # image tokens per sequence of the noise refiner
    refiner_layers: int = 0


@dataclass(frozen=True)
class Hardware:
    name: str = "H100/H200 SXM, NVLink 4 (assumed figures)"
    tflops: float = 500.0  # achieved bf16 dense TFLOP/s per GPU (about half of the 989 peak)
    gbps: float = 350.0  # achieved GB/s per GPU per direction in all-to-all / ring transfers (450 peak)


def parse_spec(spec: str):
    from zimage_core.parallel import ParallelConfig

    return ParallelConfig.parse(spec)


def stack_model(shape: Shape, cfg, layers: int, N: int) -> dict:
    """One pass of ``layers`` blocks over N tokens per sequence through the sequence-parallel hook (rank 0)."""
    from zimage_core.parallel import head_splits

    P, B = cfg.sp, shape.batch // cfg.cfg
    n = N / P
    D = shape.dim // shape.heads
    padded, splits = head_splits(shape.heads, cfg.ulysses, cfg.heads) if cfg.ulysses > 1 else (shape.heads, [0])
    linear = 2 * B * n * (4 * shape.dim**2 + 3 * shape.dim * shape.ffn)
    if cfg.ulysses > 1:  # every token's query over the whole sequence, for this rank's heads
        attn = 4 * B * N * N * splits[0] * D
    else:  # ring: this rank's queries over every key; single: everything
        attn = 4 * B * n * N * shape.heads * D
    per_layer, sent = {}, 0.0
    if cfg.ulysses > 1:
        qkv = 3 * B * n * padded * D  # one all_to_all of q, k, v stacked
        out = B * N * splits[0] * D
        per_layer = {"all_to_all qkv": qkv, "all_to_all out": out}
        sent = (qkv + out) * (P - 1) / P
    elif cfg.ring > 1:
        per_layer = {"ring k,v (P-1 hops)": 2 * B * n * shape.heads * D * (P - 1)}
        sent = per_layer["ring k,v (P-1 hops)"]
    elements = sum(per_layer.values()) * layers
    if P > 1:  # the shards gathered after the stack
        elements += B * n * shape.dim
        sent = sent * layers + B * n * shape.dim * (P - 1)
    return {"flops": layers * (linear + attn), "per_layer": per_layer, "elements": elements, "sent": sent}


def step_model(shape: Shape, spec: str, elem_bytes: int = 2, hw: Hardware = Hardware()) -> dict:
    """Per rank, one step: FLOPs, elements handed to collectives (rank 0), bytes sent to other ranks, time.

    The main layers over the unified sequence and the noise refiner over the image tokens both go through the
    sequence-parallel hook; with ``cfg=2`` one all_gather of the outputs per step."""
    cfg = parse_spec(spec)
    main = stack_model(shape, cfg, shape.layers, shape.tokens)
    refiner = stack_model(shape, cfg, shape.refiner_layers, shape.refiner_tokens)
    if shape.refiner_layers == 0:
        refiner = {"flops": 0, "elements": 0, "sent": 0.0}
    flops = main["flops"] + refiner["flops"]
    per_step = {"main layers": main["elements"], "noise refiner": refiner["elements"]}
    sent = main["sent"] + refiner["sent"]
    if cfg.cfg > 1:
        B = shape.batch // cfg.cfg
        per_step["all_gather cfg"] = B * shape.latent_elems
        sent += B * shape.latent_elems * (cfg.cfg - 1)
    bytes_sent = sent * elem_bytes
    t = flops / (hw.tflops * 1e12) + bytes_sent / (hw.gbps * 1e9)
    return {
        "flops": flops,
        "elements_per_layer": main["per_layer"],
        "elements_per_step": per_step,
        "elements_total": sum(per_step.values()),
        "bytes_sent_per_rank": bytes_sent,
        "time_s": t,
    }


def gpu_table(res: int, caption: int = 128) -> list[dict]:
    from zimage_core.config import PRESETS

    c = PRESETS["z-image"]
    image = (res // 16) ** 2
    tokens = image + caption
    shape = Shape(c.dim, c.n_heads, c.ffn_dim, c.n_layers, tokens, 2, 16 * (res // 8) ** 2, image, c.n_refiner_layers)
    base = step_model(shape, "")
    rows = []
    for spec in ["", *GPU_MODES]:
        m = step_model(shape, spec)
        cfg = parse_spec(spec)
        rows.append(
            {
                "resolution": f"{res}x{res}",
                "tokens": tokens,
                "mode": cfg.describe(),
                "gpus": cfg.world_size,
                "a2a_or_ring_MB_per_layer": sum(m["elements_per_layer"].values()) * 2 / 1e6,
                "MB_sent_per_rank_per_step": m["bytes_sent_per_rank"] / 1e6,
                "model_ms": m["time_s"] * 1e3,
                "model_speedup": base["time_s"] / m["time_s"],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------------------------------------------
def bench_model(heads: int, layers: int):
    from zimage_core import ZImageConfig, ZImageTransformer

    D = 8
    cfg = ZImageConfig(
        dim=heads * D,
        n_layers=layers,
        n_refiner_layers=1,
        n_heads=heads,
        n_kv_heads=heads,
        cap_feat_dim=32,
        axes_dims=(2, 2, 4),
        axes_lens=(512, 128, 128),
    )
    torch.manual_seed(0)
    return ZImageTransformer(cfg).eval()


def bench_inputs(latent: int, caption: int):
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(16, 1, latent, latent, generator=g)
    caps = [torch.randn(caption, 32, generator=g), torch.randn(caption, 32, generator=g)]
    return [lat, lat.clone()], torch.full((2,), 0.3), caps


class Counter:
    """Counts elements handed to torch.distributed collectives by our parallel modules (this rank)."""

    def __init__(self):
        import torch.distributed as dist

        from zimage_core.parallel import attention, hook, runtime

        self.counts: dict[str, int] = {}
        self.patches = []
        a2a, gather = dist.all_to_all_single, attention.all_gather_tensor
        p2p = dist.batch_isend_irecv

        def count(name, n):
            self.counts[name] = self.counts.get(name, 0) + int(n)

        def all_to_all_single(out, inp, *a, **k):
            count("all_to_all", inp.numel())
            return a2a(out, inp, *a, **k)

        def all_gather(out, inp, *a, **k):
            count("all_gather", inp.numel())
            return gather(out, inp, *a, **k)

        def batch_isend_irecv(ops):
            count("ring send", sum(op.tensor.numel() for op in ops if op.op is dist.isend))
            return p2p(ops)

        self._set(dist, "all_to_all_single", all_to_all_single)
        self._set(dist, "batch_isend_irecv", batch_isend_irecv)
        for mod in (attention, hook, runtime):
            self._set(mod, "all_gather_tensor", all_gather)

    def _set(self, obj, name, value):
        self.patches.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def reset(self):
        self.counts = {}


def rank_bench(rank: int, spec: str, heads: int, layers: int, latent: int, caption: int, reps: int) -> dict:
    import torch.distributed as dist

    from zimage_core.parallel import ParallelConfig, ParallelContext

    torch.set_num_threads(1)
    config = ParallelConfig.parse(spec)
    ctx = ParallelContext(config) if config.world_size > 1 else None
    model = bench_model(heads, layers)
    x, t, caps = bench_inputs(latent, caption)
    counter = Counter()
    times = []
    with torch.no_grad():
        context = model.encode_context(caps)
        for i in range(reps + 1):
            counter.reset()
            dist.barrier()
            t0 = time.perf_counter()
            if ctx is None:
                model.forward_with_context(x, t, context)
            else:
                ctx.forward(model, x, t, context, cfg_batch=True)
            elapsed = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
            if i:  # the first call is a warm-up
                times.append(float(elapsed))
    times.sort()
    return {"median_s": times[len(times) // 2], "min_s": times[0], "counts": dict(counter.counts)}


def measure(args) -> list[dict]:
    from zimage_core.parallel import launch

    image = (args.latent // 2) ** 2
    image += (-image) % 32
    tokens = image + args.caption + (-args.caption) % 32
    dim = 8 * args.heads
    shape = Shape(dim, args.heads, int(dim / 3 * 8), args.layers, tokens, 2, 16 * args.latent**2, image, 1)
    rows = []
    for name, spec in MODES.items():
        world = parse_spec(spec).world_size
        res = launch(
            rank_bench,
            world,
            (spec, args.heads, args.layers, args.latent, args.caption, args.reps),
            timeout_s=args.timeout,
            start_method="fork",
            threads=1,
        )[0]
        model = step_model(shape, spec, elem_bytes=4)
        rows.append(
            {
                "mode": name,
                "ranks": world,
                "median_ms": res["median_s"] * 1e3,
                "min_ms": res["min_s"] * 1e3,
                "elements_counted": sum(res["counts"].values()),
                "elements_model": model["elements_total"],
                "counts": res["counts"],
            }
        )
        print(f"  measured {name}: {rows[-1]['median_ms']:.1f} ms", flush=True)
    base = rows[0]["median_ms"]
    for r in rows:
        r["cpu_ratio_vs_single"] = base / r["median_ms"]
    return rows


def table(rows: list[dict], cols: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for _, key in cols:
            v = r[key]
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m zimage_bench parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=30, help="heads of the measured toy model (head_dim 8)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    p.add_argument("--caption", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per launched run")
    p.add_argument("--model-only", action="store_true", help="print the NVLink model, measure nothing")
    p.add_argument("--out", default="zimage_bench/out/parallel", help="folder for rows.json and table.md")
    args = p.parse_args(argv)

    hw = Hardware()
    text = [
        "## Modelled: Z-Image (30 layers, 30 heads, dim 3840), bf16, CFG batch of 2, caption 128 tokens",
        f"Assumptions: {hw.name}: {hw.tflops:.0f} TFLOP/s achieved per GPU, {hw.gbps:.0f} GB/s per GPU per "
        "direction, communication not overlapped with compute; main layers and noise refiner sharded; the context "
        "refiner (once per request) and the final layer left out.",
        "",
    ]
    model_rows = gpu_table(1024) + gpu_table(2048)
    text.append(
        table(
            model_rows,
            [
                ("resolution", "resolution"),
                ("tokens", "tokens"),
                ("mode", "mode"),
                ("GPUs", "gpus"),
                ("MB per layer (a2a/ring)", "a2a_or_ring_MB_per_layer"),
                ("MB sent per rank per step", "MB_sent_per_rank_per_step"),
                ("model ms/step", "model_ms"),
                ("model speedup", "model_speedup"),
            ],
        )
    )
    rows = []
    if not args.model_only:
        torch.set_num_threads(1)
        print(f"measuring {len(MODES)} modes on this machine (one thread per rank) ...", flush=True)
        rows = measure(args)
        text += [
            "",
            f"## Measured on this machine (CPU, gloo): toy model, {args.heads} heads x 8, {args.layers} layers, "
            f"latent {args.latent}x{args.latent}, caption {args.caption}, CFG batch of 2, fp32, median of {args.reps}",
            "CPU timings do not predict GPU scaling (gloo over loopback on shared cores); elements counted at the "
            "collectives vs the model's formula at this shape.",
            "",
            table(
                rows,
                [
                    ("mode", "mode"),
                    ("ranks", "ranks"),
                    ("median ms/step", "median_ms"),
                    ("CPU ratio vs single", "cpu_ratio_vs_single"),
                    ("elements counted (rank 0)", "elements_counted"),
                    ("elements modelled", "elements_model"),
                ],
            ),
        ]
    report = "\n".join(text)
    print(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .env import environment

    (out / "rows.json").write_text(
        json.dumps({"env": environment("cpu"), "model": model_rows, "measured": rows}, indent=2, default=str)
    )
    (out / "table.md").write_text(report + "\n")
    print(f"wrote {out / 'table.md'}")
    bad = [r for r in rows if not math.isclose(r["elements_counted"], r["elements_model"], rel_tol=1e-9)]
    if bad:
        print(f"communication model disagrees with the counted elements for {[r['mode'] for r in bad]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

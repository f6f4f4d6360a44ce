"""``python -m zimage_bench fp8``: what e4m3 W8A8 costs in quality, per layer group and for the chosen recipe.

Sections (each can be skipped; all run on CPU: ``torch._scaled_mm`` runs e4m3 GEMMs there):

- ``blocks``: one transformer block at Z-Image's real size (width 3840, 30 heads of 128, FFN 10240) with
  **random weights** (nn.Linear's default init, random adaLN input), ``--tokens`` tokens; each layer kind quantized
  alone, then the recipe: the relative L2 error of the block's output against the unquantized block.
- ``groups``: the **trained default model** (``zimage_core/assets/default``), one group quantized at a time (all 15
  groups of ``zimage_core.fp8.GROUPS``), then the recipe and everything: the relative L2 error of the transformer
  output at three noise levels on held-out captions.
- ``images``: the recipe against the unquantized pipeline on ``--n`` held-out captions of the trained default: image
  PSNR (mean, min) and the pixel checker's agreement for both (docs/default-model.md).
- ``memory``: the weight bytes of both on the default model (measured), and of the 6B config (computed from its
  shapes: 1 byte per quantized weight + 4 per output channel, 2 bytes per bf16 parameter).
- ``attention``: FP8 attention's error, **emulated** (no FP8 attention kernel exists yet): Q, K, V rounded to e4m3
  with one scale per (sample, head), then the reference attention; on real-size random heads after QK-norm, and the
  image PSNR of the recipe + FP8 attention against the unquantized pipeline on held-out captions of the trained
  default.
- ``lora``: an adapter on FP8 layers, as a bf16 side path vs merged into the weight and re-quantized: per-forward
  cost of the side path and per-request cost of the merge on real-size layers (random weights), CPU timings.

Numbers go to stdout and, with ``--out``, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

SECTIONS = ("blocks", "groups", "images", "memory", "lora", "attention")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def psnr_u8(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---- blocks: real-size random weights ------------------------------------------------------------------------------


def blocks(tokens: int, seed: int = 0) -> dict:
    from zimage_core import fp8 as zfp8
    from zimage_core.config import PRESETS
    from zimage_core.model import BlockInputs, TransformerBlock
    from zimage_kernels import get_ops

    cfg = PRESETS["z-image"]
    torch.manual_seed(seed)
    ref = TransformerBlock(cfg, True).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    x = torch.randn(1, tokens, cfg.dim)
    adaln = torch.randn(1, cfg.adaln_dim)
    d = cfg.dim // cfg.n_heads
    freqs = torch.polar(torch.ones(1, tokens, d // 2), torch.rand(1, tokens, d // 2) * 6.28).to(torch.complex64)
    inp = BlockInputs(get_ops("torch", "cpu"), None, freqs, adaln)
    with torch.no_grad():
        want = ref(x, inp)
    kinds = {"qkv": ["layers.qkv"], "out": ["layers.out"], "ffn_in": ["layers.ffn_in"], "ffn_out": ["layers.ffn_out"]}
    kinds["recipe (all four)"] = [g for k in kinds.values() for g in k]
    kinds["adaln"] = ["adaln"]
    out = {}
    for label, groups in kinds.items():
        blk = TransformerBlock(cfg, True).eval()
        blk.load_state_dict(ref.state_dict())
        wrapper = torch.nn.Module()  # group names are relative to the model: mount the block as layers.0
        wrapper.layers = torch.nn.ModuleList([blk])
        zfp8.quantize_model(wrapper, "fp8", groups)
        t0 = time.perf_counter()
        with torch.no_grad():
            got = blk(x, inp)
        out[label] = {"rel_l2": rel(got, want), "seconds": time.perf_counter() - t0}
        print(f"  block, {label:<18} rel L2 {out[label]['rel_l2']:.4f}", flush=True)
    return {"tokens": tokens, "weights": "random (nn.Linear default init)", "rel_l2": out}


# ---- groups: the trained default ------------------------------------------------------------------------------------


def groups(pipe, n: int = 2) -> dict:
    from zimage_core import fp8 as zfp8

    base = pipe.transformer
    g = torch.Generator().manual_seed(0)
    caps = [c for c, _ in heldout_prompts(pipe, n)]
    with torch.no_grad():
        feats = pipe.encode_prompts(caps)
    h = w = 128 // pipe.vae_scale_factor
    x = [torch.randn(base.config.in_channels, 1, h, w, generator=g) for _ in caps]
    ts = (0.1, 0.5, 0.9)

    def run(model):
        with torch.no_grad():
            return [torch.cat([o.flatten() for o in model(x, torch.full((len(x),), t), feats)]) for t in ts]

    want = run(base)
    configs = {grp: [grp] for grp in zfp8.GROUPS}
    configs["recipe"] = list(zfp8.RECIPES["fp8"])
    configs["everything"] = list(zfp8.GROUPS)
    out = {}
    for label, grps in configs.items():
        model = _copy(base)
        zfp8.quantize_model(model, "fp8", grps)
        got = run(model)
        errs = [rel(a, b) for a, b in zip(got, want)]
        out[label] = {"rel_l2_by_t": dict(zip(map(str, ts), errs)), "rel_l2_mean": sum(errs) / len(errs)}
        print(f"  default model, {label:<24} rel L2 {out[label]['rel_l2_mean']:.5f}", flush=True)
    return {"captions": caps, "t": ts, "rel_l2": out}


def _copy(model):
    import copy

    return copy.deepcopy(model)


# ---- images + pixel checker ----------------------------------------------------------------------------------------


def images(n: int, threads: int) -> dict:
    """The comparison runs in ``python -m zimage_core.train.evaluate --compare-quantize fp8`` (the pixel checker and the
    held-out captions are training code, which the bench does not import)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "compare.json"
        cmd = [sys.executable, "-m", "zimage_core.train.evaluate", "--compare-quantize", "fp8", "--n", str(n)]
        root = Path(__file__).resolve().parents[1]  # this checkout's packages, not an installed copy's
        res = subprocess.run(
            [*cmd, "--threads", str(threads), "--json", str(out)], capture_output=True, text=True, cwd=root
        )
        print(res.stdout, end="", flush=True)
        if res.returncode != 0 or not out.exists():
            raise SystemExit(f"bench fp8: {' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        return json.loads(out.read_text())


def heldout_prompts(pipe, n: int) -> list[tuple[str, int]]:
    """(caption, seed) for up to ``n`` of the default model's own prompts whose (colour, shape, background) triple
    was held out of its training (``zimage_fast.json``); seeds 10000 + i."""
    meta = getattr(pipe, "meta", {}) or {}
    held = [tuple(t) for t in meta.get("training", {}).get("heldout_triples", [])]
    caps = [
        c
        for c in meta.get("prompts", [])
        if any(f" {col} {sh} " in c and c.endswith(f" {bg} background") for col, sh, bg in held)
    ]
    if not caps:
        raise SystemExit("bench fp8: the default model's zimage_fast.json lists no held-out prompts")
    return [(c, 10_000 + i) for i, c in enumerate(caps[:n])]


# ---- memory ----------------------------------------------------------------------------------------------------------


def memory(base, quant) -> dict:
    from zimage_core import fp8 as zfp8
    from zimage_core.config import PRESETS
    from zimage_core.model import ZImageTransformer

    bf16 = _copy(base).to(torch.bfloat16)
    q16 = _copy(quant).to(torch.bfloat16)
    with torch.device("meta"):
        big = ZImageTransformer(PRESETS["z-image"])
    real_bf16, real_fp8 = 0, 0
    recipe = set(zfp8.RECIPES["fp8"])
    for name, p in big.named_parameters():
        real_bf16 += 2 * p.numel()
        mod_name = name.rpartition(".")[0]
        if name.endswith(".weight") and zfp8.group_of(mod_name) in recipe and p.dim() == 2:
            real_fp8 += p.numel() + 4 * p.shape[0]
        else:
            real_fp8 += 2 * p.numel()
    out = {
        "default_bf16_bytes": zfp8.weight_bytes(bf16),
        "default_fp8_bytes": zfp8.weight_bytes(q16),
        "z_image_6b_bf16_bytes_computed": real_bf16,
        "z_image_6b_fp8_bytes_computed": real_fp8,
    }
    for k, v in out.items():
        print(f"  {k:<34} {v / 2**20:10.1f} MiB", flush=True)
    return out


# ---- lora: side path vs merge + re-quantize --------------------------------------------------------------------------


def lora(tokens: int, rank: int = 32, repeats: int = 5) -> dict:
    from zimage_core import fp8 as zfp8
    from zimage_kernels import fp8

    torch.manual_seed(0)
    out = {}
    for label, (n_out, n_in) in {"to_q 3840x3840": (3840, 3840), "w1 10240x3840": (10240, 3840)}.items():
        lin = torch.nn.Linear(n_in, n_out, bias=False)
        q = zfp8.FP8Linear.from_linear(lin)
        down, up = torch.randn(rank, n_in) * 0.01, torch.randn(n_out, rank) * 0.01
        x = torch.randn(1, tokens, n_in)

        def base(q=q, x=x):
            return q(x)

        def side(q=q, x=x, down=down, up=up):
            a = q.quantize_input(x)
            y = zfp8.FP8Linear.forward(q, a)
            return y + (a.dequantize() @ down.t()) @ up.t()

        def merge(q=q, down=down, up=up):
            return fp8.quantize_weight(q.dequantized_weight(torch.float32) + up @ down)

        fns = {"base": base, "side": side, "merge": merge}
        t = dict.fromkeys(fns, math.inf)
        for f in fns.values():
            f()  # warm-up
        for _ in range(repeats):  # interleaved, best of ``repeats``: the machine's load hits all three alike
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                t[name] = min(t[name], time.perf_counter() - t0)
        with torch.no_grad():
            exact = x @ (q.dequantized_weight(torch.float32) + up @ down).t()
            wq, ws = merge()
            merged = fp8.gemm_dequant(q.quantize_input(x), wq, ws, None, torch.float32)
            err_side, err_merge = rel(side(), exact), rel(merged, exact)
        out[label] = {
            "side_path_overhead_per_forward": t["side"] / t["base"],
            "merge_requant_seconds_per_layer": t["merge"],
            "forward_seconds_base": t["base"],
            "side_path_seconds": t["side"],
            "rel_l2_vs_exact": {"side": err_side, "merge": err_merge},
        }
        print(
            f"  {label}: side path {t['side'] / t['base']:.3f}x the FP8 forward ({tokens} tokens); merge + requantize "
            f"{t['merge'] * 1e3:.0f} ms per layer per request ({t['merge'] / t['base']:.2f} forwards); rel L2 vs "
            f"exact: side {err_side:.4f}, merge {err_merge:.4f}",
            flush=True,
        )
    return {"tokens": tokens, "rank": rank, "weights": "random", "cpu_threads": torch.get_num_threads(), **out}


# ---- attention: e4m3 Q/K/V, emulated -------------------------------------------------------------------------------


def fake_quant_heads(t: torch.Tensor) -> torch.Tensor:
    """``[B, N, H, D]`` rounded to e4m3 with one scale per (sample, head) (amax over N and D), dequantized."""
    from zimage_kernels.fp8 import E4M3, E4M3_MAX, SCALE_FLOOR

    tf = t.float()
    scale = tf.abs().amax(dim=(1, 3), keepdim=True).clamp(min=SCALE_FLOOR) / E4M3_MAX
    return ((tf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale).to(t.dtype)


def attention_fp8_emulated(q, k, v, *, kv_lens=None, scale=None):
    from zimage_kernels import reference

    return reference.attention(
        fake_quant_heads(q), fake_quant_heads(k), fake_quant_heads(v), kv_lens=kv_lens, scale=scale
    )


def attention(base, quant, n: int, tokens: int = 1024) -> dict:
    import dataclasses

    from zimage_kernels import get_ops, reference

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tokens, 30, 128, generator=g) for _ in range(3))
    q, k = reference.rms_norm(q, torch.ones(128), 1e-5), reference.rms_norm(k, torch.ones(128), 1e-5)
    errs = {}
    for gain in (1.0, 2.0, 4.0):  # QK-norm weights set the logit scale: std(q·k/sqrt(D)) = gain²
        errs[gain] = rel(attention_fp8_emulated(q * gain, k * gain, v), reference.attention(q * gain, k * gain, v))
        print(
            f"  real-size heads (random, {tokens} tokens, 30x128, QK-normed, gain {gain:g}): output rel L2 "
            f"{errs[gain]:.4f}",
            flush=True,
        )
    model = quant.transformer
    ops = dataclasses.replace(get_ops("torch", "cpu"), attention=attention_fp8_emulated)
    model.ops_for = lambda device: ops  # this instance only
    try:
        ps = []
        for caption, seed in heldout_prompts(base, n):
            a = base.generate(caption, seed=seed).images[0]
            b = quant.generate(caption, seed=seed).images[0]
            ps.append(psnr_u8(a, b))
    finally:
        del model.ops_for
    print(f"  recipe + FP8 attention vs unquantized, {n} captions: PSNR mean {sum(ps) / n:.2f}, min {min(ps):.2f} dB")
    return {
        "emulated": True,
        "random_heads_rel_l2_by_gain": errs,
        "tokens": tokens,
        "psnr_mean": sum(ps) / n,
        "psnr": ps,
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m zimage_bench fp8", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--n", type=int, default=12, help="held-out captions for the image PSNR and checker")
    p.add_argument("--tokens", type=int, default=64, help="tokens per real-size block / LoRA layer")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        p.error(f"--only: unknown sections {bad}; known: {SECTIONS}")
    if args.n < 1:
        p.error("--n must be >= 1")
    torch.set_num_threads(args.threads)
    from zimage_bench.env import environment
    from zimage_core.pipeline import ZImage

    results: dict = {"environment": environment("cpu")}
    base = quant = None
    if {"groups", "memory"} & set(sections):
        base = ZImage.default(device="cpu")
        quant = ZImage.default(device="cpu", quantize="fp8")
    if "blocks" in sections:
        print("real-size block, random weights:", flush=True)
        results["blocks"] = blocks(args.tokens)
    if "groups" in sections:
        print("trained default model, one group at a time:", flush=True)
        results["groups"] = groups(base)
    if "images" in sections:
        print(f"recipe vs unquantized, {args.n} held-out captions (trained default model):", flush=True)
        results["images"] = images(args.n, args.threads)
    if "memory" in sections:
        print("weight memory:", flush=True)
        results["memory"] = memory(base.transformer, quant.transformer)
    if "lora" in sections:
        print("LoRA on FP8 layers (random weights, CPU):", flush=True)
        results["lora"] = lora(args.tokens)
    if "attention" in sections:
        print("FP8 attention (e4m3 Q/K/V, per-head scales), emulated:", flush=True)
        quant = quant or ZImage.default(device="cpu", quantize="fp8")
        base = base or ZImage.default(device="cpu")
        results["attention"] = attention(base, quant, min(args.n, 6))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0

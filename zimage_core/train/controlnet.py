"""Train the embedded control model for the embedded default model:
``python -m zimage_core.train.controlnet --seed 0 --out zimage_core/assets/default-controlnet``.

A ControlNet Union 1.0 layout (``zimage_core.controlnet``: 16 input channels, control layers after main layers
0 and 2, one control refiner block) on the frozen default pipeline. Its guide image is the scene's shape as a filled
white silhouette on black, at the same place and size as in the target image.

1. **Data.** One jittered render of every training caption of the default model's dataset, and the silhouette of
   the same layout. The caption that goes with a pair names the true position with probability 1/2 and a random
   other position otherwise (the image follows the guide, not the caption), and is the empty prompt with
   probability ``p_uncond``.
2. **Latents.** The frozen VAE's posterior of every render (sampled at each step) and the posterior mode of every
   guide, scaled as the pipeline scales them (``ZImage.encode_image``).
3. **Training.** Rectified flow in Z-Image's convention (as ``train.flow_loss``), with the loss weighted towards
   the object (``train.foreground_weights``), through the transformer with the ControlNet's hook. Only the
   ControlNet's weights train. The control blocks start as copies of the main layers they sit after (and the
   control refiner of the noise refiner, the control embedder of the x embedder); ``before_proj``/``after_proj``
   start at zero, so training starts from the unchanged default model. AdamW, warm-up then cosine decay, EMA.
4. **Save.** A diffusers ``ZImageControlNetModel`` folder with ``zimage_fast.json`` recording the run.

``python -m zimage_core.train.controlnet --evaluate`` runs the pixel check of docs/controlnet.md over fixed
(caption, guide) pairs whose caption names another position than the guide.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .. import controlnet as cn_mod
from . import dataset
from .train import Optimizer, encode_latents, foreground_weights, log, parse_overrides, sample_sigmas

GUIDE_COLOR, GUIDE_BACKGROUND = "white", "black"


@dataclass
class ControlTrainConfig:
    seed: int = 0
    split_seed: int = 0
    threads: int = 1
    renders_per_scene: int = 1
    scenes_limit: int = 0
    control_places: tuple[int, ...] = (0, 2)
    steps: int = 600
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    ema: float = 0.99
    p_uncond: float = 0.1
    p_wrong_position: float = 0.5
    fg_weight: float = 5.0
    sigma_shifts: tuple[float, ...] = (8.0, 2.5)
    logit_std: float = 1.0


def guide_scene(scene: dataset.Scene) -> dataset.Scene:
    return dataset.Scene(scene.size, GUIDE_COLOR, scene.shape, scene.position, GUIDE_BACKGROUND)


def render_pair(scene: dataset.Scene, rng: random.Random | None) -> tuple[np.ndarray, np.ndarray]:
    """(image, guide) with the same jitter: the guide is the image's shape as a white silhouette on black."""
    state = rng.getstate() if rng is not None else None
    image = dataset.render(scene, rng=rng)
    if rng is not None:
        after = rng.getstate()
        rng.setstate(state)
    guide = dataset.render(guide_scene(scene), rng=rng)
    if rng is not None:
        rng.setstate(after)
    return image, guide


def guide_image(scene: dataset.Scene):
    """The un-jittered guide of a scene, as a PIL image."""
    from PIL import Image

    return Image.fromarray(dataset.render(guide_scene(scene)))


def init_controlnet(pipe, cfg: ControlTrainConfig) -> cn_mod.ZImageControlNet:
    t = pipe.transformer
    tc = t.config
    config = cn_mod.ControlNetConfig(
        control_layers_places=tuple(cfg.control_places),
        control_in_dim=tc.in_channels,
        control_refiner_layers_places=tuple(range(tc.n_refiner_layers)),
        add_control_noise_refiner=None,
        dim=tc.dim,
        n_refiner_layers=tc.n_refiner_layers,
        n_heads=tc.n_heads,
        n_kv_heads=tc.n_kv_heads,
        norm_eps=tc.norm_eps,
        qk_norm=tc.qk_norm,
    )
    torch.manual_seed(cfg.seed)
    model = cn_mod.ZImageControlNet(config, tc)
    with torch.no_grad():
        for block, place in zip(model.control_layers, config.control_layers_places):
            block.load_state_dict(t.layers[place].state_dict(), strict=False)
            for proj in (getattr(block, "before_proj", None), block.after_proj):
                if proj is not None:
                    proj.weight.zero_()
                    proj.bias.zero_()
        for block, src in zip(model.control_noise_refiner, t.noise_refiner):
            block.load_state_dict(src.state_dict())
        model.control_all_x_embedder.load_state_dict(t.all_x_embedder.state_dict())
    return model


def train(pipe, cfg: ControlTrainConfig):
    """Returns (EMA ControlNet, loss per twentieth of the run, timings)."""
    torch.set_num_threads(cfg.threads)
    timings = {}
    t0 = time.perf_counter()
    train_scenes, _ = dataset.split(cfg.split_seed)
    rng = random.Random(cfg.seed)
    if cfg.scenes_limit:
        train_scenes = rng.sample(train_scenes, cfg.scenes_limit)
    scenes = [s for s in train_scenes for _ in range(cfg.renders_per_scene)]
    pairs = [render_pair(s, rng) for s in scenes]
    images = np.stack([p[0] for p in pairs])
    guides = np.stack([p[1] for p in pairs])
    timings["render_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    vae = pipe.vae
    sf, sc = vae.config.shift_factor, vae.config.scaling_factor
    mean, logvar = encode_latents(vae, images)
    mean, logvar = (mean - sf) * sc, logvar + 2 * math.log(sc)
    gmean, _ = encode_latents(vae, guides)
    control = ((gmean - sf) * sc).float()  # posterior mode, as the pipeline encodes a guide
    # every caption of the training triples, in every position (a pair's caption may name another position)
    captions = sorted(
        {dataset.Scene(s.size, s.color, s.shape, p, s.background).caption for s in scenes for p in dataset.POSITIONS}
    )
    index = {c: i for i, c in enumerate(captions)}
    feats = []
    for i in range(0, len(captions), 256):
        feats.extend(f.clone() for f in pipe.encode_prompts(captions[i : i + 256]))
    empty = pipe.encode_prompts([""])[0].clone()
    weights = foreground_weights(scenes, images, cfg.fg_weight) if cfg.fg_weight else None
    timings["encode_s"] = time.perf_counter() - t0
    log(f"{len(scenes)} pairs, {len(captions)} captions encoded ({timings['encode_s']:.0f} s)")

    transformer = pipe.transformer.requires_grad_(False).eval()
    model = init_controlnet(pipe, cfg).train()
    opt = Optimizer(model, cfg, no_decay=lambda name, p: p.ndim < 2, smoothing=0.95)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    positions = list(dataset.POSITIONS)
    std = (0.5 * logvar).exp()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, len(scenes), (cfg.batch,), generator=gen)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        caps = []
        for i in idx.tolist():
            s = scenes[i]
            u = torch.rand(2, generator=gen).tolist()
            if u[0] < cfg.p_uncond:
                caps.append(empty)
                continue
            pos = s.position
            if u[1] < cfg.p_wrong_position:
                others = [p for p in positions if p != s.position]
                pos = others[int(torch.randint(0, len(others), (1,), generator=gen))]
            caps.append(feats[index[dataset.Scene(s.size, s.color, s.shape, pos, s.background).caption]])
        sigmas = sample_sigmas(cfg.batch, cfg, gen)
        noise = torch.randn(x0.shape, generator=gen)
        sg = sigmas.view(-1, 1, 1, 1)
        xs = list(((1 - sg) * x0 + sg * noise).unsqueeze(2).unbind(0))
        hook = _TrainHook(model, transformer, xs, control[idx].unsqueeze(2))
        out = transformer.forward_with_context(xs, 1 - sigmas, transformer.encode_context(caps), hooks=[hook])
        err = (torch.stack(out).squeeze(2) - (x0 - noise)).pow(2)
        w = weights[idx] if weights is not None else torch.ones_like(err[:, :1])
        loss = (err * w).mean() / w.mean()
        opt.step(step, loss)
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"controlnet step {step}/{cfg.steps}: loss {opt.running:.4f} ({time.perf_counter() - t0:.0f} s)")
    timings["train_s"] = time.perf_counter() - t0
    return opt.ema, opt.losses, timings


class _TrainHook(cn_mod.ControlHook):
    """The ControlNet hook with one control latent per row (training batches mix guides)."""

    def __init__(self, model, transformer, x, controls):
        super().__init__(model, transformer, x, controls[0], 1.0)
        self.controls = list(controls)

    def before_stack(self, hidden, inp):
        p, pf = self.patch
        plens = [cn_mod.padded_len((xi.shape[1] // pf) * (xi.shape[2] // p) * (xi.shape[3] // p)) for xi in self.x]
        self._pending = self.model.iter_hints(self.transformer, hidden, inp, plens, self.controls, self.x)
        self._hints = {}
        return hidden, inp


# ---------------------------------------------------------------------------------------------------------------
# The pixel check
# ---------------------------------------------------------------------------------------------------------------


def eval_pairs(n: int = 24, seed: int = 0, split_seed: int = 0) -> list[tuple[dataset.Scene, dataset.Scene, int]]:
    """``n`` fixed (caption scene, guide scene, generation seed): the guide has the caption's shape and size at a
    different position (captions from the held-out triples)."""
    _, held = dataset.split(split_seed)
    rng = random.Random(2000 + seed)
    out = []
    for i, s in enumerate(rng.sample(held, n)):
        pos = rng.choice([p for p in dataset.POSITIONS if p != s.position])
        out.append((s, dataset.Scene(s.size, s.color, s.shape, pos, s.background), 20_000 * (seed + 1) + i))
    return out


def evaluate(pipe, model, pairs, weight: float = 1.0, mode: str = "controlnet", **kw) -> dict:
    """Fraction of images whose shape sits where the guide says (and has the guide's shape), by the pixel checker."""
    from .checker import read_image

    at_guide = shape_ok = at_caption = 0
    for scene, target, seed in pairs:
        spec = cn_mod.ControlNetInput(model, guide_image(target), weight=weight, mode=mode)
        image = pipe.generate(scene.caption, seed=seed, controlnets=[spec], **kw).images[0]
        r = read_image(image)
        at_guide += r.position == target.position
        at_caption += r.position == scene.position
        shape_ok += r.position == target.position and r.shape == target.shape
    n = len(pairs)
    return {"n": n, "at_guide": at_guide / n, "at_guide_with_shape": shape_ok / n, "at_caption": at_caption / n}


def measure(pipe, model, n: int = 24, repeats: int = 3) -> dict:
    """The figures of docs/controlnet.md: the pixel check per controlMode, with FBCache and at weight 0; weight 0
    against no ControlNet; and CPU process time per image (medians of interleaved runs, one caption and seed) per
    setting."""
    import statistics

    from zimage_core.cache import CacheConfig

    pairs = eval_pairs(n)
    fb = CacheConfig.for_method("fb", threshold=0.25)
    out = {mode: evaluate(pipe, model, pairs, weight=1.0, mode=mode) for mode in cn_mod.MODES}
    out["weight0"] = evaluate(pipe, model, pairs, weight=0.0)
    out["controlnet+fb0.25"] = evaluate(pipe, model, pairs, weight=1.0, mode="controlnet", cache=fb)
    s, g, seed = pairs[0]
    guide = guide_image(g)
    off = pipe.generate(s.caption, seed=seed, output_type="latent").latents
    zero = cn_mod.ControlNetInput(model, guide, weight=0.0)
    out["weight0_equal"] = bool(torch.equal(off, pipe.generate(s.caption, seed=seed, output_type="latent",
                                                                 controlnets=[zero]).latents))  # fmt: skip
    spec = lambda **kw: [cn_mod.ControlNetInput(model, guide, weight=1.0, **kw)]  # noqa: E731
    cases = {
        "none": {},
        "balanced": dict(controlnets=spec()),
        "controlnet": dict(controlnets=spec(mode="controlnet")),
        "balanced_window_half": dict(controlnets=spec(end=6)),
        "fb": dict(cache=fb),
        "fb+controlnet": dict(cache=fb, controlnets=spec(mode="controlnet")),
    }
    times, stats = {k: [] for k in cases}, {}
    for _ in range(repeats):
        for k, kw in cases.items():
            t0 = time.process_time()
            r = pipe.generate(s.caption, seed=seed, output_type="latent", **kw)
            times[k].append(time.process_time() - t0)
            stats[k] = {
                "controlnet_forwards": (r.stats.get("controlnet") or [{}])[0].get("controlnet_forwards"),
                "reused_steps": [len(c["reused_steps"]) for c in r.stats.get("cache", [])],
            }
    med = {k: statistics.median(v) for k, v in times.items()}
    out["cpu_s_median"] = med
    out["ratio_vs_none"] = {k: round(v / med["none"], 3) for k, v in med.items()}
    out["stats"] = stats
    return out


def main(argv: list[str] | None = None) -> int:
    from ..pipeline import ZImage

    p = argparse.ArgumentParser(prog="python -m zimage_core.train.controlnet", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="ControlNet folder to write (e.g. zimage_core/assets/default-controlnet)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override ControlTrainConfig fields")
    p.add_argument("--evaluate", action="store_true", help="run the pixel check on --out (default: the shipped one)")
    p.add_argument("--n", type=int, default=24)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = ZImage.default(device="cpu", dtype=torch.float32)
    if args.evaluate:
        model = cn_mod.load_controlnet(args.out or cn_mod.builtin_path(), pipe.transformer)
        print(json.dumps(measure(pipe, model, args.n), indent=1))
        return 0
    if not args.out:
        p.error("--out is required for training")
    overrides = parse_overrides(p, ControlTrainConfig, args.set)
    cfg = ControlTrainConfig(seed=args.seed, threads=args.threads, **overrides)
    t0 = time.perf_counter()
    model, losses, timings = train(pipe, cfg)
    timings["total_s"] = time.perf_counter() - t0
    out = cn_mod.save_controlnet(model, args.out)
    record = {
        "model_id": cn_mod.BUILTIN_ID,
        "for_model": pipe.meta.get("model_id"),
        "guide": f"the shape as a filled {GUIDE_COLOR} silhouette on {GUIDE_BACKGROUND}",
        "training": {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
            "losses": [round(v, 5) for v in losses],
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "torch": torch.__version__,
            "params": sum(p.numel() for p in model.parameters()),
        },
    }
    (out / "zimage_fast.json").write_text(json.dumps(record, indent=2))
    log(f"wrote {out} ({timings['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

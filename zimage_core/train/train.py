"""Train the embedded default model from scratch: ``python -m zimage_core.train --seed 0 --out DIR``.

Stages (each one reproducible from ``--seed``; intermediate results are kept in ``--work`` so a stage can be rerun
alone):

1. **Data.** :data:`TrainConfig.renders_per_scene` jittered renders of every *training* caption (the held-out
   triples of :func:`dataset.split` are never rendered), 128x128.
2. **VAE.** A small ``AutoencoderKL`` with Z-Image's latent layout (16 channels, x8), trained on random 64x64 crops
   (mostly around the object) with L1 + MSE reconstruction and a small KL term, then a few full-size steps. Its
   ``shift_factor``/``scaling_factor`` are set from the latent statistics of the training renders, so scaled
   latents have mean 0 and standard deviation 1, like Z-Image's.
3. **Latents and caption features.** Posterior mean and log-variance of every render (a fresh posterior sample is
   drawn at every training step), and the frozen text encoder's features of every caption and of the empty
   prompt, computed by :meth:`ZImage.encode_prompts` itself.
4. **Transformer.** Our :class:`ZImageTransformer` trained with rectified flow in Z-Image's convention:
   ``x_σ = (1 − σ)·x0 + σ·ε``, the model sees ``t = 1 − σ`` and is trained to output ``x0 − ε`` (the pipeline
   negates its output into the velocity ``ε − x0``). σ is logit-normal, mapped through the same shift the default
   schedule uses. The loss is weighted towards the object's latent pixels (``fg_weight``, see
   :func:`foreground_weights`). The caption is replaced by the empty prompt's features with probability
   ``p_uncond`` so that classifier-free guidance works. AdamW, warm-up then cosine decay, gradient clipping, EMA
   of the weights (the EMA weights are what ships).
5. **Save.** A diffusers-format folder (``save_pipeline_folder``) with ``zimage_fast.json`` holding the model id,
   the generation defaults and a record of the training run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..components import save_pipeline_folder, small_text_encoder
from ..config import ZImageConfig
from ..model import ZImageTransformer, count_parameters
from . import dataset
from .text import word_tokenizer

MODEL_ID = "zimage-fast:shapes-v1"


@dataclass
class TrainConfig:
    seed: int = 0
    split_seed: int = 0  # which (colour, shape, background) triples are held out
    threads: int = 2
    renders_per_scene: int = 2
    scenes_limit: int = 0  # 0: every training caption; n > 0: a random n of them (smoke tests)
    # text encoder (random, frozen)
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    # VAE
    vae_channels: tuple[int, ...] = (8, 16, 32, 32)
    vae_groups: int = 1  # GroupNorm groups; few, so that a flat colour survives normalisation (see shapes_vae)
    vae_steps: int = 900
    vae_full_steps: int = 50  # final steps on whole 128x128 images
    vae_batch: int = 16
    vae_crop: int = 64
    vae_lr: float = 2e-3
    vae_kl: float = 1e-4  # weight of the KL term (per latent element) against the per-pixel reconstruction loss
    vae_edge_weight: float = 4.0  # extra reconstruction weight near colour edges (the shapes' outlines)
    # transformer
    dim: int = 128
    n_layers: int = 4
    n_refiner_layers: int = 1
    n_heads: int = 4
    axes_dims: tuple[int, ...] = (8, 12, 12)
    axes_lens: tuple[int, ...] = (1536, 160, 160)  # room for 512-token prompts and 2048-px images
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    qk_norm_init: float = 1.0
    warmup: int = 100
    weight_decay: float = 0.01
    ema: float = 0.995
    p_uncond: float = 0.1
    fg_weight: float = 5.0  # extra loss weight on the latent pixels that touch the object (foreground_weights)
    shift: float = 3.0  # the scheduler config's shift (the default schedule's is in ``defaults``)
    sigma_shifts: tuple[float, ...] = (8.0, 2.5)  # training σ: half the samples at each shift (sample_sigmas)
    logit_std: float = 1.0
    # defaults written to zimage_fast.json (fields of zimage_core.pipeline.Defaults)
    defaults: dict = field(
        default_factory=lambda: dict(
            steps=12,
            cfg_scale=3.0,
            shift=3.0,
            cfg_normalization=0.0,
            cfg_truncation=1.0,
            width=128,
            height=128,
            max_sequence_length=512,
        )
    )

    def transformer_config(self) -> ZImageConfig:
        return ZImageConfig(
            dim=self.dim,
            n_layers=self.n_layers,
            n_refiner_layers=self.n_refiner_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_heads,
            cap_feat_dim=self.text_hidden,
            axes_dims=tuple(self.axes_dims),
            axes_lens=tuple(self.axes_lens),
        )


# A configuration of seconds, for the smoke test.
SMOKE = dict(
    renders_per_scene=1,
    scenes_limit=32,
    vae_steps=4,
    vae_full_steps=1,
    vae_batch=4,
    steps=40,
    batch=4,
    warmup=2,
    dim=32,
    n_layers=1,
    n_heads=1,
    axes_dims=(8, 12, 12),
    text_hidden=16,
    text_layers=1,
    vae_channels=(8, 8, 8, 8),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: data
# ---------------------------------------------------------------------------------------------------------------


def render_training_set(cfg: TrainConfig):
    """(scenes [N], uint8 images [N, 128, 128, 3]): ``renders_per_scene`` jittered renders of each train caption."""
    train, _ = dataset.split(cfg.split_seed)
    rng = random.Random(cfg.seed)
    if cfg.scenes_limit:
        train = rng.sample(train, cfg.scenes_limit)
    scenes = [s for s in train for _ in range(cfg.renders_per_scene)]
    return scenes, dataset.render_batch(scenes, rng)


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: VAE
# ---------------------------------------------------------------------------------------------------------------


def _crops(images: np.ndarray, scenes, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random size x size crops; three in four contain the object's nominal centre."""
    n, h, w, _ = images.shape
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        if rng.random() < 0.75:
            cx, cy, _ = dataset.layout(scenes[i], w, h)
            x0 = int(np.clip(rng.integers(int(cx) - size + 8, int(cx) - 8 + 1), 0, w - size))
            y0 = int(np.clip(rng.integers(int(cy) - size + 8, int(cy) - 8 + 1), 0, h - size))
        else:
            x0, y0 = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        out[i] = images[i, y0 : y0 + size, x0 : x0 + size]
    return out


def shapes_vae(channels=(8, 16, 32, 32), groups: int = 1, seed: int = 0):
    """AutoencoderKL with Z-Image's latent layout (16 channels, x8 = four levels), ~0.3M parameters.

    ``groups`` is the GroupNorm group count. The VAE's norms normalise each group over space, so with one channel
    per group a flat image's colour is normalised away and can only leak in through the zero padding at the
    borders; with one group per norm the colour survives as the pattern across channels.
    """
    from ..components import small_vae

    # diffusers' default scaling (0.18215, no shift) until training sets them from the latent statistics
    return small_vae(tuple(channels), seed=seed, groups=groups, scaling_factor=0.18215, shift_factor=None)


def edge_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """[N, 1, H, W]: 1 + ``weight`` within 2 pixels of a colour edge of x (normalised to mean 1)."""
    gx = (x[..., :, 1:] - x[..., :, :-1]).abs().sum(1, keepdim=True)
    gy = (x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True)
    edge = (F.pad(gx, (0, 1, 0, 0)) + F.pad(gy, (0, 0, 0, 1)) > 0.02).float()
    w = 1.0 + weight * F.max_pool2d(edge, 5, stride=1, padding=2)
    return w / w.mean()


def vae_loss(vae, x: torch.Tensor, kl_weight: float, generator: torch.Generator, edge_weight: float = 0.0):
    """Reconstruction (L1 + MSE, weighted towards colour edges) + ``kl_weight`` × KL per latent element."""
    post = vae.encode(x).latent_dist
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=generator)
    rec = vae.decode(z).sample
    w = edge_weights(x, edge_weight) if edge_weight else 1.0
    rec_loss = (w * ((rec - x).abs() + (rec - x).pow(2))).mean()
    kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
    return rec_loss + kl_weight * kl, rec_loss.detach(), kl.detach()


def train_vae(cfg: TrainConfig, scenes, images: np.ndarray):
    vae = shapes_vae(tuple(cfg.vae_channels), cfg.vae_groups, seed=cfg.seed).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    total = cfg.vae_steps + cfg.vae_full_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / 50) * (0.1 + 0.9 * (1 - i / total)))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    for step in range(total):
        idx = rng.integers(0, len(images), cfg.vae_batch)
        if step < cfg.vae_steps:
            batch = _crops(images[idx], [scenes[i] for i in idx], cfg.vae_crop, rng)
        else:
            batch = images[idx[: max(1, cfg.vae_batch // 4)]]  # whole images: same pixels per step
        loss, rec, kl = vae_loss(vae, _to_pixels(batch), cfg.vae_kl, gen, cfg.vae_edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == total - 1:
            log(f"vae step {step}/{total}: rec {rec.item():.4f} kl {kl.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 64):
    """Raw (unscaled) posterior mean and log-variance [N, 16, h, w] of each image."""
    means, logvars = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(_to_pixels(images[i : i + batch])).latent_dist
        means.append(post.mean)
        logvars.append(post.logvar)
    return torch.cat(means), torch.cat(logvars)


# ---------------------------------------------------------------------------------------------------------------
# Stage 4: transformer
# ---------------------------------------------------------------------------------------------------------------


def init_transformer(config: ZImageConfig, seed: int, qk_norm_init: float = 1.0) -> ZImageTransformer:
    """PyTorch's default init, with adaLN-Zero: every block's adaLN and the final projection start at zero, so each
    block starts as the identity (tanh(0) gates) and the model's first output is 0.

    ``qk_norm_init`` is the initial weight of the per-head QK RMSNorms. With QK-norm the attention logits are at
    most ``w_q·w_k·sqrt(head_dim)``; at 1 a head cannot single out one caption word among ~100 tokens until Adam has
    grown those weights, which at ~1e-3 per step takes most of a short run."""
    torch.manual_seed(seed)
    model = ZImageTransformer(config)
    with torch.no_grad():
        for block in model.noise_refiner + model.context_refiner + model.layers:
            if block.attention.norm_q is not None:
                block.attention.norm_q.weight.fill_(qk_norm_init)
                block.attention.norm_k.weight.fill_(qk_norm_init)
        for block in model.noise_refiner + model.layers:
            block.adaLN_modulation[0].weight.zero_()
            block.adaLN_modulation[0].bias.zero_()
        for final in model.all_final_layer.values():
            final.linear.weight.zero_()
            final.linear.bias.zero_()
            final.adaLN_modulation[1].weight.zero_()
            final.adaLN_modulation[1].bias.zero_()
    return model


def sample_sigmas(n: int, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal σ in (0, 1), each shifted like a schedule, σ' = s·σ / (1 + (s − 1)·σ), with a shift s drawn
    uniformly from ``cfg.sigma_shifts``: a large shift puts samples at high noise, where only the caption says
    where the object is and what it looks like; a small one at the noise levels that shape its outline."""
    u = torch.sigmoid(torch.randn(n, generator=generator) * cfg.logit_std)
    shifts = torch.tensor(cfg.sigma_shifts, dtype=torch.float32)
    s = shifts[torch.randint(0, len(shifts), (n,), generator=generator)]
    return s * u / (1 + (s - 1) * u)


def foreground_weights(scenes, images: np.ndarray, weight: float, factor: int = 8) -> torch.Tensor:
    """[N, 1, H/8, W/8]: 1 + ``weight`` on every latent pixel whose 8x8 patch, or a neighbouring one, holds a pixel
    of the object (a pixel away from the background colour), else 1.

    The object covers ~10% of the image. With a plain MSE the background dominates the loss, and the model learns
    where the object is long before what colour and shape it has; weighting the object's latents makes the
    caption's colour and shape words worth learning early."""
    bg = np.stack([np.array(dataset.COLORS[s.background], dtype=np.int16) for s in scenes])[:, None, None, :]
    obj = (np.abs(images.astype(np.int16) - bg).max(-1) > 24).astype(np.float32)  # [N, H, W]
    m = F.max_pool2d(torch.from_numpy(obj)[:, None], factor)  # any object pixel in the patch
    m = F.max_pool2d(m, 3, stride=1, padding=1)  # and its neighbours (the outline's context)
    return 1.0 + weight * m


def flow_loss(model, x0, feats, sigmas, noise, weights=None):
    """MSE between the model output and x0 − ε at x_σ = (1 − σ)·x0 + σ·ε, t = 1 − σ (Z-Image's convention);
    ``weights`` [B, 1, h, w] weight each latent pixel (normalised to mean 1 over the batch)."""
    s = sigmas.view(-1, 1, 1, 1)
    xs = (1 - s) * x0 + s * noise
    ctx = model.encode_context(feats)
    out = model.forward_with_context(list(xs.unsqueeze(2).unbind(0)), 1 - sigmas, ctx)
    pred = torch.stack(out).squeeze(2)
    err = (pred - (x0 - noise)).pow(2)
    if weights is None:
        return err.mean()
    return (err * weights).mean() / weights.mean()


class Optimizer:
    """The training step both trainers use: AdamW (betas 0.9/0.99; weight decay ``cfg.weight_decay`` except on the
    parameters ``no_decay(name, param)`` picks), ``cfg.warmup`` warm-up steps then cosine decay to 5% of ``cfg.lr``
    over ``cfg.steps``, gradients clipped to norm 1, an EMA copy of the weights (decay ``cfg.ema``, less at the
    start), and the loss record: the mean of each twentieth of the run (``losses``) and a smoothed value for the
    log (``running``)."""

    def __init__(self, model: torch.nn.Module, cfg, no_decay, smoothing: float):
        self.model, self.cfg, self.smoothing = model, cfg, smoothing
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        decay, keep = [], []
        for n, p in model.named_parameters():
            (keep if no_decay(n, p) else decay).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.99),
        )

        def lr_at(i):
            warm = min(1.0, (i + 1) / cfg.warmup)
            return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * i / cfg.steps)))

        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_at)
        self.running: float | None = None
        self.losses: list[float] = []
        self._acc: list[float] = []
        self._chunk = max(1, cfg.steps // 20)

    def step(self, step: int, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        with torch.no_grad():
            d = min(self.cfg.ema, (1 + step) / (10 + step))
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.lerp_(pm, 1 - d)
        value = loss.item()
        self.running = value if self.running is None else self.smoothing * self.running + (1 - self.smoothing) * value
        self._acc.append(value)
        if len(self._acc) == self._chunk or step == self.cfg.steps - 1:
            self.losses.append(sum(self._acc) / len(self._acc))
            self._acc = []


def train_transformer(
    cfg: TrainConfig, mean, logvar, caption_ids, feats: list, empty_feats, callback=None, weights=None
):
    """mean/logvar: scaled latent posterior [N, 16, h, w]; caption_ids [N] index into ``feats``; weights: the
    per-latent-pixel loss weights [N, 1, h, w] (:func:`foreground_weights`) or None.
    ``callback(step, ema)`` is called after every step (for monitoring)."""
    model = init_transformer(cfg.transformer_config(), cfg.seed, cfg.qk_norm_init).train()
    opt = Optimizer(model, cfg, no_decay=lambda name, p: p.ndim < 2 or "pad_token" in name, smoothing=0.98)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n = len(mean)
    std = (0.5 * logvar).exp()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.p_uncond
        caps = [empty_feats if d else feats[caption_ids[i]] for i, d in zip(idx.tolist(), drop.tolist())]
        sigmas = sample_sigmas(cfg.batch, cfg, gen)
        noise = torch.randn(x0.shape, generator=gen)
        loss = flow_loss(model, x0, caps, sigmas, noise, None if weights is None else weights[idx])
        opt.step(step, loss)
        if callback is not None:
            callback(step, opt.ema)
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"transformer step {step}/{cfg.steps}: loss {opt.running:.4f} ({time.perf_counter() - t0:.0f} s)")
    return opt.ema, model, opt.losses


# ---------------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------------


def run(cfg: TrainConfig, out: Path, work: Path | None = None) -> dict:
    """Train everything and write the pipeline folder ``out``; returns the training record."""
    from ..pipeline import ZImage

    torch.set_num_threads(cfg.threads)
    timings = {}
    t_all = time.perf_counter()
    work = Path(work) if work else None
    if work:
        work.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    scenes, images = render_training_set(cfg)
    timings["render_s"] = time.perf_counter() - t0
    log(f"rendered {len(images)} training images ({timings['render_s']:.0f} s)")

    t0 = time.perf_counter()
    vae_path = work / "vae" if work else None
    lat_path = work / "latents.pt" if work else None
    if vae_path and (vae_path / "config.json").exists() and lat_path.exists():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(vae_path).eval()
        mean, logvar = torch.load(lat_path)
        log(f"loaded the VAE and the latents from {work}")
    else:
        vae = train_vae(cfg, scenes, images)
        mean, logvar = encode_latents(vae, images)  # raw posterior of every training render
        shift, std = mean.mean().item(), mean.std().item()
        vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(1.0 / std, 6))
        if work:
            vae.save_pretrained(vae_path)
            torch.save((mean, logvar), lat_path)
    timings["vae_s"] = time.perf_counter() - t0
    vae.requires_grad_(False)

    t0 = time.perf_counter()
    sf, sc = vae.config.shift_factor, vae.config.scaling_factor
    mean = (mean - sf) * sc  # the pipeline's scaled latent space
    logvar = logvar + 2 * math.log(sc)
    tok = word_tokenizer()
    text_encoder = small_text_encoder(
        cfg.text_hidden, len(tok), layers=cfg.text_layers, heads=cfg.text_heads, seed=cfg.seed + 1
    )
    text_encoder.requires_grad_(False)
    transformer = init_transformer(cfg.transformer_config(), cfg.seed)
    pipe = ZImage(transformer, text_encoder, tok, vae)
    captions = sorted({s.caption for s in scenes})
    cap_index = {c: i for i, c in enumerate(captions)}
    feats = []
    for i in range(0, len(captions), 256):
        feats.extend(f.clone() for f in pipe.encode_prompts(captions[i : i + 256]))
    empty_feats = pipe.encode_prompts([""])[0].clone()
    caption_ids = [cap_index[s.caption] for s in scenes]
    timings["encode_s"] = time.perf_counter() - t0
    log(f"latents {tuple(mean.shape)} (std {mean.std():.3f}), {len(captions)} captions ({timings['encode_s']:.0f} s)")

    t0 = time.perf_counter()
    weights = foreground_weights(scenes, images, cfg.fg_weight) if cfg.fg_weight else None
    ema, _, losses = train_transformer(cfg, mean, logvar, caption_ids, feats, empty_feats, weights=weights)
    timings["transformer_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_all

    record = {
        "name": "zimage-fast shapes (toy)",
        "kind": "trained-small",
        # captions it draws (8 training, 8 held-out): the default prompts of `bench cache` and the calibration
        "prompts": [s.caption for s, _ in dataset.eval_prompts(0, 8, heldout=False, split_seed=cfg.split_seed)]
        + [s.caption for s, _ in dataset.eval_prompts(0, 8, heldout=True, split_seed=cfg.split_seed)],
        "model_id": MODEL_ID,
        "defaults": dict(cfg.defaults),
        "training": {
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k != "defaults"},
            "losses": [round(v, 5) for v in losses],
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "torch": torch.__version__,
            "heldout_triples": [list(t) for t in dataset.heldout_triples(cfg.split_seed)],
            "params": {
                "transformer": count_parameters(ema),
                "text_encoder": count_parameters(text_encoder),
                "vae": count_parameters(vae),
            },
        },
    }
    save_pipeline_folder(out, ema, text_encoder, tok, vae, shift=cfg.shift, extra=record)
    log(f"wrote {out} (total {timings['total_s']:.0f} s)")
    return record


def parse_overrides(parser: argparse.ArgumentParser, config_cls: type, items: list[str]) -> dict:
    """``--set KEY=VALUE`` items as {field: JSON value} for the dataclass ``config_cls``; an unknown field or a value
    that is not JSON ends the program through ``parser.error`` (exit code 2, naming the field)."""
    overrides = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in config_cls.__dataclass_fields__:
            parser.error(f"unknown {config_cls.__name__} field {key!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            parser.error(f"--set {key}: the value must be JSON (e.g. {key}=3000 or {key}=[8.0, 2.5]), got {value!r}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zimage_core.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="pipeline folder to write (e.g. zimage_core/assets/default)")
    p.add_argument("--work", help="folder for intermediate results (the trained VAE is reused from here)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--smoke", action="store_true", help="a tiny configuration that runs in seconds (for tests)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override TrainConfig fields")
    args = p.parse_args(argv)
    overrides = dict(SMOKE) if args.smoke else {}
    overrides.update(parse_overrides(p, TrainConfig, args.set))
    cfg = TrainConfig(seed=args.seed, threads=args.threads, **overrides)
    run(cfg, Path(args.out), args.work)
    return 0

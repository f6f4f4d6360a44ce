"""Shared test utilities: small random diffusers transformers, inputs, error metrics."""

from __future__ import annotations

import uuid

import torch

# Three small configs that differ in head_dim, RoPE axes, layer and refiner counts (diffusers' config keys).
SMALL_CONFIGS = {
    "hd32": dict(
        dim=64,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[8, 12, 12],
        axes_lens=[256, 32, 32],
    ),
    "hd96": dict(
        dim=96,
        n_layers=1,
        n_refiner_layers=2,
        n_heads=1,
        n_kv_heads=1,
        cap_feat_dim=24,
        axes_dims=[16, 40, 40],
        axes_lens=[300, 40, 40],
    ),
    "hd16x8": dict(
        dim=128,
        n_layers=3,
        n_refiner_layers=1,
        n_heads=8,
        n_kv_heads=8,
        cap_feat_dim=32,
        axes_dims=[4, 6, 6],
        axes_lens=[512, 64, 64],
    ),
}


def diffusers_transformer(name: str = "hd32", seed: int = 0, dtype=torch.float32):
    """A diffusers ZImageTransformer2DModel with random weights, including non-trivial pad tokens and norms."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(**SMALL_CONFIGS[name]).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("pad_token") or "norm" in n:  # default init is zeros/ones: make them matter
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in n else 0.0))
    return model.to(dtype)


def inputs(cfg: dict, kind: str, seed: int = 1, dtype=torch.float32):
    """(x list, t, cap_feats list) covering the cases of the parity bar."""
    g = torch.Generator().manual_seed(seed)
    cd = cfg["cap_feat_dim"]

    def rn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if kind == "ragged":  # captions of different lengths -> masked path; 6x10 latents -> 15 tokens, padded
        x, caps = [rn(16, 1, 6, 10), rn(16, 1, 6, 10)], [rn(9, cd), rn(45, cd)]
    elif kind == "nonsquare":  # image tokens not a multiple of 32, non-square, different image sizes in the batch
        x, caps = [rn(16, 1, 12, 20), rn(16, 1, 8, 6)], [rn(33, cd), rn(33, cd)]
    elif kind == "cfg":  # the same latent twice, positive and negative caption of different padded lengths
        lat = rn(16, 1, 10, 14)
        x, caps = [lat, lat.clone()], [rn(40, cd), rn(7, cd)]
    elif kind == "single":
        x, caps = [rn(16, 1, 16, 16)], [rn(16, cd)]
    else:
        raise ValueError(kind)
    t = torch.rand(len(x), generator=g)
    if kind == "cfg":
        t = t[:1].expand(2).clone()
    return x, t, caps


def flat(outs) -> torch.Tensor:
    return torch.cat([o.reshape(-1).double() for o in outs])


def rel_l2(a, b) -> float:
    a, b = flat(a), flat(b)
    return float((a - b).norm() / b.norm())


def image_request(**fields) -> dict:
    """A minimal valid imageInference request (fresh taskUUID, base64 PNG output) updated with ``fields``."""
    r = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "model": "runware:z-image@0",
        "positivePrompt": "a red circle",
        "outputType": "base64Data",
        "outputFormat": "PNG",
    }
    r.update(fields)
    return r

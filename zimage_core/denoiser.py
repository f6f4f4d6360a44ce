"""The denoiser: the Z-Image model convention in one wrapper (k-diffusion's "model wrapper" for this project).

``denoiser(x, sigma) -> v`` is the guided flow velocity for fp32 latents ``x`` ``[B, C, h, w]``:

- the model sees ``t = 1 − σ``, computed as diffusers does (``timestep = 1000σ`` in fp32, ``t = (1000 − timestep) /
  1000`` in fp32), on the host so that reading ``t`` for CFG truncation costs no device sync;
- CFG uses diffusers' formulation ``pos + g·(pos − neg)`` with ``g = CFGScale − 1``, only while ``t ≤ cfg_truncation``;
  with ``cfg_normalization = f > 0`` the guided prediction's norm is clamped to ``f·‖pos‖`` per result;
- the model output is negated into the flow velocity, and latents stay fp32;
- a phased LoRA is told σ before every call, and for σ below ``lora.HIGH_NOISE_SIGMA`` the low-noise caption contexts
  are used when the caption branch differs between the phases;
- ``hooks`` (``zimage_core.hooks``) act around the 30 main layers of every model call: the caller's hooks first, a
  step cache's state last (it decides which layers run).

Statistics of a call to ``generate`` are a :class:`GenerationStats` (a read-only mapping for the old dict keys).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from . import lora as lora_mod
from .hooks import StackHook
from .model import CaptionContext, ZImageTransformer


@dataclass
class GenerationStats(Mapping):
    """What one ``generate`` call did. Also readable as a mapping (``stats["forwards"]``); ``"cache"`` is present
    only when a step cache ran (one summary per result)."""

    scheduler: str
    shift: float
    t_start: int
    steps: int  # sampler steps run per result
    cfg_scale: float
    forwards: int = 0  # transformer calls
    sequences: int = 0  # sequences through the transformer (a CFG call counts two per result)
    nfe_per_result: int = 0
    batched: bool = False
    cache: list[dict] | None = None
    timings: dict[str, float] = field(default_factory=dict)  # encode_s, denoise_s, decode_s, total_s

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["cache"] is None:
            del d["cache"]
        return d

    def __getitem__(self, key: str):
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())


def _with_cfg_batch(pos: CaptionContext, neg: CaptionContext | None):
    """(context without CFG, batched [pos ‖ neg] context for CFG, or None)."""
    if neg is None:
        return pos, None
    return pos, CaptionContext(pos.feats + neg.feats, pos.freqs + neg.freqs, pos.lens + neg.lens)


@dataclass
class Denoiser:
    transformer: ZImageTransformer
    high: tuple[CaptionContext, CaptionContext | None]  # (single, [pos ‖ neg]) for σ ≥ HIGH_NOISE_SIGMA
    low: tuple[CaptionContext, CaptionContext | None]  # the same for σ below it (== high unless a phased LoRA)
    guidance: float  # g = CFGScale − 1; CFG is off when g ≤ 0 or there is no negative context
    cfg_normalization: float
    cfg_truncation: float
    stats: GenerationStats
    hooks: Sequence[StackHook] = ()

    @classmethod
    def build(
        cls,
        transformer: ZImageTransformer,
        ctx_pos: CaptionContext,
        ctx_neg: CaptionContext | None,
        *,
        guidance: float,
        cfg_normalization: float,
        cfg_truncation: float,
        stats: GenerationStats,
        hooks: Sequence[StackHook] = (),
        ctx_low: tuple[CaptionContext, CaptionContext | None] | None = None,
    ) -> Denoiser:
        high = _with_cfg_batch(ctx_pos, ctx_neg)
        low = high if ctx_low is None else _with_cfg_batch(*ctx_low)
        return cls(transformer, high, low, guidance, cfg_normalization, cfg_truncation, stats, tuple(hooks))

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        b = x.shape[0]
        timestep = torch.tensor(float(sigma), dtype=torch.float32) * 1000
        t_host = (1000 - timestep) / 1000
        t = t_host.to(x.device).expand(b)
        lora_mod.set_sigma(float(sigma))
        single, both = self.high if float(sigma) >= lora_mod.HIGH_NOISE_SIGMA else self.low
        apply_cfg = both is not None and self.guidance > 0 and float(t_host) <= self.cfg_truncation
        xin = x.to(self.transformer.dtype)
        if apply_cfg:
            xin, t, ctx = xin.repeat(2, 1, 1, 1), t.repeat(2), both
        else:
            ctx = single
        out = self.transformer.forward_with_context(list(xin.unsqueeze(2).unbind(0)), t, ctx, hooks=self.hooks)
        self.stats.forwards += 1
        self.stats.sequences += len(out)
        if apply_cfg:
            pred = torch.stack([self._guide(out[j].float(), out[b + j].float()) for j in range(b)])
        else:
            pred = torch.stack([o.float() for o in out])
        return -pred.squeeze(2)  # flow velocity, fp32 [B, C, h, w]

    def _guide(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        pred = pos + self.guidance * (pos - neg)
        if self.cfg_normalization > 0:
            pos_norm, pred_norm = torch.linalg.vector_norm(pos), torch.linalg.vector_norm(pred)
            max_norm = pos_norm * self.cfg_normalization
            if pred_norm > max_norm:
                pred = pred * (max_norm / pred_norm)
        return pred


__all__ = ["Denoiser", "GenerationStats"]

"""Our Z-Image transformer: a readable re-implementation of diffusers' ``ZImageTransformer2DModel`` (0.42.1).

The state dict uses exactly diffusers' keys, so checkpoints load unchanged (``zimage_core.weights``). The forward
pass follows diffusers 0.42.1's ``ZImageTransformer2DModel`` step by step; the fused ops (attention, QK-norm + RoPE,
RMSNorm·(1+scale), x + tanh(g)·RMSNorm(y), SwiGLU, final LayerNorm·(1+scale)) go through one switch
(``zimage_kernels.get_ops``) whose torch backend is the reference and whose Triton backend is the fast path.

Data flow of one forward (basic text-to-image mode)::

    t ─► t_embedder ─► adaln_input [B, 256]  (drives every adaLN: noise_refiner, layers, final)
    cap_feats ─► pad to 32 ─► cap_embedder ─► context_refiner (2, unmodulated) ──────────┐
    x ─► patchify ─► pad to 32 ─► x_embedder ─► noise_refiner (2) ─► [image ‖ caption] ◄─┘
      ─► layers (30) ─► final layer ─► unpatchify

The caption branch does not depend on ``t``: :meth:`ZImageTransformer.encode_context` computes it once and
:meth:`ZImageTransformer.forward_with_context` reuses it at every step (exactly: same ops, same inputs).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from torch.nn.utils.rnn import pad_sequence

from zimage_kernels import Ops, get_ops, reference
from zimage_kernels.backend import validate_backend

from . import fp8, nosync
from .config import SEQ_MULTI_OF, T_EMBED_MID, ZImageConfig
from .fp8 import quantize_model, takes_fp8, validate_quantize
from .hooks import BlockInputs, StackHook, run_stack
from .weights import (
    CONFIG_KEY,
    FP8_DTYPES,
    CheckpointError,
    as_config,
    check_size,
    check_state_dict,
    comfy_to_diffusers,
    config_from_json,
    float_dtype,
    infer_config,
    is_comfy_layout,
    read_header,
    resolve_checkpoint,
    scaled_fp8_keys,
    split_scaled_fp8,
)

FINAL_NORM_EPS = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Building blocks (parameter layout identical to diffusers)
# ---------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Holds an RMSNorm weight; the math lives in ``zimage_kernels.reference.rms_norm`` / the op switch."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reference.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.heads = n_heads
        self.eps = eps
        head_dim = dim // n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim, bias=False)])
        self.norm_q = RMSNorm(head_dim, eps) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps) if qk_norm else None

    def forward(self, x: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
        q = self.to_q(x).unflatten(-1, (self.heads, -1))  # [B, N, H, D]
        k = self.to_k(x).unflatten(-1, (self.heads, -1))  # [B, N, H, D]
        v = self.to_v(x).unflatten(-1, (self.heads, -1))  # [B, N, H, D]
        if self.norm_q is not None:
            q, k = inp.ops.qk_norm_rope(q, k, self.norm_q.weight, self.norm_k.weight, inp.freqs_cis, self.eps)
        else:
            q, k = reference.rope(q, inp.freqs_cis), reference.rope(k, inp.freqs_cis)
        out = inp.ops.attention(q, k, v, kv_lens=inp.kv_lens)  # [B, N, H, D]
        return self.to_out[0](out.flatten(2).to(q.dtype))  # [B, N, H*D]; an FP8 to_out quantizes it per token


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        a, b = self.w1(x), self.w3(x)  # x may be an Fp8Act from the block's pre-norm (FP8 w1/w3)
        if takes_fp8(self.w2):  # FP8 w2: the SwiGLU gate emits e4m3 + per-token scales directly
            return self.w2(ops.swiglu_fp8(a, b))
        return self.w2(ops.swiglu(a, b))


class TransformerBlock(nn.Module):
    """Sandwich-norm block with tanh gates and no shift (``ZImageTransformerBlock``).

    modulated:   x = x + tanh(g_msa)·RMSNorm₂(Attn(RMSNorm₁(x)·(1+s_msa)));  same for the FFN with (s_mlp, g_mlp)
    unmodulated: x = x + RMSNorm₂(Attn(RMSNorm₁(x)));                        same for the FFN
    """

    def __init__(self, cfg: ZImageConfig, modulation: bool):
        super().__init__()
        eps = cfg.norm_eps
        self.eps = eps
        self.attention = Attention(cfg.dim, cfg.n_heads, cfg.qk_norm, eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)
        self.attention_norm1 = RMSNorm(cfg.dim, eps)
        self.ffn_norm1 = RMSNorm(cfg.dim, eps)
        self.attention_norm2 = RMSNorm(cfg.dim, eps)
        self.ffn_norm2 = RMSNorm(cfg.dim, eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = nn.Sequential(nn.Linear(cfg.adaln_dim, 4 * cfg.dim, bias=True))

    def modulation_terms(self, adaln_input: torch.Tensor | None):
        """(scale_msa, gate_msa, scale_mlp, gate_mlp), each [B, 1, C] raw (no 1+, no tanh); Nones if unmodulated."""
        if not self.modulation:
            return None, None, None, None
        mod = self.adaLN_modulation(adaln_input).unsqueeze(1)  # [B, 1, 4C] bare Linear, no SiLU
        return mod.chunk(4, dim=2)  # this exact order

    def forward(self, x: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
        ops = inp.ops
        scale_msa, gate_msa, scale_mlp, gate_mlp = self.modulation_terms(inp.adaln_input)
        att, ffn = self.attention, self.feed_forward
        # FP8 consumers (zimage_core.fp8): the pre-norm emits e4m3 + per-token scales for all of them at once
        pre = ops.rms_norm_modulate_fp8 if takes_fp8(att.to_q, att.to_k, att.to_v) else ops.rms_norm_modulate
        h = pre(x, self.attention_norm1.weight, scale_msa, self.eps)
        x = ops.gated_residual(x, self.attention(h, inp), self.attention_norm2.weight, gate_msa, self.eps)
        pre = ops.rms_norm_modulate_fp8 if takes_fp8(ffn.w1, ffn.w3) else ops.rms_norm_modulate
        h = pre(x, self.ffn_norm1.weight, scale_mlp, self.eps)
        x = ops.gated_residual(x, self.feed_forward(h, ops), self.ffn_norm2.weight, gate_mlp, self.eps)
        return x


class FinalLayer(nn.Module):
    """``LayerNorm(x)·(1 + Linear(SiLU(c)))`` then Linear: scale only, no shift, no gate."""

    def __init__(self, dim: int, out_dim: int, adaln_dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_dim, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(adaln_dim, dim, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, ops: Ops) -> torch.Tensor:
        scale = self.adaLN_modulation(c).unsqueeze(1)  # [B, 1, C]
        return self.linear(ops.layer_norm_modulate(x, scale, FINAL_NORM_EPS))


class TimestepEmbedder(nn.Module):
    def __init__(self, out_size: int, mid_size: int = T_EMBED_MID, freq_size: int = 256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, mid_size), nn.SiLU(), nn.Linear(mid_size, out_size))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """fp32 ``cat([cos, sin])`` embedding (cos first), computed outside autocast."""
        with torch.autocast(t.device.type, enabled=False):
            half = dim // 2
            freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
            args = t[:, None].float() * freqs[None]  # [B, half]
            return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.sinusoid(t, self.freq_size).to(self.mlp[0].weight.dtype)
        return self.mlp(t_freq)


class RopeTables:
    """Per-axis complex64 RoPE tables (theta, axes_dims, axes_lens), built once per device, gathered by position."""

    def __init__(self, theta: float, axes_dims: Sequence[int], axes_lens: Sequence[int]):
        self.theta, self.axes_dims, self.axes_lens = theta, tuple(axes_dims), tuple(axes_lens)
        self._tables: dict[torch.device, list[torch.Tensor]] = {}

    def _build(self) -> list[torch.Tensor]:
        tables = []
        for d, e in zip(self.axes_dims, self.axes_lens):
            freqs = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # [d/2] fp64
            angles = torch.outer(torch.arange(e, dtype=torch.float64), freqs).float()  # [e, d/2] fp32
            tables.append(torch.polar(torch.ones_like(angles), angles).to(torch.complex64))
        return tables

    def check(self, top: Sequence[int]) -> None:
        """Raise if a largest position per axis (Python ints, so no device sync) is outside the tables."""
        for axis, (p, e) in enumerate(zip(top, self.axes_lens)):
            if p >= e:
                raise ValueError(
                    f"RoPE position {p} on axis {axis} exceeds this model's axes_lens[{axis}] = {e}: the caption or "
                    "the image is too large for this model config"
                )

    def __call__(self, pos_ids: torch.Tensor) -> torch.Tensor:
        """pos_ids: int [N, n_axes] -> complex64 [N, head_dim/2]."""
        device = pos_ids.device
        if device not in self._tables:
            self._tables[device] = [t.to(device) for t in self._build()]
        tables = self._tables[device]
        return torch.cat([tables[a][pos_ids[:, a]] for a in range(len(tables))], dim=-1)


def coordinate_grid(size: Sequence[int], start: Sequence[int], device) -> torch.Tensor:
    """int32 [prod(size), 3] positions (start[i] + arange(size[i])) in row-major order."""
    axes = [torch.arange(s0, s0 + n, dtype=torch.int32, device=device) for s0, n in zip(start, size)]
    return torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1).flatten(0, -2)


def padded_len(n: int) -> int:
    return n + (-n) % SEQ_MULTI_OF


def batch_lengths(lens: Sequence[int], device) -> torch.Tensor | None:
    """kv_lens for a batch: None when every sample has the same length (no mask, as in diffusers)."""
    if all(n == lens[0] for n in lens):
        return None
    return nosync.kv_lens_tensor(lens, device)  # made once per length tuple: no host copy per forward


@dataclass
class CaptionContext:
    """Timestep-independent caption branch for a batch: computed once per request, reused at every step."""

    feats: list[torch.Tensor]  # per sample [Lp_i, dim]: context-refiner output (caption pad tokens included)
    freqs: list[torch.Tensor]  # per sample complex64 [Lp_i, head_dim/2]
    lens: list[int]  # Lp_i: caption length padded to a multiple of 32 (sets the image's RoPE offset)

    def select(self, index: Sequence[int]) -> CaptionContext:
        """Sub-batch (e.g. positives only once CFG is truncated, or prompts repeated per result)."""
        pick = lambda xs: [xs[i] for i in index]
        return CaptionContext(pick(self.feats), pick(self.freqs), pick(self.lens))

    def __len__(self) -> int:
        return len(self.feats)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class ZImageTransformer(nn.Module):
    """Z-Image single-stream DiT with diffusers' parameter names and call convention.

    ``forward(x, t, cap_feats)``: x is a list of B latents [C, F, H, W], t a [B] tensor in [0, 1] with 0 = pure noise,
    cap_feats a list of B unpadded caption features [L_i, cap_feat_dim]; returns a list of B [C, F, H, W] tensors
    (the pipeline negates it to get the flow velocity).
    """

    def __init__(self, config: ZImageConfig, kernel_backend: str | None = None):
        super().__init__()
        cfg = self.config = config
        self.kernel_backend = validate_backend(kernel_backend) if kernel_backend else None
        self.all_x_embedder = nn.ModuleDict()
        self.all_final_layer = nn.ModuleDict()
        for p, fp in zip(cfg.all_patch_size, cfg.all_f_patch_size):
            patch_dim = fp * p * p * cfg.in_channels
            self.all_x_embedder[f"{p}-{fp}"] = nn.Linear(patch_dim, cfg.dim, bias=True)
            self.all_final_layer[f"{p}-{fp}"] = FinalLayer(cfg.dim, p * p * fp * cfg.out_channels, cfg.adaln_dim)
        self.noise_refiner = nn.ModuleList([TransformerBlock(cfg, True) for _ in range(cfg.n_refiner_layers)])
        self.context_refiner = nn.ModuleList([TransformerBlock(cfg, False) for _ in range(cfg.n_refiner_layers)])
        self.t_embedder = TimestepEmbedder(cfg.adaln_dim)
        self.cap_embedder = nn.Sequential(RMSNorm(cfg.cap_feat_dim, cfg.norm_eps), nn.Linear(cfg.cap_feat_dim, cfg.dim))
        self.x_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, cfg.dim))
        self.layers = nn.ModuleList([TransformerBlock(cfg, True) for _ in range(cfg.n_layers)])
        self.rope = RopeTables(cfg.rope_theta, cfg.axes_dims, cfg.axes_lens)

    # ---- convenience -------------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.x_pad_token.dtype

    @property
    def device(self) -> torch.device:
        return self.x_pad_token.device

    def set_kernel_backend(self, backend: str | None) -> ZImageTransformer:
        """'auto' (Triton on CUDA, torch elsewhere), 'torch' or 'triton'; None defers to $ZIMAGE_KERNELS."""
        self.kernel_backend = validate_backend(backend) if backend else None
        fp8.set_backend(self, backend)
        return self

    def quantize(self, mode: str = "fp8", groups=None) -> ZImageTransformer:
        """In place: the linear layers of ``groups`` (default: the recipe ``mode``) in e4m3 W8A8 (``zimage_core.fp8``,
        docs/fp8.md); ``mode="none"`` does nothing. Returns self."""
        return fp8.quantize_model(self, mode, groups)

    def ops_for(self, device: torch.device) -> Ops:
        return get_ops(self.kernel_backend, device)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> ZImageTransformer:
        """Load a diffusers folder, a diffusers-layout or ComfyUI-layout .safetensors file (see zimage_core.weights)."""
        return load_transformer(path, **kwargs)

    @classmethod
    def from_diffusers(cls, module: nn.Module, kernel_backend: str | None = None) -> ZImageTransformer:
        """Convert a live diffusers ``ZImageTransformer2DModel`` (same weights, same dtype and device)."""
        return from_diffusers(module, kernel_backend=kernel_backend)

    # ---- caption branch (timestep independent) ------------------------------------------------------------------
    def encode_context(self, cap_feats: Sequence[torch.Tensor]) -> CaptionContext:
        """cap_embedder + context_refiner for a batch of unpadded captions [L_i, cap_feat_dim]."""
        device = cap_feats[0].device
        ops = self.ops_for(device)
        lens = [len(c) for c in cap_feats]
        if min(lens) == 0:
            raise ValueError("every caption must have at least one token")
        plens = [padded_len(n) for n in lens]
        self.rope.check((max(plens), 0, 0))
        # Pad each caption to a multiple of 32 by repeating its last row; those rows become cap_pad_token below.
        padded = [torch.cat([c, c[-1:].expand(p - n, -1)]) if p > n else c for c, n, p in zip(cap_feats, lens, plens)]
        feats = self.cap_embedder(torch.cat(padded))  # [ΣLp, dim]
        is_pad = torch.cat([torch.arange(p, device=device) >= n for n, p in zip(lens, plens)])[:, None]
        feats = torch.where(is_pad, self.cap_pad_token, feats)
        # Caption positions (1 + j, 0, 0) for j < Lp: pad tokens included, sequential.
        freqs = [self.rope(coordinate_grid((p, 1, 1), (1, 0, 0), device)) for p in plens]
        hidden = pad_sequence(list(feats.split(plens)), batch_first=True)  # [B, max Lp, dim]
        inp = BlockInputs(ops, batch_lengths(plens, device), pad_sequence(freqs, batch_first=True), None)
        for layer in self.context_refiner:
            hidden = layer(hidden, inp)
        return CaptionContext([hidden[i, :p] for i, p in enumerate(plens)], freqs, plens)

    # ---- image branch + main stack ------------------------------------------------------------------------------
    def forward_with_context(
        self,
        x: Sequence[torch.Tensor],
        t: torch.Tensor,
        context: CaptionContext,
        *,
        patch_size: int = 2,
        f_patch_size: int = 1,
        hooks: Sequence[StackHook] = (),
    ) -> list[torch.Tensor]:
        """The forward pass with a precomputed caption context (equal to ``forward`` with its captions).

        ``hooks`` act around the main layers (``zimage_core.hooks``: step caches, ControlNet hints, sequence
        parallelism), composed for this call only (the first is the outermost); those with ``wraps_refiner = True``
        (sequence parallelism) also around the noise refiner.
        """
        cfg = self.config
        key = f"{patch_size}-{f_patch_size}"
        if key not in self.all_x_embedder:
            raise ValueError(f"patch size {key} not in this model's {list(self.all_x_embedder)}")
        if len(x) != len(context):
            raise ValueError(f"got {len(x)} latents but {len(context)} captions")
        device = x[0].device
        ops = self.ops_for(device)
        x = [xi.to(self.dtype) for xi in x]
        t = torch.as_tensor(t, device=device).reshape(-1).expand(len(x))
        adaln_input = self.t_embedder(t * cfg.t_scale).type_as(x[0])  # [B, adaln_dim]

        # Patchify: (C, F, H, W) -> [F'·H'·W', pF·pH·pW·C], channel fastest; pad to 32 by repeating the last patch.
        pF, pH, pW = f_patch_size, patch_size, patch_size
        sizes, patches, img_lens, img_plens, img_freqs = [], [], [], [], []
        for xi, lp in zip(x, context.lens):
            C, Fr, H, W = xi.shape
            if Fr % pF or H % pH or W % pW:
                raise ValueError(f"latent size {(Fr, H, W)} is not divisible by the patch size {(pF, pH, pW)}")
            Ft, Ht, Wt = Fr // pF, H // pH, W // pW
            self.rope.check((lp + Ft, Ht - 1, Wt - 1))
            tokens = (
                xi.view(C, Ft, pF, Ht, pH, Wt, pW)  # [C, F', pF, H', pH, W', pW]
                .permute(1, 3, 5, 2, 4, 6, 0)  # [F', H', W', pF, pH, pW, C]
                .reshape(Ft * Ht * Wt, pF * pH * pW * C)  # [N_img, patch_dim]
            )
            n, p = len(tokens), padded_len(len(tokens))
            if p > n:
                tokens = torch.cat([tokens, tokens[-1:].expand(p - n, -1)])
            # Image positions (Lp + 1 + f, h, w); the image's own pad tokens sit at (0, 0, 0).
            pos = coordinate_grid((Ft, Ht, Wt), (lp + 1, 0, 0), device)
            pos = torch.cat([pos, pos.new_zeros(p - n, 3)])
            sizes.append((Fr, H, W))
            patches.append(tokens)
            img_lens.append(n)
            img_plens.append(p)
            img_freqs.append(self.rope(pos))

        # x embed (+ x_pad_token on pad rows) and the noise refiner on image tokens only.
        feats = self.all_x_embedder[key](torch.cat(patches))  # [ΣNp, dim]
        is_pad = torch.cat([torch.arange(p, device=device) >= n for n, p in zip(img_lens, img_plens)])[:, None]
        feats = torch.where(is_pad, self.x_pad_token, feats)
        hidden = pad_sequence(list(feats.split(img_plens)), batch_first=True)  # [B, max Np, dim]
        inp = BlockInputs(ops, batch_lengths(img_plens, device), pad_sequence(img_freqs, batch_first=True), adaln_input)
        # hooks that also wrap the noise refiner (sequence parallelism: shard the image tokens); none: every layer
        hidden = run_stack(hidden, inp, self.noise_refiner, [h for h in hooks if getattr(h, "wraps_refiner", False)])

        # Unified sequence per sample: [image tokens (incl. own pad) ‖ caption tokens (Lp)], then batch-padded.
        uni_lens = [p + lp for p, lp in zip(img_plens, context.lens)]
        unified = pad_sequence(
            [torch.cat([hidden[i, :p], c]) for i, (p, c) in enumerate(zip(img_plens, context.feats))], batch_first=True
        )  # [B, max(Np + Lp), dim]
        uni_freqs = pad_sequence([torch.cat([f, c]) for f, c in zip(img_freqs, context.freqs)], batch_first=True)
        inp = BlockInputs(ops, batch_lengths(uni_lens, device), uni_freqs, adaln_input)
        unified = run_stack(unified, inp, self.layers, hooks)

        out = self.all_final_layer[key](unified, adaln_input, ops)  # [B, N, patch_dim]
        # Unpatchify: the first N_img tokens of each sample are its image.
        result = []
        for i, (Fr, H, W) in enumerate(sizes):
            Ft, Ht, Wt = Fr // pF, H // pH, W // pW
            result.append(
                out[i, : img_lens[i]]
                .view(Ft, Ht, Wt, pF, pH, pW, cfg.out_channels)  # [F', H', W', pF, pH, pW, C]
                .permute(6, 0, 3, 1, 4, 2, 5)  # [C, F', pF, H', pH, W', pW]
                .reshape(cfg.out_channels, Fr, H, W)
            )
        return result

    def forward(
        self,
        x: Sequence[torch.Tensor],
        t: torch.Tensor,
        cap_feats: Sequence[torch.Tensor],
        return_dict: bool | None = None,
        patch_size: int = 2,
        f_patch_size: int = 1,
        **unsupported,
    ):
        """Same arguments and result as diffusers' forward (basic mode).

        Returns the list of outputs; with ``return_dict=False`` a 1-tuple ``(list,)`` and with ``return_dict=True``
        an object with ``.sample``, as diffusers does, so the model drops into diffusers' pipelines.
        """
        used = [k for k, v in unsupported.items() if v is not None and k != "joint_attention_kwargs"]
        if used:
            raise NotImplementedError(f"ZImageTransformer does not support {used} (Omni / ControlNet inputs)")
        if len(x) != len(cap_feats):
            raise ValueError(f"got {len(x)} latents but {len(cap_feats)} captions")
        out = self.forward_with_context(
            x, t, self.encode_context(cap_feats), patch_size=patch_size, f_patch_size=f_patch_size
        )
        if return_dict is None:
            return out
        return TransformerOutput(out) if return_dict else (out,)


@dataclass
class TransformerOutput:
    sample: list[torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Building from checkpoints (the files are read and checked by zimage_core.weights)
# ---------------------------------------------------------------------------------------------------------------


def expected_parameters(cfg: ZImageConfig) -> int:
    """The parameter count of a config, without building it: the model is linear in its layer counts, so three
    meta-device builds of at most two layers give the per-layer and fixed costs."""

    def count(n_layers, n_ref):
        with torch.device("meta"):
            m = ZImageTransformer(cfg.replace(n_layers=n_layers, n_refiner_layers=n_ref))
        return sum(p.numel() for p in m.state_dict().values())

    base = count(1, 1)
    per_layer = count(2, 1) - base
    per_refiner = count(1, 2) - base  # noise and context refiners together
    return base + (cfg.n_layers - 1) * per_layer + (cfg.n_refiner_layers - 1) * per_refiner


def load_transformer(
    path: str | Path,
    *,
    config=None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    kernel_backend: str | None = None,
    quantize: str | None = None,
) -> ZImageTransformer:
    """Load a transformer checkpoint (see module docstring). ``config``: ZImageConfig, preset name, dict or json path.

    ``dtype``: convert every floating tensor to it (default: keep the stored dtype). ``quantize``: "none" (default)
    or "fp8" (the recipe of ``zimage_core.fp8``, quantized on load). A ComfyUI "scaled fp8" file (see
    ``weights.split_scaled_fp8``) loads either way: its e4m3 codes are used as they are by FP8 layers, dequantized
    otherwise.
    """
    quantize = validate_quantize(quantize)
    files, config_json = resolve_checkpoint(path)
    where, shapes, meta = read_header(files)
    scaled = {k: where.pop(k) for k in scaled_fp8_keys(shapes, str(path))}  # marker and scales: not model tensors
    for k in scaled:
        shapes.pop(k)
    comfy = is_comfy_layout(where)
    if comfy:
        # Shapes after the key conversion (fused qkv splits into three equal parts).
        shapes = {
            k: tuple(v.shape)
            for k, v in comfy_to_diffusers({k: torch.empty(s, device="meta") for k, s in shapes.items()}).items()
        }
    cfg = as_config(config)
    if cfg is None and config_json is not None:
        cfg = config_from_json(config_json)
    if cfg is None and CONFIG_KEY in meta:
        try:
            cfg = ZImageConfig.from_dict(json.loads(meta[CONFIG_KEY]))
        except (TypeError, ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: invalid config in the safetensors metadata ({str(e)[:300]})") from None
    if cfg is None:
        cfg = infer_config(shapes, str(path))
    check_size(cfg, shapes, files, str(path), expected_parameters)

    with torch.device("meta"):
        model = ZImageTransformer(cfg, kernel_backend=kernel_backend)
    check_state_dict(model, shapes, str(path))

    def convert(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)

    sd: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for f, stored in where.values():
        by_file.setdefault(f, []).append(stored)
    for f, keys in by_file.items():
        with safe_open(f, framework="pt") as h:
            for k in keys:
                sd[k] = h.get_tensor(k)
    fp8_codes = {}
    if scaled:
        scale_sd = {}
        for k, (f, stored) in scaled.items():
            with safe_open(f, framework="pt") as h:
                scale_sd[k] = h.get_tensor(stored)
        sd, fp8_codes = split_scaled_fp8(sd, scale_sd, comfy, str(path), dtype or float_dtype(sd))
    elif any(v.dtype in FP8_DTYPES for v in sd.values()):
        bad = next(k for k, v in sd.items() if v.dtype in FP8_DTYPES)
        raise CheckpointError(
            f"{path}: {bad} is stored in {sd[bad].dtype} without the 'scaled_fp8' marker key and per-tensor "
            "'.scale_weight' scales; only ComfyUI 'scaled fp8' files (float8_e4m3fn + scale_weight) are read"
        )
    if comfy:
        sd = comfy_to_diffusers(sd)
    sd = {k: convert(v) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True)
    if quantize != "none":
        quantize_model(model, quantize, codes={k: (q.to(device), s.to(device)) for k, (q, s) in fp8_codes.items()})
    return model.eval()


def from_diffusers(module: torch.nn.Module, kernel_backend: str | None = None) -> ZImageTransformer:
    """Our model sharing the parameters of a live diffusers ``ZImageTransformer2DModel`` (no copy)."""
    cfg = ZImageConfig.from_dict(dict(module.config))
    with torch.device("meta"):
        model = ZImageTransformer(cfg, kernel_backend=kernel_backend)
    sd = module.state_dict()
    check_state_dict(model, {k: tuple(v.shape) for k, v in sd.items()}, type(module).__name__)
    model.load_state_dict(sd, assign=True)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "BlockInputs",
    "CaptionContext",
    "ZImageTransformer",
    "count_parameters",
    "expected_parameters",
    "from_diffusers",
    "load_transformer",
]

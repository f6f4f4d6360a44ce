"""Z-Image ControlNet Union (1.0, 2.0, 2.1 and the 2.1 lite files; ``layouts.py``, docs/controlnet-variants.md) on
our transformer, computed as diffusers 0.42.1's ``ZImageControlNetModel`` + ``ZImageControlNetPipeline`` /
``ZImageControlNetInpaintPipeline`` compute it.

What the ControlNet owns and what it shares::

    own:    control_all_x_embedder  (Linear 2·2·control_in_dim -> dim)
            control_layers          (one ControlBlock per entry of control_layers_places; block 0 has before_proj)
            control_noise_refiner   (1.0: plain modulated blocks; 2.1: ControlBlocks; 2.0: none)
    shared: the transformer's x embedder, pad tokens, t embedder, RoPE, noise refiner and the caption context

A ``ControlBlock`` is a main-layer block (``model.TransformerBlock``, so it runs through the same op switch and the
same fused kernels) acting on the control stream ``c``; block 0 first does ``c = before_proj(c) + x`` with ``x``
the main stream, and every block emits ``after_proj(c)`` as a hint.

One forward of the main model with one ControlNet (``ControlHook``, a ``hooks.StackHook``)::

    before_stack(unified, inp):
        c = control_all_x_embedder(patchify(control latent))            (image tokens; pad rows = x_pad_token)
        1.0: c = control_noise_refiner(c)                                (plain blocks, image tokens only)
        2.x: c, refiner hints = control stage over the pre-refiner image tokens; the ControlNet's own pass through
             the shared noise refiner adds those hints (diffusers' behaviour: the main path does not get them)
        c = [c ‖ caption tokens]   (all of this lazily, when the first hint is needed)
    after_layer(i, hidden): run the control layers up to place i (each emits after_proj(c)), then
        hidden + weight · per-layer scale · hint[i]   (on the rows that get the control)

For 1.0 the main stream ``x`` that the control layers read is exactly the unified stream the hook receives, so it
is not recomputed; for 2.x the ControlNet's own refined stream differs (it has the refiner hints) and is recomputed
(two refiner blocks). Hints are added through ``Stack.run``'s ``after_layer``: a step cache that runs only some
layers adds the hints on the layers it computes.

``controlMode`` (README, "ControlNet"): ``balanced`` adds the hints to every row of the batch (diffusers);
``controlnet`` only to the conditional half of a CFG batch (the ControlNet then runs on that half only);
``prompt`` scales the hint of the k-th of n control layers by 0.825^(n−1−k). The step window ``[start, end)`` is
in absolute steps; outside it, and at weight 0, the ControlNet is not run at all.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.utils.rnn import pad_sequence

from ..config import ZImageConfig
from ..errors import RequestError, show
from ..hooks import StackHook
from ..model import BlockInputs, TransformerBlock, ZImageTransformer, batch_lengths, padded_len
from ..weights import CheckpointError, read_header
from . import layouts
from .layouts import CONTROL_TYPES

MODES = ("balanced", "controlnet", "prompt")
PROMPT_MODE_DECAY = 0.825  # "prompt" mode: the hint of the k-th of n control layers is scaled by 0.825^(n-1-k)
DEFAULT_WEIGHT = 0.75  # diffusers' controlnet_conditioning_scale default (the Python API's default)
LAYOUTS = {None: "1.0", "control_layers": "2.0", "control_noise_refiner": "2.1"}
CONFIG_KEY = "zimage_controlnet_config"  # safetensors metadata key for our single files
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BUILTIN_ID = "zimage:default-controlnet"
# The transformer's modules a diffusers ControlNet holds by reference after ``from_transformer`` (and writes into a
# folder saved after it); we share the transformer's own and never read these from a ControlNet checkpoint.
SHARED_PREFIXES = (
    "t_embedder.", "all_x_embedder.", "cap_embedder.", "noise_refiner.", "context_refiner.", "x_pad_token",
    "cap_pad_token",
)  # fmt: skip


class ControlNetError(CheckpointError):
    """A ControlNet checkpoint that cannot be loaded or does not fit the transformer."""


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControlNetConfig:
    """diffusers' ``ZImageControlNetModel`` config (same keys in config.json)."""

    control_layers_places: tuple[int, ...]
    control_in_dim: int
    control_refiner_layers_places: tuple[int, ...] | None = None
    add_control_noise_refiner: str | None = None  # None (1.0), "control_layers" (2.0), "control_noise_refiner" (2.1)
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True

    def __post_init__(self):
        def count(name, v, lo):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ControlNetError(f"{name} must be an integer >= {lo}, got {show(v)}")

        for name in ("control_layers_places", "all_patch_size", "all_f_patch_size"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise ControlNetError(f"{name} must be a list of integers, got {show(getattr(self, name))}")
        for name, lo in (("control_in_dim", 1), ("dim", 1), ("n_refiner_layers", 0), ("n_heads", 1), ("n_kv_heads", 1)):
            count(name, getattr(self, name), lo)
        for v in (*self.control_layers_places, *(self.control_refiner_layers_places or ())):
            count("control_layers_places / control_refiner_layers_places entries", v, 0)
        for v in (*self.all_patch_size, *self.all_f_patch_size):
            count("all_patch_size / all_f_patch_size entries", v, 1)
        if len(self.all_patch_size) != len(self.all_f_patch_size) or not self.all_patch_size:
            raise ControlNetError("all_patch_size and all_f_patch_size must be non-empty lists of the same length")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ControlNetError(f"norm_eps must be a positive number, got {show(self.norm_eps)}")
        if not isinstance(self.qk_norm, bool):
            raise ControlNetError(f"qk_norm must be true or false, got {show(self.qk_norm)}")
        places = list(self.control_layers_places)
        if not places or places[0] != 0 or places != sorted(set(places)):
            raise ControlNetError(f"control_layers_places must be increasing and start at 0, got {places}")
        if self.add_control_noise_refiner not in LAYOUTS:
            raise ControlNetError(
                f"add_control_noise_refiner must be one of {list(LAYOUTS)}, got {self.add_control_noise_refiner!r}"
            )
        if self.add_control_noise_refiner is not None and not self.control_refiner_layers_places:
            raise ControlNetError("the 2.0/2.1 layouts need control_refiner_layers_places")

    @property
    def layout(self) -> str:
        return LAYOUTS[self.add_control_noise_refiner]

    @property
    def variant(self) -> str:
        """The released layout this config is (``layouts.LAYOUTS``: union-1.0, -2.0, -2.1, -2.1-lite) or "custom"."""
        return layouts.name_of(self.control_layers_places, self.add_control_noise_refiner)

    _TUPLES = ("control_layers_places", "control_refiner_layers_places", "all_patch_size", "all_f_patch_size")

    @classmethod
    def from_dict(cls, d: dict) -> ControlNetConfig:
        names = set(cls.__dataclass_fields__)
        for k in cls._TUPLES:
            if k in d and d[k] is not None and not isinstance(d[k], (list, tuple)):
                raise ControlNetError(f"{k} must be a list of integers, got {show(d[k])}")
        kw = {k: (tuple(v) if k in cls._TUPLES and v is not None else v) for k, v in d.items() if k in names}
        return cls(**kw)

    def to_dict(self) -> dict:
        d = {"_class_name": "ZImageControlNetModel"}
        for k in self.__dataclass_fields__:
            v = getattr(self, k)
            d[k] = list(v) if isinstance(v, tuple) else v
        return d


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------


class ControlBlock(TransformerBlock):
    """``ZImageControlTransformerBlock``: a main-layer block on the control stream, with the two projections."""

    def __init__(self, cfg: ZImageConfig, block_id: int):
        super().__init__(cfg, modulation=True)
        self.block_id = block_id
        if block_id == 0:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)

    def step(self, c: torch.Tensor, x: torch.Tensor, inp: BlockInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(new control stream, hint)."""
        if self.block_id == 0:
            c = self.before_proj(c) + x
        c = TransformerBlock.forward(self, c, inp)
        return c, self.after_proj(c)


def block_config(cfg: ControlNetConfig, transformer_cfg: ZImageConfig) -> ZImageConfig:
    """The transformer's config, after checking the ControlNet fits it (same width, heads, eps, patch sizes)."""
    t = transformer_cfg
    wrong = [
        f"{name}: controlnet {a} vs transformer {b}"
        for name, a, b in (
            ("dim", cfg.dim, t.dim),
            ("n_heads", cfg.n_heads, t.n_heads),
            ("norm_eps", cfg.norm_eps, t.norm_eps),
            ("qk_norm", cfg.qk_norm, t.qk_norm),
        )
        if a != b
    ]
    if max(cfg.control_layers_places) >= t.n_layers:
        wrong.append(f"control_layers_places {list(cfg.control_layers_places)} vs {t.n_layers} main layers")
    if cfg.control_refiner_layers_places and max(cfg.control_refiner_layers_places) >= t.n_refiner_layers:
        wrong.append(
            f"control_refiner_layers_places {list(cfg.control_refiner_layers_places)} vs "
            f"{t.n_refiner_layers} noise-refiner layers"
        )
    for p, fp in zip(cfg.all_patch_size, cfg.all_f_patch_size):
        if p not in t.all_patch_size or fp not in t.all_f_patch_size:
            wrong.append(f"patch size {p}-{fp} not in the transformer's")
    if wrong:
        raise ControlNetError("this ControlNet does not fit the transformer: " + "; ".join(wrong))
    return t


class ZImageControlNet(nn.Module):
    """The ControlNet's own weights (diffusers' state-dict keys); the shared modules stay on the transformer."""

    def __init__(self, config: ControlNetConfig, transformer_cfg: ZImageConfig):
        super().__init__()
        self.config = config
        bcfg = block_config(config, transformer_cfg)
        self.control_layers = nn.ModuleList([ControlBlock(bcfg, i) for i in config.control_layers_places])
        self.control_all_x_embedder = nn.ModuleDict(
            {
                f"{p}-{fp}": nn.Linear(fp * p * p * config.control_in_dim, config.dim, bias=True)
                for p, fp in zip(config.all_patch_size, config.all_f_patch_size)
            }
        )
        mode = config.add_control_noise_refiner
        if mode == "control_layers":
            self.control_noise_refiner = None
        elif mode == "control_noise_refiner":
            self.control_noise_refiner = nn.ModuleList([ControlBlock(bcfg, i) for i in range(config.n_refiner_layers)])
        else:
            self.control_noise_refiner = nn.ModuleList(
                [TransformerBlock(bcfg, True) for _ in range(config.n_refiner_layers)]
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.control_layers[0].after_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.control_layers[0].after_proj.weight.device

    # ---- the hint computation -----------------------------------------------------------------------------------
    def hints(self, *args, **kwargs) -> list[torch.Tensor]:
        """Every hint at once (see :meth:`iter_hints`)."""
        return list(self.iter_hints(*args, **kwargs))

    def iter_hints(
        self,
        transformer: ZImageTransformer,
        unified: torch.Tensor,
        inp: BlockInputs,
        img_plens: Sequence[int],
        control: Sequence[torch.Tensor],
        x: Sequence[torch.Tensor] | None = None,
        scale: float = 1.0,
        patch: tuple[int, int] = (2, 1),
        sp=None,
    ):
        """The hints, one per control layer in order, each [B, N, dim] over the unified sequence, computed lazily:
        nothing runs until the first is asked for, and control layer k runs only when hint k is asked for.

        ``unified``/``inp``: the main stream before the main layers and its inputs; ``img_plens``: the padded image
        token count of each sample; ``control``: control latents [control_in_dim, F, H, W] per sample; ``x``: the
        latents (needed for the 2.x layouts, whose own pass re-runs the noise refiner); ``scale`` multiplies the
        refiner-stage hints of 2.x (diffusers scales them by ``conditioning_scale``). ``sp``: a
        ``parallel.SequenceParallelHook``; then ``unified``/``inp`` are the whole sequence, every block runs on this
        rank's shard of the tokens (the image-only stage on a shard of the image tokens, gathered before the caption
        is joined) and each hint is this rank's shard, as the main stream the hook adds it to.
        """
        cfg = self.config
        key = f"{patch[0]}-{patch[1]}"
        if key not in self.control_all_x_embedder:
            raise ControlNetError(f"patch size {key} not in this ControlNet's {list(self.control_all_x_embedder)}")
        device = unified.device
        img_lens = [_tokens(ci, patch)[1] for ci in control]
        tokens = [_tokens(ci.to(self.dtype), patch)[0] for ci in control]
        c = self.control_all_x_embedder[key](torch.cat(tokens))
        is_pad = torch.cat([torch.arange(p, device=device) >= n for n, p in zip(img_lens, img_plens)])[:, None]
        c = torch.where(is_pad, transformer.x_pad_token, c)
        c = pad_sequence(list(c.split(list(img_plens))), batch_first=True)  # [B, max Np, dim]
        img_freqs = pad_sequence([inp.freqs_cis[i, :p] for i, p in enumerate(img_plens)], batch_first=True)
        img_inp = BlockInputs(inp.ops, batch_lengths(list(img_plens), device), img_freqs, inp.adaln_input)

        main = unified
        n_img = c.shape[1]
        if sp is not None:  # the image-only stage on this rank's shard of the image tokens
            c, img_inp, _ = sp.shard(c, img_inp)
        if cfg.add_control_noise_refiner is None:
            for layer in self.control_noise_refiner:
                c = layer(c, img_inp)
        else:
            if x is None:
                raise ValueError("the 2.0/2.1 ControlNet layouts need the latents x")
            feats = transformer.all_x_embedder[key](torch.cat([_tokens(xi.to(self.dtype), patch)[0] for xi in x]))
            feats = torch.where(is_pad, transformer.x_pad_token, feats)
            h = pad_sequence(list(feats.split(list(img_plens))), batch_first=True)
            if sp is not None:
                h = _shard_like(sp, h)
            stage = (
                self.control_layers if cfg.add_control_noise_refiner == "control_layers" else self.control_noise_refiner
            )
            stage_hints = []
            for block in stage:
                c, hint = block.step(c, h, img_inp)
                stage_hints.append(hint)
            refiner_hints = {place: stage_hints[k] * scale for k, place in enumerate(cfg.control_refiner_layers_places)}
            for i, layer in enumerate(transformer.noise_refiner):
                h = layer(h, img_inp)
                if i in refiner_hints:
                    h = h + refiner_hints[i]
            if sp is not None:
                h = sp.gather(h, n_img)
            main = _splice(h, unified, img_plens)
        if sp is not None:
            c = sp.gather(c, n_img)

        # [control image tokens ‖ the caption tokens of the unified stream], batch-padded like the unified stream
        cu = _splice(c, unified, img_plens)
        if sp is not None:  # the control layers on this rank's shard of the unified sequence
            cu, inp, _ = sp.shard(cu, inp)
            main = _shard_like(sp, main)
        for block in self.control_layers:
            cu, hint = block.step(cu, main, inp)
            yield hint


def _shard_like(sp, t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` [B, N, dim] along the tokens, padded as the sequence-parallel hook pads."""
    N = t.shape[1]
    pad = (-N) % sp.degree
    if pad:
        t = F.pad(t, (0, 0, 0, pad))
    n = (N + pad) // sp.degree
    return t[:, sp.rank * n : (sp.rank + 1) * n].contiguous()


def _tokens(xi: torch.Tensor, patch: tuple[int, int]) -> tuple[torch.Tensor, int]:
    """(C, F, H, W) -> [padded N, pF·pH·pW·C] patches (pad rows repeat the last patch, as the transformer does), N."""
    p, pf = patch
    C, Fr, H, W = xi.shape
    if Fr % pf or H % p or W % p:
        raise ValueError(f"control latent size {(Fr, H, W)} is not divisible by the patch size {(pf, p, p)}")
    Ft, Ht, Wt = Fr // pf, H // p, W // p
    t = xi.view(C, Ft, pf, Ht, p, Wt, p).permute(1, 3, 5, 2, 4, 6, 0).reshape(Ft * Ht * Wt, pf * p * p * C)
    n, pn = len(t), padded_len(len(t))
    if pn > n:
        t = torch.cat([t, t[-1:].expand(pn - n, -1)])
    return t, n


def _splice(img: torch.Tensor, unified: torch.Tensor, img_plens: Sequence[int]) -> torch.Tensor:
    """Per sample: img[i, :Np_i] followed by unified[i, Np_i:] (the caption part and the batch padding)."""
    rows = [torch.cat([img[i, :p], unified[i, p:]]) for i, p in enumerate(img_plens)]
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------------
# The hook
# ---------------------------------------------------------------------------------------------------------------


class ControlHook(StackHook):
    """One ControlNet for one forward: prepares the control pass before the main layers and adds hint k after
    layer ``places[k]``. Control layers run lazily, when ``after_layer`` first needs a hint: on a step where a
    cache skips layers, only the control layers up to the last computed hint place run (none, when no layer with
    a hint is computed)."""

    def __init__(
        self,
        model: ZImageControlNet,
        transformer: ZImageTransformer,
        x: Sequence[torch.Tensor],
        control: torch.Tensor,
        weight: float,
        layer_scales: Sequence[float] | None = None,
        rows: Sequence[int] | None = None,
        patch: tuple[int, int] = (2, 1),
        on_forward: Callable[[], None] | None = None,
        on_block: Callable[[], None] | None = None,
    ):
        self.model, self.transformer, self.x = model, transformer, list(x)
        self.control = control  # [control_in_dim, F, H, W] for every row, or a list: row i gets control[i % len]
        self.weight = float(weight)
        self.layer_scales = list(layer_scales) if layer_scales is not None else None
        self.rows = None if rows is None else list(rows)
        self.patch = patch
        self.on_forward, self.on_block = on_forward, on_block
        places = model.config.control_layers_places
        scales = self.layer_scales or [1.0] * len(places)
        self._scale = {place: self.weight * s for place, s in zip(places, scales)}
        self._places = list(places)
        self._hints: dict[int, torch.Tensor] = {}
        self._pending = None  # the lazy hint iterator of this forward
        self._index: torch.Tensor | None = None
        # set by parallel.ParallelContext.forward: this forward's SequenceParallelHook (the hints are then sharded)
        self.sequence_parallel = None

    def for_rows(self, rows: Sequence[int]) -> ControlHook:
        """This hook for a sub-batch (a CFG-parallel rank's half): rows ``rows`` of the batch it was made for."""
        new = copy.copy(self)
        ctl = self.control if isinstance(self.control, (list, tuple)) else [self.control]
        new.x = [self.x[i] for i in rows]
        new.control = [ctl[i % len(ctl)] for i in rows]
        new.rows = None if self.rows is None else [j for j, i in enumerate(rows) if i in set(self.rows)]
        return new

    def before_stack(self, hidden, inp):
        p, pf = self.patch
        plens = [padded_len((xi.shape[1] // pf) * (xi.shape[2] // p) * (xi.shape[3] // p)) for xi in self.x]
        rows = self.rows if self.rows is not None and len(self.rows) < len(self.x) else None
        self._pending, self._hints, self._index = None, {}, None
        if rows == []:  # none of this forward's rows gets the control (the other CFG-parallel half)
            return hidden, inp
        sp = self.sequence_parallel
        # under sequence parallelism: the whole sequence, as the sequence-parallel hook received it
        h, sub = sp.outer if sp is not None else (hidden, inp)
        x = self.x
        ctl = self.control if isinstance(self.control, (list, tuple)) else [self.control]
        ctl = [ctl[i % len(ctl)] for i in range(len(x))]  # a CFG batch repeats the rows: [cond..., uncond...]
        if rows is not None:
            self._index = torch.tensor(rows, device=h.device)
            kv = None if sub.kv_lens is None else sub.kv_lens.index_select(0, self._index.to(sub.kv_lens.device))
            sub = BlockInputs(
                sub.ops, kv, sub.freqs_cis.index_select(0, self._index), sub.adaln_input.index_select(0, self._index)
            )
            h = h.index_select(0, self._index)
            plens, x, ctl = [plens[i] for i in rows], [x[i] for i in rows], [ctl[i] for i in rows]
        self._pending = self.model.iter_hints(
            self.transformer, h, sub, plens, ctl, x, scale=self.weight, patch=self.patch, sp=sp
        )
        if self.on_forward is not None:
            self.on_forward()
        return hidden, inp

    def after_layer(self, index, hidden, inp):
        if index not in self._scale or self._pending is None:
            return hidden
        while index not in self._hints:  # run the control layers up to this place
            place = self._places[len(self._hints)]
            self._hints[place] = next(self._pending) * self._scale[place]
            if self.on_block is not None:
                self.on_block()
        hint = self._hints[index]
        if self._index is None:
            return hidden + hint
        return hidden.index_add(0, self._index, hint)


def layer_scales(mode: str, n: int) -> list[float]:
    """Per-control-layer multipliers of a controlMode (README, "ControlNet")."""
    if mode == "prompt":
        return [PROMPT_MODE_DECAY ** (n - 1 - k) for k in range(n)]
    return [1.0] * n


# ---------------------------------------------------------------------------------------------------------------
# Generation inputs and the per-result state
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ControlNetInput:
    """One ControlNet of a ``generate`` call.

    ``guide_image``: PIL image, or a [1, 3, H, W] tensor in [-1, 1] (used as is, like diffusers' tensor input).
    ``start``/``end``: the half-open step window in absolute steps (None: from the first / to the last step).
    ``mode``: ``balanced`` | ``controlnet`` | ``prompt``. ``inpaint_image``/``mask_image``: the ControlNet-inpaint
    conditioning (33-channel models); when absent and the call is an inpainting call, its seed image and mask are used.
    """

    model: ZImageControlNet
    guide_image: object
    weight: float = DEFAULT_WEIGHT
    start: int | None = None
    end: int | None = None
    mode: str = "balanced"
    inpaint_image: object = None
    mask_image: object = None
    field: str = "controlnets"  # the name errors use (the request maps it to controlNet[i])
    # the guide's kind (layouts.CONTROL_TYPES; None: not said). "gray" turns the guide into luminance; a kind the
    # ControlNet's layout was not trained on is refused (docs/controlnet-variants.md)
    control_type: str | None = None


@dataclass
class _Prepared:
    spec: ControlNetInput
    latent: torch.Tensor | list[torch.Tensor]  # [control_in_dim, 1, h, w], or one per row (see ControlHook)
    start: int
    end: int
    scales: list[float]


@dataclass
class ControlState:
    """Per result: which step the sampler is on and which ControlNets run at it."""

    prepared: list[_Prepared]
    transformer: ZImageTransformer
    start_step: int = 0
    step: int = 0
    stats: dict = field(
        default_factory=lambda: dict(controlnet_forwards=0, controlnet_skipped=0, control_layers_run=0, steps=[])
    )

    def end_step(self, i: int) -> None:
        self.step = self.start_step + int(i) + 1

    def hooks(self, x: Sequence[torch.Tensor], cfg_batch: bool) -> list[ControlHook]:
        out = []
        b = len(x)
        for p in self.prepared:
            if p.spec.weight == 0 or not (p.start <= self.step < p.end):
                self.stats["controlnet_skipped"] += 1
                continue
            rows = list(range(b // 2)) if cfg_batch and p.spec.mode == "controlnet" else None
            out.append(
                ControlHook(
                    p.spec.model,
                    self.transformer,
                    x,
                    p.latent,
                    p.spec.weight,
                    p.scales,
                    rows,
                    on_forward=self._count,
                    on_block=self._count_block,
                )
            )
        return out

    def _count_block(self) -> None:
        self.stats["control_layers_run"] += 1

    def _count(self) -> None:
        self.stats["controlnet_forwards"] += 1
        self.stats["steps"].append(self.step)


def _pixels(pipe, image, width: int, height: int, field_name: str) -> torch.Tensor:
    """A guide/inpaint image as a [1, 3, H, W] tensor in [-1, 1] at the working size (tensors pass unchanged)."""
    if isinstance(image, torch.Tensor):
        t = image if image.dim() == 4 else image.unsqueeze(0)
        if t.shape[1] != 3 or tuple(t.shape[-2:]) != (height, width):
            raise RequestError(field_name, f"tensor must be [1, 3, {height}, {width}], got {list(image.shape)}")
        return t
    from PIL import Image

    from .. import images as imgs

    if not isinstance(image, Image.Image):
        image = imgs.load_image(image, field_name, None, allow_paths=True)  # the service decodes UUIDs
    return pipe.image_processor.preprocess(image.convert("RGB"), height=height, width=width)


def _type_field(name: str) -> str:
    if name.startswith("controlNet["):
        return f"{name}.controlType"
    return "--control-type" if name.startswith("--") else f"{name}.control_type"


def prepare(
    pipe, controlnets: Sequence[ControlNetInput], width: int, height: int, steps: int, work=None
) -> list[_Prepared]:
    """Validate the inputs and VAE-encode each guide image once per request (diffusers: posterior mode)."""
    out = []
    for i, cn in enumerate(controlnets):
        name = cn.field if cn.field != "controlnets" else f"controlnets[{i}]"
        if not isinstance(cn.model, ZImageControlNet):
            raise RequestError(f"{name}.model", "must be a loaded ZImageControlNet (zimage_core.controlnet)")
        if cn.mode not in MODES:
            raise RequestError(f"{name}.mode", f"must be one of {', '.join(MODES)}, got {show(cn.mode)}")
        if cn.control_type is not None:
            type_field = _type_field(name)
            if cn.control_type not in layouts.CONTROL_TYPES:
                allowed = ", ".join(layouts.CONTROL_TYPES)
                raise RequestError(type_field, f"must be one of {allowed}, got {show(cn.control_type)}")
            variant = cn.model.config.variant
            if cn.control_type not in layouts.control_types(variant):
                raise RequestError(
                    type_field,
                    f"{show(cn.control_type)} is not a guide this ControlNet's layout ({variant}) was trained on; "
                    f"allowed: {', '.join(layouts.control_types(variant))}",
                )
        if isinstance(cn.weight, bool) or not isinstance(cn.weight, (int, float)) or not -4 <= cn.weight <= 4:
            raise RequestError(f"{name}.weight", f"must be a number in [-4, 4], got {show(cn.weight)}")
        start = 0 if cn.start is None else cn.start
        end = steps if cn.end is None else cn.end
        for label, v in (("start", start), ("end", end)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise RequestError(f"{name}.{label}", f"must be an integer step, got {show(v)}")
        if not 0 <= start < end <= steps:
            raise RequestError(
                f"{name}.start", f"the window must satisfy 0 <= start < end <= steps ({steps}), got [{start}, {end})"
            )
        cfg = cn.model.config
        try:
            block_config(cfg, pipe.transformer.config)
        except ControlNetError as e:
            raise RequestError(f"{name}.model", str(e)) from None
        latent_ch = pipe.transformer.config.in_channels
        pixels = _pixels(pipe, cn.guide_image, width, height, f"{name}.guide_image")
        if cn.control_type == "gray":  # luminance, ITU-R 601 weights (what PIL's convert("L") computes)
            luma = torch.tensor([0.299, 0.587, 0.114], dtype=pixels.dtype, device=pixels.device)
            pixels = torch.einsum("bchw,c->bhw", pixels, luma)[:, None].expand(-1, 3, -1, -1)
        guide = pipe.encode_image(pixels)
        parts = [guide]
        inpaint_image = cn.inpaint_image if cn.inpaint_image is not None else (None if work is None else work.image)
        mask = cn.mask_image
        if mask is None and work is not None and work.mask is not None:
            mask = work.mask
        if mask is not None and cfg.control_in_dim >= 2 * latent_ch + 1:
            if inpaint_image is None:
                raise RequestError(f"{name}.inpaint_image", "the ControlNet-inpaint conditioning needs the image too")
            if isinstance(mask, torch.Tensor):
                m = mask if mask.dim() == 4 else mask[None]
            else:
                from .. import images as imgs

                if not hasattr(mask, "convert"):
                    mask = imgs.load_image(mask, f"{name}.mask_image", None, allow_paths=True)
                m = pipe.mask_processor.preprocess(mask, height=height, width=width)
            m = m[:, :1].to(torch.float32)
            image = _pixels(pipe, inpaint_image, width, height, f"{name}.inpaint_image").to(torch.float32)
            masked = pipe.encode_image(image * (m < 0.5))
            keep = F.interpolate(1 - m, size=guide.shape[-2:], mode="nearest").to(guide.device)
            parts += [keep, masked]
        latent = torch.cat(parts, dim=1)
        if latent.shape[1] > cfg.control_in_dim:
            raise RequestError(
                f"{name}.model", f"control_in_dim {cfg.control_in_dim} < {latent.shape[1]} input channels"
            )
        if latent.shape[1] < cfg.control_in_dim:  # 2.x without inpainting: zero channels up to control_in_dim
            pad = latent.new_zeros(1, cfg.control_in_dim - latent.shape[1], *latent.shape[-2:])
            latent = torch.cat([latent, pad], dim=1)
        latent = latent[0].unsqueeze(1).to(pipe.device, pipe.dtype)  # [C, F=1, h, w]
        out.append(_Prepared(cn, latent, start, end, layer_scales(cn.mode, len(cfg.control_layers_places))))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------------------------


def _files(path: Path) -> tuple[list[Path], Path | None]:
    """(weight files, config.json or None), through weights.py's checks: shard names inside the folder, no pickles,
    regular files only (a FIFO would block the loader)."""
    from ..weights import PICKLE_SUFFIXES, check_regular_file, weight_files

    try:
        if not path.exists():
            raise ControlNetError(f"{path}: no such file or folder")
        if path.is_dir():
            if (path / "controlnet").is_dir() and not (path / "config.json").exists():
                path = path / "controlnet"
            return weight_files(path)
        if path.suffix in PICKLE_SUFFIXES:
            raise ControlNetError(
                f"{path}: pickle checkpoints are not supported (they can execute code); use safetensors"
            )
        if path.suffix != ".safetensors":
            raise ControlNetError(f"{path}: expected a .safetensors file or a diffusers folder")
        check_regular_file(path)
        return [path], None
    except ControlNetError:
        raise
    except CheckpointError as e:
        raise ControlNetError(str(e)) from None


def _config_from(data, where: str) -> ControlNetConfig:
    if not isinstance(data, dict):
        raise ControlNetError(f"{where}: a ControlNet config must be a JSON object, got {type(data).__name__}")
    try:
        return ControlNetConfig.from_dict(data)
    except ControlNetError as e:
        raise ControlNetError(f"{where}: {str(e)[:500]}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise ControlNetError(f"{where}: invalid ControlNet config ({type(e).__name__}: {str(e)[:300]})") from None


def _block_keys(transformer_cfg: ZImageConfig) -> list[str]:
    with torch.device("meta"):
        return list(TransformerBlock(transformer_cfg.replace(n_layers=1), True).state_dict())


def infer_config(shapes: dict[str, tuple], transformer_cfg: ZImageConfig, where: str, zero_before_proj=None):
    """A single-file release carries no config: find the released layout whose tensor names are exactly these
    (``layouts.LAYOUTS``; never the file name) and take the widths from the shapes. A file matching no layout is a
    ControlNetError naming the missing and extra tensors against the nearest one."""
    layout, why = layouts.detect(shapes, _block_keys(transformer_cfg), zero_before_proj)
    if layout is None:
        raise ControlNetError(f"{where}: {why}")
    patches = [tuple(int(v) for v in p.split("-")) for p in layouts.patch_keys(shapes)]
    p, fp = patches[0]
    dim, fan_in = shapes[f"control_all_x_embedder.{p}-{fp}.weight"]
    if fan_in % (p * p * fp):
        raise ControlNetError(f"{where}: control_all_x_embedder.{p}-{fp}.weight has {fan_in} inputs, not a multiple "
                              f"of the patch size {p}·{p}·{fp}")  # fmt: skip
    return ControlNetConfig(
        control_layers_places=layout.control_layers_places,
        control_in_dim=fan_in // (p * p * fp),
        control_refiner_layers_places=tuple(range(layouts.N_REFINER)),
        add_control_noise_refiner=layout.add_control_noise_refiner,
        all_patch_size=tuple(a for a, _ in patches),
        all_f_patch_size=tuple(b for _, b in patches),
        dim=dim,
        n_refiner_layers=layouts.N_REFINER,
        n_heads=transformer_cfg.n_heads,
        n_kv_heads=transformer_cfg.n_kv_heads,
        norm_eps=transformer_cfg.norm_eps,
        qk_norm=transformer_cfg.qk_norm,
    )


def expected_parameters(config: ControlNetConfig, transformer_cfg: ZImageConfig) -> int:
    """The parameter count of a ControlNet config, without building it (one block of each kind on the meta device)."""
    bcfg = block_config(config, transformer_cfg)

    def count(module) -> int:
        return sum(t.numel() for t in module.state_dict().values())

    with torch.device("meta"):
        first, other, plain = (
            count(ControlBlock(bcfg, 0)),
            count(ControlBlock(bcfg, 1)),
            count(TransformerBlock(bcfg, True)),
        )
    n = len(config.control_layers_places)
    total = first + (n - 1) * other
    total += sum((fp * p * p * config.control_in_dim + 1) * config.dim
                 for p, fp in zip(config.all_patch_size, config.all_f_patch_size))  # fmt: skip
    if config.add_control_noise_refiner is None:
        total += config.n_refiner_layers * plain
    elif config.add_control_noise_refiner == "control_noise_refiner":
        total += first + (config.n_refiner_layers - 1) * other
    return total


def _check_size(config: ControlNetConfig, transformer_cfg, files: list[Path], where: str) -> None:
    """Refuse a config that promises more parameters than the files can hold, before building anything of that size."""
    expected = expected_parameters(config, transformer_cfg)
    file_bytes = sum(f.stat().st_size for f in files)
    if expected > file_bytes:  # every parameter takes at least one byte on disk
        raise ControlNetError(
            f"{where}: the config describes {expected:,} parameters but the checkpoint files hold {file_bytes:,} "
            "bytes; the config does not belong to these weights"
        )


def load_controlnet(
    path: str | Path,
    transformer: ZImageTransformer,
    *,
    config: ControlNetConfig | dict | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> ZImageControlNet:
    """Load a ControlNet for ``transformer``: a diffusers folder (config.json + safetensors, sharded or not) or a
    single ``.safetensors`` release of any released layout (``layouts.LAYOUTS``, told apart by the tensor names).
    Defaults: the transformer's dtype and device.

    Files are found and read with ``weights.py``'s checks (shards inside the folder, regular files only, no
    pickles); a config whose parameter count the files cannot hold is refused before anything is built. Tensors are
    read straight into a model built on the meta device (no second copy); the 2.0 layout's unused
    ``control_noise_refiner.*`` tensors are not read at all.
    """
    return load_checked(
        path, transformer.config, config, dtype or transformer.dtype, device or transformer.device,
        lambda cfg: ZImageControlNet(cfg, transformer.config),
    )  # fmt: skip


def _header(files: list[Path]):
    """``weights.read_header`` (names, shapes, metadata of the files), its refusals as ControlNetError."""
    try:
        return read_header(files)
    except CheckpointError as e:
        raise ControlNetError(str(e)) from None


def released_transformer_config(path: str | Path) -> ZImageConfig:
    """For a single file loaded without a transformer (the drop-in's ``from_single_file``): the block shapes of
    the released transformer the file's control blocks were made for (30 main layers, 2 refiner layers, the width
    and head size read from the tensors)."""
    path = Path(path).expanduser()
    files, _ = _files(path)
    _, shapes, _ = _header(files)
    key = "control_layers.0.attention.norm_q.weight"
    emb = [k for k in shapes if re.fullmatch(r"control_all_x_embedder\.\d+-\d+\.weight", k)]
    if key not in shapes or not emb or len(shapes[key]) != 1 or len(shapes[emb[0]]) != 2:
        raise ControlNetError(f"{path}: no {key} / control_all_x_embedder: not a Z-Image ControlNet checkpoint")
    head_dim, dim = shapes[key][0], shapes[emb[0]][0]
    if head_dim < 1 or dim % head_dim:
        raise ControlNetError(f"{path}: width {dim} is not a multiple of the head size {head_dim}")
    return ZImageConfig(
        dim=dim, n_layers=30, n_refiner_layers=layouts.N_REFINER, n_heads=dim // head_dim,
        n_kv_heads=dim // head_dim, axes_dims=(head_dim,), axes_lens=(1,),
    )  # fmt: skip


def load_checked(path, transformer_cfg: ZImageConfig, config, dtype, device, build: Callable) -> nn.Module:
    """load_controlnet's body; ``build(config)`` makes the (meta-device) model."""
    from ..weights import check_state_dict, read_json

    path = Path(path).expanduser()
    files, config_json = _files(path)
    where, shapes, meta = _header(files)
    where = {k: f for k, (f, _) in where.items()}
    source = "config"  # where the config came from, for the errors
    if isinstance(config, dict):
        config = _config_from(config, source)
    if config is None and config_json is not None:
        try:
            data = read_json(config_json, "ControlNet config")
        except CheckpointError as e:
            raise ControlNetError(str(e)) from None
        source = str(config_json)
        config = _config_from(data, source)
    if config is None and CONFIG_KEY in meta:
        try:
            data = json.loads(meta[CONFIG_KEY])
        except (json.JSONDecodeError, RecursionError) as e:
            raise ControlNetError(f"{path}: invalid config in the safetensors metadata ({str(e)[:200]})") from None
        source = f"{path} (metadata {CONFIG_KEY})"
        config = _config_from(data, source)
    shapes = {k: v for k, v in shapes.items() if not k.startswith(SHARED_PREFIXES)}
    if config is None:
        zero = None
        if layouts.ZERO_CHECK_KEY in shapes:
            with safe_open(where[layouts.ZERO_CHECK_KEY], framework="pt") as h:
                zero = bool((h.get_tensor(layouts.ZERO_CHECK_KEY) == 0).all())
        config = infer_config(shapes, transformer_cfg, str(path), zero)
        source = f"{path} (the layout read from its tensor names)"
    try:
        _check_size(config, transformer_cfg, files, source)
    except ControlNetError as e:
        raise ControlNetError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise ControlNetError(f"{source}: the config cannot be built ({type(e).__name__}: {str(e)[:200]})") from None
    if config.add_control_noise_refiner == "control_layers":  # diffusers' 2.0 conversion drops these
        shapes = {k: v for k, v in shapes.items() if not k.startswith("control_noise_refiner.")}
    with torch.device("meta"):
        model = build(config)
    try:
        check_state_dict(model, shapes, str(path))
    except CheckpointError as e:
        raise ControlNetError(str(e)) from None
    sd = {}
    for f in dict.fromkeys(where[k] for k in shapes):
        with safe_open(f, framework="pt") as h:
            for k in shapes:
                if where[k] == f:
                    t = h.get_tensor(k)
                    sd[k] = (t.to(dtype) if t.is_floating_point() else t).to(device)
    model.load_state_dict(sd, assign=True)
    return model.eval()


def from_diffusers(module: nn.Module, transformer: ZImageTransformer) -> ZImageControlNet:
    """Our ControlNet sharing the parameters of a live diffusers ``ZImageControlNetModel`` (no copy)."""
    from ..weights import check_state_dict

    config = ControlNetConfig.from_dict(dict(module.config))
    with torch.device("meta"):
        model = ZImageControlNet(config, transformer.config)
    sd = {k: v for k, v in module.state_dict().items() if not k.startswith(SHARED_PREFIXES)}
    check_state_dict(model, {k: tuple(v.shape) for k, v in sd.items()}, type(module).__name__)
    model.load_state_dict(sd, assign=True)
    return model.eval()


def save_controlnet(model: ZImageControlNet, folder: str | Path) -> Path:
    """A diffusers ``ZImageControlNetModel`` folder (config.json + diffusion_pytorch_model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    return folder


def save_single_file(model: ZImageControlNet, path: str | Path, with_config: bool = False) -> Path:
    """One .safetensors file with the release's key names; ``with_config`` also stores our config in the metadata
    (the releases do not, so by default the loader has to infer it)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt"}
    if with_config:
        meta[CONFIG_KEY] = json.dumps(model.config.to_dict())
    save_file(sd, Path(path), metadata=meta)
    return Path(path)


# ---------------------------------------------------------------------------------------------------------------
# Model ids (the request's controlNet[].model)
# ---------------------------------------------------------------------------------------------------------------


def builtin_path() -> Path:
    from ..default_model import ASSET_DIR

    return ASSET_DIR.parent / "default-controlnet"


class ControlNetStore:
    """A pluggable resolver ``(model id, field) -> ZImageControlNet`` for one pipeline, like ``lora.LoraStore``.

    Knows ``zimage:default-controlnet`` (the embedded control model, only for the embedded default transformer)
    and any ids registered with :meth:`add` (a path or a loaded model); loads each once.
    """

    def __init__(self, pipe, paths: dict[str, str | Path] | None = None):
        self.pipe = pipe
        self.paths: dict[str, object] = dict(paths or {})
        self._loaded: dict[str, ZImageControlNet] = {}
        meta = builtin_path() / "zimage_fast.json"
        if meta.exists() and json.loads(meta.read_text()).get("for_model") == getattr(pipe, "meta", {}).get("model_id"):
            self.paths.setdefault(BUILTIN_ID, builtin_path())  # trained for this (the embedded default) model

    def add(self, model_id: str, source) -> None:
        self.paths[model_id] = source
        self._loaded.pop(model_id, None)

    def __call__(self, model_id: str, field_name: str) -> ZImageControlNet:
        if model_id in self._loaded:
            return self._loaded[model_id]
        if model_id not in self.paths:
            known = ", ".join(sorted(self.paths)) or "none"
            raise RequestError(field_name, f"unknown ControlNet model {show(model_id)} (known: {known})")
        src = self.paths[model_id]
        model = src if isinstance(src, ZImageControlNet) else load_controlnet(src, self.pipe.transformer)
        self._loaded[model_id] = model
        return model


def store_for(pipe) -> ControlNetStore:
    """The pipeline's default ControlNet store (created on first use; knows the embedded control model)."""
    store = getattr(pipe, "_controlnet_store", None)
    if store is None:
        store = pipe._controlnet_store = ControlNetStore(pipe)
    return store


def resolve_local(pipe, model: str, field_name: str) -> ZImageControlNet:
    """Python API / CLI: a store id (``zimage:default-controlnet``) or a local folder / .safetensors path."""
    store = store_for(pipe)
    if model not in store.paths:
        if not Path(model).expanduser().exists():
            known = ", ".join(sorted(store.paths)) or "none"
            raise RequestError(field_name, f"{show(model)} is neither a known ControlNet id ({known}) nor a path")
        store.add(model, Path(model).expanduser())
    return store(model, field_name)


__all__ = [
    "BUILTIN_ID",
    "ControlBlock",
    "ControlHook",
    "ControlNetConfig",
    "ControlNetError",
    "ControlNetInput",
    "ControlNetStore",
    "ControlState",
    "CONTROL_TYPES",
    "MODES",
    "ZImageControlNet",
    "expected_parameters",
    "from_diffusers",
    "layouts",
    "load_checked",
    "layer_scales",
    "load_controlnet",
    "prepare",
    "released_transformer_config",
    "resolve_local",
    "store_for",
    "save_controlnet",
    "save_single_file",
]

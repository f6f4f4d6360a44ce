"""Configuration of the Z-Image transformer, with named presets.

Field names follow diffusers' ``ZImageTransformer2DModel`` config (``transformer/config.json``), so a checkpoint's
config loads unchanged through :meth:`ZImageConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

ADALN_EMBED_DIM = 256  # width of the timestep embedding that drives every adaLN (min(dim, 256))
SEQ_MULTI_OF = 32  # captions and images are padded to a multiple of this many tokens
T_EMBED_MID = 1024  # hidden width of the timestep MLP
SEED_MAX = 2**63 - 1  # seeds are in [0, SEED_MAX]; result i uses seed (seed + i) mod (SEED_MAX + 1)
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short name -> torch dtype name


@dataclass(frozen=True)
class ZImageConfig:
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30  # kept for config compatibility; diffusers ignores it (no GQA)
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1536, 512, 512)
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # unknown config.json keys, kept

    def __post_init__(self):
        errors = []
        for name in ("in_channels", "dim", "n_layers", "n_refiner_layers", "n_heads", "n_kv_heads", "cap_feat_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "n_refiner_layers" else 1):
                errors.append(f"{name} must be a positive integer, got {str(v)[:40]}")
        for name in ("norm_eps", "rope_theta", "t_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                errors.append(f"{name} must be a positive finite number, got {str(v)[:40]}")
        for name in self._TUPLE_FIELDS:
            v = getattr(self, name)
            if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                errors.append(f"{name} must be a non-empty list of positive integers, got {str(v)[:60]}")
        if errors:
            raise ValueError("invalid ZImageConfig: " + "; ".join(errors))
        if self.dim % self.n_heads:
            errors.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        elif sum(self.axes_dims) != self.head_dim:
            errors.append(f"sum(axes_dims) {list(self.axes_dims)} must equal head_dim {self.head_dim}")
        if any(d % 2 for d in self.axes_dims):
            errors.append(f"every axes_dims entry must be even, got {list(self.axes_dims)}")
        if len(self.axes_dims) != len(self.axes_lens):
            errors.append("axes_dims and axes_lens must have the same length")
        if len(self.all_patch_size) != len(self.all_f_patch_size):
            errors.append("all_patch_size and all_f_patch_size must have the same length")
        if errors:
            raise ValueError("invalid ZImageConfig: " + "; ".join(errors))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def ffn_dim(self) -> int:
        return int(self.dim / 3 * 8)

    @property
    def out_channels(self) -> int:
        return self.in_channels

    # ---- (de)serialisation in diffusers' config.json format ------------------------------------------------
    _TUPLE_FIELDS = ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens")

    @classmethod
    def from_dict(cls, d: dict) -> ZImageConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a transformer config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs, extra = {}, {}
        for k, v in d.items():
            if k in names:
                if k in cls._TUPLE_FIELDS and not isinstance(v, (list, tuple)):
                    raise ValueError(f"invalid ZImageConfig: {k} must be a list of integers, got {str(v)[:40]}")
                kwargs[k] = tuple(v) if k in cls._TUPLE_FIELDS else v
            else:
                extra[k] = v
        if extra.get("siglip_feat_dim") is not None:
            raise ValueError(
                "this checkpoint is the Omni variant (siglip_feat_dim is set); only the text-to-image "
                "transformer is supported"
            )
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> ZImageConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for k in self._TUPLE_FIELDS:
            d[k] = list(d[k])
        return {"_class_name": "ZImageTransformer2DModel", **d}

    def replace(self, **changes) -> ZImageConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str) -> ZImageConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown transformer preset {name!r}; known: {sorted(PRESETS)}") from None


PRESETS: dict[str, ZImageConfig] = {
    # The released checkpoints (Tongyi-MAI/Z-Image and Z-Image-Turbo share the transformer shape): 6,154,908,736
    # parameters.
    "z-image": ZImageConfig(),
    # Small configs for tests and the embedded default; real values in comments.
    "tiny": ZImageConfig(
        dim=64,  # 3840
        n_layers=2,  # 30
        n_refiner_layers=1,  # 2
        n_heads=2,  # 30 -> head_dim 32 (128)
        n_kv_heads=2,
        cap_feat_dim=16,  # 2560
        axes_dims=(8, 12, 12),  # (32, 48, 48)
        axes_lens=(256, 32, 32),  # (1536, 512, 512)
    ),
}

"""Reading, checking and saving Z-Image transformer checkpoints (safetensors only).

Reading and checking checkpoint files; building the model from them is ``zimage_core.model.load_transformer``
(this module does not import the model, so the model's ``from_pretrained`` can use it). Accepted inputs:

- a diffusers pipeline folder (``model_index.json`` + ``transformer/``) or its ``transformer/`` folder: ``config.json``
  plus ``diffusion_pytorch_model.safetensors`` or sharded ``*.safetensors`` with an ``.index.json``;
- a single ``.safetensors`` file in diffusers layout (``layers.0.attention.to_q.weight``, ...);
- a single ``.safetensors`` file in the ComfyUI layout (``x_embedder.``, ``final_layer.``, fused
  ``attention.qkv.weight``, ``attention.out``, ``q_norm``/``k_norm``; optional ``model.diffusion_model.`` prefix),
  converted exactly as diffusers' ``convert_z_image_transformer_checkpoint_to_diffusers`` does.

Pickle checkpoints (``.bin``, ``.pt``, ``.ckpt``, ``.pth``) are refused: loading them executes arbitrary code.
The model is built on the meta device and each tensor is read straight into its parameter (``assign=True``), so
the 6B model never exists twice in host memory.
"""

from __future__ import annotations

import json
import math
import re
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import PRESETS, ZImageConfig

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_KEY = "zimage_config"  # safetensors metadata key under which we store our config in single files

# ComfyUI single-file names -> diffusers names (diffusers' Z_IMAGE_KEYS_RENAME_DICT, applied in this order).
COMFY_RENAMES = (
    ("final_layer.", "all_final_layer.2-1."),
    ("x_embedder.", "all_x_embedder.2-1."),
    (".attention.out.bias", ".attention.to_out.0.bias"),
    (".attention.k_norm.weight", ".attention.norm_k.weight"),
    (".attention.q_norm.weight", ".attention.norm_q.weight"),
    (".attention.out.weight", ".attention.to_out.0.weight"),
    ("model.diffusion_model.", ""),
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and where."""


# ---------------------------------------------------------------------------------------------------------------
# Locating weight files
# ---------------------------------------------------------------------------------------------------------------


MAX_JSON_BYTES = 16 * 2**20  # config / index / scheduler JSON files are a few KiB; refuse anything absurd


def check_regular_file(path: Path) -> None:
    """Refuse anything that is not a regular file (a FIFO would block the process on open, a device never ends)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file")


def read_json(path: str | Path, what: str = "JSON file") -> dict:
    """A JSON object from ``path``; every failure (not a regular file, too large, not UTF-8, malformed JSON, not an
    object) is a CheckpointError naming the file."""
    path = Path(path)
    check_regular_file(path)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {what} is larger than {MAX_JSON_BYTES // 2**20} MiB")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a valid {what} ({type(e).__name__}: {str(e)[:200]})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or type(e).__name__})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: a {what} must be a JSON object, got {type(data).__name__}")
    return data


def config_from_json(path: str | Path) -> ZImageConfig:
    """A transformer config.json; a malformed or inconsistent one is a CheckpointError naming the file."""
    data = read_json(path, "transformer config")
    try:
        return ZImageConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {str(e)[:500]}") from None


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path}: pickle checkpoints are not supported (loading them can execute arbitrary code); convert it to "
        ".safetensors first, e.g. safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')"
    )


def _weight_files(folder: Path) -> tuple[list[Path], Path | None]:
    """(safetensors files, config.json or None) of a transformer folder."""
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = read_json(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: not a valid safetensors index (needs a weight_map of file names)")
        root = folder.resolve()
        files = []
        for name in sorted(set(weight_map.values())):
            shard = (folder / name).resolve()
            # a shard must be a file name inside this folder: no absolute paths, no ../, no symlink out
            if Path(name).is_absolute() or ".." in Path(name).parts or shard.parent != root:
                raise CheckpointError(f"{index}: shard path {name[:200]!r} points outside {folder}")
            files.append(folder / name)
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing[:10]}")
    elif (folder / WEIGHTS_NAME).exists():
        files = [folder / WEIGHTS_NAME]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle(folder / pickles[0])
        raise CheckpointError(f"{folder}: no weights found (expected {WEIGHTS_NAME}, {INDEX_NAME} or *.safetensors)")
    for f in files:
        check_regular_file(f)
    config = folder / "config.json"
    return files, config if config.exists() else None


weight_files = _weight_files  # public name: the ControlNet loader reads its folders with the same checks


def check_safetensors_component(folder: Path) -> None:
    """A text_encoder/ or vae/ folder must hold its weights as .safetensors (regular files): transformers and
    diffusers would otherwise unpickle a ``.bin``, which can execute arbitrary code."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    tensors = sorted(folder.glob("*.safetensors"))
    if not tensors:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle(folder / pickles[0])
        raise CheckpointError(f"{folder}: no .safetensors weights found")
    for f in tensors:
        check_regular_file(f)
    for name in ("config.json", "model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json"):
        if (folder / name).exists():
            read_json(folder / name, name)


def resolve_checkpoint(path: str | Path) -> tuple[list[Path], Path | None]:
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "model_index.json").exists():
            sub = path / "transformer"
            if not sub.is_dir():
                raise CheckpointError(f"{path}: pipeline folder without a transformer/ subfolder")
            path = sub
        return _weight_files(path)
    if path.suffix in PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: expected a .safetensors file or a diffusers folder")
    check_regular_file(path)
    config = path.with_name("config.json")
    return [path], config if config.exists() else None


# ---------------------------------------------------------------------------------------------------------------
# Key layouts
# ---------------------------------------------------------------------------------------------------------------


def is_comfy_layout(keys: Iterable[str]) -> bool:
    return any(
        k.startswith(("model.diffusion_model.", "final_layer.", "x_embedder.")) or ".attention.qkv.weight" in k
        for k in keys
    )


def comfy_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI single-file state dict -> diffusers names (fused qkv split with ``chunk(3, dim=0)``)."""
    out = {}
    for key, value in sd.items():
        new = key
        for old, repl in COMFY_RENAMES:
            new = new.replace(old, repl)
        if new == "norm_final.weight":
            continue
        if new.endswith(".attention.qkv.weight"):
            q, k, v = torch.chunk(value, 3, dim=0)
            stem = new[: -len("qkv.weight")]
            out[stem + "to_q.weight"], out[stem + "to_k.weight"], out[stem + "to_v.weight"] = q, k, v
        else:
            out[new] = value
    return out


def diffusers_to_comfy(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Inverse of :func:`comfy_to_diffusers` (fuses q/k/v), for writing ComfyUI-layout files."""
    out = {}
    for key, value in sd.items():
        if re.search(r"\.attention\.to_[kv]\.weight$", key):
            continue
        if key.endswith(".attention.to_q.weight"):
            stem = key[: -len("to_q.weight")]
            value = torch.cat([sd[stem + "to_q.weight"], sd[stem + "to_k.weight"], sd[stem + "to_v.weight"]])
            key = stem + "qkv.weight"
        key = (
            key.replace("all_final_layer.2-1.", "final_layer.")
            .replace("all_x_embedder.2-1.", "x_embedder.")
            .replace(".attention.to_out.0.", ".attention.out.")
            .replace(".attention.norm_q.", ".attention.q_norm.")
            .replace(".attention.norm_k.", ".attention.k_norm.")
        )
        out[prefix + key] = value
    return out


def infer_config(shapes: dict[str, tuple[int, ...]], where: str) -> ZImageConfig:
    """A config from a diffusers-layout state dict's shapes (axes_dims/axes_lens: the real model's, if head_dim 128)."""

    def need(key):
        if key not in shapes:
            raise CheckpointError(f"{where}: cannot infer the model config, key {key!r} is missing; pass config=")
        return shapes[key]

    dim = need("x_pad_token")[1]
    head_dim = need("layers.0.attention.norm_q.weight")[0]
    n_layers = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k)))
    n_ref = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"noise_refiner\.(\d+)\.", k))), default=-1)
    embedders = sorted(k.split(".")[1] for k in shapes if k.startswith("all_x_embedder.") and k.endswith(".weight"))
    patches = [tuple(int(v) for v in e.split("-")) for e in embedders]
    p, fp = patches[0]
    real = PRESETS["z-image"]
    if head_dim != real.head_dim:
        raise CheckpointError(
            f"{where}: head_dim {head_dim} differs from the released model's, so the RoPE axes cannot be inferred; "
            "pass config= (a ZImageConfig, a preset name or a config.json)"
        )
    return ZImageConfig(
        all_patch_size=tuple(q for q, _ in patches),
        all_f_patch_size=tuple(f for _, f in patches),
        in_channels=need(f"all_x_embedder.{p}-{fp}.weight")[1] // (p * p * fp),
        dim=dim,
        n_layers=n_layers,
        n_refiner_layers=n_ref,
        n_heads=dim // head_dim,
        n_kv_heads=dim // head_dim,
        cap_feat_dim=need("cap_embedder.0.weight")[0],
        axes_dims=real.axes_dims,
        axes_lens=real.axes_lens,
    )


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def as_config(config) -> ZImageConfig | None:
    if config is None or isinstance(config, ZImageConfig):
        return config
    if isinstance(config, str) and config in PRESETS:
        return PRESETS[config]
    if not isinstance(config, dict):
        return config_from_json(config)
    try:
        return ZImageConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config: {str(e)[:500]}") from None


def read_header(files: list[Path]) -> tuple[dict[str, tuple[Path, str]], dict[str, tuple[int, ...]], dict]:
    """key -> (file, stored key), key -> shape, merged metadata; without reading tensor data."""
    where, shapes, meta = {}, {}, {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as h:
                meta.update(h.metadata() or {})
                for k in h.keys():
                    where[k] = (f, k)
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return where, shapes, meta


def check_size(
    cfg, shapes: dict[str, tuple[int, ...]], files: list[Path], where: str, expected_parameters: Callable[..., int]
) -> None:
    """Refuse a config whose parameter count the checkpoint cannot hold, before anything of that size is built (a
    config.json saying ``n_layers: 10000000`` would otherwise allocate until memory runs out).
    ``expected_parameters(cfg)`` counts the parameters of the model a config describes (the model's module has it)."""
    stored = sum(math.prod(s) for s in shapes.values())
    file_bytes = sum(f.stat().st_size for f in files)
    try:
        expected = expected_parameters(cfg)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{where}: the config cannot be built ({type(e).__name__}: {str(e)[:200]})") from None
    if expected > file_bytes:  # every parameter takes at least one byte on disk
        raise CheckpointError(
            f"{where}: the config describes {expected:,} parameters but the checkpoint files hold {stored:,} in "
            f"{file_bytes:,} bytes; the config does not belong to these weights"
        )


def check_state_dict(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise a CheckpointError naming every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {shapes[k]} vs model {expected[k]}"
        for k in set(shapes) & set(expected)
        if shapes[k] != expected[k]
    )
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", wrong)):
            if items:
                more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{label} ({len(items)}): {', '.join(items[:10])}{more}")
        raise CheckpointError(f"{where}: checkpoint does not match the model config: " + "; ".join(parts))


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI "scaled fp8" single files
# ---------------------------------------------------------------------------------------------------------------

SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's marker key (an empty tensor whose dtype is the fp8 format used)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def scaled_fp8_keys(shapes: dict[str, tuple[int, ...]], where: str) -> list[str]:
    """The keys of a ComfyUI "scaled fp8" file that are not model tensors: the marker (``[prefix]scaled_fp8``),
    ``<layer>.scale_weight`` and ``<layer>.scale_input`` (static input scales; we quantize activations
    dynamically, so they are read and not used). Empty for other files; ``.scale_weight`` keys without the marker
    are a CheckpointError."""
    extra = [k for k in shapes if k.endswith((".scale_weight", ".scale_input"))]
    markers = [k for k in shapes if k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER)]
    if extra and not markers:
        raise CheckpointError(
            f"{where}: has '.scale_weight'/'.scale_input' keys (e.g. {extra[0]}) but no '{SCALED_FP8_MARKER}' marker "
            "key: not a ComfyUI scaled-fp8 file this loader knows"
        )
    return extra + markers if markers else []


def float_dtype(sd: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the checkpoint's unquantized floating tensors (what dequantized fp8 weights become)."""
    return next((v.dtype for v in sd.values() if v.is_floating_point() and v.dtype not in FP8_DTYPES), torch.bfloat16)


def split_scaled_fp8(sd, scale_sd, comfy: bool, where: str, dtype: torch.dtype):
    """(state dict with every fp8 weight dequantized to ``dtype``, {layer: (e4m3 codes, fp32 per-channel scale)}).

    A ComfyUI scaled-fp8 file stores ``<layer>.weight`` as float8_e4m3fn and ``<layer>.scale_weight`` (one fp32
    scale per tensor): ``W = codes · scale_weight``. The per-tensor scale becomes a per-output-channel one (the same
    value in every row, exact); a fused ``attention.qkv`` splits into q, k, v codes sharing the scale. Checks: every
    scale belongs to an e4m3 weight and is one finite positive number; every fp8 weight has a scale; no e5m2; no
    e4m3 NaN codes.
    """
    marker = next(k for k in scale_sd if k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER))
    if scale_sd[marker].dtype != torch.float8_e4m3fn:
        raise CheckpointError(
            f"{where}: the '{marker}' marker says {scale_sd[marker].dtype}; only float8_e4m3fn scaled files are read"
        )
    scales = {}
    for k, v in scale_sd.items():
        if not k.endswith(".scale_weight"):
            continue
        wkey = k[: -len(".scale_weight")] + ".weight"
        if wkey not in sd:
            raise CheckpointError(f"{where}: {k} scales {wkey}, which is not in the file")
        if sd[wkey].dtype != torch.float8_e4m3fn:
            raise CheckpointError(f"{where}: {k} scales {wkey}, which is {sd[wkey].dtype}, not float8_e4m3fn")
        if v.numel() != 1 or not v.is_floating_point():
            raise CheckpointError(f"{where}: {k} must be one floating-point number (per-tensor), got {tuple(v.shape)}")
        s = float(v.float().reshape(()))
        if not (s > 0 and s < float("inf")):
            raise CheckpointError(f"{where}: {k} = {s} must be a finite positive number")
        scales[wkey] = s
    for k, v in sd.items():
        if v.dtype == torch.float8_e5m2:
            raise CheckpointError(f"{where}: {k} is float8_e5m2; only float8_e4m3fn weights are read")
        if v.dtype == torch.float8_e4m3fn:
            if k not in scales:
                raise CheckpointError(f"{where}: {k} is float8_e4m3fn but has no {k[: -len('weight')]}scale_weight")
            if torch.isnan(v.float()).any():
                raise CheckpointError(f"{where}: {k} holds e4m3 NaN codes")
    codes_sd = {k: sd[k] for k in scales}
    scale_rows = {k: torch.full((sd[k].shape[0],), scales[k]) for k in scales}
    if comfy:  # rename (and split fused qkv) codes and their per-row scales the same way as the weights
        codes_sd, scale_rows = comfy_to_diffusers(codes_sd), comfy_to_diffusers(scale_rows)
    codes = {k[: -len(".weight")]: (codes_sd[k], scale_rows[k]) for k in codes_sd}
    out = dict(sd)
    for k, s in scales.items():
        out[k] = (sd[k].float() * s).to(dtype)
    return out, codes


# ---------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------


def save_transformer(model: torch.nn.Module, folder: str | Path, max_shard_bytes: int | None = None) -> Path:
    """Write a diffusers ``transformer/`` folder (config.json + safetensors, sharded with an index if asked)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if max_shard_bytes is None:
        save_file(sd, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        return folder
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = v, size + nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return folder


def save_single_file(model: torch.nn.Module, path: str | Path, layout: str = "diffusers", prefix: str = "") -> Path:
    """One .safetensors file in ``diffusers`` or ``comfyui`` layout; our config goes into the metadata."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if layout == "comfyui":
        sd = diffusers_to_comfy(sd, prefix=prefix)
    elif layout != "diffusers":
        raise ValueError(f"layout must be 'diffusers' or 'comfyui', got {layout!r}")
    path = Path(path)
    save_file(sd, path, metadata={"format": "pt", CONFIG_KEY: json.dumps(model.config.to_dict())})
    return path

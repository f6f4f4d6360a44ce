"""The non-transformer components of a Z-Image pipeline folder, and a builder for small offline pipelines.

A diffusers-format Z-Image folder (Tongyi-MAI/Z-Image, Z-Image-Turbo) holds ``model_index.json`` and the subfolders
``transformer/`` (ours: ``zimage_core.weights``), ``text_encoder/`` (Qwen3Model, transformers), ``tokenizer/``
(Qwen2Tokenizer), ``vae/`` (AutoencoderKL, diffusers) and ``scheduler/`` (FlowMatchEulerDiscreteScheduler config:
only its shift settings are used, the sampling loop is ours).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ZImageConfig
from .model import ZImageTransformer
from .weights import CheckpointError, read_json, save_transformer

# A Qwen3-style chat template (the parts Z-Image uses): user turn, then the assistant header; the empty think block
# is emitted only when enable_thinking is false, exactly like Qwen3's own template.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@dataclass(frozen=True)
class SchedulerSettings:
    """What our samplers take from ``scheduler/scheduler_config.json``."""

    shift: float = 3.0
    use_dynamic_shifting: bool = False
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_folder(cls, folder: Path) -> SchedulerSettings | None:
        path = folder / "scheduler_config.json"
        if not path.exists():
            return None
        d = read_json(path, "scheduler config")
        if d.get("time_shift_type", "exponential") != "exponential" and d.get("use_dynamic_shifting"):
            raise CheckpointError(f"{path}: only exponential dynamic shifting is supported")
        keys = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        for k, v in keys.items():
            want = bool if k == "use_dynamic_shifting" else (int if "seq_len" in k else (int, float))
            ok = isinstance(v, want) and (k == "use_dynamic_shifting" or not isinstance(v, bool))
            if not ok or (isinstance(v, float) and not math.isfinite(v)) or (isinstance(v, int) and abs(v) > 2**53):
                raise CheckpointError(f"{path}: {k} must be a {getattr(want, '__name__', 'number')}, got {str(v)[:40]}")
        if keys.get("shift", 1.0) <= 0:
            raise CheckpointError(f"{path}: shift must be > 0")
        if keys.get("max_image_seq_len", 4096) == keys.get("base_image_seq_len", 256):
            raise CheckpointError(f"{path}: max_image_seq_len must differ from base_image_seq_len")
        return cls(**keys)

    def shift_for(self, image_seq_len: int) -> float:
        """The static shift, or with dynamic shifting exp(mu): σ' = e^mu·σ / (1 + (e^mu − 1)·σ) is the same map."""
        if not self.use_dynamic_shifting:
            return float(self.shift)
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        mu = image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)
        return math.exp(mu)


def byte_level_tokenizer():
    """A Qwen2Tokenizer over the 256 byte symbols (no merges) plus Qwen's chat specials; built offline in ms."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def small_text_encoder(hidden: int, vocab_size: int, layers: int = 2, heads: int = 2, seed: int = 0):
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    return Qwen3Model(cfg).eval()


def small_vae(channels=(16, 32, 32, 32), seed: int = 0, groups: int = 8, scaling_factor=0.3611, shift_factor=0.1159):
    """AutoencoderKL with Z-Image's latent layout: 16 channels, ×8 downsampling (4 levels), FLUX scaling/shift
    unless given; ``groups`` GroupNorm groups."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(channels),
        up_block_types=["UpDecoderBlock2D"] * len(channels),
        block_out_channels=list(channels),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=groups,
        sample_size=128,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def save_pipeline_folder(
    folder: str | Path,
    transformer: ZImageTransformer,
    text_encoder,
    tokenizer,
    vae,
    shift: float = 3.0,
    extra: dict | None = None,
) -> Path:
    """Write a diffusers-format Z-Image folder that diffusers' ``ZImagePipeline.from_pretrained`` loads unchanged."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_transformer(transformer, folder / "transformer")
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(folder / "tokenizer")
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False).save_config(folder / "scheduler")
    index = {
        "_class_name": "ZImagePipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3Model"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "ZImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    if extra:
        (folder / "zimage_fast.json").write_text(json.dumps(extra, indent=2))
    return folder


RANDOM_TRANSFORMER = ZImageConfig(
    dim=64,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    cap_feat_dim=32,
    axes_dims=(8, 12, 12),
    axes_lens=(1536, 160, 160),  # room for 512-token captions and 2048-px images (latent 256 -> 128 patches)
)


def build_random_pipeline(folder: str | Path, seed: int = 0, config: ZImageConfig = RANDOM_TRANSFORMER) -> Path:
    """A small pipeline folder with random weights (byte-level tokenizer, Qwen3 text encoder, ×8 VAE)."""
    tok = byte_level_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer(config)
    with torch.no_grad():  # diffusers initialises these to zeros/ones; random values exercise every path
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    enc = small_text_encoder(config.cap_feat_dim, len(tok), seed=seed + 1)
    vae = small_vae(seed=seed + 2)
    return save_pipeline_folder(folder, transformer, enc, tok, vae, extra={"kind": "random", "seed": seed})

"""Loading and saving the drop-in pipelines as diffusers does: per-component dtype maps, the ``dtype`` alias,
variants (and the error for a missing one), components set to ``None``, and the loader's log lines.

Written from what diffusers' common pipeline tests check (``tests/pipelines/test_pipelines_common.py`` in diffusers'
repository: ``test_dtype_dict``, ``test_dtype_alias``, ``test_serialization_with_variants``,
``test_loading_with_variants``, ``test_loading_with_incorrect_variants_raises_error``,
``test_save_load_optional_components``, ``test_save_load_local``); each test runs on diffusers' classes and on ours.
"""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import diffusers
import pytest
import torch

import zimage_core.diffusers as zd


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from zimage_core.components import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("dload") / "pipe", seed=6)


@pytest.fixture(scope="module", params=["diffusers", "zimage"])
def impl(request):
    mod = diffusers if request.param == "diffusers" else zd
    return SimpleNamespace(
        name=request.param,
        classes=(mod.ZImagePipeline, mod.ZImageImg2ImgPipeline, mod.ZImageInpaintPipeline),
        Transformer=mod.ZImageTransformer2DModel,
    )


def modules(pipe) -> dict:
    return {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def latents(pipe):
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=1.5)
    return pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_dtype_dict(impl, folder):
    for cls in impl.classes:
        for key in ("dtype", "torch_dtype"):
            dtypes = {"transformer": torch.bfloat16, "default": torch.float16}
            pipe = cls.from_pretrained(folder, **{key: dtypes})
            assert isinstance(pipe.transformer, impl.Transformer)
            for name, m in modules(pipe).items():
                assert m.dtype == dtypes.get(name, dtypes["default"]), (cls.__name__, key, name, m.dtype)


def test_dtype_alias(impl, folder):
    pipe = impl.classes[0].from_pretrained(folder, dtype=torch.float16)
    assert {m.dtype for m in modules(pipe).values()} == {torch.float16}


def test_variants_save_and_load(impl, folder, tmp_path):
    pipe = impl.classes[0].from_pretrained(folder)
    pipe.save_pretrained(tmp_path, variant="fp16", safe_serialization=False)
    index = json.loads((tmp_path / "model_index.json").read_text())
    for name in modules(pipe):
        assert name in index
        assert any(f.split(".")[1].startswith("fp16") for f in os.listdir(tmp_path / name)), name
    loaded = impl.classes[0].from_pretrained(tmp_path, variant="fp16")
    assert isinstance(loaded.transformer, impl.Transformer)
    for name, m in modules(pipe).items():
        got = dict(modules(loaded)[name].named_parameters())
        for pname, p in m.named_parameters():
            if pname in got:  # tied weights are not saved with variants (transformers v5)
                assert torch.equal(p, got[pname]), (name, pname)


def test_missing_variant_raises_diffusers_error(impl, folder, tmp_path):
    pipe = impl.classes[0].from_pretrained(folder)
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    for cls in impl.classes:
        with pytest.raises(ValueError, match="You are trying to load the model files of the `variant=fp16`"):
            cls.from_pretrained(tmp_path, variant="fp16")


def test_components_set_to_none(impl, folder, tmp_path):
    """A pipeline built with components set to None: built, listed, saved and loaded back with them None."""
    full = impl.classes[0].from_pretrained(folder)
    for cls in impl.classes:
        parts = dict(full.components, text_encoder=None, tokenizer=None, transformer=None)
        pipe = cls(**parts)
        assert pipe.transformer is None and pipe.text_encoder is None
        assert set(pipe.components) == set(parts)
        out = tmp_path / cls.__name__
        pipe.save_pretrained(out)
        index = json.loads((out / "model_index.json").read_text())
        assert index["transformer"] == [None, None] and index["text_encoder"] == [None, None]
        with pytest.raises(ValueError, match="expected"):  # diffusers: required components must be passed again
            cls.from_pretrained(out)
        again = cls.from_pretrained(out, text_encoder=None, tokenizer=None, transformer=None)
        assert again.transformer is None and again.text_encoder is None and again.vae is not None
        # swapping a component in, diffusers' own transformer included: the pipeline runs it as its class
        theirs = diffusers.ZImageTransformer2DModel.from_pretrained(folder, subfolder="transformer")
        pipe.register_modules(transformer=theirs, text_encoder=full.text_encoder, tokenizer=full.tokenizer)
        assert isinstance(pipe.transformer, impl.Transformer)
        pipe.transformer = theirs
        assert isinstance(pipe.transformer, impl.Transformer)
        assert pipe.config["transformer"] == ("diffusers", "ZImageTransformer2DModel")
        if cls is impl.classes[0]:
            assert torch.equal(latents(pipe), latents(full))


def test_loading_logs_every_component(impl, folder, caplog):
    with caplog.at_level(logging.INFO, logger="diffusers.pipelines.pipeline_utils"):
        pipe = impl.classes[0].from_pretrained(folder)
    text = caplog.text
    for name in pipe.components:
        if name not in pipe._optional_components:
            assert name in text, name
    assert "Loaded transformer as ZImageTransformer2DModel" in text


def test_saved_folder_round_trip_same_latents(impl, folder, tmp_path):
    pipe = impl.classes[0].from_pretrained(folder)
    want = latents(pipe)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]  # loads in diffusers unchanged
    assert torch.equal(latents(impl.classes[0].from_pretrained(tmp_path)), want)
    ref = latents(diffusers.ZImagePipeline.from_pretrained(tmp_path))  # diffusers loads the folder ours saved
    assert float((ref.double() - want.double()).norm() / ref.double().norm()) <= 1e-5


def test_model_cpu_offload_hooks(impl, folder):
    """diffusers' model offload (accelerate hooks; on this CPU-only machine with device="cpu"): the hooks sit on the
    pipeline's transformer and the result is unchanged."""
    want = latents(impl.classes[0].from_pretrained(folder))
    pipe = impl.classes[0].from_pretrained(folder)
    pipe.enable_model_cpu_offload(device="cpu")
    assert isinstance(pipe.transformer, impl.Transformer)
    assert getattr(pipe.transformer, "_hf_hook", None) is not None
    assert torch.equal(latents(pipe), want)


def test_lora_loaded_under_model_offload(folder):
    """diffusers' test_lora_loading_model_cpu_offload, ours only: diffusers' load_lora_weights re-enables offload
    without a device, which needs an accelerator (it raises on this machine). Ours keeps the hooks (its adapters
    are not modules) and equals diffusers' pipeline without offload with the same LoRA."""
    from tests.test_diffusers_lora import lora_sd

    ref = diffusers.ZImagePipeline.from_pretrained(folder)
    ref.load_lora_weights(lora_sd(ref.transformer, 1), adapter_name="a")
    want = latents(ref)
    pipe = zd.ZImagePipeline.from_pretrained(folder)
    pipe.enable_model_cpu_offload(device="cpu")
    pipe.load_lora_weights(lora_sd(pipe.transformer, 1), adapter_name="a")
    assert getattr(pipe.transformer, "_hf_hook", None) is not None
    got = latents(pipe)
    assert float((got.double() - want.double()).norm() / want.double().norm()) <= 1e-5

"""The drop-in suite: tests written against the public behaviour of diffusers' Z-Image classes (the kind of checks
diffusers keeps for its pipelines), run once on diffusers' own classes and once on ``zimage_core.diffusers``.

Every test takes the ``impl`` fixture and uses only the public API; a test that fails on the diffusers run is a
wrong test, one that fails only on ours is a drop-in bug.
"""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

STEPS = 2
H, W = 64, 96


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from zimage_core.components import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("dropin") / "pipe", seed=0)


@pytest.fixture(scope="module", params=["diffusers", "zimage"])
def impl(request):
    if request.param == "diffusers":
        import diffusers as mod
    else:
        import zimage_core.diffusers as mod
    return SimpleNamespace(
        name=request.param,
        T2I=mod.ZImagePipeline,
        I2I=mod.ZImageImg2ImgPipeline,
        INP=mod.ZImageInpaintPipeline,
        Transformer=mod.ZImageTransformer2DModel,
    )


def load(cls, folder, **kw):
    pipe = cls.from_pretrained(folder, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def t2i(impl, folder):
    return load(impl.T2I, folder)


def seed_image(w=W, h=H):
    return Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype("uint8"))


def mask_image(value=None):
    m = np.zeros((H, W), "uint8")
    if value is None:
        m[16:48, 32:80] = 255
    else:
        m[:] = value
    return Image.fromarray(m)


def call(pipe, **kw):
    args = dict(prompt="a red circle", height=H, width=W, num_inference_steps=STEPS, guidance_scale=2.0)
    args.update(kw)
    args.setdefault("generator", torch.Generator().manual_seed(0))
    args.setdefault("output_type", "latent")
    return pipe(**args)


def close(a, b, tol=1e-5):
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    assert a.shape == b.shape
    return float((a - b).norm() / b.norm().clamp_min(1e-12)) <= tol


# ---- classes and loading ------------------------------------------------------------------------------------------
def test_classes_are_diffusers_pipelines(impl, t2i):
    import diffusers

    assert isinstance(t2i, diffusers.DiffusionPipeline)
    assert isinstance(t2i.transformer, diffusers.ModelMixin)
    assert isinstance(t2i.transformer, impl.Transformer)
    assert t2i._callback_tensor_inputs == ["latents", "prompt_embeds"]
    assert t2i.model_cpu_offload_seq == "text_encoder->transformer->vae"


def test_components_rebuild_the_pipeline(impl, t2i):
    params = set(inspect.signature(impl.T2I.__init__).parameters) - {"self"}
    assert set(t2i.components) == params
    again = impl.T2I(**t2i.components)
    again.set_progress_bar_config(disable=True)
    assert close(call(again).images, call(t2i).images, 0)


def test_save_load_local(impl, t2i, tmp_path):
    t2i.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert json.loads((tmp_path / "transformer" / "config.json").read_text())["_class_name"] == (
        "ZImageTransformer2DModel"
    )
    loaded = load(impl.T2I, tmp_path)
    assert close(call(loaded).images, call(t2i).images)


def test_transformer_save_load_and_from_config(impl, t2i, tmp_path):
    model = t2i.transformer
    model.save_pretrained(tmp_path)
    again = impl.Transformer.from_pretrained(tmp_path)
    assert set(again.state_dict()) == set(model.state_dict())
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
    fresh = impl.Transformer.from_config(model.config)
    assert fresh.config["n_layers"] == model.config.n_layers and fresh.config.dim == model.config["dim"]
    assert again.in_channels == model.config.in_channels == 16


def test_torch_dtype_on_load(impl, folder):
    pipe = load(impl.T2I, folder, torch_dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.dtype == torch.bfloat16
    out = call(pipe).images
    assert out.dtype == torch.float32 and torch.isfinite(out).all()  # latents stay fp32 through the loop


def test_to_dtype_and_device(impl, folder):
    pipe = load(impl.T2I, folder)
    pipe.to(torch.float16)
    assert {m.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module)} == {torch.float16}
    pipe.to("cpu", torch.float32)
    assert pipe.device.type == "cpu" and pipe.transformer.dtype == torch.float32
    assert {m.device.type for m in pipe.components.values() if isinstance(m, torch.nn.Module)} == {"cpu"}


# ---- call behaviour -----------------------------------------------------------------------------------------------
def test_dict_tuple_outputs_equivalent(t2i):
    as_dict = call(t2i, output_type="np").images
    as_tuple = call(t2i, output_type="np", return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert np.abs(as_dict - as_tuple[0]).max() < 1e-6


def test_output_types(t2i):
    pil = call(t2i, output_type="pil").images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (W, H)
    assert call(t2i, output_type="np").images.shape == (1, H, W, 3)
    assert call(t2i, output_type="pt").images.shape == (1, 3, H, W)
    assert call(t2i).images.shape == (1, 16, H // 8, W // 8)


@pytest.mark.parametrize("batch,per_prompt", [(1, 2), (2, 1), (2, 2)])
def test_num_images_per_prompt(t2i, batch, per_prompt):
    prompts = ["a red circle", "a green square"][:batch]
    out = call(t2i, prompt=prompts, num_images_per_prompt=per_prompt, output_type="np").images
    assert out.shape[0] == batch * per_prompt


def test_inference_batch_single_identical(t2i):
    prompts = ["a red circle", "a large green square on a blue background"]
    # a copy: diffusers' own pipeline writes the chat-templated text back into the list it is given
    batched = call(t2i, prompt=list(prompts), generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    for i, p in enumerate(prompts):
        single = call(t2i, prompt=p, generator=torch.Generator().manual_seed(i)).images
        assert close(batched[i : i + 1], single, 1e-4)


def test_prompt_embeds_equivalent_to_prompt(t2i):
    pos, neg = t2i.encode_prompt(["a red circle"], device="cpu", negative_prompt=["blurry"])
    from_embeds = call(t2i, prompt=None, prompt_embeds=pos, negative_prompt_embeds=neg).images
    from_text = call(t2i, negative_prompt="blurry").images
    assert close(from_embeds, from_text)


def test_given_latents_replace_the_noise(t2i):
    lat = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(5))
    a = call(t2i, latents=lat.clone(), generator=torch.Generator().manual_seed(1)).images
    b = call(t2i, latents=lat.clone(), generator=torch.Generator().manual_seed(2)).images
    assert close(a, b, 0)


def test_custom_sigmas(t2i):
    a = call(t2i, sigmas=[1.0, 0.6]).images
    b = call(t2i, sigmas=[1.0, 0.3]).images
    assert not close(a, b, 1e-3)


def test_callback_inputs_and_last_step_zeroing(t2i):
    seen = []

    def cb(pipe, i, t, kwargs):
        seen.append((i, sorted(kwargs)))
        assert set(kwargs) <= set(pipe._callback_tensor_inputs)
        if i == pipe.num_timesteps - 1:
            kwargs["latents"] = torch.zeros_like(kwargs["latents"])
        return kwargs

    out = call(t2i, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    assert seen == [(i, ["latents", "prompt_embeds"]) for i in range(STEPS)]
    assert out.abs().sum() == 0


def test_callback_can_change_guidance_state(t2i):
    """A callback sees the pipeline (``num_timesteps``, ``guidance_scale``) and its timestep ``t`` in [0, 1000]."""
    ts = []

    def cb(pipe, i, t, kwargs):
        ts.append(float(t))
        assert pipe.guidance_scale == 2.0 and pipe.do_classifier_free_guidance
        return {}

    call(t2i, callback_on_step_end=cb)
    assert len(ts) == STEPS and ts[0] == 1000.0 and all(0 < t <= 1000 for t in ts)


def test_attention_slicing_forward_pass(impl, folder):
    pipe = load(impl.T2I, folder)
    before = call(pipe).images
    pipe.enable_attention_slicing(slice_size=1)
    after = call(pipe).images
    pipe.disable_attention_slicing()
    assert close(after, before, 1e-4)


def test_cfg_off_ignores_negative_prompt(t2i):
    a = call(t2i, guidance_scale=0.0, negative_prompt="anything").images
    b = call(t2i, guidance_scale=0.0).images
    assert close(a, b, 0)


def test_bad_size_is_a_value_error(t2i):
    with pytest.raises(ValueError, match="(?i)height"):
        call(t2i, height=H + 8)


# ---- image-to-image and inpainting ----------------------------------------------------------------------------------
def test_img2img_size_from_image_and_strength(impl, folder):
    pipe = load(impl.I2I, folder)
    out = call(pipe, image=seed_image(), height=None, width=None, strength=0.5, output_type="np").images
    assert out.shape == (1, H, W, 3)
    with pytest.raises(ValueError):
        call(pipe, image=seed_image(), strength=1.5)
    weak = call(pipe, image=seed_image(), strength=0.5, num_inference_steps=4).images
    strong = call(pipe, image=seed_image(), strength=1.0, num_inference_steps=4).images
    assert not close(weak, strong, 1e-3)


def test_img2img_too_little_strength_is_a_value_error(impl, folder):
    pipe = load(impl.I2I, folder)
    with pytest.raises(ValueError):
        call(pipe, image=seed_image(), strength=0.0, num_inference_steps=2)


def test_inpaint_black_mask_keeps_the_image(impl, folder):
    """With nothing to repaint, the final latents are the seed image's whatever the prompt."""
    pipe = load(impl.INP, folder)
    a = call(pipe, image=seed_image(), mask_image=mask_image(0), prompt="a cat").images
    b = call(pipe, image=seed_image(), mask_image=mask_image(0), prompt="a dog").images
    assert close(a, b, 0)


def test_inpaint_callback_sees_the_mask(impl, folder):
    pipe = load(impl.INP, folder)
    masks = []

    def cb(p, i, t, kwargs):
        masks.append(kwargs["mask"])
        return {}

    call(pipe, image=seed_image(), mask_image=mask_image(), callback_on_step_end=cb,
         callback_on_step_end_tensor_inputs=["latents", "mask"])  # fmt: skip
    assert len(masks) == STEPS and masks[0].shape == (1, 1, H // 8, W // 8)
    assert set(masks[0].unique().tolist()) == {0.0, 1.0}

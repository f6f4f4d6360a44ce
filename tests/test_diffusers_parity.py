"""``zimage_core.diffusers`` against diffusers 0.42.1's own classes on the same tiny random components (fp32):
signatures, transformer forward, every pipeline mode, the attention processor on diffusers' transformer, the
intentional differences, and our extras (``scheduler_name``, ``cache``, run-time LoRA).
"""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import zimage_core.diffusers as zd
from tests.helpers import SMALL_CONFIGS, diffusers_transformer, inputs, rel_l2
from zimage_core import RequestError

TOL = 1e-5
H, W = 64, 96
PAIRS = [
    (zd.ZImagePipeline, diffusers.ZImagePipeline),
    (zd.ZImageImg2ImgPipeline, diffusers.ZImageImg2ImgPipeline),
    (zd.ZImageInpaintPipeline, diffusers.ZImageInpaintPipeline),
]


def rel(a, b) -> float:
    a, b = torch.as_tensor(a).detach().double(), torch.as_tensor(b).detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from zimage_core.components import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("parity") / "pipe", seed=3)


_loaded: dict = {}


def loaded(cls, folder):
    key = (cls, str(folder))
    if key not in _loaded:
        pipe = cls.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        _loaded[key] = pipe
    return _loaded[key]


# ---- signatures --------------------------------------------------------------------------------------------
def _params(fn):
    return [(n, p.kind, p.default) for n, p in inspect.signature(fn).parameters.items()]


@pytest.mark.parametrize("ours,theirs", PAIRS, ids=["t2i", "img2img", "inpaint"])
def test_pipeline_signatures(ours, theirs):
    assert issubclass(ours, theirs) and issubclass(ours, diffusers.DiffusionPipeline)
    assert _params(ours.__init__) == _params(theirs.__init__)
    mine, ref = _params(ours.__call__), _params(theirs.__call__)
    assert mine[: len(ref)] == ref
    extras = mine[len(ref) :]
    names = ["cache", "scheduler_name", "hooks"] + (["padding_mask_crop"] if ours is zd.ZImageInpaintPipeline else [])
    assert [(n, k) for n, k, _ in extras] == [(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
    assert ours._callback_tensor_inputs == theirs._callback_tensor_inputs


def test_transformer_signatures():
    ours, theirs = zd.ZImageTransformer2DModel, diffusers.ZImageTransformer2DModel
    assert _params(ours.__init__) == _params(theirs.__init__)
    assert _params(ours.forward) == _params(theirs.forward)
    assert set(ours(**SMALL_CONFIGS["hd32"]).state_dict()) == set(theirs(**SMALL_CONFIGS["hd32"]).state_dict())


def test_package_name_does_not_shadow_diffusers():
    """``zimage_core.diffusers`` imports the real library absolutely; ``import diffusers`` stays diffusers."""
    import importlib
    from pathlib import Path

    real = importlib.import_module("diffusers")
    assert zd.__name__ == "zimage_core.diffusers" and real is diffusers
    assert "zimage_core" not in Path(real.__file__).parts and hasattr(real, "DiffusionPipeline")
    assert diffusers.ZImagePipeline in zd.ZImagePipeline.__mro__


# ---- the transformer -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", ["hd32", "hd16x8"])
@pytest.mark.parametrize("kind", ["single", "ragged", "cfg"])
def test_transformer_forward_parity(cfg, kind):
    ref = diffusers_transformer(cfg)
    ours = zd.ZImageTransformer2DModel.from_diffusers(ref)
    x, t, caps = inputs(SMALL_CONFIGS[cfg], kind)
    with torch.no_grad():
        want = ref(x, t, caps)
        got = ours(x, t, caps)
        got_tuple = ours(x, t, caps, return_dict=False)
    assert type(got) is type(want)
    assert rel_l2(got.sample, want.sample) <= TOL
    assert isinstance(got_tuple, tuple) and rel_l2(got_tuple[0], want.sample) <= TOL


def test_transformer_controlnet_block_samples_parity():
    ref = diffusers_transformer("hd16x8")
    ours = zd.ZImageTransformer2DModel.from_diffusers(ref)
    x, t, caps = inputs(SMALL_CONFIGS["hd16x8"], "ragged")
    # unified length: image tokens (15 -> 32) + caption (45 -> 64) = 96 for the longer sample
    g = torch.Generator().manual_seed(0)
    hints = {0: torch.randn(2, 96, 128, generator=g), 2: torch.randn(2, 96, 128, generator=g)}
    with torch.no_grad():
        want = ref(x, t, caps, controlnet_block_samples=hints).sample
        got = ours(x, t, caps, controlnet_block_samples=hints).sample
        plain = ours(x, t, caps).sample
    assert rel_l2(got, want) <= TOL and rel_l2(plain, want) > 1e-3


def test_transformer_attention_backend_is_ours():
    model = zd.ZImageTransformer2DModel(**SMALL_CONFIGS["hd32"])
    with pytest.warns(UserWarning, match="set_kernel_backend"):
        model.set_attention_backend("native")
    with pytest.raises(ValueError):  # diffusers' own check of the name
        model.set_attention_backend("no-such-backend")


def test_pipeline_built_from_diffusers_components(folder):
    """Our pipeline given diffusers' own transformer converts it (same weights) and gives diffusers' result."""
    ref = loaded(diffusers.ZImagePipeline, folder)
    pipe = zd.ZImagePipeline(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.transformer, zd.ZImageTransformer2DModel)
    assert pipe.transformer.x_pad_token.data_ptr() == ref.transformer.x_pad_token.data_ptr()  # shared, not copied
    assert rel(_run(pipe, "t2i", dict(prompt="a red circle")), _run(ref, "t2i", dict(prompt="a red circle"))) <= TOL


def test_encode_prompt_parity(folder):
    ours, ref = loaded(zd.ZImagePipeline, folder), loaded(diffusers.ZImagePipeline, folder)
    prompts = ["a red circle", "a small yellow triangle in the top left on a black background"]
    got = ours.encode_prompt(list(prompts), device="cpu", negative_prompt=["", "blurry"])
    want = ref.encode_prompt(list(prompts), device="cpu", negative_prompt=["", "blurry"])
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        assert g.shape == w.shape and rel(g, w) <= TOL


def test_transformer_refuses_omni():
    with pytest.raises(NotImplementedError, match="Omni"):
        zd.ZImageTransformer2DModel(**SMALL_CONFIGS["hd32"], siglip_feat_dim=8)


# ---- the attention processor on diffusers' own transformer -----------------------------------------------------
def test_attention_processor_whole_pipeline(folder):
    pipe = diffusers.ZImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(
            ["a red circle", "a large blue square on a green background"],
            height=H,
            width=W,
            num_inference_steps=3,
            guidance_scale=2.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    before = run()
    n = zd.set_fast_attention(pipe.transformer)
    cfg = pipe.transformer.config
    assert n == cfg.n_layers + 2 * cfg.n_refiner_layers
    assert "freqs_cis" in inspect.signature(zd.ZImageAttnProcessor.__call__).parameters
    after = run()
    assert rel(after, before) <= TOL


def test_attention_processor_keeps_rope():
    """The processor must see freqs_cis: with it dropped the result changes (the test would notice)."""
    ref = diffusers_transformer("hd32")
    x, t, caps = inputs(SMALL_CONFIGS["hd32"], "ragged")
    with torch.no_grad():
        want = ref(x, t, caps).sample
        zd.set_fast_attention(ref)
        got = ref(x, t, caps).sample
        for m in ref.modules():
            if isinstance(m, diffusers.models.attention_processor.Attention):
                m.processor = lambda attn, h, encoder_hidden_states=None, attention_mask=None, proc=m.processor, **kw: (
                    proc(attn, h, None, attention_mask, freqs_cis=None)
                )
        no_rope = ref(x, t, caps).sample
    assert rel_l2(got, want) <= TOL and rel_l2(no_rope, want) > 1e-3


# ---- the pipelines: numeric parity -----------------------------------------------------------------------------
def _image():
    return Image.fromarray((np.random.RandomState(1).rand(H, W, 3) * 255).astype("uint8"))


def _mask():
    m = np.zeros((H, W), "uint8")
    m[8:40, 24:72] = 255
    return Image.fromarray(m)


def _gens(n):
    return [torch.Generator().manual_seed(10 + i) for i in range(n)]


def _latents(n, seed=7):
    return torch.randn(n, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(seed))


CASES = {
    "cfg": lambda: dict(prompt="a red circle"),
    "cfg_off": lambda: dict(prompt="a red circle", guidance_scale=0.0),
    "negative_many": lambda: dict(
        prompt=["a red circle", "a small yellow triangle in the top left"],
        negative_prompt=["blurry", "a dark background"],
        num_images_per_prompt=2,
        generator=_gens(4),
        cfg_normalization=True,
        cfg_truncation=0.6,
    ),
    "latents": lambda: dict(prompt=["a red circle", "a green square"], latents=_latents(2)),
    "sigmas": lambda: dict(prompt="a red circle", sigmas=[1.0, 0.7, 0.2]),
}


def _prompt_embeds_case(pipe):
    pos, neg = pipe.encode_prompt(["a white circle"], device="cpu", negative_prompt=["noise"])
    return dict(prompt=None, prompt_embeds=pos, negative_prompt_embeds=neg)


def _run(pipe, mode, args):
    base = dict(height=H, width=W, num_inference_steps=3, guidance_scale=2.5, output_type="latent")
    base.setdefault("generator", torch.Generator().manual_seed(0))
    if mode == "img2img":
        base.update(image=_image(), strength=0.7)
    elif mode == "inpaint":
        base.update(image=_image(), mask_image=_mask(), strength=0.9)
    base.update(args)
    return pipe(**base).images


@pytest.mark.parametrize("case", [*CASES, "prompt_embeds"])
@pytest.mark.parametrize("mode,pair", zip(["t2i", "img2img", "inpaint"], PAIRS), ids=["t2i", "img2img", "inpaint"])
def test_pipeline_parity(folder, mode, pair, case):
    ours, ref = loaded(pair[0], folder), loaded(pair[1], folder)
    make = (lambda: _prompt_embeds_case(ours)) if case == "prompt_embeds" else CASES[case]
    got, want = _run(ours, mode, make()), _run(ref, mode, make())  # fresh args: diffusers mutates them
    assert got.dtype == want.dtype == torch.float32
    assert rel(got, want) <= TOL


def test_inpaint_padding_mask_crop(folder):
    """Our extra ``padding_mask_crop`` equals diffusers' inpaint pipeline run on the crop that diffusers' own image
    processor cuts (mask box + margin, resized to the generation size), pasted back with its ``apply_overlay``."""
    ours, ref = loaded(zd.ZImageInpaintPipeline, folder), loaded(diffusers.ZImageInpaintPipeline, folder)
    big = Image.fromarray((np.random.RandomState(2).rand(144, 224, 3) * 255).astype("uint8"))
    m = np.zeros((144, 224), "uint8")
    m[40:70, 120:160] = 255
    mask = Image.fromarray(m)
    args = dict(prompt="a red circle", height=H, width=W, num_inference_steps=3, output_type="pil")
    got = ours(image=big, mask_image=mask, padding_mask_crop=8, generator=torch.Generator().manual_seed(0), **args)
    got = got.images[0]
    box = ref.mask_processor.get_crop_region(mask, W, H, pad=8)
    crop = dict(height=H, width=W, crops_coords=box, resize_mode="fill")
    init, mask_t = ref.image_processor.preprocess(big, **crop), ref.mask_processor.preprocess(mask, **crop)
    want = ref(image=init, mask_image=mask_t, generator=torch.Generator().manual_seed(0), **args).images[0]
    want = ref.image_processor.apply_overlay(mask, big, want, box)
    assert got.size == big.size == want.size
    assert np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1
    x0, y0, x1, y1 = box
    outside = np.ones((144, 224), bool)
    outside[y0:y1, x0:x1] = False
    assert np.array_equal(np.asarray(got)[outside], np.asarray(big)[outside])
    with pytest.raises(RequestError) as e:
        ours(image=big, mask_image=mask, padding_mask_crop=8, **{**args, "output_type": "latent"})
    assert e.value.field == "padding_mask_crop"


def test_decoded_images_parity(folder):
    ours, ref = loaded(zd.ZImagePipeline, folder), loaded(diffusers.ZImagePipeline, folder)
    got = _run(ours, "t2i", dict(prompt="a red circle", output_type="np"))
    want = _run(ref, "t2i", dict(prompt="a red circle", output_type="np"))
    assert np.abs(got - want).max() <= 1e-4


def test_callback_replacing_embeddings_and_interrupt_parity(folder):
    ours, ref = loaded(zd.ZImagePipeline, folder), loaded(diffusers.ZImagePipeline, folder)

    def halve_embeds(pipe, i, t, kw):
        return {"prompt_embeds": [e * 0.5 for e in kw["prompt_embeds"]]} if i == 0 else {}

    def stop_after_one(pipe, i, t, kw):
        pipe._interrupt = True
        return {}

    for cb, inputs_ in ((halve_embeds, ["latents", "prompt_embeds"]), (stop_after_one, ["latents"])):
        args = dict(prompt="a red circle", callback_on_step_end=cb, callback_on_step_end_tensor_inputs=inputs_)
        assert rel(_run(ours, "t2i", dict(args)), _run(ref, "t2i", dict(args))) <= TOL


# ---- intentional differences -----------------------------------------------------------------------------------
def test_prompt_list_is_not_modified(folder):
    ours, ref = loaded(zd.ZImagePipeline, folder), loaded(diffusers.ZImagePipeline, folder)
    prompts, negatives = ["a red circle"], ["blurry"]
    first = _run(ours, "t2i", dict(prompt=prompts, negative_prompt=negatives))
    assert prompts == ["a red circle"] and negatives == ["blurry"]
    assert rel(_run(ours, "t2i", dict(prompt=prompts, negative_prompt=negatives)), first) == 0
    # diffusers' own pipeline writes the chat template into the caller's lists (docs/dropin.md: intentional differences)
    _run(ref, "t2i", dict(prompt=prompts, negative_prompt=negatives))
    assert prompts[0].startswith("<|im_start|>user") and negatives[0].startswith("<|im_start|>user")


def test_single_negative_prompt_for_many_prompts(folder):
    """diffusers fails (an assert) on one negative string with a prompt list; ours applies it to every prompt."""
    ours = loaded(zd.ZImagePipeline, folder)
    one = _run(ours, "t2i", dict(prompt=["a red circle", "a green square"], negative_prompt="blurry"))
    each = _run(ours, "t2i", dict(prompt=["a red circle", "a green square"], negative_prompt=["blurry", "blurry"]))
    assert rel(one, each) == 0


def test_errors_name_the_field(folder):
    ours = loaded(zd.ZImagePipeline, folder)
    cases = [
        (dict(height=H + 8), "height"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(callback_on_step_end_tensor_inputs=["noise_pred"]), "callback_on_step_end_tensor_inputs"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(prompt=None, prompt_embeds=[torch.zeros(3, 32)]), "negative_prompt_embeds"),
        (dict(scheduler_name="Euler Z"), "scheduler_name"),
        (dict(prompt_embeds=[torch.zeros(3, 32)], negative_prompt_embeds=[torch.zeros(3, 32)]), "prompt_embeds"),
    ]
    for args, field in cases:
        args.setdefault("prompt", "a red circle")
        with pytest.raises(RequestError) as e:
            _run(ours, "t2i", args)
        assert e.value.field == field


# ---- extras: scheduler_name, cache, LoRA ------------------------------------------------------------------------
def test_scheduler_name(folder):
    ours = loaded(zd.ZImagePipeline, folder)
    default = _run(ours, "t2i", dict(prompt="a red circle"))
    assert rel(_run(ours, "t2i", dict(prompt="a red circle", scheduler_name="Euler")), default) == 0
    other = _run(ours, "t2i", dict(prompt="a red circle", scheduler_name="DPM++ 2M Karras"))
    assert torch.isfinite(other).all() and rel(other, default) > 1e-4
    # another diffusers scheduler object on the pipeline is refused, not silently replaced by Euler
    pipe = zd.ZImagePipeline(**{**ours.components, "scheduler": diffusers.FlowMatchHeunDiscreteScheduler()})
    with pytest.raises(RequestError) as e:
        _run(pipe, "t2i", dict(prompt="a red circle"))
    assert e.value.field == "scheduler"


def test_cache_extra(folder):
    from zimage_core.cache import FBCacheConfig

    ours = loaded(zd.ZImagePipeline, folder)
    args = dict(prompt="a red circle", num_inference_steps=6)
    plain = _run(ours, "t2i", args)
    assert rel(_run(ours, "t2i", dict(args, cache=FBCacheConfig(threshold=0.0))), plain) == 0
    assert ours._last_stats.cache[0]["reused_steps"] == []
    reused = _run(ours, "t2i", dict(args, cache=FBCacheConfig(threshold=1e9)))
    summary = ours._last_stats.cache[0]
    assert summary["reused_steps"] and summary["main_layer_evals"] < summary["main_layer_evals_uncached"]
    assert 0 < rel(reused, plain) and torch.isfinite(reused).all()


def test_lora_matches_merged_weights(folder, tmp_path):
    """A LoRA loaded through diffusers' loader and applied at run time equals diffusers with W + s·B·A merged."""
    ours = loaded(zd.ZImagePipeline, folder)
    g = torch.Generator().manual_seed(0)
    targets = ["layers.0.attention.to_q", "layers.1.feed_forward.w1", "context_refiner.0.attention.to_v"]
    sd, merged = {}, {}
    ref_pipe = diffusers.ZImagePipeline.from_pretrained(folder)
    ref_pipe.set_progress_bar_config(disable=True)
    weights = dict(ref_pipe.transformer.named_parameters())
    for name in targets:
        w = weights[name + ".weight"]
        a = torch.randn(4, w.shape[1], generator=g) * 0.3
        b = torch.randn(w.shape[0], 4, generator=g) * 0.3
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
        merged[name] = (w, b @ a)
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "shapes_lora.safetensors")
    ours.load_lora_weights(tmp_path, weight_name="shapes_lora.safetensors", adapter_name="shapes")
    assert ours.get_active_adapters() == ["shapes"] and ours.get_list_adapters() == {"transformer": ["shapes"]}
    prompt = dict(prompt="a red circle")
    try:
        for scale in (1.0, 0.5):
            ours.set_adapters(["shapes"], [scale])
            got = _run(ours, "t2i", prompt)
            with torch.no_grad():
                for w, delta in merged.values():
                    w += scale * delta
                want = _run(ref_pipe, "t2i", prompt)
                for w, delta in merged.values():
                    w -= scale * delta
            assert rel(got, want) <= TOL
        ours.disable_lora()
        assert ours.get_active_adapters() == ["shapes"]  # as diffusers: a disabled adapter stays listed as active
        assert rel(_run(ours, "t2i", prompt), _run(ref_pipe, "t2i", prompt)) <= TOL
    finally:
        ours.enable_lora()
        ours.unload_lora_weights()


def test_hooks_extra_reaches_every_model_call(folder):
    from zimage_core.hooks import StackHook

    class Count(StackHook):
        def __init__(self):
            self.layers = []

        def after_layer(self, index, hidden, inp):
            self.layers.append(index)
            return hidden

    ours = loaded(zd.ZImagePipeline, folder)
    hook = Count()
    plain = _run(ours, "t2i", dict(prompt="a red circle"))
    hooked = _run(ours, "t2i", dict(prompt="a red circle", hooks=[hook]))
    n_layers = ours.transformer.config.n_layers
    assert hook.layers == list(range(n_layers)) * ours._last_stats.forwards and ours._last_stats.forwards == 3
    assert rel(hooked, plain) == 0


def test_saved_folders_cross_load(folder, tmp_path):
    """A folder saved by our pipeline loads in diffusers' (and diffusers' own folders load in ours: every fixture)."""
    ours = loaded(zd.ZImagePipeline, folder)
    ours.save_pretrained(tmp_path)
    theirs = diffusers.ZImagePipeline.from_pretrained(tmp_path)
    theirs.set_progress_bar_config(disable=True)
    assert type(theirs.transformer) is diffusers.ZImageTransformer2DModel
    assert rel(_run(theirs, "t2i", dict(prompt="a red circle")), _run(ours, "t2i", dict(prompt="a red circle"))) <= TOL

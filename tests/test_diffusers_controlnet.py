"""``zimage_core.diffusers``' ControlNet classes against diffusers 0.42.1's own ``ZImageControlNetModel``,
``ZImageControlNetPipeline`` and ``ZImageControlNetInpaintPipeline`` on the same tiny random components (fp32, CPU,
every parameter random, the zero-initialised projections included, so the hints are not zero); then drop-in checks
written against the public behaviour of diffusers' classes, run on both implementations.
"""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import zimage_core.diffusers as zd
from tests.test_controlnet import LAYOUTS, TINY, diffusers_controlnet, guide, model_inputs, randomise
from zimage_core import RequestError

TOL = 1e-5
H, W = 96, 64
STEPS = 3


def rel(a, b) -> float:
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).norm() / b.norm())


def _params(fn):
    return [(n, p.kind, p.default) for n, p in inspect.signature(fn).parameters.items()]


# ---- signatures ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ours,theirs",
    [
        (zd.ZImageControlNetPipeline, diffusers.ZImageControlNetPipeline),
        (zd.ZImageControlNetInpaintPipeline, diffusers.ZImageControlNetInpaintPipeline),
    ],
    ids=["controlnet", "controlnet-inpaint"],
)
def test_pipeline_signatures(ours, theirs):
    assert issubclass(ours, theirs) and issubclass(ours, diffusers.DiffusionPipeline)
    assert _params(ours.__init__) == _params(theirs.__init__)
    mine, ref = _params(ours.__call__), _params(theirs.__call__)
    assert mine[: len(ref)] == ref
    assert [(n, k) for n, k, _ in mine[len(ref) :]] == [
        (n, inspect.Parameter.KEYWORD_ONLY) for n in ("cache", "scheduler_name", "hooks")
    ]
    assert ours._callback_tensor_inputs == theirs._callback_tensor_inputs
    assert ours.model_cpu_offload_seq == theirs.model_cpu_offload_seq


def test_model_signatures_and_state_dict_keys():
    ours, theirs = zd.ZImageControlNetModel, diffusers.ZImageControlNetModel
    assert issubclass(ours, diffusers.ModelMixin) and issubclass(ours, diffusers.ConfigMixin)
    assert _params(ours.__init__) == _params(theirs.__init__)
    assert _params(ours.forward) == _params(theirs.forward)
    for mode, in_dim in LAYOUTS.values():
        cfg = dict(control_layers_places=[0, 2], control_refiner_layers_places=[0, 1], control_in_dim=in_dim,
                   add_control_noise_refiner=mode, dim=64, n_heads=2, n_kv_heads=2)  # fmt: skip
        a, b = ours(**cfg), theirs(**cfg)
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
        assert dict(a.config) == dict(b.config)


# ---- the model -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tr = randomise(diffusers.ZImageTransformer2DModel(**TINY).eval(), 1)
    return tr, zd.ZImageTransformer2DModel.from_diffusers(tr)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("use_ours_transformer", [True, False], ids=["our-transformer", "their-transformer"])
def test_model_forward_matches_diffusers(tiny, layout, use_ours_transformer):
    tr, ours_t = tiny
    cn = diffusers_controlnet(layout, tr)
    ours = zd.ZImageControlNetModel.from_transformer(cn, ours_t if use_ours_transformer else tr)
    assert not any(p is q for p in ours.parameters() for q in tr.parameters())  # holds no transformer module
    x, caps, ctl = model_inputs(LAYOUTS[layout][1])
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        want = cn(x, t, caps, [ctl, ctl], conditioning_scale=0.7)
        got = ours(x, t, caps, [ctl, ctl], conditioning_scale=0.7)
    assert sorted(got) == sorted(want) == [0, 2]
    for k, v in want.items():
        assert v.norm() > 1.0
        assert rel(got[k], v) <= TOL


def test_model_forward_needs_from_transformer():
    cfg = dict(control_layers_places=[0], control_in_dim=16, dim=64, n_heads=2, n_kv_heads=2, n_refiner_layers=1)
    with pytest.raises(RuntimeError, match="from_transformer"):
        zd.ZImageControlNetModel(**cfg)([torch.zeros(16, 1, 4, 4)], torch.zeros(1), [torch.zeros(3, 16)], [None])


def test_model_folders_load_both_ways(tiny, tmp_path):
    """Ours saves the control weights only (diffusers loads them); a folder diffusers saved after from_transformer
    (with the transformer's tensors in it) loads into ours, which ignores those."""
    tr, _ = tiny
    cn = diffusers_controlnet("2.1", tr, seed=4)
    cn.save_pretrained(tmp_path / "theirs")
    ours = zd.ZImageControlNetModel.from_pretrained(tmp_path / "theirs")
    control = {k: v for k, v in cn.state_dict().items() if k.startswith("control_")}
    assert set(ours.state_dict()) == set(control)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in control.items())
    ours.save_pretrained(tmp_path / "ours")
    back = diffusers.ZImageControlNetModel.from_pretrained(tmp_path / "ours")
    assert set(back.state_dict()) == set(control)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in control.items())


def test_from_single_file_matches_diffusers(tiny, tmp_path):
    from safetensors.torch import save_file

    tr, _ = tiny
    cn = diffusers_controlnet("2.1", tr, seed=6)
    control = {k: v.contiguous() for k, v in cn.state_dict().items() if k.startswith("control_")}
    save_file(control, tmp_path / "release.safetensors")
    cn.save_pretrained(tmp_path / "config")  # a local config: the test machine has no hub access
    args = (tmp_path / "release.safetensors",)
    theirs = diffusers.ZImageControlNetModel.from_single_file(*args, config=str(tmp_path / "config"))
    ours = zd.ZImageControlNetModel.from_single_file(*args, config=str(tmp_path / "config"))
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert isinstance(ours, zd.ZImageControlNetModel) and public(ours.config) == public(theirs.config)
    assert set(ours.state_dict()) == set(control)
    assert all(torch.equal(ours.state_dict()[k], theirs.state_dict()[k]) for k in control)


# ---- the pipelines: parity ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from zimage_core.components import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("dcn") / "pipe", seed=3)


@pytest.fixture(scope="module")
def base(folder):
    pipe = diffusers.ZImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_pairs: dict = {}


def pair(base, layout, inpaint=False):
    """(diffusers' pipeline, ours) on the same components and the same random ControlNet."""
    key = (layout, inpaint)
    if key not in _pairs:
        cn = diffusers_controlnet(layout, base.transformer, seed=21, places=[0, 1])
        theirs_cls = diffusers.ZImageControlNetInpaintPipeline if inpaint else diffusers.ZImageControlNetPipeline
        ours_cls = zd.ZImageControlNetInpaintPipeline if inpaint else zd.ZImageControlNetPipeline
        pipes = theirs_cls(**base.components, controlnet=cn), ours_cls(**base.components, controlnet=cn)
        for p in pipes:
            p.set_progress_bar_config(disable=True)
        _pairs[key] = pipes
    return _pairs[key]


def run(pipe, seed=7, **kw):
    """Latents of one call; the control image defaults to a guide (pipelines without ControlNet get none)."""
    args = dict(prompt="a white circle", height=H, width=W, num_inference_steps=STEPS, output_type="latent")
    if "control_image" in inspect.signature(pipe.__call__).parameters:
        args["control_image"] = guide(W, H)
    args.update(kw)
    if "generator" not in args:
        args["generator"] = torch.Generator().manual_seed(seed)
    return pipe(**args).images


CASES = {
    "cfg_off": dict(guidance_scale=0.0, controlnet_conditioning_scale=0.6),
    "cfg_on_negative": dict(guidance_scale=2.0, negative_prompt="dark blurry", controlnet_conditioning_scale=1.3),
    "cfg_norm_trunc": dict(guidance_scale=3.0, cfg_normalization=True, cfg_truncation=0.5),  # default scale 0.75
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(CASES))
def test_controlnet_pipeline_matches_diffusers(base, layout, case):
    theirs, ours = pair(base, layout)
    want, got = run(theirs, **CASES[case]), run(ours, **CASES[case])
    plain = run(base, **{k: v for k, v in CASES[case].items() if k != "controlnet_conditioning_scale"})
    assert rel(plain, want) > 1e-3  # the ControlNet changes the result
    assert rel(got, want) <= TOL
    assert ours._last_stats.controlnet[0]["controlnet_forwards"] == STEPS


def test_conditioning_scale_and_several_images_and_control_images(base):
    theirs, ours = pair(base, "2.0")
    kw = dict(guidance_scale=1.5, controlnet_conditioning_scale=0.3, num_images_per_prompt=2)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3, 4)]  # noqa: E731
    prompts = ["a white circle", "a dark room"]
    controls = [guide(W, H), guide(W, H, box=(0.5, 0.1, 0.9, 0.4))]
    # a fresh list per diffusers call: diffusers writes the chat-templated prompts back into it
    want = run(theirs, prompt=list(prompts), control_image=controls, generator=gens(), **kw)
    got = run(ours, prompt=prompts, control_image=controls, generator=gens(), **kw)
    assert prompts == ["a white circle", "a dark room"]  # ours leaves the caller's list alone
    assert rel(got, want) <= TOL
    one_control = run(ours, prompt=prompts, generator=gens(), **kw)  # one control image for every row
    assert rel(one_control, want) > 1e-3
    assert rel(one_control, run(theirs, prompt=list(prompts), generator=gens(), **kw)) <= TOL
    zero = run(ours, controlnet_conditioning_scale=0.0, guidance_scale=1.5)
    assert rel(zero, run(base, guidance_scale=1.5)) <= TOL


def test_latents_prompt_embeds_and_callback_match_diffusers(base):
    theirs, ours = pair(base, "1.0")
    pe, ne = theirs.encode_prompt("a white circle", negative_prompt="fog", device="cpu")
    latents = torch.randn(1, 16, H // 8, W // 8, generator=torch.Generator().manual_seed(5))
    seen = {}

    def halve(name):
        def cb(pipe, i, t, tensors):
            seen.setdefault(name, []).append(int(i))
            return {"latents": tensors["latents"] * 0.9} if i == 1 else {}

        return cb

    kw = dict(prompt=None, prompt_embeds=pe, negative_prompt_embeds=ne, latents=latents, guidance_scale=2.0)
    want = run(theirs, callback_on_step_end=halve("theirs"), **kw)
    got = run(ours, callback_on_step_end=halve("ours"), **kw)
    assert seen["ours"] == seen["theirs"] == list(range(STEPS))
    assert rel(got, want) <= TOL


@pytest.mark.parametrize("layout", ["2.0", "2.1"])
@pytest.mark.parametrize("gs", [0.0, 2.0], ids=["cfg_off", "cfg_on"])
def test_controlnet_inpaint_pipeline_matches_diffusers(base, layout, gs):
    theirs, ours = pair(base, layout, inpaint=True)
    image = Image.new("RGB", (W, H), (200, 40, 40))
    ImageDraw.Draw(image).rectangle([10, 10, 40, 50], fill=(20, 200, 60))
    mask = Image.new("L", (W, H), 0)
    ImageDraw.Draw(mask).rectangle([0, 40, 63, 95], fill=255)
    kw = dict(image=image, mask_image=mask, guidance_scale=gs, controlnet_conditioning_scale=0.8)
    want, got = run(theirs, seed=3, **kw), run(ours, seed=3, **kw)
    assert rel(got, want) <= TOL
    no_inpaint_channels = run(pair(base, layout)[1], seed=3, guidance_scale=gs, controlnet_conditioning_scale=0.8)
    assert rel(no_inpaint_channels, want) > 1e-3  # the mask and image channels matter
    # several images with one mask (diffusers' torch.cat fails there): row i equals diffusers' run with generator i
    rows = run(ours, generator=[torch.Generator().manual_seed(s) for s in (3, 9)], num_images_per_prompt=2, **kw)
    assert rel(rows[:1], want) <= TOL
    assert rel(rows[1:], run(theirs, seed=9, **kw)) <= TOL


# ---- intentional differences and errors ---------------------------------------------------------------------------
def test_bad_inputs_are_request_errors(base):
    _, ours = pair(base, "1.0")
    with pytest.raises(RequestError) as e:
        run(ours, controlnet_conditioning_scale=[0.5, 0.5])  # diffusers: TypeError deep in the ControlNet
    assert e.value.field == "controlnet_conditioning_scale"
    with pytest.raises(RequestError) as e:
        run(ours, control_image=None)
    assert e.value.field == "control_image"
    with pytest.raises(RequestError) as e:
        run(ours, prompt=["a", "b"], control_image=[guide(W, H)] * 3)
    assert e.value.field == "control_image"
    with pytest.raises(RequestError) as e:
        run(ours, height=72)
    assert e.value.field == "height"
    _, inp = pair(base, "2.1", inpaint=True)
    with pytest.raises(RequestError) as e:
        run(inp, image=guide(W, H))
    assert e.value.field == "mask_image"
    with pytest.raises(ValueError, match="control_in_dim"):
        zd.ZImageControlNetInpaintPipeline(**base.components, controlnet=pair(base, "1.0")[1].controlnet)


def test_the_pipeline_holds_one_copy_of_the_transformer(base):
    _, ours = pair(base, "2.1")
    params = {id(p) for p in ours.transformer.parameters()}
    assert not any(id(p) in params for p in ours.controlnet.parameters())
    assert isinstance(ours.controlnet, zd.ZImageControlNetModel)
    assert set(ours.controlnet.state_dict()) == {
        k for k in diffusers_controlnet("2.1", base.transformer, places=[0, 1]).state_dict() if k.startswith("control_")
    }


# ---- drop-in checks: public behaviour, run on diffusers' classes and on ours ----------------------------------------
@pytest.fixture(scope="module", params=["diffusers", "zimage"])
def impl(request):
    mod = diffusers if request.param == "diffusers" else zd
    return SimpleNamespace(
        name=request.param,
        CN=mod.ZImageControlNetPipeline,
        CNI=mod.ZImageControlNetInpaintPipeline,
        Model=mod.ZImageControlNetModel,
    )


@pytest.fixture(scope="module")
def cn_folder(base, tmp_path_factory):
    """A saved diffusers ControlNet pipeline folder (diffusers' layout, 2.1 ControlNet)."""
    path = tmp_path_factory.mktemp("dcn_saved") / "pipe"
    theirs, _ = pair(base, "2.1")
    theirs.save_pretrained(path)
    return path


def test_dropin_classes_components_and_save_load(impl, cn_folder, tmp_path):
    pipe = impl.CN.from_pretrained(cn_folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe, diffusers.DiffusionPipeline) and isinstance(pipe.controlnet, impl.Model)
    assert set(pipe.components) == set(inspect.signature(impl.CN.__init__).parameters) - {"self"}
    first = run(pipe, guidance_scale=1.0)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["controlnet"] == ["diffusers", "ZImageControlNetModel"]
    for cls in (impl.CN, diffusers.ZImageControlNetPipeline):  # loads in ours and in diffusers
        again = cls.from_pretrained(tmp_path)
        again.set_progress_bar_config(disable=True)
        assert rel(run(again, guidance_scale=1.0), first) <= TOL
    rebuilt = impl.CN(**pipe.components)
    rebuilt.set_progress_bar_config(disable=True)
    assert rel(run(rebuilt, guidance_scale=1.0), first) <= TOL
    inpaint = impl.CNI.from_pretrained(cn_folder)
    assert isinstance(inpaint.controlnet, impl.Model)


def test_dropin_outputs_batch_and_callback(impl, cn_folder):
    pipe = impl.CN.from_pretrained(cn_folder)
    pipe.set_progress_bar_config(disable=True)
    out = run(pipe, output_type="pil", guidance_scale=1.0, num_images_per_prompt=2)
    assert len(out) == 2 and all(isinstance(im, Image.Image) and im.size == (W, H) for im in out)
    arr = run(pipe, output_type="np", guidance_scale=1.0)
    assert arr.shape == (1, H, W, 3) and 0 <= arr.min() and arr.max() <= 1
    tup = pipe(prompt="x", height=H, width=W, num_inference_steps=1, control_image=guide(W, H), return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1
    # batch vs single: the second image of a batch equals a single run with its generator
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    batch = run(pipe, prompt=["a", "b"], generator=gens, guidance_scale=1.0)  # a fresh list: diffusers rewrites it
    single = run(pipe, prompt="b", seed=2, guidance_scale=1.0)
    assert rel(batch[1:], single) <= 1e-4
    steps = []

    def cb(p, i, t, tensors):
        steps.append(sorted(tensors))
        return {}

    run(pipe, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert steps == [["latents", "prompt_embeds"]] * STEPS

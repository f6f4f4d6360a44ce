"""ControlNet (zimage_core.controlnet) against diffusers 0.42.1's ZImageControlNetModel and its two pipelines, on
tiny random components in the three checkpoint layouts (fp32, CPU), plus the definitions of controlMode and the step
window (counted ControlNet forwards)."""

import copy

import pytest
import torch
from PIL import Image, ImageDraw

from zimage_core import controlnet as C
from zimage_core.components import build_random_pipeline
from zimage_core.model import ZImageTransformer
from zimage_core.pipeline import ZImage

SHARED = C.SHARED_PREFIXES  # the transformer's modules a diffusers ControlNet holds

SHIFT = 3.0
# diffusers' add_control_noise_refiner per layout, and control_in_dim
LAYOUTS = {"1.0": (None, 16), "2.0": ("control_layers", 33), "2.1": ("control_noise_refiner", 33)}
TINY = dict(
    dim=64, n_layers=4, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 12, 12],
    axes_lens=[256, 32, 32],
)  # fmt: skip


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def randomise(module, seed):
    """Every parameter random (the zero-initialised before/after projections included, or every hint is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in n:
                p.copy_(1.0 + 0.3 * r)
            elif p.dim() == 2:
                p.copy_(r / p.shape[1] ** 0.5)
            else:
                p.copy_(0.5 * r)
    return module


def diffusers_controlnet(layout, transformer, seed=5, places=None, dim=None, heads=None, refiners=None):
    from diffusers import ZImageControlNetModel

    mode, in_dim = LAYOUTS[layout]
    cfg = transformer.config
    cn = ZImageControlNetModel(
        control_layers_places=places or list(range(0, cfg.n_layers, 2)),
        control_refiner_layers_places=list(range(cfg.n_refiner_layers)),
        control_in_dim=in_dim,
        add_control_noise_refiner=mode,
        dim=dim or cfg.dim,
        n_refiner_layers=refiners or cfg.n_refiner_layers,
        n_heads=heads or cfg.n_heads,
        n_kv_heads=heads or cfg.n_heads,
    ).eval()
    randomise(cn, seed)
    return ZImageControlNetModel.from_transformer(cn, transformer)


@pytest.fixture(scope="module")
def tiny():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    tr = randomise(ZImageTransformer2DModel(**TINY).eval(), 1)
    return tr, ZImageTransformer.from_diffusers(tr)


def model_inputs(in_dim, seed=1, size=(8, 12)):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 1, *size, generator=g) for _ in range(2)]
    caps = [torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)]  # padded to 32 and 64 tokens
    ctl = torch.randn(in_dim, 1, *size, generator=g)
    return x, caps, ctl


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hints_and_transformer_output_match_diffusers(tiny, layout):
    tr, ours_t = tiny
    cn = diffusers_controlnet(layout, tr)
    ours = C.from_diffusers(cn, ours_t)
    x, caps, ctl = model_inputs(LAYOUTS[layout][1])
    t = torch.tensor([0.3, 0.3])
    with torch.no_grad():
        want = cn(x, t, caps, [ctl, ctl], conditioning_scale=0.7)
        want_out = tr(x, t, caps, controlnet_block_samples=want, return_dict=False)[0]
        plain = tr(x, t, caps, return_dict=False)[0]
        hook = C.ControlHook(ours, ours_t, x, ctl, 0.7)
        out = ours_t.forward_with_context(x, t, ours_t.encode_context(caps), hooks=[hook])
    assert sorted(hook._hints) == sorted(want) == [0, 2]
    for k, v in want.items():
        assert v.norm() > 1.0  # the hints are not zero
        assert rel_err(hook._hints[k], v) <= 1e-5
    for a, b, p in zip(out, want_out, plain):
        assert rel_err(b, p) > 1e-2  # the control changes the output
        assert rel_err(a, b) <= 1e-5


def test_shares_the_transformers_modules_and_owns_only_control_weights(tiny):
    tr, ours_t = tiny
    ours = C.from_diffusers(diffusers_controlnet("2.1", tr), ours_t)
    names = [n for n, _ in ours.named_parameters()]
    assert names and all(
        n.startswith(("control_layers.", "control_all_x_embedder.", "control_noise_refiner.")) for n in names
    )
    assert not any(p is q for p in ours.parameters() for q in ours_t.parameters())


# ---- loading -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_folder_and_single_file_give_bit_identical_weights(tiny, layout, tmp_path):
    from safetensors.torch import save_file

    tr, ours_t = tiny
    cn = diffusers_controlnet(layout, tr, seed=9)
    cn.save_pretrained(tmp_path / "folder")
    # the single-file release: the control weights only, no config (2.0 also carries a control_noise_refiner that
    # the conversion drops; give it an all-zero before_proj as the release's)
    sd = {k: v.contiguous() for k, v in cn.state_dict().items() if not k.startswith(SHARED)}
    if layout == "2.0":
        extra = C.ControlBlock(ours_t.config, 0).state_dict()
        sd.update({f"control_noise_refiner.0.{k}": torch.zeros_like(v) for k, v in extra.items()})
    save_file(sd, tmp_path / "release.safetensors")
    a = C.load_controlnet(tmp_path / "folder", ours_t)
    # 4 main layers fit no released layout (tests/test_controlnet_variants.py loads those on 30 layers): the file is
    # refused unless config= says where its layers go
    with pytest.raises(C.ControlNetError, match="match no released ControlNet layout"):
        C.load_controlnet(tmp_path / "release.safetensors", ours_t)
    b = C.load_controlnet(tmp_path / "release.safetensors", ours_t, config=dict(cn.config))
    assert a.config == b.config
    assert a.config.layout == layout
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
        assert torch.equal(sa[k], cn.state_dict()[k]), k


def test_loader_errors_name_the_problem(tiny, tmp_path):
    from zimage_core.config import ZImageConfig

    tr, ours_t = tiny
    cn = diffusers_controlnet("1.0", tr)
    cn.save_pretrained(tmp_path / "cn")
    other = ZImageTransformer(ZImageConfig(dim=96, n_layers=4, n_heads=2, axes_dims=(16, 16, 16), cap_feat_dim=16))
    with pytest.raises(C.ControlNetError, match="dim: controlnet 64 vs transformer 96"):
        C.load_controlnet(tmp_path / "cn", other)
    (tmp_path / "x.ckpt").write_bytes(b"0")
    with pytest.raises(C.ControlNetError, match="pickle"):
        C.load_controlnet(tmp_path / "x.ckpt", ours_t)


# ---- the pipelines -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_random_pipeline(tmp_path_factory.mktemp("cnpipe") / "random", seed=3)


@pytest.fixture(scope="module")
def ours(folder):
    return ZImage.from_pretrained(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def base(folder):
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)


def guide(w, h, box=(0.2, 0.3, 0.6, 0.8)):
    im = Image.new("RGB", (w, h), (0, 0, 0))
    ImageDraw.Draw(im).ellipse([box[0] * w, box[1] * h, box[2] * w, box[3] * h], fill=(255, 255, 255))
    return im


def pipeline_pair(ours, base, layout, tmp_path, inpaint=False):
    from diffusers import ZImageControlNetInpaintPipeline, ZImageControlNetPipeline

    cn = diffusers_controlnet(layout, base.transformer, seed=21, places=[0, 1])
    cn.save_pretrained(tmp_path / f"cn{layout}")
    cls = ZImageControlNetInpaintPipeline if inpaint else ZImageControlNetPipeline
    theirs = cls(**base.components, controlnet=cn)
    theirs.set_progress_bar_config(disable=True)
    return theirs, C.load_controlnet(tmp_path / f"cn{layout}", ours.transformer)


PIPE_CASES = {
    "cfg_off": dict(cfg_scale=1.0, width=64, height=64),
    "cfg_on": dict(cfg_scale=3.0, width=64, height=64, negative_prompt="dark blurry picture"),
    "non_square": dict(cfg_scale=2.5, width=96, height=160),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", list(PIPE_CASES))
def test_controlnet_pipeline_latents_match_diffusers(ours, base, layout, case, tmp_path):
    kw = PIPE_CASES[case]
    theirs, cn = pipeline_pair(ours, base, layout, tmp_path)
    g = guide(kw["width"], kw["height"])
    prompt = "a white circle"
    res = ours.generate(
        prompt, seed=7, steps=3, shift=SHIFT, output_type="latent", cfg_normalization=0.0, cfg_truncation=1.0,
        controlnets=[C.ControlNetInput(cn, g, weight=0.6)], **kw,
    )  # fmt: skip
    want = theirs(
        prompt=prompt, negative_prompt=kw.get("negative_prompt"), width=kw["width"], height=kw["height"],
        num_inference_steps=3, guidance_scale=kw["cfg_scale"] - 1.0, control_image=g,
        controlnet_conditioning_scale=0.6, generator=torch.Generator("cpu").manual_seed(7), output_type="latent",
    ).images  # fmt: skip
    plain = ours.generate(prompt, seed=7, steps=3, shift=SHIFT, output_type="latent", cfg_normalization=0.0, **kw)
    assert res.latents.shape == want.shape
    assert rel_err(plain.latents, want) > 1e-3  # the ControlNet changed the result
    assert rel_err(res.latents, want) <= 1e-5
    assert res.stats["controlnet"][0]["controlnet_forwards"] == 3


@pytest.mark.parametrize("layout", ["2.0", "2.1"])
def test_controlnet_inpaint_pipeline_latents_match_diffusers(ours, base, layout, tmp_path):
    theirs, cn = pipeline_pair(ours, base, layout, tmp_path, inpaint=True)
    w, h = 64, 96
    g = guide(w, h)
    image = Image.new("RGB", (w, h), (200, 40, 40))
    ImageDraw.Draw(image).rectangle([10, 10, 40, 50], fill=(20, 200, 60))
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).rectangle([0, 40, 63, 95], fill=255)
    spec = C.ControlNetInput(cn, g, weight=0.8, inpaint_image=image, mask_image=mask)
    res = ours.generate("x", seed=3, steps=3, shift=SHIFT, cfg_scale=2.0, width=w, height=h, output_type="latent",
                        cfg_normalization=0.0, controlnets=[spec])  # fmt: skip
    want = theirs(
        prompt="x", width=w, height=h, num_inference_steps=3, guidance_scale=1.0, control_image=g, image=image,
        mask_image=mask, controlnet_conditioning_scale=0.8, generator=torch.Generator("cpu").manual_seed(3),
        output_type="latent",
    ).images  # fmt: skip
    no_mask = ours.generate("x", seed=3, steps=3, shift=SHIFT, cfg_scale=2.0, width=w, height=h, output_type="latent",
                            cfg_normalization=0.0, controlnets=[C.ControlNetInput(cn, g, weight=0.8)])  # fmt: skip
    assert rel_err(no_mask.latents, want) > 1e-3  # the inpaint conditioning channels matter
    assert rel_err(res.latents, want) <= 1e-5


# ---- controlMode, window, weight 0, several ControlNets, caches --------------------------------------------------


def hook_forward(ours_t, x, caps, hooks):
    t = torch.full((len(x),), 0.4)
    with torch.no_grad():
        return ours_t.forward_with_context(x, t, ours_t.encode_context(caps), hooks=hooks)


def test_controlnet_mode_adds_hints_to_the_conditional_half_only(tiny):
    tr, ours_t = tiny
    cn = C.from_diffusers(diffusers_controlnet("2.1", tr), ours_t)
    x, caps, ctl = model_inputs(33)
    x = [x[0], x[0]]  # a CFG batch: the same latent with the positive (row 0) and the negative caption (row 1)
    plain = hook_forward(ours_t, x, caps, [])
    both = hook_forward(ours_t, x, caps, [C.ControlHook(cn, ours_t, x, ctl, 0.9)])
    cond = hook_forward(ours_t, x, caps, [C.ControlHook(cn, ours_t, x, ctl, 0.9, rows=[0])])
    assert rel_err(cond[0], both[0]) <= 1e-5  # the conditional row gets the same hints as in balanced mode
    assert torch.equal(cond[1], plain[1])  # the unconditional row gets none
    assert rel_err(both[1], plain[1]) > 1e-2


def test_prompt_mode_scales_the_kth_of_n_hints_by_0825_power(tiny):
    tr, ours_t = tiny
    dcn = diffusers_controlnet("2.0", tr, places=[0, 1, 3])
    cn = C.from_diffusers(dcn, ours_t)
    x, caps, ctl = model_inputs(33)
    scales = C.layer_scales("prompt", 3)
    assert scales == [0.825**2, 0.825, 1.0]
    hook = C.ControlHook(cn, ours_t, x, ctl, 0.5, scales)
    hook_forward(ours_t, x, caps, [hook])
    with torch.no_grad():
        want = dcn(x, torch.full((2,), 0.4), caps, [ctl, ctl], conditioning_scale=0.5)
    for k, place in enumerate([0, 1, 3]):
        assert rel_err(hook._hints[place], want[place] * 0.825 ** (2 - k)) <= 1e-5


def test_several_controlnets_add_their_hints(tiny):
    tr, ours_t = tiny
    d1, d2 = diffusers_controlnet("1.0", tr, seed=1), diffusers_controlnet("2.1", tr, seed=2, places=[0, 1])
    c1, c2 = C.from_diffusers(d1, ours_t), C.from_diffusers(d2, ours_t)
    x, caps, _ = model_inputs(16)
    g = torch.Generator().manual_seed(4)
    k1, k2 = torch.randn(16, 1, 8, 12, generator=g), torch.randn(33, 1, 8, 12, generator=g)
    out = hook_forward(ours_t, x, caps, [C.ControlHook(c1, ours_t, x, k1, 0.5), C.ControlHook(c2, ours_t, x, k2, -0.7)])
    t = torch.full((2,), 0.4)
    with torch.no_grad():
        h1 = d1(x, t, caps, [k1, k1], conditioning_scale=0.5)
        h2 = d2(x, t, caps, [k2, k2], conditioning_scale=-0.7)
        total = {k: h1.get(k, 0) + h2.get(k, 0) for k in set(h1) | set(h2)}
        want = tr(x, t, caps, controlnet_block_samples=total, return_dict=False)[0]
    for a, b in zip(out, want):
        assert rel_err(a, b) <= 1e-5


@pytest.fixture(scope="module")
def cn_pipe(ours, base, tmp_path_factory):
    cn = diffusers_controlnet("2.1", base.transformer, seed=31, places=[0, 1])
    path = tmp_path_factory.mktemp("cn21")
    cn.save_pretrained(path)
    return C.load_controlnet(path, ours.transformer)


def run(ours, *cns, steps=6, cfg_scale=2.0, callback=None, **kw):
    return ours.generate(
        "a white circle", seed=5, steps=steps, shift=SHIFT, cfg_scale=cfg_scale, width=64, height=64,
        output_type="latent", cfg_normalization=0.0, controlnets=list(cns), step_callback=callback, **kw,
    )  # fmt: skip


def trajectory(ours, *cns, **kw):
    xs = []
    run(ours, *cns, callback=lambda info: xs.append(info["x"].clone()), **kw)
    return xs


def test_window_runs_the_controlnet_only_inside_it(ours, cn_pipe):
    g = guide(64, 64)
    res = run(ours, C.ControlNetInput(cn_pipe, g, weight=1.0, start=2, end=5))
    st = res.stats["controlnet"][0]
    assert st["controlnet_forwards"] == 3 and st["steps"] == [2, 3, 4]
    assert st["controlnet_skipped"] == 3
    # definition: before the window the trajectory is the no-ControlNet one; up to its end, the full-window one
    none = trajectory(ours)
    late = trajectory(ours, C.ControlNetInput(cn_pipe, g, weight=1.0, start=2))
    early = trajectory(ours, C.ControlNetInput(cn_pipe, g, weight=1.0, end=3))
    full = trajectory(ours, C.ControlNetInput(cn_pipe, g, weight=1.0))
    for i in range(2):
        assert torch.equal(late[i], none[i])
    assert rel_err(late[2], none[2]) > 1e-4
    for i in range(3):
        assert torch.equal(early[i], full[i])
    assert rel_err(early[3], full[3]) > 1e-4


def test_weight_zero_equals_no_controlnet_and_runs_nothing(ours, cn_pipe):
    res = run(ours, C.ControlNetInput(cn_pipe, guide(64, 64), weight=0.0))
    assert torch.equal(res.latents, run(ours).latents)
    assert res.stats["controlnet"][0]["controlnet_forwards"] == 0


def test_controlnet_mode_without_cfg_equals_balanced_and_differs_with_cfg(ours, cn_pipe):
    g = guide(64, 64)
    for cfg, same in ((1.0, True), (3.0, False)):
        a = run(ours, C.ControlNetInput(cn_pipe, g, mode="controlnet"), cfg_scale=cfg).latents
        b = run(ours, C.ControlNetInput(cn_pipe, g, mode="balanced"), cfg_scale=cfg).latents
        assert torch.equal(a, b) if same else rel_err(a, b) > 1e-4


def test_bad_inputs_are_request_errors(ours, cn_pipe):
    from zimage_core.errors import RequestError

    g = guide(64, 64)
    for spec, fieldname in (
        (C.ControlNetInput(cn_pipe, g, mode="strong"), "controlnets[0].mode"),
        (C.ControlNetInput(cn_pipe, g, weight=5.0), "controlnets[0].weight"),
        (C.ControlNetInput(cn_pipe, g, start=4, end=2), "controlnets[0].start"),
        (C.ControlNetInput(cn_pipe, "not-an-image"), "controlnets[0].guide_image"),
        (C.ControlNetInput("path", g), "controlnets[0].model"),
    ):
        with pytest.raises(RequestError) as e:
            run(ours, spec)
        assert e.value.field == fieldname


def test_step_cache_with_controlnet_adds_hints_on_computed_layers(ours, cn_pipe):
    from zimage_core.cache import CacheConfig

    g = guide(64, 64)
    spec = C.ControlNetInput(cn_pipe, g, weight=1.0)
    ref = run(ours, spec, steps=8)
    # a cache that never reuses computes every layer through the hook chain: identical to no cache
    never = CacheConfig.for_method("fb", threshold=0.0)
    assert torch.equal(run(ours, spec, steps=8, cache=never).latents, ref.latents)
    # one that reuses: the ControlNet still runs at every step (its hints reach the computed head layer)
    some = CacheConfig.for_method("fb", threshold=10.0)
    res = run(ours, spec, steps=8, cache=some)
    st, reused = res.stats["controlnet"][0], len(res.stats["cache"][0]["reused_steps"])
    assert st["controlnet_forwards"] == 8 and reused > 0
    # FBCache computes layer 0 (the head) on a reused step: only the control layer of place 0 runs then
    n = len(cn_pipe.config.control_layers_places)
    assert n == 2 and st["control_layers_run"] == n * (8 - reused) + reused
    nocn = run(ours, steps=8, cache=some)
    assert rel_err(res.latents, nocn.latents) > 1e-3


# ---- the request's controlNet[] ----------------------------------------------------------------------------------


def b64png(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_request_controlnet_runs_through_the_store_like_generate(ours, cn_pipe):
    from tests.helpers import image_request

    C.store_for(ours).add("test:cn21", cn_pipe)
    g = guide(128, 128)
    entry = {"model": "test:cn21", "guideImage": "data:image/png;base64," + b64png(g), "weight": 0.8,
             "controlMode": "controlnet", "startStepPercentage": 25, "endStep": 3}  # fmt: skip
    req = image_request(positivePrompt="a white circle", width=128, height=128, steps=4, CFGScale=2.0, seed=9,
                        outputType="base64Data", outputFormat="PNG", controlNet=[entry])  # fmt: skip
    out = ours.infer(req)
    assert len(out) == 1
    import base64
    import io

    import numpy as np

    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(out[0]["imageBase64Data"]))).convert("RGB"))
    spec = C.ControlNetInput(cn_pipe, g, weight=0.8, start=1, end=3, mode="controlnet")  # floor(25·4/100) = 1
    want = ours.generate("a white circle", width=128, height=128, steps=4, cfg_scale=2.0, seed=9, controlnets=[spec])
    assert np.array_equal(got, np.asarray(want.images[0].convert("RGB")))
    assert want.stats["controlnet"][0]["steps"] == [1, 2]


def test_request_controlnet_errors_name_the_field(ours, cn_pipe):
    from tests.helpers import image_request
    from zimage_core.errors import RequestError

    C.store_for(ours).add("test:cn21", cn_pipe)
    ok = {"model": "test:cn21", "guideImage": b64png(guide(128, 128))}
    cases = (
        ({**ok, "model": "nope"}, "controlNet[0].model"),
        ({**ok, "guideImage": "bm90IGFuIGltYWdl"}, "controlNet[0].guideImage"),
        ({**ok, "weight": 4.5}, "controlNet[0].weight"),
        ({**ok, "controlMode": "strong"}, "controlNet[0].controlMode"),
        ({**ok, "startStep": 3, "endStep": 2}, "controlNet[0].startStep"),
    )
    for entry, fieldname in cases:
        req = image_request(positivePrompt="a circle", width=128, height=128, steps=4, controlNet=[entry])
        with pytest.raises(RequestError) as e:
            ours.infer(req)
        assert e.value.field == fieldname, (entry, e.value)


# ---- the op switch -----------------------------------------------------------------------------------------------


@pytest.mark.interpret
def test_control_blocks_run_the_fused_kernels_within_tolerance(tiny, monkeypatch):
    from tests.tolerance import assert_close_to_ref
    from zimage_kernels import attention

    tr, _ = tiny
    x, caps, ctl = model_inputs(33)
    t = torch.full((2,), 0.4)
    launched = []
    real = attention._launch
    monkeypatch.setattr(attention, "_launch", lambda *a, **k: launched.append(1) or real(*a, **k))

    def hints(backend, dtype):
        theirs = copy.deepcopy(tr).to(dtype)
        model = ZImageTransformer.from_diffusers(theirs, kernel_backend=backend)
        net = C.from_diffusers(diffusers_controlnet("2.1", theirs).to(dtype), model)
        xs, k = [xi.to(dtype) for xi in x], ctl.to(dtype)
        hook = C.ControlHook(net, model, xs, k, 0.7)
        with torch.no_grad():
            model.forward_with_context(xs, t.to(dtype), model.encode_context([c.to(dtype) for c in caps]), hooks=[hook])
        return torch.cat([h.reshape(-1) for h in hook._hints.values()]).double()

    exact = hints("torch", torch.float64)
    eager = hints("torch", torch.float32)
    n_main = len(launched)
    fused = hints("triton", torch.float32)
    assert n_main == 0 and len(launched) > 0
    assert_close_to_ref(fused, exact, eager, "controlnet 2.1 hints")


def test_controlnet_for_another_transformer_is_a_request_error(ours, tiny):
    from zimage_core.errors import RequestError

    tr, ours_t = tiny  # 4 main layers; the pipeline's transformer has 2
    other = C.from_diffusers(diffusers_controlnet("1.0", tr), ours_t)
    with pytest.raises(RequestError, match="control_layers_places") as e:
        run(ours, C.ControlNetInput(other, guide(64, 64)))
    assert e.value.field == "controlnets[0].model"
